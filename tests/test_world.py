"""This process's place among a job's processes, and its age (cifar_exp.world)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Prints, as JSON, the ages world.py gives the process running it and the clock beside them.
AGES = ("import json, time, psutil; from cifar_exp import world; "
        "print(json.dumps({'interpreter': world.interpreter_seconds(), "
        "'process': world.process_seconds(), "
        "'psutil': time.time() - psutil.Process().create_time(), "
        "'monotonic': time.monotonic()}))")


def ages_of(command: list[str]) -> tuple[dict[str, float], float]:
    """What AGES printed in `command`, and the monotonic clock (system-wide) just before
    the command started."""
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(result.stdout), started


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads Linux's /proc")
def test_a_process_age_is_read_by_one_clock_from_its_creation():
    ages, started = ages_of([sys.executable, "-c", AGES])
    at_most = ages["monotonic"] - started  # it was created after `started`
    assert 0 < ages["process"] <= at_most + 0.011  # its creation is known to a 10 ms tick
    # psutil's wall-clock reading adds /proc/stat's whole-second boot time: up to 1 s high.
    assert -0.011 <= ages["psutil"] - ages["process"] < 1.0
    # A process that ran nothing before it became the interpreter: the interpreter's age.
    assert ages["interpreter"] == pytest.approx(ages["process"], abs=0.011)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads Linux's /proc")
def test_a_shell_that_becomes_the_interpreter_leaves_its_commands_out():
    # `bash -c 'a && python ...'` runs python in the shell's own process, as exec does.
    line = f"sleep 2 && exec {shlex.quote(sys.executable)} -c {shlex.quote(AGES)}"
    ages, started = ages_of(["sh", "-c", line])
    assert ages["process"] >= 2.0  # the process is as old as the whole line
    # The interpreter started after the sleep (give or take the shell's own CPU time).
    assert 0 < ages["interpreter"] <= ages["monotonic"] - started - 2.0 + 0.05
