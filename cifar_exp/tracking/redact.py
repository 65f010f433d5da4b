"""Credentials never reach a record or the console: they are masked wherever the project
writes text down (MLflow params, tags, notes and artifacts, the log, the run folder's and
the sweep folder's .hydra files and multirun.yaml, reports, the checkpoint) and in what
the command prints (stdout and stderr, MLflow's own "View run ... at: <url>" lines).

Masked: the userinfo of a URI (`http://user:secret@host`, any scheme), as typed, as Hydra
escapes it in a sweep's overrides (`http\\://user\\:secret@host`) or percent-encoded
(`http%3A%2F%2Fuser%3Asecret%40host`); the value of a query parameter named like a
credential (`?token=`, `&password=`, `api_key`, `access_token`, `X-Amz-Signature`, ...);
the value given to a credential variable (`hydra.job.env_set.MLFLOW_TRACKING_PASSWORD=...`,
its `NAME: value` line in a YAML file); and, wherever it appears, the value of any
credential environment variable set in the process (MLFLOW_TRACKING_PASSWORD,
MLFLOW_TRACKING_TOKEN, AWS_SECRET_ACCESS_KEY, any *_PASSWORD, *_TOKEN, *_SECRET, ...; not
MLFLOW_TRACKING_USERNAME). MLflow reads credentials from those variables: give them there,
never in tracking.uri."""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

MASK = "***"

# scheme://userinfo@ : the userinfo (a user, a user:password, or a token) is masked whole.
# `:` may come Hydra-escaped (`\:`, any number of backslashes in a YAML or JSON dump of
# it) or percent-encoded, and so may `//` and `@`. The userinfo is the authority up to its
# last `@`: a password may hold a raw `@`; it never holds `/`, `?`, `#` or a space.
_AUTHORITY_CHAR = r"(?:(?!%2[Ff]|%3[Ff]|%23)[^/?#\s])"
_USERINFO = re.compile(
    r"(?P<prefix>[A-Za-z][A-Za-z0-9+.\-]*(?:\\*:|%3[Aa])(?://|%2[Ff]%2[Ff]))"
    rf"(?P<userinfo>{_AUTHORITY_CHAR}+)(?P<at>@|%40)")
# ?token=..., &password=..., ;AccountKey=... (a parameter whose name ends in a credential's
# word), `=` plain, Hydra-escaped or percent-encoded: its value up to the next parameter.
_CREDENTIAL_WORDS = (r"token|password|passwd|pwd|secret|key|apikey|signature|sig|auth"
                     r"|credentials?")
_QUERY_PARAMETER = re.compile(
    rf"(?P<name>(?:[?&;]|%3[Ff]|%26)[\w.\-]*?(?:{_CREDENTIAL_WORDS})(?:\\*=|%3[Dd]))"
    r"(?P<value>[^&#\s'\"]+)", re.IGNORECASE)
# NAME=value, NAME: value where NAME is a credential variable's: an override
# hydra.job.env_set.MLFLOW_TRACKING_PASSWORD=..., its line in hydra.yaml, a shell's export.
_ASSIGNMENT = re.compile(r"\b(?P<name>[A-Za-z][A-Za-z0-9_]*)(?P<sep>\\*=|:[ \t]*)"
                         r"(?P<value>'[^'\n]*'|\"[^\"\n]*\"|[^\s'\",}\]]+)")
# Environment variables that hold a credential (MLFLOW_TRACKING_USERNAME and
# MLFLOW_TRACKING_CLIENT_CERT_PATH do not: a name and a path).
_SECRET_VARIABLE = re.compile(r"(?:^|_)(?:PASSWORD|PASSWD|TOKEN|SECRET|SECRET_KEY"
                              r"|SECRET_ACCESS_KEY|ACCESS_KEY|API_KEY|CONNECTION_STRING)$")
# Shorter values (or a flag's) would mask ordinary words all over the text.
MIN_SECRET_LENGTH = 4
_NOT_SECRETS = {"true", "false", "none", "null", "yes", "no"}
# What Hydra escapes with a backslash in a sweep's overrides (hydra/_internal/grammar).
_HYDRA_SPECIAL = re.compile(r"[\\()\[\]{}:=, \t]")


