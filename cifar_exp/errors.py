"""Errors that reach the user as one line: what is wrong and how to fix it. Hydra's own
composition errors (a value of the wrong type, a key or option that does not exist, an
override its grammar cannot read) are said so too, with what to type instead: Hydra's
messages span several lines, and its hint for an unknown key (`+key=`) leads into this
project's refusal of new keys."""

import argparse
import difflib
import re
import signal
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:  # Hydra is the commands' business: the trainer imports this module too
    from hydra.errors import HydraException


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


# Hydra's composition errors, in one line.
UNKNOWN_KEY = re.compile(r"Could not override '(?P<key>[^']+)'")
MERGE = re.compile(r"Error merging override (?P<override>.+)")
MISSING_OPTION = re.compile(r"Could not find '(?P<group>.+)/(?P<option>[^/']+)'")
KEYS_HINT = "`python -m cifar_exp.run --cfg job` lists the keys and their values"


def one_line_composition_error(error: "HydraException", known_keys: list[str],
                               owners: Mapping[str, list[str]]) -> str:
    """`error` in one line: what is wrong and what to type instead. `known_keys` (dotted)
    give the nearest key to a misspelt one; `owners`, the group options that have a key
    (`optimizer.momentum` -> sgd, sgd_decay)."""
    from hydra.errors import MissingConfigException, OverrideParseException

    message = str(error)
    cause = _first_line(error.__cause__)
    if unknown := UNKNOWN_KEY.search(message):
        key = unknown["key"]
        if key in owners:  # a real key, of another option than the one chosen
            group = key.split(".")[0]
            return (f"{key}: the {group} chosen has no such key; choose one that has it "
                    f"(e.g. {group}={' or '.join(owners[key])}) before it on the command line, "
                    f"or sweep only over those")
        near = difflib.get_close_matches(key, known_keys, n=1, cutoff=0.75)
        guess = f"did you mean {near[0]}? " if near else ""
        return f"{key} is not a config key ({guess}{KEYS_HINT})"
    if merge := MERGE.search(message):
        override = merge["override"]
        if override.startswith("~"):
            return removes_needed_key(override.lstrip("~").partition("=")[0])
        return f"{override}: {cause}; give {override.split('=', 1)[0]} a value of its type"
    if isinstance(error, MissingConfigException) and (missing := MISSING_OPTION.search(message)):
        return no_such_option(missing["group"], missing["option"], _available_options(message))
    if isinstance(error, OverrideParseException):
        return f"{error.override} cannot be read ({_grammar_reason(message)}); " \
               f"quote the value: key='...' (with \\' for a quote inside)"
    lines = [line.strip() for line in message.split("Config search path:")[0].splitlines()]
    return " ".join(line for line in [*lines, cause] if line)


def removes_needed_key(key: str) -> str:
    return (f"~{key} removes a key every run needs; give it a value ({key}=...) or leave "
            f"it out for its default")


def no_such_option(group: str, option: str, options: list[str]) -> str:
    choices = f"; choose one of {', '.join(options)}" if options else ""
    return f"{group}={option}: there is no such option{choices}"


def _grammar_reason(message: str) -> str:
    """What Hydra's override grammar found wrong, without its token sets and its link."""
    for line in message.splitlines():
        line = line.strip()
        if line and not line.startswith(("Error parsing override", "See https", "^")):
            if line.startswith("LexerNoViableAltException"):
                return "a character it does not take there"
            return re.sub(r" expecting (\{.*\}|\S+)", "", line)
    return "Hydra's override grammar"


def _first_line(error: BaseException | None) -> str:
    return str(error).strip().splitlines()[0] if error is not None and str(error) else ""


def _available_options(message: str) -> list[str]:
    """The options Hydra lists after `Available options in '<group>':`."""
    listed = message.split("Config search path:")[0].split("Available options in", 1)[1:]
    return [line.strip() for line in listed[0].splitlines()[1:] if line.startswith("\t")
            ] if listed else []
