"""A job of a grid sweep that keeps a record (tracking/sweep_record.py), found there by its
config, not by its number: a job that finished in an earlier run of the sweep is skipped
and its result returned again; one that failed is skipped unless `retry_failed=true`; any
other (stopped, killed, or never started) trains in its own folder, where `resume=auto`
continues it from its checkpoint. How it ends is recorded for the next run of the sweep."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from cifar_exp.errors import UserError
from cifar_exp.job import checkpoint, run_folder
from cifar_exp.job.job import JobContext
from cifar_exp.tracking.naming import SWEPT_KEYS_ENV
from cifar_exp.tracking.redact import redact, redacted
from cifar_exp.tracking.runs import flatten
from cifar_exp.tracking.store import resumable_run
from cifar_exp.tracking.sweep_record import (
    FAILED,
    FINISHED,
    RECORD_ENV,
    STARTED,
    JobEntry,
    SweepRecord,
    config_digest,
    read_record,
    updating,
)
from cifar_exp.world import current_world

log = logging.getLogger(__name__)
RETRY_KEY = "retry_failed"  # the config key that runs failed jobs again


def run_in_sweep(cfg: DictConfig, context: JobContext,
                 train: Callable[[JobContext], float]) -> float:
    """`train(context)`, or the job's recorded result where it needs no training; `train`
    gets the context of the job's own folder."""
    record = os.environ.get(RECORD_ENV)
    if not record or context.job_number is None:
        return train(context)
    sweep_dir = Path(record).parent
    if sweep_dir not in context.folder.parents:  # hydra.sweep.subdir led out of the sweep
        return train(context)
    return SweepJob(Path(record), cfg, context).run(train)


class SweepJob:
    """One job of a recorded sweep: its folder claimed in the record, then trained or not."""

    def __init__(self, record: Path, cfg: DictConfig, context: JobContext) -> None:
        self.record, self.cfg, self.context = record, cfg, context
        self.sweep_dir = record.parent
        self.digest = config_digest(redacted(flatten(OmegaConf.to_container(cfg,
                                                                            resolve=True))),
                                    swept_keys())
        self.name = str(context.folder.relative_to(self.sweep_dir))  # Hydra's folder for it
        self.writes = current_world().is_main  # one writer of a job's several processes

    def run(self, train: Callable[[JobContext], float]) -> float:
        retry = bool(OmegaConf.select(self.cfg, RETRY_KEY, default=False))
        name, entry, claimed = self.claim(retry)
        context = self.moved_to(name, claimed) if name != self.name else self.context
        where = context.folder
        if entry.status == FINISHED:
            log.info("%s finished in an earlier run of this sweep, in %s: not trained again "
                     "(precision @ 1 = %.4f)", context.run_name, where, entry.precision)
            return entry.precision if entry.precision is not None else math.nan
        if entry.status == FAILED and not retry:
            log.info("%s failed in an earlier run of this sweep, in %s: skipped (%s=true "
                     "runs it again)", context.run_name, where, RETRY_KEY)
            return math.nan
        earlier = finished_in(self.cfg, where, self.digest)
        if earlier is not None:  # killed after its run closed, before the record said so
            log.info("%s had finished, in %s: not trained again", context.run_name, where)
            self.mark(name, FINISHED, earlier)
            return earlier
        try:
            precision = train(context)
        except Exception:  # as the job's MLflow run: FAILED (a stop or refusal: SystemExit)
            self.mark(name, FAILED)
            raise
        if math.isfinite(precision):
            self.mark(name, FINISHED, precision)
        else:  # diverged (FAILED), or trained with a record to finish (resume=auto does)
            state = saved_state(self.cfg, where, self.digest)
            self.mark(name, STARTED if state and state["step"] >= self.cfg.steps else FAILED)
        return precision

    def claim(self, retry: bool) -> tuple[str, JobEntry, set[str]]:
        """The job's folder (the one recorded for its config, else a new one) and its entry
        as found; every job folder of the record. A job about to train is marked started.
        Of a job's several processes (submitit's tasks), rank 0 alone writes the record:
        the others find the same folder from it, or the one rank 0 is making."""
        if not self.writes:
            record = read_record(self.record) or SweepRecord()
            name = record.folder_of(self.digest) or record.new_folder(self.name, self.digest)
            found = record.jobs.get(name) or JobEntry(self.digest)
            return name, dataclasses.replace(found), {*record.jobs, name}
        with updating(self.record) as record:
            name = record.folder_of(self.digest)
            if name is None:
                name = record.new_folder(self.name, self.digest)
                record.jobs[name] = JobEntry(self.digest, STARTED,
                                             redact(" ".join(self.context.overrides)))
            found = dataclasses.replace(record.jobs[name])
            if found.status == FAILED and retry:
                record.jobs[name].status = STARTED
            return name, found, set(record.jobs)

    def mark(self, name: str, status: str, precision: float | None = None) -> None:
        if not self.writes:
            return
        with updating(self.record) as record:
            entry = record.jobs[name]
            entry.status = status
            entry.precision = precision if status == FINISHED else None

    def moved_to(self, name: str, claimed: set[str]) -> JobContext:
        """The context of the job in its recorded folder `name`, where Hydra chose another:
        its log files follow it, and Hydra's folder goes if no job holds it."""
        context, folder = self.context, self.sweep_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        follow_log_files(context.folder, folder)
        if self.name not in claimed and self.writes:
            remove_if_unused(context.folder)
        hydra = None
        if context.hydra is not None:
            hydra = copy.deepcopy(context.hydra)  # Hydra's own stays as it is
            with read_write(hydra), open_dict(hydra):
                hydra.runtime.output_dir = str(folder)
        return dataclasses.replace(context, folder=folder, hydra=hydra)


