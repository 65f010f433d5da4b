"""Hydra entry point: compose -> build -> train -> return the final precision.

    python -m cifar_exp.run [overrides]          one run
    python -m cifar_exp.run -m key=a,b [...]     a sweep, one MLflow run per job
    python -m cifar_exp.run [the same overrides] hydra.run.dir=<its folder> resume=true

Exit codes: 0 done, 1 the loss diverged, 2 bad input, 130 / 143 stopped by SIGINT /
SIGTERM (after a checkpoint: resume=true goes on).
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any, NamedTuple

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cifar_exp import checkpoint, distributed
from cifar_exp.build import build_experiment, device_name, resolve_device, select_gpu
from cifar_exp.config import command_overrides, register_schema, validate
from cifar_exp.data import CifarData, load_cifar
from cifar_exp.errors import (
    CheckpointError,
    ConfigError,
    NonFiniteLoss,
    Stopped,
    UserError,
)
from cifar_exp.stop import StopRequest
from cifar_exp.tracking import (
    PARENT_RUN_ENV,
    NoTracking,
    RunTracker,
    check_tracking_uri,
    command_line,
    flatten,
    git_tags,
    resumable_run,
)
from cifar_exp.train import TrainResult, train

log = logging.getLogger(__name__)

register_schema()
git_tags()  # read once, when the code that will run is imported


def sweep_job_number() -> int | None:
    """This job's number within a multirun, None for a single run."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return HydraConfig.get().job.num


