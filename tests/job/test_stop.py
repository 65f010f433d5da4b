"""SIGINT and SIGTERM become a stop request; a second signal stops at once."""

from __future__ import annotations

import os
import signal

import pytest

from cifar_exp.errors import Stopped
from cifar_exp.job.stop import StopRequest


@pytest.mark.parametrize("signum,exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_first_signal_is_a_request_the_second_stops_at_once(signum, exit_code):
    # As a terminal starts a command: the signal handled (pytest started in the background,
    # `nohup` or `&` in a script, inherits SIGINT ignored, which StopRequest keeps ignored).
    started_with = signal.signal(signum, signal.default_int_handler
                                 if signum == signal.SIGINT else signal.SIG_DFL)
    try:
        stopped = check_request_then_stop(signum)
    finally:
        signal.signal(signum, started_with)
    assert stopped.value.step is None and stopped.value.exit_code == exit_code
    assert str(stopped.value) == f"stopped by {signal.Signals(signum).name} at once"


def check_request_then_stop(signum: int) -> pytest.ExceptionInfo[Stopped]:
    before = signal.getsignal(signum)
    with StopRequest() as stop:
        assert stop() is None
        os.kill(os.getpid(), signum)  # handled synchronously in the main thread
        assert stop() == signum  # no KeyboardInterrupt: the loop decides where to stop
        with pytest.raises(Stopped) as stopped:
            os.kill(os.getpid(), signum)
    assert signal.getsignal(signum) is before  # the previous handler is back
    return stopped


def test_a_signal_the_process_ignores_stays_ignored():
    # Started with SIGINT ignored (nohup, `&` in a script): Ctrl-C's signal must not stop it.
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop() is None
            assert signal.getsignal(signal.SIGTERM) == stop._handle  # SIGTERM still stops
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
