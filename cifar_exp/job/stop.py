"""SIGINT (Ctrl-C) and SIGTERM (preemption) as a request to stop at the next step boundary,
where the training loop saves a checkpoint first; a second signal stops at once."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from cifar_exp.errors import Stopped

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """A context manager that catches SIGINT and SIGTERM while it is open; calling it
    returns the number of the signal received, or None. Handlers can only be set from the
    main thread: elsewhere it never reports a stop and the signals keep their handlers. A
    signal the process was started with ignored (`nohup`, `&` in a script ignores SIGINT)
    stays ignored."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __call__(self) -> int | None:
        return self.signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the loop acts at a step boundary, where the state is consistent.
        if self.signum is not None:
            raise Stopped(signum, None)  # asked twice: stop now, without a checkpoint
        self.signum = signum
