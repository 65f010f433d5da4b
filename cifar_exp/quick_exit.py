"""A command's end without the interpreter tearing its modules down.

With torch, MLflow and Hydra loaded, Python's own exit spends 1.5-2 s on a small machine
freeing module objects one by one, after the command's work is done and its files are
closed. The commands (`python -m cifar_exp.<command>` and the installed scripts) end here
instead: everything an exit promises still happens (threads joined, atexit handlers run,
which flush logging's files, MLflow's queues and multiprocessing's children, and the
standard streams flushed), then the process ends. An uncaught exception, Ctrl-C included,
takes the interpreter's usual way out.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn


def exit_status(code: object) -> int:
    """The status `SystemExit(code)` gives: None is 0, a number itself, anything else is
    printed to stderr and gives 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def exit_now(code: int) -> NoReturn:
    """End the process as the interpreter's exit would, less the tearing down of modules."""
    shutdown = getattr(threading, "_shutdown", None)  # what CPython's exit calls first
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os._exit(code)


def run_and_exit(main: Callable[[], object]) -> NoReturn:
    """Run a command's `main` and end the process with its status (what `main` returns or
    raises as SystemExit)."""
    try:
        code = exit_status(main())
    except SystemExit as stop:
        code = exit_status(stop.code)
    exit_now(code)
