"""Hydra entry point: compose -> build -> train -> return the final precision.

    python -m cifar_exp.run [overrides]          one run
    python -m cifar_exp.run -m key=a,b [...]     a sweep, one MLflow run per job
    python -m cifar_exp.run [the same overrides] hydra.run.dir=<its folder> resume=true

Exit codes: 0 done, 1 the loss diverged, 2 bad input (nothing started), 3 trained but the
tracking store or the checkpoint file failed (the message says how to finish), 130 / 143
stopped by SIGINT / SIGTERM (after a checkpoint: resume=true goes on).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from cifar_exp import distributed
from cifar_exp.config import check_callables, command_overrides, register_schema
from cifar_exp.errors import ConfigError, NonFiniteLoss, RecordFailure, Stopped, UserError
from cifar_exp.job import JobContext, run_job
from cifar_exp.redact import install_redaction
from cifar_exp.tracking import SWEPT_KEYS_ENV, git_tags, short_keys
from cifar_exp.train import TrainResult

log = logging.getLogger(__name__)

register_schema()
git_tags()  # read once, when the code that will run is imported


def sweep_job_number() -> int | None:
    """This job's number within a multirun, None for a single run."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return HydraConfig.get().job.num


def run_name(cfg: DictConfig) -> str:
    """model-optimizer-steps, with the optimizer as chosen on the command line (sgd_decay):
    tf_cnn-adam-3000. A sweep's job is named by what differs between its jobs, its values
    of the swept keys: `tf_cnn-adam lr=0.003 seed=1` (a key by its last part, unless two
    swept keys end alike); by its number where no key is swept."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    base = f"{choices.get('model', cfg.model.name)}-{choices.get('optimizer', cfg.optimizer.name)}"
    job_number = sweep_job_number()
    if job_number is None:
        return f"{base}-{cfg.steps}"
    values = dict(override.lstrip("+~").split("=", 1) for override in
                  HydraConfig.get().overrides.task if "=" in override)
    swept = [key for key in os.environ.get(SWEPT_KEYS_ENV, "").split(",")
             if key in values and key not in ("model", "optimizer")]
    shown = [f"{short}={values[key]}" for key, short in zip(swept, short_keys(swept),
                                                            strict=True)]
    return " ".join([base, *shown]) if shown else f"{base}-{cfg.steps} #{job_number}"


def job_context(cfg: DictConfig, folder: Path | None = None) -> JobContext:
    """What Hydra decided for this job: its output folder, overrides, name and number.
    Outside a Hydra app: the current folder (or `folder`), no overrides."""
    if not HydraConfig.initialized():
        return JobContext(folder or Path.cwd(), run_name=run_name(cfg))
    hydra_cfg = HydraConfig.get()
    return JobContext(Path(hydra_cfg.runtime.output_dir), tuple(hydra_cfg.overrides.task),
                      run_name(cfg), sweep_job_number(), hydra_cfg)


def run_experiment(cfg: DictConfig, folder: Path | None = None) -> TrainResult:
    """Train the job `cfg` describes (see cifar_exp.job); `folder` stands for the output
    folder when called outside a Hydra app."""
    return run_job(cfg, job_context(cfg, folder))


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    install_redaction()  # Hydra has set up this job's logging by now
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
    except RecordFailure as error:
        print(f"error: {error}", file=sys.stderr)
        if sweep_job_number() is not None:
            return math.nan  # the sweep goes on; this job's record says what is missing
        sys.exit(RecordFailure.EXIT_CODE)
    except Stopped as stopped:
        print(f"{stopped}; the MLflow run is marked KILLED"
              + (f"; {stopped.hint}" if stopped.hint else ""), file=sys.stderr)
        sys.exit(stopped.exit_code)
    except KeyboardInterrupt:  # Ctrl-C before training started: nothing to save
        print("stopped by SIGINT before training started", file=sys.stderr)
        sys.exit(130)


def refuse_untrusted_configs() -> None:
    """Check every config Hydra composes (a run's, a sweep's, each of its jobs') as soon as
    it is composed, before Hydra calls anything it names (callbacks, launcher, sweeper, log
    handlers): a refusal is one line and exit code 2. Hydra offers no hook at that point,
    so its config loader is wrapped, for this command only."""
    load_configuration = ConfigLoaderImpl.load_configuration

    def checked(self: ConfigLoaderImpl, *args: Any, **kwargs: Any) -> DictConfig:
        cfg = load_configuration(self, *args, **kwargs)
        try:
            check_callables(cfg)
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        return cfg

    ConfigLoaderImpl.load_configuration = checked


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
    refuse_untrusted_configs()
    main()