def run_name(cfg: DictConfig) -> str:
    """model-optimizer-steps, with the optimizer as chosen on the command line (sgd_decay);
    a sweep's jobs add their number: tf_cnn-sgd-3000 #2."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    model = choices.get("model", cfg.model.name)
    optimizer = choices.get("optimizer", cfg.optimizer.name)
    job_number = sweep_job_number()
    suffix = f" #{job_number}" if job_number is not None else ""
    return f"{model}-{optimizer}-{cfg.steps}{suffix}"


def task_overrides() -> list[str]:
    """The overrides that made this job (a sweep's job gets its own values)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def output_dir() -> Path:
    """The job's Hydra output folder (the current folder outside a Hydra app)."""
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()


def checkpoint_path(cfg: DictConfig, resumed_from: Path | None, folder: Path) -> Path:
    """Where this job writes its checkpoint: checkpoint.path if set, else the file it
    resumed from, else checkpoint.pt in its output folder `folder`."""
    if cfg.checkpoint.path:
        return Path(cfg.checkpoint.path).expanduser()
    return resumed_from or folder / checkpoint.FILENAME


def resume_command(path: Path) -> str:
    """The command that continues this job from `path`."""
    kept = [o for o in task_overrides() if not o.startswith(("resume=", "hydra.run.dir="))]
    default = output_dir() / checkpoint.FILENAME
    single_run = HydraConfig.initialized() and HydraConfig.get().mode.name == "RUN"
    where = ([f"hydra.run.dir={output_dir()}", "resume=true"] if single_run and path == default
             else [f"resume={path}"])
    return shlex.join(["python", "-m", "cifar_exp.run", *kept, *where])


class Resumed(NamedTuple):
    path: Path
    state: dict[str, Any]


def load_resumed(cfg: DictConfig, config: dict[str, Any], folder: Path) -> Resumed | None:
    """The checkpoint `resume` names, read and checked against this config and the MLflow
    store before any data is read; None for a new run."""
    path = checkpoint.find_checkpoint(cfg.resume, checkpoint_path(cfg, None, folder))
    if path is None:
        return None
    state = checkpoint.load_checkpoint(path)
    checkpoint.check_config(state, config, path)
    run = resumable_run(cfg.tracking.uri, state["tracking"]["run_id"])
    if state["step"] >= cfg.steps and run.info.status == "FINISHED":
        raise CheckpointError(f"{path}: run {run.info.run_id} already finished all "
                              f"{cfg.steps} steps; nothing to resume")
    return Resumed(path, state)


def limit_test_set(data: CifarData, count: int) -> CifarData:
    """`data` with only its first `count` test images (`eval_images`), said in the log."""
    available = data.test_images.shape[0]
    if count > available:
        raise ConfigError(f"eval_images={count} is more than the {available} test images; "
                          f"use at most {available}, or null for the whole test set")
    log.info("evaluating on the first %d of the %d test images (eval_images=%d): precision "
             "is not comparable with a run on the whole test set", count, available, count)
    return data.first_test_images(count)


def run_experiment(cfg: DictConfig) -> TrainResult:
    """Check `cfg`, load the data onto the device, build every part, train, and track the
    run in MLflow. Bad input fails before a run is opened, so none is left RUNNING. With
    `resume`, the parts and the MLflow run continue from a checkpoint. Under torchrun,
    every rank trains its slice of each batch and rank 0 alone tracks and checkpoints."""
    validate(cfg)
    world = distributed.current_world()
    distributed.check_batch_size(cfg.batch_size, world)
    device = resolve_device(distributed.device_for(cfg.device, world), sweep_job_number())
    select_gpu(device)
    with distributed.process_group(world, device):
        return train_job(cfg, device, world)


def train_job(cfg: DictConfig, device: torch.device,
              world: distributed.World = distributed.SINGLE) -> TrainResult:
    """run_experiment's work once the device (and process group) are set up."""
    check_tracking_uri(cfg.tracking.uri)
    config = flatten(OmegaConf.to_container(cfg, resolve=True))
    # Rank 0's output folder holds the job's checkpoint, for every rank.
    folder = distributed.from_main(output_dir()) if world.distributed else output_dir()
    resumed = load_resumed(cfg, config, folder)
    path = checkpoint_path(cfg, resumed.path if resumed else None, folder)
    if resumed is None and cfg.checkpoint.enabled and path.exists():
        raise CheckpointError(f"{path} exists: resume=true continues that run; to start "
                              f"afresh remove it or choose another hydra.run.dir")
    data = load_cifar(cfg.data.name, cfg.data.root, cfg.data.download, cfg.data.verify,
                      cfg.data.manifest).to(device)
    if cfg.eval_images is not None:
        data = limit_test_set(data, cfg.eval_images)
    experiment = build_experiment(cfg, data, world)
    loop_state = (checkpoint.restore(resumed.state, resumed.path, experiment.states())
                  if resumed else None)

    tags = {"command": command_line(),
            "overrides": " ".join(task_overrides()),
            "device": device_name(device),
            # What `auto` became on this device (the params hold the config as written).
            "amp": experiment.settings.amp,
            "compile": experiment.settings.compile,
            "cuda_graph": str(experiment.settings.cuda_graph).lower(),
            "processes": str(world.size),  # 1, or the data-parallel ranks of the job
            **git_tags()}
    tracking: dict[str, Any] = {}
    if resumed is not None:
        tracking = {"run_id": resumed.state["tracking"]["run_id"],
                    "pending": resumed.state["tracking"]["pending"]}
        # The run keeps the tags it started with; this one says where it was taken up.
        tags = {"resumed_from_step": str(resumed.state["step"])}
    name = run_name(cfg)
    tracker_of_rank = (RunTracker(cfg.tracking.uri, cfg.tracking.experiment, name, tags,
                                  cfg.tracking.flush_seconds, os.environ.get(PARENT_RUN_ENV),
                                  **tracking)
                       if world.is_main else NoTracking())
    try:
        with StopRequest() as stop, tracker_of_rank as tracker:
            if resumed is not None:
                log.info("MLflow run %s resumed from step %d of %s (the store holds points up "
                         "to step %d: none is written twice)", tracker.run_id,
                         resumed.state["step"], resumed.path, tracker.stored_up_to)
            else:
                log.info("MLflow run %s (%s) in %s", tracker.run_id, name, cfg.tracking.uri)
                tracker.log_params(config)
                tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
                if HydraConfig.initialized():
                    tracker.log_text("\n".join(task_overrides()) + "\n", "overrides.txt")
            checkpointer = None
            if cfg.checkpoint.enabled:
                every = cfg.checkpoint.every or 0
                checkpointer = checkpoint.Checkpointer(path, every, experiment.states(),
                                                       config, tracker.checkpoint_state)
                log.info("checkpoints to %s %s", path,
                         f"every {every} steps and at the end" if every else "at the end")
            else:
                log.info("no checkpoints (checkpoint.enabled=false): a stopped run cannot be "
                         "resumed")
            result = train(experiment, data, tracker,
                           checkpoints=checkpointer if world.is_main else None,
                           resume=loop_state, stop=stop, world=world)
            tracker.log_state_dict(experiment.model, "weights.pt")
            if experiment.ema is not None:
                tracker.log_state_dict(experiment.ema.model, "ema_weights.pt")
            if cfg.tracking.log_model:
                tracker.log_model(experiment.evaluated,
                                  experiment.augmentation.eval(data.test_images[:8]))
    except Stopped as stopped:
        if stopped.step is not None:
            stopped.hint = (f"checkpoint {path}; continue with: {resume_command(path)}"
                            if cfg.checkpoint.enabled
                            else "no checkpoint was written (checkpoint.enabled=false)")
        raise
    log.info("final precision @ 1 = %.4f (%.0f examples/sec, %.1f s training, %.1f s "
             "writing checkpoints)", result.precision, result.examples_per_sec,
             result.train_seconds, checkpointer.seconds if checkpointer else 0.0)
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    distributed.adopt_launcher_tasks()  # hydra.launcher.tasks_per_node > 1: one DDP job
    try:
        return run_experiment(cfg).precision
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as error:
        print(f"error: {error}", file=sys.stderr)
        if sweep_job_number() is not None:
            return math.nan  # one diverged job (its run marked FAILED) does not end the sweep
        sys.exit(1)
    except Stopped as stopped:
        print(f"{stopped}; the MLflow run is marked KILLED"
              + (f"; {stopped.hint}" if stopped.hint else ""), file=sys.stderr)
        sys.exit(stopped.exit_code)
    except KeyboardInterrupt:  # Ctrl-C before training started: nothing to save
        print("stopped by SIGINT before training started", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    world = distributed.current_world()
    if world.distributed and {"-m", "--multirun"} & set(sys.argv):
        print("error: a sweep (-m) under torchrun would run once per process; run its jobs "
              "one by one under torchrun", file=sys.stderr)
        sys.exit(2)
    try:
        sys.argv[1:] = command_overrides(sys.argv[1:])
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    # Under torchrun, ranks other than 0 run without an output folder of their own (Hydra
    # would otherwise create one per process).
    sys.argv += distributed.hydra_overrides(world)
    main()
