"""One training job from a checked config, as a `Job` whose methods are its phases: place
it on its device, prepare (hold its run folder, read what it resumes, load the data, build
the parts), open its record (the MLflow run and the checkpoints), train, close the record,
and say in one line what failed if the store or the disk did. Bad input is refused before
a run is opened, so none is left RUNNING, and before the run folder is written to.

It knows nothing of Hydra or of launchers: the entry point passes what Hydra decided as a
JobContext, and a launcher that needs more (its own step, a shared stop, a device slot)
fills the context's LauncherHooks."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from omegaconf import DictConfig, OmegaConf

from cifar_exp.config import validate
from cifar_exp.data import limit_test_set, load_cifar
from cifar_exp.errors import CheckpointError, RecordFailure, Stopped
from cifar_exp.job import checkpoint, run_folder
from cifar_exp.job.search import trial_reporter
from cifar_exp.job.stop import StopRequest
from cifar_exp.tracking.class_results import Predictions
from cifar_exp.tracking.naming import PARENT_RUN_ENV, command_line, git_tags
from cifar_exp.tracking.redact import redact, redacted
from cifar_exp.tracking.runs import (
    RUN_DIR_TAG,
    NoTracking,
    RunTracker,
    close_abandoned_runs,
    data_inputs,
    flatten,
    serve_lines,
    where_to_see,
)
from cifar_exp.tracking.store import (
    check_tracking_uri,
    open_experiment,
    resumable_run,
    sqlite_path,
)
from cifar_exp.training import distributed
from cifar_exp.training.build import build_parts, device_name, resolve_device, select_gpu
from cifar_exp.training.loop import LoopState, TrainResult, train
from cifar_exp.training.timeline import TABLE_ARTIFACT, TOTAL_METRIC, Timeline
from cifar_exp.world import check_batch_size, current_world

if TYPE_CHECKING:
    import torch

    from cifar_exp.data import CifarData
    from cifar_exp.training.loop import StepMaker, StopCheck
    from cifar_exp.training.parts import Parts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LauncherHooks:
    """What a launcher may give its jobs beyond their configs. A job with none trains alone
    with its own step, signal handlers and GPU."""

    step_maker: StepMaker | None = None  # takes the job's steps (e.g. with other jobs')
    stop: StopCheck | None = None  # the launcher's stop request (signals reach its thread)
    device_slot: int | None = None  # which visible GPU (default: the job's number)
    shares_device: bool = False  # other jobs of this process share its device and console


@dataclass(frozen=True)
class JobContext:
    """What the launcher decided for this job."""

    folder: Path  # its output folder
    overrides: tuple[str, ...] = ()  # the command-line overrides that made it
    run_name: str = "run"
    job_number: int | None = None  # its number within a sweep; None for a single run
    hydra: DictConfig | None = None  # Hydra's own config, recorded beside the job's
    hooks: LauncherHooks = field(default_factory=LauncherHooks)


class Resumed(NamedTuple):
    path: Path
    state: dict[str, Any]


@dataclass
class Record:
    """Where a job's results go, kept together: its MLflow run (the tracker), its
    checkpoints, and what of them could not be written."""

    tracker: RunTracker | NoTracking
    path: Path | None  # the checkpoint file; None with checkpoint.enabled=false
    checkpointer: checkpoint.Checkpointer | None = None
    model_id: str = ""  # the served model's (`m-...`), once logged

    def stop_hint(self, step: int, resume_command: str) -> str:
        """How to carry on after a stop at `step`: where the checkpoint is and the command."""
        if self.path is None:
            return "no checkpoint was written (checkpoint.enabled=false)"
        saver = self.checkpointer
        if saver is None or saver.saved_step is None:
            return f"no checkpoint could be written to {self.path}"
        held = ("" if saver.saved_step == step
                else f" (it could not be written at step {step}: it holds step "
                     f"{saver.saved_step})")
        return f"checkpoint {self.path}{held}; continue with: {resume_command}"

    def failure(self, uri: str, steps: int, resume_command: str) -> str | None:
        """One line on what could not be written and how to finish it (with the store at
        `uri`, after `steps` steps); None when everything was written."""
        parts = []
        saver = self.checkpointer
        if saver is not None and saver.failures:
            at = ", ".join(str(step) for step, _ in saver.failures[:5])
            held = (f"it holds step {saver.saved_step}" if saver.saved_step
                    else "none was written")
            parts.append(f"checkpoint {self.path} could not be written at step {at} "
                         f"({saver.failures[-1][1]}); {held}")
        if self.tracker.failures:
            parts.append(f"the MLflow store {redact(uri)} failed "
                         f"({self.tracker.failure_cause or 'see the log'}); not written: "
                         f"{', '.join(self.tracker.failures)}")
            if saver is not None and saver.saved_step == steps:
                parts.append(f"the checkpoint keeps what the store did not take: once the "
                             f"store answers, {resume_command} writes it and closes run "
                             f"{self.tracker.run_id}")
            else:
                parts.append("what the store did not take is lost (no checkpoint of the "
                             "last step)")
        return "; ".join(parts) if parts else None


def run_job(cfg: DictConfig, context: JobContext) -> TrainResult:
    """Check `cfg` and train the job it describes (see Job)."""
    return Job(cfg, context).run()


class Job:
    """One training job. Under torchrun every rank trains its slice of each batch; rank 0
    alone holds the run folder, tracks and checkpoints."""

    def __init__(self, cfg: DictConfig, context: JobContext) -> None:
        self.cfg, self.context = cfg, context
        self.hooks = context.hooks
        self.timeline = Timeline.for_job()
        self.world = current_world()
        self.device: torch.device | None = None
        self.folder = context.folder
        self.config: dict[str, Any] = {}  # flattened and redacted: the run's params
        self.resumed: Resumed | None = None
        self.checkpoint_path: Path | None = None
        self.loop_state: LoopState | None = None
        self.checkpoint_seconds = 0.0

    @property
    def owns_folder(self) -> bool:
        """A Hydra job owns its output folder; a caller outside Hydra owns the current one."""
        return self.world.is_main and self.context.hydra is not None

    def run(self) -> TrainResult:
        """The whole job: place, prepare, train inside its record, report."""
        self.place()
        with distributed.process_group(self.world, self.device), \
                contextlib.ExitStack() as held:
            self.prepare(held)
            return self.train()

    def place(self) -> None:
        """Check the config and choose the device (and the GPU of a sweep's job)."""
        validate(self.cfg)
        check_batch_size(self.cfg.batch_size, self.world)
        slot = (self.hooks.device_slot if self.hooks.device_slot is not None
                else self.context.job_number)
        self.device = resolve_device(distributed.device_for(self.cfg.device, self.world), slot)
        select_gpu(self.device)

    def prepare(self, held: contextlib.ExitStack) -> None:
        """Everything before the record opens: the folder's lock, the checkpoint to resume
        and the one to write (locked), the data, the parts, the store's experiment. `held`
        keeps the locks until the job ends."""
        cfg, world = self.cfg, self.world
        check_tracking_uri(cfg.tracking.uri)
        self.config = redacted(flatten(OmegaConf.to_container(cfg, resolve=True)))
        # Rank 0's output folder holds the job's checkpoint, for every rank.
        if world.distributed:
            self.folder = distributed.from_main(self.context.folder)
        if self.owns_folder:
            held.enter_context(run_folder.folder_lock(self.folder))
        self.resumed = load_resumed(cfg, self.config, self.folder)
        if cfg.checkpoint.enabled:
            self.checkpoint_path = run_folder.checkpoint_destination(
                cfg.checkpoint.path, self.resumed.path if self.resumed else None, self.folder,
                sqlite_path(cfg.tracking.uri))
            if world.is_main:
                run_folder.check_writable(self.checkpoint_path)
                held.enter_context(run_folder.checkpoint_lock(self.checkpoint_path))
        self.data, self.parts = self.build()
        with self.timeline.phase("tracking"):
            if world.is_main and self.resumed is None:  # the store's schema and the
                open_experiment(cfg.tracking.uri, cfg.tracking.experiment)  # experiment
            if self.owns_folder:
                keep = self.resumed.state["tracking"]["run_id"] if self.resumed else ""
                close_abandoned_runs(cfg.tracking.uri, cfg.tracking.experiment, self.folder,
                                     keep=keep)
                run_folder.record_config(self.folder, cfg, self.context.hydra,
                                         self.context.overrides, replace=self.resumed is None)

    def build(self) -> tuple[CifarData, Parts]:
        """The data on the device, and the parts built for it (restored when resuming)."""
        cfg = self.cfg
        with self.timeline.phase("data"):
            data = load_cifar(cfg.data.name, cfg.data.root, cfg.data.download,
                              cfg.data.verify, cfg.data.manifest).to(self.device)
            if cfg.eval_images is not None:
                data = limit_test_set(data, cfg.eval_images)
        with self.timeline.phase("build"):
            parts = build_parts(cfg, data, self.world,
                                own_step=self.hooks.step_maker is None,
                                shares_console=self.hooks.shares_device)
            if self.resumed is not None:
                self.loop_state = checkpoint.restore(self.resumed.state, self.resumed.path,
                                                     parts.states())
        if self.loop_state is not None:
            checkpoint.check_loop(self.loop_state, self.resumed.path,
                                  data.train_labels.numel())
        return data, parts

    def train(self) -> TrainResult:
        """Train inside the job's record, close it, and say what could not be written."""
        record = Record(self.tracker(), self.checkpoint_path)
        try:
            with contextlib.ExitStack() as scope:
                with self.timeline.phase("tracking"):
                    stop = scope.enter_context(
                        StopRequest() if self.hooks.stop is None
                        else contextlib.nullcontext(self.hooks.stop))
                    record.tracker = scope.enter_context(record.tracker)
                    self.open_record(record)
                self.open_checkpoints(record)
                result = self.loop(record, stop)
                self.close(record, result)
                closing_start = time.perf_counter()
            self.timeline.add("tracking", time.perf_counter() - closing_start)
        except Stopped as stopped:
            if stopped.step is not None:
                stopped.hint = record.stop_hint(stopped.step,
                                                self.resume_command(record.path))
            raise
        self.report(record, result)
        return result

    def tracker(self) -> RunTracker | NoTracking:
        """The job's MLflow run (rank 0's): a new one, or the resumed run reopened."""
        cfg, parts = self.cfg, self.parts
        if not self.world.is_main:
            return NoTracking()
        tags = {"command": command_line(),
                "overrides": " ".join(self.context.overrides),
                "device": device_name(self.device),
                # What `auto` became on this device (the params hold the config as written).
                "amp": parts.settings.amp,
                "compile": parts.settings.compile,
                "cuda_graph": str(parts.settings.cuda_graph).lower(),
                "processes": str(self.world.size),  # 1, or the data-parallel ranks of the job
                "data": cfg.data.name,
                RUN_DIR_TAG: str(self.folder),
                **git_tags()}
        reopened: dict[str, Any] = {}
        if self.resumed is not None:
            reopened = {"run_id": self.resumed.state["tracking"]["run_id"],
                        "pending": self.resumed.state["tracking"]["pending"]}
            # The run keeps the tags it started with; these say where it was taken up.
            tags = {"resumed_from_step": str(self.resumed.state["step"]),
                    RUN_DIR_TAG: str(self.folder)}
        return RunTracker(cfg.tracking.uri, cfg.tracking.experiment, self.context.run_name,
                          tags=tags, flush_seconds=cfg.tracking.flush_seconds,
                          parent_run_id=os.environ.get(PARENT_RUN_ENV), **reopened,
                          system_metrics_seconds=cfg.tracking.system_metrics_seconds)

    def open_record(self, record: Record) -> None:
        """Say which MLflow run this is; a new one gets its params, inputs and config."""
        cfg, tracker, resumed = self.cfg, record.tracker, self.resumed
        if resumed is not None:
            log.info("MLflow run %s resumed from step %d of %s (the store holds points up "
                     "to step %d: none is written twice)", tracker.run_id,
                     resumed.state["step"], resumed.path, tracker.stored_up_to)
            return
        log.info("MLflow run %s (%s) in %s", tracker.run_id, self.context.run_name,
                 redact(cfg.tracking.uri))
        tracker.log_params(self.config)
        tracker.log_inputs(data_inputs(cfg.data.name, cfg.data.root))
        tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        tracker.log_text("\n".join(self.context.overrides) + "\n", "overrides.txt")

    def open_checkpoints(self, record: Record) -> None:
        """The record's checkpointer, which saves the parts with the tracker's state."""
        cfg, resumed = self.cfg, self.resumed
        if record.path is None:
            log.info("no checkpoints (checkpoint.enabled=false): a stopped run cannot be "
                     "resumed")
            return
        every = cfg.checkpoint.every or 0
        record.checkpointer = checkpoint.Checkpointer(
            record.path, every, self.parts.states(), self.config,
            record.tracker.checkpoint_state,
            saved_step=resumed.state["step"] if resumed else None)
        log.info("checkpoints to %s %s", record.path,
                 f"every {every} steps and at the end" if every else "at the end")

    def loop(self, record: Record, stop: StopCheck) -> TrainResult:
        """The training loop, its time split into steps, evaluations and checkpoints."""
        loop_start = time.perf_counter()
        result = train(self.parts, self.data, record.tracker,
                       checkpoints=record.checkpointer if self.world.is_main else None,
                       resume=self.loop_state, stop=stop, world=self.world,
                       on_evaluation=(trial_reporter(self.cfg) if not self.world.distributed
                                      else None),
                       make_step=self.hooks.step_maker)
        # The loop's time less its evaluations and checkpoints: its steps.
        self.checkpoint_seconds = record.checkpointer.seconds if record.checkpointer else 0.0
        self.timeline.add("checkpoints", self.checkpoint_seconds)
        self.timeline.add("evaluation", result.eval_seconds)
        self.timeline.add("training", time.perf_counter() - loop_start - result.eval_seconds
                          - self.checkpoint_seconds)
        return result

    def close(self, record: Record, result: TrainResult) -> None:
        """Log the final evaluation's results per class, the weights and the models, then
        the job's time split (the run's closing aside): its total as a metric, each phase
        in a small table."""
        cfg, parts, tracker, data = self.cfg, self.parts, record.tracker, self.data
        if result.predicted is not None:  # None: resumed after its last evaluation
            with self.timeline.phase("tracking"):
                tracker.log_class_results(Predictions(data.test_images, data.test_labels,
                                                      result.predicted, data.classes))
        with self.timeline.phase("model_logging"):
            tracker.log_state_dict(parts.model, "weights.pt")
            if parts.ema is not None:
                tracker.log_state_dict(parts.ema.model, "ema_weights.pt")
            if cfg.tracking.log_model:
                record.model_id = self.log_models(tracker)
        tracker.log_metrics({TOTAL_METRIC: self.timeline.breakdown()["total"]}, cfg.steps)
        tracker.log_text(self.timeline.table(), TABLE_ARTIFACT)

    def log_models(self, tracker: RunTracker | NoTracking) -> str:
        """Log the models, unless the resumed run has them already; the served one's id."""
        if self.resumed is not None and (logged := tracker.served_model_id()):
            return logged
        return tracker.log_models(self.parts.evaluated, self.parts.augmentation,
                                  self.data.test_images, self.data.classes, self.cfg.steps,
                                  self.cfg.tracking.registered_model_name)

    def report(self, record: Record, result: TrainResult) -> None:
        """The job's last lines; RecordFailure if its record could not be fully written."""
        log.info("final precision @ 1 = %.4f (%.0f examples/sec, %.1f s training, %.1f s "
                 "writing checkpoints)", result.precision, result.examples_per_sec,
                 result.train_seconds, self.checkpoint_seconds)
        log.info("time: %s", self.timeline.summary())
        failure = record.failure(self.cfg.tracking.uri, self.cfg.steps,
                                 self.resume_command(record.path))
        if failure is not None:
            raise RecordFailure(failure)
        if self.world.is_main:
            tracker, uri = record.tracker, self.cfg.tracking.uri
            for line in serve_lines(uri, record.model_id) if record.model_id else []:
                log.info("%s", line)
            log.info("MLflow run %s: %s", tracker.run_id,
                     where_to_see(uri, tracker.experiment_id, tracker.run_id))

    def resume_command(self, path: Path | None) -> str:
        """The command that continues this job from `path`."""
        context = self.context
        kept = [o for o in context.overrides if not o.startswith(("resume=", "hydra.run.dir="))]
        default = context.folder / run_folder.FILENAME
        single_hydra_run = context.hydra is not None and context.job_number is None
        where = ([f"hydra.run.dir={context.folder}", "resume=true"]
                 if single_hydra_run and path == default else [f"resume={path}"])
        return redact(shlex.join(["python", "-m", "cifar_exp.run", *kept, *where]))


def same_device_as_saved(saved: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """`config` with the checkpoint's `device` where both name the same device here
    (device=cpu resuming a device=auto run on a machine without a GPU), so that only a
    real change of device is refused."""
    import torch  # already loaded by then; imported here as the module's other uses are types

    def here(name: object) -> object:
        return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name

    mine, theirs = config.get("device"), saved.get("device")
    if mine != theirs and here(mine) == here(theirs):
        return {**config, "device": theirs}
    return config


def load_resumed(cfg: DictConfig, config: dict[str, Any], folder: Path) -> Resumed | None:
    """The checkpoint `resume` names, read and checked against this config and the MLflow
    store before any data is read; None for a new run."""
    default = (Path(cfg.checkpoint.path).expanduser() if cfg.checkpoint.path
               else folder / run_folder.FILENAME)
    path = checkpoint.find_checkpoint(cfg.resume, default)
    if path is None:
        return None
    state = checkpoint.load_checkpoint(path)
    checkpoint.check_config(state, same_device_as_saved(state["config"], config), path)
    run = resumable_run(cfg.tracking.uri, state["tracking"]["run_id"])
    # A run whose last points the store did not take goes on even once finished.
    finished = run.info.status == "FINISHED" and not state["tracking"]["pending"]
    if state["step"] >= cfg.steps and finished:
        raise CheckpointError(f"{path}: run {run.info.run_id} already finished all "
                              f"{cfg.steps} steps; nothing to resume")
    return Resumed(path, state)
