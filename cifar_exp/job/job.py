"""One training job from a checked config: hold its run folder, read what it resumes, load
the data, build the parts, open (or reopen) its MLflow run, train, log the result, and say
in one line what failed if the store or the disk did. Bad input is refused before a run
is opened, so none is left RUNNING, and before the run folder is written to.

It knows nothing of Hydra: the entry point passes what Hydra decided as a JobContext."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf

from cifar_exp.config import validate
from cifar_exp.data import CifarData, limit_test_set, load_cifar
from cifar_exp.errors import CheckpointError, RecordFailure, Stopped
from cifar_exp.job import checkpoint, run_folder
from cifar_exp.job.search import trial_reporter
from cifar_exp.job.stop import StopRequest
from cifar_exp.tracking.naming import PARENT_RUN_ENV, command_line, git_tags
from cifar_exp.tracking.redact import redact, redacted
from cifar_exp.tracking.runs import (
    RUN_DIR_TAG,
    NoTracking,
    RunTracker,
    close_abandoned_runs,
    data_inputs,
    flatten,
    where_to_see,
)
from cifar_exp.tracking.store import check_tracking_uri, open_experiment, resumable_run, sqlite_path
from cifar_exp.training import distributed
from cifar_exp.training.build import build_parts, device_name, resolve_device, select_gpu
from cifar_exp.training.loop import LoopState, TrainResult, train
from cifar_exp.training.parts import Parts
from cifar_exp.training.timeline import Timeline
from cifar_exp.world import SINGLE, World, check_batch_size, current_world

if TYPE_CHECKING:
    from cifar_exp.training.packing import Pack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobContext:
    """What the launcher decided for this job."""

    folder: Path  # its output folder
    overrides: tuple[str, ...] = ()  # the command-line overrides that made it
    run_name: str = "run"
    job_number: int | None = None  # its number within a sweep; None for a single run
    hydra: DictConfig | None = None  # Hydra's own config, recorded beside the job's
    pack: Pack | None = None  # a packed sweep's: the members that take their steps together
    member: int = 0  # this job's place in its pack


class Resumed(NamedTuple):
    path: Path
    state: dict[str, Any]


def run_job(cfg: DictConfig, context: JobContext) -> TrainResult:
    """Check `cfg`, set up the device (and the process group under torchrun), and train.
    Under torchrun every rank trains its slice of each batch; rank 0 alone holds the run
    folder, tracks and checkpoints."""
    timeline = Timeline.for_job()
    validate(cfg)
    world = current_world()
    check_batch_size(cfg.batch_size, world)
    # A pack's members share one device; the packs of a sweep take the GPUs in turn.
    slot = context.job_number if context.pack is None else context.pack.index
    device = resolve_device(distributed.device_for(cfg.device, world), slot)
    select_gpu(device)
    with distributed.process_group(world, device):
        return train_job(cfg, device, context, world, timeline)


def train_job(cfg: DictConfig, device: torch.device, context: JobContext,
              world: World = SINGLE, timeline: Timeline | None = None) -> TrainResult:
    """run_job's work once the device (and process group) are set up; `timeline` counts
    where its time goes (a new one by default)."""
    timeline = timeline or Timeline()
    check_tracking_uri(cfg.tracking.uri)
    config = redacted(flatten(OmegaConf.to_container(cfg, resolve=True)))
    # Rank 0's output folder holds the job's checkpoint, for every rank.
    folder = distributed.from_main(context.folder) if world.distributed else context.folder
    # A Hydra job owns its output folder; a caller outside Hydra owns the current one.
    owns_folder = world.is_main and context.hydra is not None
    with contextlib.ExitStack() as held:
        if owns_folder:
            held.enter_context(run_folder.folder_lock(folder))
        resumed = load_resumed(cfg, config, folder)
        path = None
        if cfg.checkpoint.enabled:
            path = run_folder.checkpoint_destination(
                cfg.checkpoint.path, resumed.path if resumed else None, folder,
                sqlite_path(cfg.tracking.uri))
            if world.is_main:
                run_folder.check_writable(path)
                held.enter_context(run_folder.checkpoint_lock(path))
        with timeline.phase("data"):
            data = load_cifar(cfg.data.name, cfg.data.root, cfg.data.download,
                              cfg.data.verify, cfg.data.manifest).to(device)
            if cfg.eval_images is not None:
                data = limit_test_set(data, cfg.eval_images)
        with timeline.phase("build"):
            parts = build_parts(cfg, data, world)
        if context.pack is not None:  # the pack shows one progress bar for its members,
            # and its stacked step runs op by op (the run's tags say what ran)
            parts.settings.progress = False
            parts.settings.compile, parts.settings.cuda_graph = "none", False
        loop_state = None
        if resumed is not None:
            with timeline.phase("build"):
                loop_state = checkpoint.restore(resumed.state, resumed.path,
                                                parts.states())
            checkpoint.check_loop(loop_state, resumed.path, data.train_labels.numel())
        with timeline.phase("tracking"):
            if world.is_main and resumed is None:  # the store's schema and the experiment,
                open_experiment(cfg.tracking.uri, cfg.tracking.experiment)  # e.g. one deleted
            if owns_folder:
                close_abandoned_runs(cfg.tracking.uri, cfg.tracking.experiment, folder,
                                     keep=resumed.state["tracking"]["run_id"] if resumed else "")
                run_folder.record_config(folder, cfg, context.hydra, context.overrides,
                                         replace=resumed is None)
        return _tracked(cfg, device, world, context, folder, config, data, parts,
                        resumed, loop_state, path, timeline)


def _tracked(cfg: DictConfig, device: torch.device, world: World,
             context: JobContext, folder: Path, config: dict[str, Any], data: CifarData,
             parts: Parts, resumed: Resumed | None, loop_state: LoopState | None,
             path: Path | None, timeline: Timeline) -> TrainResult:
    """Train `experiment` inside its MLflow run, then log the weights and the model; say
    where the job's time went."""
    tags = {"command": command_line(),
            "overrides": " ".join(context.overrides),
            "device": device_name(device),
            # What `auto` became on this device (the params hold the config as written).
            "amp": parts.settings.amp,
            "compile": parts.settings.compile,
            "cuda_graph": str(parts.settings.cuda_graph).lower(),
            "processes": str(world.size),  # 1, or the data-parallel ranks of the job
            "data": cfg.data.name,
            RUN_DIR_TAG: str(folder),
            **git_tags()}
    tracking: dict[str, Any] = {}
    if resumed is not None:
        tracking = {"run_id": resumed.state["tracking"]["run_id"],
                    "pending": resumed.state["tracking"]["pending"]}
        # The run keeps the tags it started with; these say where it was taken up.
        tags = {"resumed_from_step": str(resumed.state["step"]), RUN_DIR_TAG: str(folder)}
    tracker_of_rank = (RunTracker(cfg.tracking.uri, cfg.tracking.experiment, context.run_name,
                                  tags, cfg.tracking.flush_seconds,
                                  os.environ.get(PARENT_RUN_ENV), **tracking,
                                  system_metrics_seconds=cfg.tracking.system_metrics_seconds)
                       if world.is_main else NoTracking())
    checkpointer = None
    # A pack's members share the launcher's stop request: signals reach the main thread.
    stop_request = (StopRequest() if context.pack is None
                    else contextlib.nullcontext(context.pack.stop))
    try:
        with contextlib.ExitStack() as run_scope:
            with timeline.phase("tracking"):
                stop = run_scope.enter_context(stop_request)
                tracker = run_scope.enter_context(tracker_of_rank)
                _open_record(cfg, context, tracker, resumed, config, data)
            if path is not None:
                every = cfg.checkpoint.every or 0
                checkpointer = checkpoint.Checkpointer(
                    path, every, parts.states(), config, tracker.checkpoint_state,
                    saved_step=resumed.state["step"] if resumed else None)
                log.info("checkpoints to %s %s", path,
                         f"every {every} steps and at the end" if every else "at the end")
            else:
                log.info("no checkpoints (checkpoint.enabled=false): a stopped run cannot be "
                         "resumed")
            loop_start = time.perf_counter()
            result = train(parts, data, tracker,
                           checkpoints=checkpointer if world.is_main else None,
                           resume=loop_state, stop=stop, world=world,
                           on_evaluation=trial_reporter(cfg) if not world.distributed
                           else None,
                           make_step=(context.pack.step_maker(context.member)
                                      if context.pack is not None else None))
            # The loop's time less its evaluations and checkpoints: its steps.
            checkpoint_seconds = checkpointer.seconds if checkpointer else 0.0
            timeline.add("checkpoints", checkpoint_seconds)
            timeline.add("evaluation", result.eval_seconds)
            timeline.add("training", time.perf_counter() - loop_start - result.eval_seconds
                         - checkpoint_seconds)
            with timeline.phase("model_logging"):
                tracker.log_state_dict(parts.model, "weights.pt")
                if parts.ema is not None:
                    tracker.log_state_dict(parts.ema.model, "ema_weights.pt")
                if cfg.tracking.log_model and not (resumed and tracker.has_models()):
                    tracker.log_models(parts.evaluated, parts.augmentation,
                                       data.test_images, data.classes, cfg.steps,
                                       cfg.tracking.registered_model_name)
            tracker.log_metrics(timeline.metrics(), cfg.steps)  # the run's closing aside
            closing_start = time.perf_counter()
        timeline.add("tracking", time.perf_counter() - closing_start)
    except Stopped as stopped:
        if stopped.step is not None:
            stopped.hint = stop_hint(context, cfg, path, checkpointer, stopped.step)
        raise
    log.info("final precision @ 1 = %.4f (%.0f examples/sec, %.1f s training, %.1f s "
             "writing checkpoints)", result.precision, result.examples_per_sec,
             result.train_seconds, checkpoint_seconds)
    log.info("time: %s", timeline.summary())
    failure = record_failure(cfg, context, tracker, checkpointer, path)
    if failure is not None:
        raise RecordFailure(failure)
    if world.is_main:
        log.info("MLflow run %s: %s", tracker.run_id,
                 where_to_see(cfg.tracking.uri, tracker.experiment_id, tracker.run_id))
    return result


