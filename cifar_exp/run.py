"""Hydra entry point: compose -> build -> train -> return the final precision.

    python -m cifar_exp.run [overrides]          one run
    python -m cifar_exp.run -m key=a,b [...]     a sweep, one MLflow run per job
    python -m cifar_exp.run [the same overrides] hydra.run.dir=<its folder> resume=true

Exit codes: 0 done, 1 the loss diverged, 2 bad input (nothing started), 3 trained but the
tracking store or the checkpoint file failed (the message says how to finish), 130 / 143
stopped by SIGINT / SIGTERM (after a checkpoint: resume=true goes on).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import hydra
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, OverrideParseException
from hydra.plugins.completion_plugin import CompletionPlugin
from hydra.types import RunMode
from omegaconf import DictConfig

from cifar_exp.config import (
    CONF_DIR,
    check_composed,
    command_overrides,
    composition_error_line,
    register_schema,
)
from cifar_exp.errors import (
    NonFiniteLoss,
    Pruned,
    RecordFailure,
    Stopped,
    UserError,
    refuse,
)
from cifar_exp.quick_exit import run_and_exit
from cifar_exp.sweep_values import check_sweep_values
from cifar_exp.tracking.naming import SWEPT_KEYS_ENV, git_tags, short_keys, short_number
from cifar_exp.tracking.redact import install_console_redaction, install_redaction, redact
from cifar_exp.world import adopt_launcher_tasks, current_world, hydra_overrides

if TYPE_CHECKING:
    from cifar_exp.job import job

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
    shown = [f"{short}={short_number(values[key])}"
             for key, short in zip(swept, short_keys(swept), strict=True)]
    # A swept value may hold a credential (masked: the name is shown and recorded).
    return redact(" ".join([base, *shown])) if shown else f"{base}-{cfg.steps} #{job_number}"


def job_context(cfg: DictConfig, folder: Path | None = None) -> job.JobContext:
    """What Hydra decided for this job: its output folder, overrides, name and number.
    Outside a Hydra app: the current folder (or `folder`), no overrides."""
    from cifar_exp.job import job  # torch and MLflow: not for --help and tab completion

    if not HydraConfig.initialized():
        return job.JobContext(folder or Path.cwd(), run_name=run_name(cfg))
    hydra_cfg = HydraConfig.get()
    return job.JobContext(Path(hydra_cfg.runtime.output_dir), tuple(hydra_cfg.overrides.task),
                      run_name(cfg), sweep_job_number(), hydra_cfg)


# An absolute path: the same config whether started as python -m cifar_exp.run or cifar-exp.
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    install_redaction()  # Hydra has set up this job's logging by now
    adopt_launcher_tasks()  # hydra.launcher.tasks_per_node > 1: one DDP job
    new_folder = made_for_this_job()
    from cifar_exp.job.sweep_job import run_in_sweep  # torch: not for --help

    # A job of a recorded sweep may need no training, or train in another folder.
    return run_in_sweep(cfg, job_context(cfg),
                        lambda context: run_and_report(cfg, context, new_folder))


def run_and_report(cfg: DictConfig, context: job.JobContext,
                   new_folder: Path | None = None) -> float:
    """Run the job and return its final precision; what ends it is said in one line on
    stderr, with the exit code (SystemExit) of the module docstring. Within a sweep a
    diverged job, or one whose record failed, returns nan and the sweep goes on.
    `new_folder` (made for this command) is removed when the command is refused."""
    from cifar_exp.job import job

    in_sweep = context.job_number is not None
    try:
        return job.run_job(cfg, context).precision
    except UserError as error:
        if new_folder is not None:  # refused: leave no empty outputs/<date>/<time>/
            remove_new_folder(new_folder)
        refuse(error)
    except NonFiniteLoss as error:
        print(f"error: {error}", file=sys.stderr)
        if in_sweep:
            return math.nan  # one diverged job (its run marked FAILED) does not end the sweep
        sys.exit(1)
    except Pruned as pruned:  # an Optuna trial the study's pruner stopped
        print(pruned, file=sys.stderr)
        return pruned.precision
    except RecordFailure as error:
        print(f"error: {error}", file=sys.stderr)
        if in_sweep:
            return math.nan  # the sweep goes on; this job's record says what is missing
        sys.exit(RecordFailure.EXIT_CODE)
    except Stopped as stopped:
        print(f"{stopped}; the MLflow run is marked KILLED"
              + (f"; {stopped.hint}" if stopped.hint else ""), file=sys.stderr)
        sys.exit(stopped.exit_code)
    except KeyboardInterrupt:  # Ctrl-C before training started: nothing to save
        print("stopped by SIGINT before training started", file=sys.stderr)
        sys.exit(130)


def made_for_this_job() -> Path | None:
    """A single run's output folder, when Hydra made it for this command: it holds nothing
    but the job's new log. None for a sweep's job, or a folder with a run in it."""
    if not HydraConfig.initialized() or sweep_job_number() is not None:
        return None
    folder = Path(HydraConfig.get().runtime.output_dir)
    contents = list(folder.iterdir()) if folder.is_dir() else []
    fresh = all(path.suffix == ".log" and path.stat().st_size == 0 for path in contents)
    return folder if fresh else None


def remove_new_folder(folder: Path) -> None:
    """Remove a run folder made for a refused command, and the folders above it that this
    leaves empty, up to the current one (Hydra's outputs/<date>/<time>/)."""
    shutil.rmtree(folder, ignore_errors=True)
    here = Path.cwd().resolve()
    for parent in folder.resolve().parents:
        if parent == here or here not in parent.parents:
            break
        try:
            parent.rmdir()
        except OSError:  # not empty: other runs live there
            break


def refuse_untrusted_configs() -> None:
    """Check every config Hydra composes (a run's, a sweep's, each of its jobs') as soon as
    it is composed, before Hydra calls anything it names (callbacks, launcher, sweeper, log
    handlers): a refusal is one line and exit code 2, Hydra's own composition errors
    included. A sweep's values are checked too, each on its own, before its MLflow parent
    opens (sweep_values). Hydra offers no hook at that point,
    so its config loader is wrapped, for this command only."""
    load_configuration = ConfigLoaderImpl.load_configuration

    def checked(self: ConfigLoaderImpl, config_name: str | None, overrides: list[str],
                run_mode: RunMode, *args: Any, **kwargs: Any) -> DictConfig:
        try:
            cfg = load_configuration(self, config_name, overrides, run_mode, *args, **kwargs)
            check_composed(cfg)
            if run_mode == RunMode.MULTIRUN:  # before the sweep opens its MLflow parent
                check_sweep_values(cfg, overrides, self.get_group_options, check_builders)
        except UserError as error:
            refuse(error)
        except (ConfigCompositionException, OverrideParseException) as error:
            refuse(composition_error_line(error))
        return cfg

    ConfigLoaderImpl.load_configuration = checked


def check_builders(cfg: DictConfig) -> None:
    """What the parts' builders refuse in `cfg`, found by building them without data."""
    from cifar_exp.training.build import check_parts, resolve_device

    check_parts(cfg, resolve_device(cfg.device))


def complete_quietly() -> None:
    """Tab completion offers nothing where a line cannot be completed (a value refused, a
    config search path that cannot be read), instead of printing an error or a traceback
    into the line the user is typing."""
    query = CompletionPlugin._query

    def quiet(self: CompletionPlugin, *args: Any, **kwargs: Any) -> list[str]:
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                return query(self, *args, **kwargs)
        except (Exception, SystemExit):  # SystemExit: refuse() of a checked config
            return []

    CompletionPlugin._query = quiet


def cli() -> None:
    """`python -m cifar_exp.run` and the `cifar-exp` command."""
    install_console_redaction()  # Hydra's own errors echo the overrides as typed
    world = current_world()
    if world.distributed and {"-m", "--multirun"} & set(sys.argv):
        refuse("a sweep (-m) under torchrun would run once per process; run its jobs one by "
               "one under torchrun")
    try:
        sys.argv[1:] = command_overrides(sys.argv[1:])
    except UserError as error:
        refuse(error)
    # Under torchrun, ranks other than 0 run without an output folder of their own (Hydra
    # would otherwise create one per process).
    sys.argv += hydra_overrides(world)
    refuse_untrusted_configs()
    complete_quietly()
    main()


def command() -> NoReturn:
    """`python -m cifar_exp.run` and `cifar-exp`: cli(), then a quick
    exit (cifar_exp.quick_exit)."""
    run_and_exit(cli)


if __name__ == "__main__":
    command()
