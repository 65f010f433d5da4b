"""A Python that has imported the project's dependencies once and runs each command it is sent
in a forked child, as `python -m MODULE ARGS` would, without paying interpreter start-up and
imports again (torch, MLflow and Hydra take seconds on a small machine).

The child is a process of its own: its own folder, environment, standard streams (files),
exit status and signals. It runs the module as `__main__` with
`runpy` and ends as the project's commands end (cifar_exp.quick_exit): threads joined,
atexit handlers run, streams flushed, its modules not torn down, which would write to every
object inherited from the warm interpreter, copying its memory page by page.

Protocol, one JSON object per line: requests on stdin {"module", "args", "cwd", "env",
"stdout", "stderr"}; replies on stdout {"started": pid} at once and
{"ended": pid, "returncode": code} when the child ends (negative: killed by that signal).
Started by tests/conftest.py; it exits when its stdin closes.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import pkgutil
import queue
import runpy
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path

from cifar_exp.quick_exit import exit_now, exit_status

# What the commands import anyway (not the commands themselves: `-m` runs a module that is
# not imported yet); nothing here may start a thread, which a forked child would lack.
PRELOAD = ("torch", "torchvision", "mlflow", "mlflow.pytorch", "mlflow.pyfunc",
           "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.db.utils",
           "mlflow.system_metrics.system_metrics_monitor", "mlflow.tracing", "git",
           "matplotlib.pyplot", "optuna", "hydra", "omegaconf", "cifar_exp.config",
           "cifar_exp.models", "cifar_exp.augment", "cifar_exp.job.job",
           "cifar_exp.tracking.runs", "cifar_exp.tracking.sweep", "cifar_exp.tracking.report",
           "cifar_exp.training.loop", "cifar_exp.serving.trained")


def preload() -> None:
    """Import PRELOAD and the Hydra plugins (Hydra imports every one of them at start-up),
    and compose a config once."""
    for name in PRELOAD:
        importlib.import_module(name)
    import hydra_plugins

    for plugin in pkgutil.walk_packages(hydra_plugins.__path__, "hydra_plugins."):
        importlib.import_module(plugin.name)
    # Hydra's first composition builds its override parser (ANTLR) and finds its plugins:
    # done once here, the same in every child.
    from hydra.core.plugins import Plugins

    from cifar_exp.config import compose_config

    Plugins.instance()
    compose_config(["optimizer=sgd"])


def reply(message: dict) -> None:
    try:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()  # before any fork: a child must not inherit unwritten replies
    except BrokenPipeError:  # the test process is gone: so is the need for this one
        os._exit(0)


def run_child(request: dict) -> None:
    """In the forked child: become the command, run it, exit; never returns."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
    sys.path[0] = request["cwd"]  # `python -m` puts the current folder first
    sys.argv = [request["module"], *request["args"]]
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        code = exit_status(stop.code)
    except BaseException:
        sys.excepthook(*sys.exc_info())  # the traceback, as an uncaught exception prints it
        code = 1
    exit_now(code)


def serve() -> None:
    children: set[int] = set()
    pending = b""
    while True:
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                reply({"ended": pid, "returncode": os.waitstatus_to_exitcode(status)})
        if not select.select([0], [], [], 0.05)[0]:
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            return
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                run_child(request)
            children.add(pid)
            reply({"started": pid})


class WarmPython:
    """The test side: one warm interpreter, started on first use by `warm_python()`."""

    def __init__(self) -> None:
        self.server = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, cwd=Path(__file__).parent)
        self.started: queue.Queue[int] = queue.Queue()
        self.ended: dict[int, int] = {}
        self.changed = threading.Condition()
        self.requests = threading.Lock()
        self.ready = False  # its imports go on in the background until the first command

    def wait_until_ready(self) -> None:
        """Wait for its imports to finish (the first command waits anyway)."""
        with self.requests:
            self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        if self.ready:
            return
        ready = json.loads(self.server.stdout.readline() or "{}")
        if not ready.get("ready"):
            raise RuntimeError(f"the warm interpreter did not start (exit {self.server.wait()})")
        threading.Thread(target=self._read_replies, daemon=True).start()
        self.ready = True

    def _read_replies(self) -> None:
        for line in self.server.stdout:
            message = json.loads(line)
            if "started" in message:
                self.started.put(message["started"])
            else:
                with self.changed:
                    self.ended[message["ended"]] = message["returncode"]
                    self.changed.notify_all()

    def start(self, module: str, args: list[str], cwd: Path, env: dict[str, str],
              stdout: Path, stderr: Path) -> WarmProcess:
        request = {"module": module, "args": list(args), "cwd": str(cwd), "env": env,
                   "stdout": str(stdout), "stderr": str(stderr)}
        with self.requests:  # one at a time, so that the next "started" is this one's
            self._wait_until_ready()
            self.server.stdin.write((json.dumps(request) + "\n").encode())
            self.server.stdin.flush()
            pid = self.started.get(timeout=60)
        return WarmProcess(self, pid, [sys.executable, "-m", module, *args])

    def returncode(self, pid: int, timeout: float | None) -> int | None:
        with self.changed:
            self.changed.wait_for(lambda: pid in self.ended, timeout)
            return self.ended.get(pid)


@functools.cache
def shared_warm_python() -> WarmPython:
    """The one warm interpreter of this test process. Kept here, not in conftest.py: pytest
    imports conftest.py as `conftest` while test files import it as `tests.conftest`, two
    modules with a cache each, which had started a second warm interpreter."""
    return WarmPython()


class WarmProcess:
    """A command started by the warm interpreter, with the part of subprocess.Popen's
    interface the tests use."""

    def __init__(self, server: WarmPython, pid: int, args: list[str]) -> None:
        self.server, self.pid, self.args = server, pid, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.wait(timeout=0) if self.returncode is None else self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self.server.returncode(self.pid, timeout)
        if self.returncode is None and timeout != 0:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


if __name__ == "__main__":
    preload()
    reply({"ready": True})
    serve()
