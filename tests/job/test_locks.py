"""OS file locks: one process at a time, and free again once the holder is gone."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cifar_exp.job.locks import Locked, exclusive, is_free

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
