"""A run's output folder: one process at a time (an OS lock), where its checkpoint goes and
whether it may be written there, and its .hydra/ record of the config, written only once
the command has been accepted (so a refused command changes nothing in the folder). Its
lock and record files never follow a link (cifar_exp.job.locks)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cifar_exp.errors import CheckpointError, UserError
from cifar_exp.job.locks import exclusive, write_atomically
from cifar_exp.tracking.redact import redact

FILENAME = "checkpoint.pt"
RECORD = ".hydra"  # Hydra's name for it; Hydra's own writing is off (conf/config.yaml)


def folder_lock(folder: Path) -> contextlib.AbstractContextManager[None]:
    """The run folder, one process at a time; held by another: Locked, in one line. Its
    record is checked here too, so that a link there is refused before any work."""
    check_record(folder)
    return exclusive(folder / ".lock", f"{folder} is in use: another process is running a "
                     f"job there; wait for it to end, or choose another hydra.run.dir")


def checkpoint_lock(path: Path) -> contextlib.AbstractContextManager[None]:
    """A checkpoint file, one process at a time (runs in different folders may name the
    same file); held by another: Locked, in one line."""
    return exclusive(path.with_name(f".{path.name}.lock"),
                     f"checkpoint {path} is in use: another process is training with it; "
                     f"wait for it to end, or choose another checkpoint.path")


def checkpoint_destination(configured: str | None, resumed_from: Path | None, folder: Path,
                           store_file: Path | None) -> Path:
    """Where a job writes its checkpoint: `configured` (checkpoint.path) if set, else the
    file it resumed from, else checkpoint.pt in its output folder. Refused: a folder, the
    tracking store's own file, and any existing file other than the one this job resumes
    from (a new run's, or another run's, or any other file)."""
    path = (Path(configured).expanduser() if configured
            else resumed_from or folder / FILENAME)
    try:
        return _checked_destination(path, resumed_from, store_file)
    except OSError as error:  # e.g. a name longer than the file system takes
        raise CheckpointError(f"checkpoint.path cannot be used ({error.strerror}); choose "
                              f"another") from error


def _checked_destination(path: Path, resumed_from: Path | None,
                         store_file: Path | None) -> Path:
    if path.is_dir():
        raise CheckpointError(f"checkpoint.path={path} is a folder; name a file in it, e.g. "
                              f"{path / FILENAME}")
    if store_file is not None and path.resolve() == store_file:
        raise CheckpointError(f"checkpoint.path={path} is the MLflow store itself; choose "
                              f"another file")
    if path.exists():
        if resumed_from is None:
            raise CheckpointError(f"{path} exists: if it is an interrupted run's checkpoint, "
                                  f"resume=true continues that run; to start afresh remove it "
                                  f"or choose another hydra.run.dir (or checkpoint.path)")
        if path.resolve() != resumed_from.resolve():
            raise CheckpointError(f"checkpoint.path={path} exists and is not the checkpoint "
                                  f"this run resumes from ({resumed_from}); choose a path that "
                                  f"does not exist, or leave checkpoint.path unset to keep "
                                  f"writing to {resumed_from}")
    return path


def check_writable(path: Path) -> None:
    """Refuse, before any training, a checkpoint destination whose folder cannot be made or
    written: otherwise the first save, maybe hours in, would fail."""
    if path.parent.exists() and not path.parent.is_dir():
        raise CheckpointError(f"checkpoints cannot be written to {path.parent}: it is a file, "
                              f"not a folder; choose another checkpoint.path or hydra.run.dir")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe",
                                             dir=path.parent)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        raise CheckpointError(f"checkpoints cannot be written to {path.parent} "
                              f"({error.strerror}); choose another checkpoint.path or "
                              f"hydra.run.dir") from error


def check_record(folder: Path) -> Path:
    """The run's record folder (.hydra/); refused if it is a link: its files would be
    written into the folder the link points to."""
    record = folder / RECORD
    if record.is_symlink():
        raise UserError(f"{record} is a symbolic link; a run's record must be a plain "
                        f"folder: remove the link")
    return record


def record_config(folder: Path, cfg: DictConfig, hydra: DictConfig,
                  overrides: Sequence[str], replace: bool) -> None:
    """Write .hydra/config.yaml, hydra.yaml and overrides.yaml into `folder`, as Hydra
    would, with credentials masked. `replace=False` (a resumed run) keeps the files its
    first job wrote."""
    record = check_record(folder)
    if not replace and (record / "overrides.yaml").exists():
        return
    record.mkdir(parents=True, exist_ok=True)
    files = {"config.yaml": OmegaConf.to_yaml(cfg),
             "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra})),
             "overrides.yaml": OmegaConf.to_yaml(OmegaConf.create(list(overrides)))}
    for name, text in files.items():
        # A new file renamed over the name: a link there is replaced, its target kept.
        write_atomically(record / name, redact(text).encode())

