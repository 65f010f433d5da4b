"""A grid sweep as one thing across commands: its folder held by one command at a time, and
the same command run again there with `resume=auto` checked to be the same sweep (a grid
that grew is; one whose fixed values changed is refused) before its MLflow parent run is
reopened. The sweep callback (tracking/sweep.py) calls this in the launching process; each
job then finds itself in the record (job/sweep_job.py).

Grid sweeps (Hydra's basic sweeper) keep a record on every launcher whose jobs run
through the command's entry point or, packed, through the same job function: basic,
joblib, submitit (local and SLURM), Ray (a local instance, no `ray.init.address`) and
packed. An Optuna search keeps its own
(its study)."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shlex
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf, open_dict

from cifar_exp.config import RESUME_AUTO
from cifar_exp.errors import ConfigError, UserError
from cifar_exp.tracking.redact import redact, redacted
from cifar_exp.tracking.runs import flatten
from cifar_exp.tracking.store import with_retries
from cifar_exp.tracking.sweep_record import (
    FAILED,
    FILENAME,
    FINISHED,
    RECORD_ENV,
    STARTED,
    SweepRecord,
    changed_meaning,
    read_record,
    still_fixed,
    sweep_lock,
    updating,
    what_is_trained,
)

log = logging.getLogger(__name__)
DURABLE_SWEEPERS = ("BasicSweeper",)
# Their jobs run the entry point (packed members: its job function), in this process or
# one that inherits its environment, where the record's path is passed on.
DURABLE_LAUNCHERS = ("BasicLauncher", "JoblibLauncher", "LocalLauncher", "SlurmLauncher",
                     "RayLauncher", "PackedLauncher")
# The resume values that go on with a recorded sweep: auto also starts the jobs that never
# started; true (as for one run) needs each job's checkpoint.
RESUMING = (RESUME_AUTO, "True", "true")
_held = contextlib.ExitStack()  # the sweep folder's lock, for as long as the sweep runs


@dataclass
class SweepStart:
    """A durable sweep about to launch: its record as found, and this run's fixed values."""

    path: Path
    record: SweepRecord
    fixed: dict[str, Any] = field(default_factory=dict)

    @property
    def resumed(self) -> bool:
        return bool(self.record.parent_run_id)

    def save(self, parent_run_id: str) -> int:
        """Record the parent and this run of the command, and tell the jobs where the record
        is; returns this run's number (0 for the first)."""
        with updating(self.path) as record:
            record.parent_run_id = parent_run_id
            record.fixed = still_fixed(record.fixed, self.fixed) if record.runs else self.fixed
            record.runs += 1
            runs = record.runs
        os.environ[RECORD_ENV] = str(self.path)
        return runs - 1


def durable(config: DictConfig) -> bool:
    """Whether this multirun keeps a record: a grid sweep whose jobs run the entry point."""
    sweeper = str(config.hydra.sweeper._target_).rsplit(".", 1)[-1]
    launcher = str(config.hydra.launcher._target_).rsplit(".", 1)[-1]
    # Workers of a Ray cluster started elsewhere do not inherit this process's environment.
    if launcher == "RayLauncher" and OmegaConf.select(config, "hydra.launcher.ray.init.address"):
        return False
    return sweeper in DURABLE_SWEEPERS and launcher in DURABLE_LAUNCHERS


def begin(config: DictConfig, swept: list[str], uri: str) -> SweepStart | None:
    """Hold the sweep's folder and read its record; None for a sweep that keeps none.
    Refused (UserError, one line): another command running the sweep, a sweep there
    already without resume=auto (or true), fixed values that changed, a parent the store lacks."""
    if not durable(config):
        return None
    # Absolute, as Hydra makes each job's folder: the jobs find theirs inside it.
    sweep_dir = Path(os.path.abspath(str(config.hydra.sweep.dir)))
    _held.enter_context(sweep_lock(sweep_dir))
    path = sweep_dir / FILENAME
    record = read_record(path)
    start = SweepStart(path, record or SweepRecord(), fixed_values(config, swept))
    if record is None or not record.parent_run_id:
        return start
    if str(config.resume) not in RESUMING:
        raise UserError(f"{sweep_dir} holds a sweep already (MLflow parent run "
                        f"{record.parent_run_id}, {len(record.jobs)} jobs): resume=auto "
                        f"continues it; choose another hydra.sweep.dir for a new one")
    differ = changed_meaning(record.fixed, start.fixed)
    if differ:
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise ConfigError(f"{sweep_dir} holds a sweep of other fixed values "
                          f"({', '.join(differ[:3])}{more}); resume it with its own values "
                          f"(its multirun.yaml), or choose another hydra.sweep.dir")
    check_parent(uri, record.parent_run_id)
    return start


def fixed_values(config: DictConfig, swept: list[str]) -> dict[str, Any]:
    """What every job of this sweep trains alike: the flat config of the sweep (the swept
    keys at their defaults), less the swept keys (a swept group: its whole subtree)."""
    task = copy.deepcopy(config)
    with open_dict(task):
        del task["hydra"]
    flat = redacted(flatten(OmegaConf.to_container(task, resolve=True)))
    return {key: value for key, value in what_is_trained(flat).items()
            if not any(key == name or key.startswith(f"{name}.") for name in swept)}


def check_parent(uri: str, run_id: str) -> None:
    """The recorded parent run must be in this store, not deleted."""
    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException:
        run = None
    if run is None or run.info.lifecycle_stage == "deleted":
        raise UserError(f"the sweep's MLflow parent run {run_id} is not in {redact(uri)}"
                        f"{' (deleted)' if run else ''}; resume with the tracking.uri the "
                        f"sweep was started with")


def reopen_parent(client: MlflowClient, start: SweepStart) -> str:
    """Set the recorded parent run RUNNING again, and say what the sweep holds."""
    run_id = start.record.parent_run_id
    with_retries(lambda: client.update_run(run_id, RunStatus.to_string(RunStatus.RUNNING)),
                 "reopen run")
    counts = Counter(job.status for job in start.record.jobs.values())
    log.info("sweep %s resumed, MLflow sweep run %s reopened: of its %d jobs so far, %d "
             "finished (not trained again), %d to continue, %d failed (run again only with "
             "retry_failed=true)", start.path.parent, run_id, len(start.record.jobs),
             counts[FINISHED], counts[STARTED], counts[FAILED])
    return run_id


def resume_command(sweep_dir: Path) -> str:
    """The command that goes on with this sweep: this one, in its folder, with resume=auto."""
    kept = [arg for arg in sys.argv[1:]
            if not arg.startswith(("resume=", "hydra.sweep.dir="))]
    return redact(shlex.join(["python", "-m", "cifar_exp.run", *kept,
                              f"hydra.sweep.dir={sweep_dir}", f"resume={RESUME_AUTO}"]))


def release() -> None:
    """Let go of the sweep's folder (the OS does it too, when the process ends)."""
    _held.close()
