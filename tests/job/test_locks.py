"""OS file locks: one process at a time, and free again once the holder is gone."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cifar_exp.errors import UserError
from cifar_exp.job.locks import Locked, exclusive, is_free, write_atomically

HOLD = ("import sys, time; from pathlib import Path; from cifar_exp.job.locks import exclusive\n"
        "with exclusive(Path(sys.argv[1]), 'held'):\n"
        "    print('holding', flush=True); time.sleep(600)")


def holder(path: Path) -> subprocess.Popen:
    """Another process that takes the lock and keeps it until it is killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "holding"
    return process


def test_a_second_process_is_refused_with_who_holds_it(tmp_path):
    path = tmp_path / ".lock"
    process = holder(path)
    try:
        assert not is_free(path)
        with pytest.raises(Locked, match=rf"^in use \(held by pid {process.pid} on "), \
                exclusive(path, "in use"):
            pass
    finally:
        process.send_signal(signal.SIGKILL)  # no chance to let go: the OS does
        process.wait()
    assert is_free(path)
    with exclusive(path, "in use"):
        assert not is_free(path)  # this process holds it now


def test_waiting_for_a_lock_takes_it_once_it_is_let_go(tmp_path):
    path = tmp_path / ".lock"
    process = holder(path)
    killer = subprocess.Popen([sys.executable, "-c",
                               f"import os, time; time.sleep(1); os.kill({process.pid}, 9)"])
    start = time.monotonic()
    with exclusive(path, "in use", wait=True):
        assert time.monotonic() - start > 0.5  # it waited for the holder to go
    process.wait()
    killer.wait()


def victim(tmp_path: Path) -> Path:
    """A file that a lock or state file must never write through a link to."""
    target = tmp_path / "precious.txt"
    target.write_bytes(b"keep me\n")
    return target


@pytest.mark.parametrize("dangling", [False, True])
def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(tmp_path, dangling):
    target = victim(tmp_path)
    path = tmp_path / ".lock"
    path.symlink_to(tmp_path / "nowhere" if dangling else target)
    with pytest.raises(UserError, match=rf"^{path} is a symbolic link; a lock file must be a "
                                        rf"plain file: remove the link$"), \
            exclusive(path, "in use"):
        pytest.fail("locked through a link")
    assert target.read_bytes() == b"keep me\n"
    assert path.is_symlink() and not (tmp_path / "nowhere").exists()
    assert is_free(path)  # nobody can hold a lock through a link


@pytest.mark.parametrize("kind,what", [("hard link", "has other names (hard links)"),
                                       ("pipe", "is not a plain file (a pipe or a device)"),
                                       ("folder", "is a folder")])
def test_a_lock_file_that_is_not_a_plain_file_of_its_own_is_refused(tmp_path, kind, what):
    target = victim(tmp_path)
    path = tmp_path / ".lock"
    {"hard link": lambda: os.link(target, path), "pipe": lambda: os.mkfifo(path),
     "folder": path.mkdir}[kind]()
    with pytest.raises(UserError, match=rf"^{path} {re.escape(what)}; a lock file must be a "
                                        rf"plain file: remove it$"), \
            exclusive(path, "in use"):
        pytest.fail("locked something that is not a plain file")
    assert target.read_bytes() == b"keep me\n"


def test_a_state_file_replaces_a_link_instead_of_writing_through_it(tmp_path):
    target = victim(tmp_path)
    path = tmp_path / "state"
    path.symlink_to(target)
    write_atomically(path, b"new state")
    assert not path.is_symlink() and path.read_bytes() == b"new state"
    assert target.read_bytes() == b"keep me\n"
    assert sorted(os.listdir(tmp_path)) == ["precious.txt", "state"]  # no temporary left
