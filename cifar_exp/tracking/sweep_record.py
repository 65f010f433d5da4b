"""A grid sweep's record of its jobs, `sweep_jobs.yaml` in its folder: its MLflow parent run,
the values every job shares (what the sweep means), and for each job folder the digest of
the config trained there and how the job ended. Run again in the same folder with
`resume=auto`, the sweep reads it to reopen its parent, skip the jobs that finished and
find each job's folder by its config rather than by its number.

The file is only ever replaced whole (locks.write_atomically), under a lock of its own, so
parallel jobs (joblib) and a kill at any moment leave it readable."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Collection, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cifar_exp.config import FREE_KEYS
from cifar_exp.errors import UserError
from cifar_exp.job.locks import exclusive, lock_file, write_atomically

FILENAME = "sweep_jobs.yaml"
# The record's path, set by the sweep callback for the jobs it launches (joblib's worker
# processes inherit it); a job without it is no job of a durable sweep.
RECORD_ENV = "CIFAR_EXP_SWEEP_RECORD"

# How a job ended; `started` also stands for one stopped or killed, which a resume continues.
STARTED, FINISHED, FAILED = "started", "finished", "failed"


@dataclass
class JobEntry:
    """One job folder of the sweep: the config it trains, and how it ended."""

    digest: str
    status: str = STARTED
    overrides: str = ""  # for a reader of the file: the job's overrides, credentials masked
    precision: float | None = None  # a finished job's result, returned again when skipped


@dataclass
class SweepRecord:
    parent_run_id: str = ""
    runs: int = 0  # how many times the sweep's command ran (its first run and resumes)
    fixed: dict[str, Any] = field(default_factory=dict)  # values no run of it swept
    jobs: dict[str, JobEntry] = field(default_factory=dict)  # by folder name

    def folder_of(self, digest: str) -> str | None:
        """The folder of the job that trains the config `digest`, if the sweep has one."""
        return next((name for name, job in self.jobs.items() if job.digest == digest), None)

    def new_folder(self, preferred: str, digest: str) -> str:
        """A folder for a new job: `preferred` (Hydra's, by the job's number) unless another
        job holds it (the grid grew and numbers moved), then one named by the digest too,
        which Hydra's numbering never makes."""
        return preferred if preferred not in self.jobs else f"{preferred}_{digest[:8]}"


def read_record(path: Path) -> SweepRecord | None:
    """The record at `path`; None where the sweep has none yet."""
    if not path.is_file():
        return None
    try:
        saved = yaml.safe_load(path.read_text()) or {}
        jobs = {str(name): JobEntry(**job) for name, job in (saved.pop("jobs") or {}).items()}
        return SweepRecord(**saved, jobs=jobs)
    except (yaml.YAMLError, TypeError, KeyError, AttributeError) as error:
        raise UserError(f"{path} is not a sweep record ({type(error).__name__}); move it "
                        f"away, or choose another hydra.sweep.dir") from None


def write_record(path: Path, record: SweepRecord) -> None:
    header = "# This sweep's jobs, read when it runs again with resume=auto (cifar_exp).\n"
    write_atomically(path, (header + yaml.safe_dump(asdict(record), sort_keys=False)).encode())


@contextlib.contextmanager
def updating(path: Path) -> Iterator[SweepRecord]:
    """The record, to change in the block and written back at its end, one process at a
    time (jobs of a parallel launcher wait for each other)."""
    with exclusive(lock_file(path), f"{path} is in use", wait=True):
        record = read_record(path) or SweepRecord()
        yield record
        write_record(path, record)


def sweep_lock(sweep_dir: Path) -> contextlib.AbstractContextManager[None]:
    """The sweep's folder, one command at a time; held by another: Locked, in one line."""
    return exclusive(sweep_dir / ".sweep.lock",
                     f"{sweep_dir} is in use: another command is running this sweep; wait "
                     f"for it to end, or choose another hydra.sweep.dir")


def what_is_trained(flat_config: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of a flat config that say what is trained (FREE_KEYS left out)."""
    return {key: value for key, value in flat_config.items() if not key.startswith(FREE_KEYS)}


def config_digest(flat_config: Mapping[str, Any], swept: Collection[str] = ()) -> str:
    """A job's identity: a digest of what it trains, the same however it was asked for
    (a key at its default, or given that value on the command line). The `swept` keys
    count even where they only say where things go: jobs the sweep set apart stay apart."""
    kept = {**what_is_trained(flat_config),
            **{key: flat_config[key] for key in swept if key in flat_config}}
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def changed_meaning(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """The keys that neither the recorded runs nor this one sweep, at another value now:
    `key=<recorded> there, <now> here`. A key swept before and not now, or now and not
    before, changes the grid, not its meaning."""
    return [f"{key}={recorded[key]} there, {now[key]} here" for key in sorted(recorded)
            if key in now and recorded[key] != now[key]]


def still_fixed(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, Any]:
    """The values no run so far swept: those the recorded runs and this one share."""
    return {key: value for key, value in recorded.items() if key in now and now[key] == value}
