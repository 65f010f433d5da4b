"""Exclusive OS file locks (flock), held for as long as a process works on something that
one process at a time may write: a run folder, a checkpoint file, a new tracking store.
The OS drops a lock when its process ends, however it ends (SIGKILL included), so a lock
that can be taken proves that no earlier process still holds it.

Lock and state files never follow a link: a lock file that is a symbolic link (or has other
names, hard links) is refused, its target left untouched; a state file is written to a new
file beside it and renamed over its name, which replaces a link there instead of writing
through it."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import tempfile
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
    `wait`, else raise Locked(`refusal`, with the holder's pid and host appended). A link or
    anything but a plain file at `path`: UserError, in one line, the link's target
    untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = _open_lock_file(path)
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


def _open_lock_file(path: Path) -> int:
    """Open (or create) the lock file `path` for writing, without following a link there and
    without truncating: what it holds is only rewritten once the lock is held, and only if
    it is a plain file of its own (a hard link's other names would change too)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        descriptor = os.open(path, flags, 0o600)
    except OSError as error:
        if path.is_symlink():  # O_NOFOLLOW's ELOOP, a dangling link's too
            raise _not_plain(path, "is a symbolic link", "remove the link") from None
        if error.errno == errno.EISDIR:
            raise _not_plain(path, "is a folder", "remove it") from None
        raise
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode) or status.st_nlink > 1:
        os.close(descriptor)
        what = "has other names (hard links)" if stat.S_ISREG(status.st_mode) \
            else "is not a plain file (a pipe or a device)"
        raise _not_plain(path, what, "remove it")
    return descriptor


def _not_plain(path: Path, what: str, fix: str) -> UserError:
    return UserError(f"{path} {what}; a lock file must be a plain file: {fix}")


def is_free(path: Path) -> bool:
    """Whether no process holds the lock file `path` now (a link there: no process can
    hold it, exclusive() refuses links)."""
    try:  # O_NONBLOCK: opening a pipe to read would wait for a writer
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return True
    except OSError as error:
        if error.errno == errno.ELOOP:
            return True
        raise
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(descriptor)
    return True


def write_atomically(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` so that `path` always holds a whole file, the old one or the
    new one, and never through a link: write a new file in the same folder (mkstemp:
    O_EXCL, O_NOFOLLOW), flush it to the disk, rename it over `path` (which replaces a link
    there, not its target), then flush the folder so the rename survives a power cut."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                             dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