def saved_state(cfg: DictConfig, folder: Path, digest: str) -> dict[str, Any] | None:
    """The checkpoint of the config `digest` in its job folder `folder`; None where there
    is none, or it is amiss (the job itself then says what)."""
    path = (Path(cfg.checkpoint.path).expanduser() if cfg.checkpoint.path
            else folder / run_folder.FILENAME)
    if not cfg.checkpoint.enabled or not path.is_file():
        return None
    try:
        state = checkpoint.load_checkpoint(path)
    except UserError:
        return None
    return state if config_digest(state["config"], swept_keys()) == digest else None


def swept_keys() -> list[str]:
    """The keys this job's sweep varies, as its callback passed them on."""
    return [key for key in os.environ.get(SWEPT_KEYS_ENV, "").split(",") if key]


def finished_in(cfg: DictConfig, folder: Path, digest: str) -> float | None:
    """The precision of this config's run in `folder` if it trained every step and its
    MLflow run is FINISHED with every point stored; None otherwise."""
    state = saved_state(cfg, folder, digest)
    if state is None or state["step"] < cfg.steps or state["tracking"]["pending"]:
        return None
    try:
        run = resumable_run(cfg.tracking.uri, state["tracking"]["run_id"])
    except UserError:
        return None
    if run.info.status != "FINISHED":
        return None
    return float(state["loop"]["scores"].get("precision", math.nan))


def follow_log_files(old: Path, new: Path) -> None:
    """Point the log files that Hydra opened in folder `old` to the same names in `new`:
    those of this thread (a packed member's file takes only its own thread's lines)."""
    ours = logging.makeLogRecord({"threadName": threading.current_thread().name})
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == old \
                and handler.filter(ours):
            handler.acquire()
            try:
                handler.close()  # reopened at its next record, under its new name
                handler.baseFilename = str(new / Path(handler.baseFilename).name)
            finally:
                handler.release()


def remove_if_unused(folder: Path) -> None:
    """Remove a job folder that Hydra made and no job used: nothing in it but empty logs."""
    if not folder.is_dir() or folder == Path.cwd():  # hydra.job.chdir=true works in it
        return
    contents = list(folder.iterdir())
    if all(path.suffix == ".log" and path.stat().st_size == 0 for path in contents):
        for path in contents:
            path.unlink()
        folder.rmdir()
