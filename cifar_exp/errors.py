"""Errors that reach the user as one line: what is wrong and how to fix it."""

import argparse
import signal
import sys
from typing import NoReturn

BAD_INPUT_EXIT = 2  # the exit code of a refused command: nothing was started or written


def refused(error: BaseException | str) -> int:
    """Say `error: <what is wrong and how to fix it>` on stderr; the exit code of bad input,
    for a command's main() to return."""
    print(f"error: {error}", file=sys.stderr)
    return BAD_INPUT_EXIT


def refuse(error: BaseException | str) -> NoReturn:
    """Say the error in one line on stderr and exit with the code of bad input."""
    sys.exit(refused(error))


class CommandParser(argparse.ArgumentParser):
    """argparse for the commands: a bad command line is a UserError like any bad input,
    said in one line by the command (argparse's own way prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


class UserError(Exception):
    """Bad input (config, data, environment) that the user can fix; printed without traceback."""


class DataError(UserError):
    """A data set that is missing, incomplete or not CIFAR."""


class ConfigError(UserError):
    """A configuration value that cannot work."""


class NonFiniteLoss(Exception):
    """Training diverged: the loss became inf or nan at `step`."""

    def __init__(self, step: int, loss: float, lr: float) -> None:
        super().__init__(f"loss became {loss} at step {step} (lr {lr:g}); training stopped, "
                         f"the run is marked FAILED: try a lower optimizer.lr")
        self.step, self.loss, self.lr = step, loss, lr


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, untrusted, or from another run."""


class Pruned(Exception):
    """An Optuna trial stopped early: its pruner found it hopeless at `step`."""

    def __init__(self, trial: int, step: int, precision: float) -> None:
        super().__init__(f"trial {trial} pruned at step {step} (precision {precision:.4f}): "
                         f"the study's pruner finds it hopeless")
        self.trial, self.step, self.precision = trial, step, precision


class RecordFailure(Exception):
    """Training ran, but writing its record did not fully succeed: the tracking store or
    the checkpoint file failed. The message says what was kept and how to finish; the
    command exits with EXIT_CODE."""

    EXIT_CODE = 3


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training; `step` is the step boundary where it stopped
    (None: a second signal stopped it at once, without a checkpoint). A KeyboardInterrupt,
    so that code catching Exception lets it through and the MLflow run ends KILLED."""

    def __init__(self, signum: int, step: int | None) -> None:
        self.signal_name = signal.Signals(signum).name
        where = f"at step {step}" if step is not None else "at once"
        super().__init__(f"stopped by {self.signal_name} {where}")
        self.signum, self.step = signum, step
        self.hint = ""  # how to continue, filled in by whoever knows the checkpoint

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 130 SIGINT, 143 SIGTERM."""
        return 128 + self.signum


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut to `limit` characters (SQLAlchemy's carry
    the whole statement and its parameters; torch's several paragraphs)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
