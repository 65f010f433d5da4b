"""Credentials in URIs are masked wherever text is recorded."""

from __future__ import annotations

import logging

import pytest

from cifar_exp.tracking.redact import RedactingFilter, install_redaction, redact, redacted


@pytest.mark.parametrize("text,masked", [
    ("tracking.uri=http://user:secret@host:5000", "tracking.uri=http://***@host:5000"),
    ("postgresql+psycopg2://mlflow:pw@db:5432/mlflow", "postgresql+psycopg2://***@db:5432/mlflow"),
    ("https://token@host/api", "https://***@host/api"),
    ("a=http://u:p@h b=https://v:q@k", "a=http://***@h b=https://***@k"),
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),  # nothing to hide
    ("mail me: someone@example.com", "mail me: someone@example.com"),  # not a URI
    ("http://host/path@v2", "http://host/path@v2"),  # an @ after the host is no credential
])
def test_credentials_in_uris_are_masked(text, masked):
    assert redact(text) == masked


def test_nested_values_are_masked():
    config = {"tracking.uri": "http://u:secret@h", "steps": 3,
              "list": ["https://t@h", 1.5], "nested": {"uri": "http://a:b@c"}}
    assert redacted(config) == {"tracking.uri": "http://***@h", "steps": 3,
                                "list": ["https://***@h", 1.5], "nested": {"uri": "http://***@c"}}


def test_log_records_are_masked_by_the_installed_filter(caplog):
    install_redaction()
    install_redaction()  # twice: still one filter a handler
    for handler in logging.getLogger().handlers:
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "store %s", ("http://u:s@h",),
                               None)
    assert RedactingFilter().filter(record) and record.getMessage() == "store http://***@h"


def test_mlflow_s_own_log_handler_masks_credentials(capsys):
    # MLflow logs through a handler of its own (not the root's): e.g. its system-metrics
    # thread reports a failed request with the server's URL.
    install_redaction()
    mlflow_handlers = logging.getLogger("mlflow").handlers
    assert mlflow_handlers
    for handler in mlflow_handlers:
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    record = logging.LogRecord("mlflow.system_metrics", logging.WARNING, __file__, 1,
                               "Failed to get mlflow run: API request to %s failed",
                               ("http://user:secret@h:5000/api",), None)
    assert all(handler.filter(record) for handler in mlflow_handlers)
    assert record.getMessage() == ("Failed to get mlflow run: API request to "
                                   "http://***@h:5000/api failed")


def test_a_logger_left_without_handlers_is_masked_too(capsys):
    # Hydra's logging config empties the handlers of the loggers it names; one that MLflow
    # had set not to propagate then writes through logging.lastResort.
    install_redaction()
    orphan = logging.getLogger("cifar_exp_test_orphan")
    orphan.handlers, orphan.propagate = [], False
    orphan.warning("Failed to get mlflow run: API request to http://user:secret@h/api failed")
    assert capsys.readouterr().err == ("Failed to get mlflow run: API request to "
                                       "http://***@h/api failed\n")