def _open_record(cfg: DictConfig, context: JobContext, tracker: RunTracker | NoTracking,
                 resumed: Resumed | None, config: dict[str, Any], data: CifarData) -> None:
    """Say which MLflow run this is; a new one gets its params, inputs and config."""
    if resumed is not None:
        log.info("MLflow run %s resumed from step %d of %s (the store holds points up "
                 "to step %d: none is written twice)", tracker.run_id,
                 resumed.state["step"], resumed.path, tracker.stored_up_to)
        return
    log.info("MLflow run %s (%s) in %s", tracker.run_id, context.run_name,
             redact(cfg.tracking.uri))
    tracker.log_params(config)
    tracker.log_inputs(data_inputs(cfg.data.name, cfg.data.root))
    tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    tracker.log_text("\n".join(context.overrides) + "\n", "overrides.txt")


def stop_hint(context: JobContext, cfg: DictConfig, path: Path | None,
              checkpointer: checkpoint.Checkpointer | None, step: int) -> str:
    """How to carry on after a stop at `step`: where the checkpoint is and the command."""
    if path is None:
        return "no checkpoint was written (checkpoint.enabled=false)"
    if checkpointer is None or checkpointer.saved_step is None:
        return f"no checkpoint could be written to {path}"
    held = ("" if checkpointer.saved_step == step
            else f" (it could not be written at step {step}: it holds step "
                 f"{checkpointer.saved_step})")
    return f"checkpoint {path}{held}; continue with: {resume_command(context, path)}"


