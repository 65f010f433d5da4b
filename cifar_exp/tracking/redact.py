"""Credentials never reach a record: `user:password@` in a URI (e.g. a tracking server's
`http://user:secret@host`) is masked wherever the project writes text down: MLflow params,
tags and artifacts, the log, the run folder's .hydra files and the checkpoint. MLflow reads
credentials from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or
MLFLOW_TRACKING_TOKEN), which are never recorded."""

from __future__ import annotations

import logging
import re
from typing import Any

# scheme://userinfo@ : the userinfo (a user, a user:password, or a token) is masked whole.
_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s]+@")
MASK = "***"


def redact(text: str) -> str:
    """`text` with the credentials of every URI in it masked."""
    return _CREDENTIALS.sub(lambda match: f"{match['scheme']}{MASK}@", text)


def redacted(value: Any) -> Any:
    """A copy of `value` (strings, and dicts and lists of them) with credentials masked."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redacted(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redacted(item) for item in value)
    return value


class RedactingFilter(logging.Filter):
    """A logging filter (conf/config.yaml attaches it to Hydra's and the job's handlers)
    that masks credentials in every record, e.g. a sweep's job overrides."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def install_redaction() -> None:
    """Mask credentials in every record written from now on by the handlers of the root
    logger (Hydra's console and the job's log file) and of any other logger that has its
    own, such as MLflow's (its system-metrics thread logs failed requests with their URL)."""
    import mlflow  # noqa: F401  (MLflow replaces its loggers' handlers on import: come after)

    named = logging.Logger.manager.loggerDict.values()
    loggers = [logging.getLogger(), *(item for item in named if isinstance(item, logging.Logger))]
    # logging.lastResort writes the records of a logger left without handlers (e.g. one that
    # Hydra's logging config emptied while MLflow had set it not to propagate).
    handlers = [logging.lastResort, *(handler for logger in loggers for handler in logger.handlers)]
    for handler in handlers:
        if handler is not None and not any(isinstance(existing, RedactingFilter)
                                           for existing in handler.filters):
            handler.addFilter(RedactingFilter())
