"""Exclusive OS file locks (flock), held for as long as a process works on something that
one process at a time may write: a run folder, a checkpoint file, a new tracking store.
The OS drops a lock when its process ends, however it ends (SIGKILL included), so a lock
that can be taken proves that no earlier process still holds it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from cifar_exp.errors import UserError


class Locked(UserError):
    """Another process holds the lock."""


def lock_file(path: Path) -> Path:
    """The hidden lock file that stands for `path` (a file or a folder), beside it."""
    return path / ".lock" if path.is_dir() else path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def exclusive(path: Path, refusal: str, wait: bool = False) -> Iterator[None]:
    """Hold the lock file `path` for the block. Held by another process: wait for it with
    `wait`, else raise Locked(`refusal`, with the holder's pid and host appended)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(descriptor, 200, 0).decode(errors="replace").strip()
            raise Locked(f"{refusal} (held by {holder or 'another process'})") from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def is_free(path: Path) -> bool:
    """Whether no process holds the lock file `path` now."""
    if not path.exists():
        return True
    descriptor = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(descriptor)
    return True
