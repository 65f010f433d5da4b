"""One MLflow parent run per Hydra multirun, its jobs logged as children.

Hydra calls this callback (configured under `hydra.callbacks` in conf/config.yaml) in the
process that launches the jobs. At the start it prepares the store and the experiment
once, so parallel jobs never race to create them, and opens the parent run; its id
reaches the jobs through the environment (inherited by joblib's worker processes). At the
end the parent gets the sweep's report: the table of jobs, the best one, mean ± std over
seeds, the plots and, for an Optuna sweep, the study's best parameters and value.

A grid sweep keeps a record of its jobs in its folder (sweep_record.py): the same command
run again there with resume=auto reopens the same parent and goes on (sweep_resume.py).

Hydra writes the sweep's multirun.yaml itself, with the command's overrides as typed: its
credentials are masked as soon as a job starts, and again at the sweep's end.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from cifar_exp.errors import ConfigError, UserError, refuse
from cifar_exp.tracking import sweep_resume
from cifar_exp.tracking.naming import PARENT_RUN_ENV, SWEPT_KEYS_ENV, command_line, git_tags
from cifar_exp.tracking.redact import install_redaction, redact, redact_file
from cifar_exp.tracking.report import write_report
from cifar_exp.tracking.store import check_tracking_uri, open_experiment, with_retries
from cifar_exp.tracking.sweep_record import RECORD_ENV, read_record

log = logging.getLogger(__name__)
OPTUNA_RESULTS = "optimization_results.yaml"  # written by the Optuna sweeper
MULTIRUN_RECORD = "multirun.yaml"  # Hydra's sweeper writes it before the first job


class SweepTracking(Callback):
    """Only strings are kept here: Hydra pickles its callbacks into joblib's workers."""

    def __init__(self) -> None:
        self.uri = ""
        self.sweep_dir = ""
        self.parent_run_id: str | None = None
        self.round = 0  # which run of the sweep's command this is (a resumed sweep: 1, 2...)
        self.record = ""  # the sweep's record of its jobs, if it keeps one

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        install_redaction()  # before the launcher logs each job's overrides
        self.uri = config.tracking.uri
        self.sweep_dir = str(config.hydra.sweep.dir)
        swept = swept_keys(config)
        try:
            check_tracking_uri(self.uri)
            experiment_id = open_experiment(self.uri, config.tracking.experiment)
            start = sweep_resume.begin(config, swept, self.uri)  # None: a sweep with no record
        except UserError as error:
            refuse(error)
        client = MlflowClient(self.uri)
        if start is not None and start.resumed:
            self.parent_run_id = sweep_resume.reopen_parent(client, start)
        else:
            self.parent_run_id = self._create_parent(client, config, swept, experiment_id)
        if start is not None:
            self.round = start.save(self.parent_run_id)
            self.record = str(start.path)
        os.environ[PARENT_RUN_ENV] = self.parent_run_id
        os.environ[SWEPT_KEYS_ENV] = ",".join(swept)
        atexit.register(self._close, RunStatus.FAILED)  # a sweep that dies midway

    def _create_parent(self, client: MlflowClient, config: DictConfig, swept: list[str],
                       experiment_id: str) -> str:
        """A new parent run, named by what the sweep varies; its id."""
        overrides = redact(" ".join(config.hydra.overrides.task))
        tags = {"sweep": "parent", "command": redact(command_line()), "overrides": overrides,
                "sweep_dir": redact(self.sweep_dir),
                "sweeper": config.hydra.sweeper._target_.rsplit(".", 1)[-1],
                "launcher": config.hydra.launcher._target_.rsplit(".", 1)[-1],
                **git_tags()}
        shown = " ".join(override for override in config.hydra.overrides.task
                         if override.lstrip("+~").split("=", 1)[0] in swept)
        # Named by what it varies; the tag `overrides` holds the whole command.
        run = with_retries(lambda: client.create_run(
            experiment_id, run_name=redact(f"sweep {shown or overrides}").strip(), tags=tags),
            "create run")
        log.info("MLflow sweep run %s in %s", run.info.run_id, redact(self.uri))
        return run.info.run_id

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra has written multirun.yaml (and, where hydra.output_subdir is set, the job's
        # .hydra/) by now, in whichever process runs the job.
        if config.hydra.mode == RunMode.MULTIRUN:
            mask_sweep_record(Path(str(config.hydra.sweep.dir)))
        if config.hydra.output_subdir is not None:
            mask_folder(Path(str(config.hydra.runtime.output_dir)) / config.hydra.output_subdir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_run_id is None:
            return
        client = MlflowClient(self.uri)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        log_study_result(client, self.parent_run_id, sweep_dir / OPTUNA_RESULTS)
        try:
            report = write_report(self.uri, sweep_dir / "report", config.tracking.experiment,
                                  parent=self.parent_run_id, baseline=config.tracking.baseline)
        except ConfigError as error:  # a baseline naming no configuration: keep the report
            log.warning("%s; the report leaves the comparison out", error)
            report = write_report(self.uri, sweep_dir / "report", config.tracking.experiment,
                                  parent=self.parent_run_id)
        finished = [run for run in report.runs if run.status == "FINISHED"]
        metrics = {"jobs": len(report.runs), "jobs_finished": len(finished)}
        if report.best is not None:
            metrics["best_precision"] = report.best.precision
            client.set_tag(self.parent_run_id, "best_run_id", report.best.run_id)
            client.set_tag(self.parent_run_id, "best_run", report.best.name)
        for key, value in metrics.items():  # each run of the command at its own step
            client.log_metric(self.parent_run_id, key, value, step=self.round)
        log.info("sweep summary (%d jobs, %d finished) in %s and on MLflow run %s",
                 len(report.runs), len(finished), report.folder, self.parent_run_id)
        self._close(RunStatus.FINISHED)

    def _close(self, status: int) -> None:
        if self.sweep_dir:  # also a sweep that ended before any job started
            mask_sweep_record(Path(self.sweep_dir))
        sweep_resume.release()
        if self.parent_run_id is None:
            return
        run_id, self.parent_run_id = self.parent_run_id, None
        for name in (PARENT_RUN_ENV, SWEPT_KEYS_ENV, RECORD_ENV):
            os.environ.pop(name, None)
        if status == RunStatus.FAILED and jobs_begun(self.record):  # stopped, or a job refused
            print(f"the sweep goes on with: "
                  f"{sweep_resume.resume_command(Path(self.record).parent)}", file=sys.stderr)
        try:
            client = MlflowClient(self.uri)
            with_retries(lambda: client.set_terminated(run_id, RunStatus.to_string(status)),
                         "end run")
        except Exception as error:  # at exit: report, never mask the real failure
            log.error("MLflow: could not close sweep run %s (%s)", run_id, error)


def mask_sweep_record(sweep_dir: Path) -> None:
    """Mask credentials in what Hydra wrote into the sweep's folder itself: multirun.yaml
    (the whole config and the command's overrides) and a .hydra/ folder, if any."""
    redact_file(sweep_dir / MULTIRUN_RECORD)
    mask_folder(sweep_dir / ".hydra")


def mask_folder(folder: Path) -> None:
    """Mask credentials in the YAML files of `folder` (Hydra's .hydra/ record), if any."""
    for path in sorted(folder.glob("*.yaml")):
        redact_file(path)


def swept_keys(config: DictConfig) -> list[str]:
    """The keys a sweep varies: those given several values on the command line (a,b or a
    range), and an Optuna search space's."""
    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = [override.key_or_group for override in parsed if override.is_sweep_override()]
    searched = OmegaConf.select(config, "hydra.sweeper.params") or {}
    return [*keys, *(key for key in searched if key not in keys)]


def log_study_result(client: MlflowClient, run_id: str, results_file: Path) -> None:
    """The Optuna study's best parameters (params best.<name>) and value (metric
    best_value), when the sweep was an Optuna search."""
    if not results_file.is_file():
        return
    results = yaml.safe_load(results_file.read_text())
    for name, value in (results.get("best_params") or {}).items():
        client.log_param(run_id, f"best.{name}", redact(str(value)))
    if results.get("best_value") is not None:
        client.log_metric(run_id, "best_value", float(results["best_value"]))


def jobs_begun(record: str) -> bool:
    """Whether the sweep recorded at `record` (if any) has a job to go on with: one refused
    before any job began (a packed sweep checks them all first) has none."""
    try:
        found = read_record(Path(record)) if record else None
    except UserError:
        return False
    return found is not None and bool(found.jobs)