def record_failure(cfg: DictConfig, context: JobContext, tracker: RunTracker | NoTracking,
                   checkpointer: checkpoint.Checkpointer | None, path: Path | None) -> str | None:
    """One line on what of the run's record could not be written and how to finish it;
    None when everything was written."""
    parts = []
    if checkpointer is not None and checkpointer.failures:
        steps = ", ".join(str(step) for step, _ in checkpointer.failures[:5])
        held = (f"it holds step {checkpointer.saved_step}" if checkpointer.saved_step
                else "none was written")
        parts.append(f"checkpoint {path} could not be written at step {steps} "
                     f"({checkpointer.failures[-1][1]}); {held}")
    if tracker.failures:
        parts.append(f"the MLflow store {redact(cfg.tracking.uri)} failed "
                     f"({tracker.failure_cause or 'see the log'}); not written: "
                     f"{', '.join(tracker.failures)}")
        if checkpointer is not None and checkpointer.saved_step == cfg.steps:
            parts.append(f"the checkpoint keeps what the store did not take: once the store "
                         f"answers, {resume_command(context, path)} writes it and closes "
                         f"run {tracker.run_id}")
        else:
            parts.append("what the store did not take is lost (no checkpoint of the last "
                         "step)")
    return "; ".join(parts) if parts else None


def resume_command(context: JobContext, path: Path) -> str:
    """The command that continues this job from `path`."""
    kept = [o for o in context.overrides if not o.startswith(("resume=", "hydra.run.dir="))]
    default = context.folder / run_folder.FILENAME
    single_hydra_run = context.hydra is not None and context.job_number is None
    where = ([f"hydra.run.dir={context.folder}", "resume=true"]
             if single_hydra_run and path == default else [f"resume={path}"])
    return redact(shlex.join(["python", "-m", "cifar_exp.run", *kept, *where]))


def load_resumed(cfg: DictConfig, config: dict[str, Any], folder: Path) -> Resumed | None:
    """The checkpoint `resume` names, read and checked against this config and the MLflow
    store before any data is read; None for a new run."""
    default = (Path(cfg.checkpoint.path).expanduser() if cfg.checkpoint.path
               else folder / run_folder.FILENAME)
    path = checkpoint.find_checkpoint(cfg.resume, default)
    if path is None:
        return None
    state = checkpoint.load_checkpoint(path)
    checkpoint.check_config(state, config, path)
    run = resumable_run(cfg.tracking.uri, state["tracking"]["run_id"])
    # A run whose last points the store did not take goes on even once finished.
    finished = run.info.status == "FINISHED" and not state["tracking"]["pending"]
    if state["step"] >= cfg.steps and finished:
        raise CheckpointError(f"{path}: run {run.info.run_id} already finished all "
                              f"{cfg.steps} steps; nothing to resume")
    return Resumed(path, state)