def redact(text: str) -> str:
    """`text` with every credential in it masked: URIs' userinfo, credential query
    parameters, values given to credential variables, and the values of the credential
    environment variables set here."""
    text = _USERINFO.sub(lambda match: f"{match['prefix']}{MASK}{match['at']}", text)
    text = _QUERY_PARAMETER.sub(lambda match: f"{match['name']}{MASK}", text)
    text = _ASSIGNMENT.sub(_masked_assignment, text)
    secrets = _secret_values()
    return _secrets_pattern(secrets).sub(MASK, text) if secrets else text


def redacted(value: Any) -> Any:
    """A copy of `value` (strings, and dicts and lists of them) with credentials masked."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redacted(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redacted(item) for item in value)
    return value


def _masked_assignment(match: re.Match[str]) -> str:
    if not is_secret_variable(match["name"]):
        return match[0]
    return f"{match['name']}{match['sep']}{MASK}"


@functools.lru_cache(maxsize=1024)
def is_secret_variable(name: str) -> bool:
    """Whether the environment variable (or config key) `name` holds a credential."""
    return _SECRET_VARIABLE.search(name.upper()) is not None


def _secret_values() -> tuple[str, ...]:
    # Read at each call: a variable set after the start (hydra.job.env_set) counts too.
    return tuple(sorted({value for name, value in os.environ.items()
                         if len(value) >= MIN_SECRET_LENGTH and is_secret_variable(name)
                         and value.lower() not in _NOT_SECRETS}))


@functools.lru_cache(maxsize=8)
def _secrets_pattern(secrets: tuple[str, ...]) -> re.Pattern[str]:
    """The values as written, percent-encoded and Hydra-escaped; the longest first, so a
    value containing another is masked whole."""
    spellings = {form for value in secrets for form in (
        value, quote(value, safe=""), _HYDRA_SPECIAL.sub(r"\\\g<0>", value))}
    ordered = sorted(spellings, key=len, reverse=True)
    return re.compile("|".join(re.escape(form) for form in ordered))


def redact_file(path: Path) -> bool:
    """Rewrite the text file `path` with credentials masked (a file that other writers read
    is replaced at once, never seen half-written); True if it held any. A file that is
    absent or not text is left alone."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    masked = redact(text)
    if masked == text:
        return False
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(descriptor, "w") as file:
        file.write(masked)
    os.chmod(temporary, path.stat().st_mode)  # as readable as it was (mkstemp: owner only)
    os.replace(temporary, path)
    return True


class RedactingFilter(logging.Filter):
    """A logging filter (install_redaction attaches it to every handler) that masks
    credentials in every record, e.g. a sweep's job overrides."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


class RedactingStream:
    """A text stream (sys.stdout, sys.stderr) that masks credentials in what is written
    to it: print() and sys.stdout.write() of other packages, such as MLflow's "View run
    ... at: <url>" lines, which carry the tracking URI as given. Everything but writing
    is the wrapped stream's."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(redact(text))
        return len(text)  # what the caller gave, as a stream answers

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def install_console_redaction() -> None:
    """Mask credentials in all that this process writes to sys.stdout and sys.stderr from
    now on (once: a stream already masked is kept)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))


def install_redaction() -> None:
    """Mask credentials in every record written from now on by the handlers of the root
    logger (Hydra's console and the job's log file) and of any other logger that has its
    own, such as MLflow's (its system-metrics thread logs failed requests with their URL),
    and in what is printed (install_console_redaction)."""
    import mlflow  # noqa: F401  (MLflow replaces its loggers' handlers on import: come after)

    install_console_redaction()
    named = logging.Logger.manager.loggerDict.values()
    loggers = [logging.getLogger(), *(item for item in named if isinstance(item, logging.Logger))]
    # logging.lastResort writes the records of a logger left without handlers (e.g. one that
    # Hydra's logging config emptied while MLflow had set it not to propagate).
    handlers = [logging.lastResort, *(handler for logger in loggers for handler in logger.handlers)]
    for handler in handlers:
        if handler is not None and not any(isinstance(existing, RedactingFilter)
                                           for existing in handler.filters):
            handler.addFilter(RedactingFilter())
