"""A command's quick exit keeps every promise of the interpreter's own exit (threads joined,
atexit handlers run, log files and standard streams flushed, the status) and skips only the
tearing down of modules."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cifar_exp.quick_exit import exit_status

# A command in a fresh interpreter: its main leaves a thread running, an atexit handler, a
# log record and unflushed output, then ends as `ENDING` says.
COMMAND = """
import atexit, logging, sys, threading, time
from pathlib import Path
from cifar_exp.quick_exit import run_and_exit

out = Path(sys.argv[1])

class Teardown:
    def __del__(self):  # called when the interpreter tears its modules down
        (out / "teardown").write_text("ran")

kept_until_teardown = Teardown()

def main():
    atexit.register(lambda: (out / "atexit").write_text("ran"))
    def late():
        time.sleep(0.3)
        (out / "thread").write_text("joined")
    threading.Thread(target=late).start()
    logging.basicConfig(filename=out / "log", level=logging.INFO)
    logging.getLogger("command").info("logged")
    sys.stdout.write("unflushed")  # no newline: still in the buffer when main ends
    ENDING

run_and_exit(main)
"""


def run_command(tmp_path, ending: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", COMMAND.replace("ENDING", ending),
                           str(tmp_path)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("ending", "status", "stderr"), [
    ("return None", 0, ""), ("return 3", 3, ""), ("sys.exit(4)", 4, ""),
    ("sys.exit('error: refused')", 1, "error: refused\n")])
def test_a_command_ends_with_its_status_and_every_exit_promise_kept(tmp_path, ending, status,
                                                                    stderr):
    result = run_command(tmp_path, ending)
    assert (result.returncode, result.stdout, result.stderr) == (status, "unflushed", stderr)
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "joined"
    assert (tmp_path / "log").read_text() == "INFO:command:logged\n"
    assert not (tmp_path / "teardown").exists()  # the one thing skipped


def test_an_uncaught_exception_takes_the_interpreters_own_way_out(tmp_path):
    result = run_command(tmp_path, "raise RuntimeError('broken')")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == "RuntimeError: broken"  # its traceback
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "teardown").read_text() == "ran"


def test_exit_status_reads_systemexit_as_the_interpreter_does(capsys):
    assert [exit_status(code) for code in (None, 0, 2, 256 + 3)] == [0, 0, 2, 3]
    assert exit_status("a message") == 1
    assert capsys.readouterr().err == "a message\n"
