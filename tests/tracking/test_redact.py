"""Credentials are masked wherever text is recorded or printed: every spelling of them,
and every place a run or a sweep writes."""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra.types import RunMode
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from cifar_exp.tracking.redact import (
    RedactingFilter,
    RedactingStream,
    install_console_redaction,
    install_redaction,
    redact,
    redact_file,
    redacted,
)
from cifar_exp.tracking.report import write_report
from cifar_exp.tracking.sweep import SweepTracking
from tests.conftest import cli, mlflow_server


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


# Every spelling of a credential (hostile input round three).

@pytest.mark.parametrize("text,masked", [
    # A sweep's overrides: Hydra escapes `:` (and `=`), a YAML or JSON dump may double it.
    (r"tracking.uri=http\://user\:secret@127.0.0.1\:5000",
     r"tracking.uri=http\://***@127.0.0.1\:5000"),
    (r'"tracking.uri=http\\://user\\:secret@h"', r'"tracking.uri=http\\://***@h"'),
    # Percent-encoded: in the userinfo, its `@`, or the whole URI (a query parameter's).
    ("http://user%3Asecret@h/x", "http://***@h/x"),
    ("http://user:p%40ss@h", "http://***@h"),
    ("next=http%3A%2F%2Fuser%3Asecret%40h%2Fx", "next=http%3A%2F%2F***%40h%2Fx"),
    ("http://user:p@ss@h/path@v2", "http://***@h/path@v2"),  # a raw @ in the password
    ("s3+https://key:secret@minio:9000/b", "s3+https://***@minio:9000/b"),
])
def test_every_spelling_of_a_uri_s_credentials_is_masked(text, masked):
    assert redact(text) == masked


@pytest.mark.parametrize("text,masked", [
    ("https://h/api?token=secret", "https://h/api?token=***"),
    ("https://h/?password=secret&x=1", "https://h/?password=***&x=1"),
    ("https://h/?key=secret#top", "https://h/?key=***#top"),
    ("https://h/?a=1&api_key=secret", "https://h/?a=1&api_key=***"),
    ("https://h/?a=1&access_token=secret", "https://h/?a=1&access_token=***"),
    ("https://h/?client_secret=secret", "https://h/?client_secret=***"),
    ("https://b.s3/o?X-Amz-Credential=AK&X-Amz-Signature=secret",
     "https://b.s3/o?X-Amz-Credential=***&X-Amz-Signature=***"),
    (r"tracking.uri=http\://h/?token\=secret", r"tracking.uri=http\://h/?token\=***"),  # Hydra
    ("u=http%3A%2F%2Fh%2F%3Ftoken%3Dsecret", "u=http%3A%2F%2Fh%2F%3Ftoken%3D***"),
    ("https://h/?tokenizer=bert&author=me", "https://h/?tokenizer=bert&author=me"),  # no
])
def test_credential_query_parameters_are_masked(text, masked):
    assert redact(text) == masked


@pytest.mark.parametrize("text,masked", [
    ("hydra.job.env_set.MLFLOW_TRACKING_PASSWORD=secret seed=1",
     "hydra.job.env_set.MLFLOW_TRACKING_PASSWORD=*** seed=1"),
    ("env_set:\n  MLFLOW_TRACKING_TOKEN: secret\n", "env_set:\n  MLFLOW_TRACKING_TOKEN: ***\n"),
    ("export AWS_SECRET_ACCESS_KEY='se cret'", "export AWS_SECRET_ACCESS_KEY=***"),
    ("MLFLOW_TRACKING_USERNAME=bob", "MLFLOW_TRACKING_USERNAME=bob"),  # a name, not a secret
    ("MLFLOW_TRACKING_CLIENT_CERT_PATH=/etc/c.pem", "MLFLOW_TRACKING_CLIENT_CERT_PATH=/etc/c.pem"),
])
def test_values_given_to_credential_variables_are_masked(text, masked):
    assert redact(text) == masked


def test_the_values_of_credential_environment_variables_are_masked(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pa:ss=w0rd")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-123456")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")  # not a secret
    monkeypatch.setenv("MLFLOW_TRACKING_CLIENT_CERT_PATH", "/etc/client.pem")  # nor a path
    monkeypatch.setenv("SOME_TOKEN", "true")  # a flag: masking it would mask every "true"
    text = ("as typed pa:ss=w0rd, escaped pa\\:ss\\=w0rd, encoded pa%3Ass%3Dw0rd; "
            "bearer tok-123456; aws wJalrXUtnFEMI; user alice; cert /etc/client.pem; true")
    assert redact(text) == ("as typed ***, escaped ***, encoded ***; bearer ***; aws ***; "
                            "user alice; cert /etc/client.pem; true")


def test_a_file_is_rewritten_masked_and_a_clean_one_left_alone(tmp_path):
    written = tmp_path / "multirun.yaml"
    written.write_text("task:\n- tracking.uri=http\\://u\\:secret@h\n")
    written.chmod(0o644)
    clean = tmp_path / "clean.yaml"
    clean.write_text("steps: 3\n")
    binary = tmp_path / "weights.pt"
    binary.write_bytes(b"\x80\xff http://u:secret@h")
    assert redact_file(written) and written.read_text() == "task:\n- tracking.uri=http\\://***@h\n"
    assert written.stat().st_mode & 0o777 == 0o644
    assert not redact_file(clean) and not redact_file(binary)
    assert not redact_file(tmp_path / "absent.yaml")
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "clean.yaml", "multirun.yaml", "weights.pt"]  # no temporary file left behind


def test_printed_lines_are_masked_once_console_redaction_is_installed(monkeypatch):
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    install_console_redaction()
    install_console_redaction()  # twice: wrapped once
    assert isinstance(sys.stdout, RedactingStream) and sys.stdout.stream is out
    # MLflow's own line, written by TrackingServiceClient._log_url with the URI as given.
    sys.stdout.write("🏃 View run x at: http://user:secret@h:5000/#/experiments/1/runs/9\n")
    print("error: http\\://u\\:secret@h?token=secret", file=sys.stderr)
    sys.stdout.flush()
    assert out.getvalue() == "🏃 View run x at: http://***@h:5000/#/experiments/1/runs/9\n"
    assert err.getvalue() == "error: http\\://***@h?token=***\n"


# Where a sweep writes: its parent run, its folder (Hydra's multirun.yaml), its report.

def sweep_config(store: str, sweep_dir: Path, overrides: list[str]) -> DictConfig:
    """The part of a multirun's config that the sweep callback reads."""
    return OmegaConf.create({
        "tracking": {"uri": store, "experiment": "cifar_exp"},
        "hydra": {"mode": RunMode.MULTIRUN, "overrides": {"task": overrides},
                  "sweep": {"dir": str(sweep_dir)}, "output_subdir": ".hydra",
                  "runtime": {"output_dir": str(sweep_dir / "0")},
                  "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper."
                                          "BasicSweeper"},
                  "launcher": {"_target_": "hydra._internal.core_plugins.basic_launcher."
                                           "BasicLauncher"}}})


HYDRA_OVERRIDES = [r"tracking.registered_model_name=http\://user\:secret@h/m?token\=secret",
                   "seed=0,1"]


def test_the_sweep_parent_and_the_sweep_folder_hold_no_credentials(tmp_path, store,
                                                                   monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cifar-exp", "-m", *HYDRA_OVERRIDES])
    sweep_dir = tmp_path / "multirun"
    config = sweep_config(store, sweep_dir, HYDRA_OVERRIDES)
    tracking = SweepTracking()
    tracking.on_multirun_start(config)
    try:
        # What Hydra writes itself: the sweeper's multirun.yaml, a job's .hydra/.
        for path in (sweep_dir / "multirun.yaml", sweep_dir / "0" / ".hydra" / "hydra.yaml"):
            path.parent.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(config, path)
        tracking.on_job_start(config)
        for path in (sweep_dir / "multirun.yaml", sweep_dir / "0" / ".hydra" / "hydra.yaml"):
            assert "secret" not in path.read_text() and "http\\://***@h/m" in path.read_text()
        parent = MlflowClient(store).get_run(tracking.parent_run_id)
    finally:
        tracking._close(RunStatus.FAILED)
        atexit.unregister(tracking._close)
    recorded = [parent.info.run_name, *parent.data.tags.values()]
    assert not [text for text in recorded if "secret" in text]
    assert "tracking.registered_model_name=http\\://***@h/m?token\\=***" in parent.data.tags[
        "overrides"]


def test_the_report_masks_credentials_its_runs_were_recorded_with(tmp_path, store):
    # Runs recorded before a spelling was masked: the report shows them masked, in report.md,
    # on the parent's page (its note), and in what --out and the command print.
    client = MlflowClient(store)
    experiment = client.create_experiment("cifar_exp", (tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment, tags={"sweep": "parent"}).info.run_id
    for seed in (0, 1):
        uri = f"http\\://user\\:secret{seed}@h/?token\\=secret"
        run = client.create_run(experiment, run_name=f"tf_cnn-adam uri={uri}", tags={
            "mlflow.parentRunId": parent, "overrides": f"tracking.uri={uri} seed={seed}"})
        client.log_metric(run.info.run_id, "precision", 0.5 + seed / 10, step=2)
        client.set_terminated(run.info.run_id)
    report = write_report(store, tmp_path / "out", parent=parent, progress=False)
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    for text in (report.markdown, (tmp_path / "out" / "report.md").read_text(), note):
        assert "secret" not in text and "http\\://***@h/?token\\=***" in text


# One sweep end to end: nothing it writes, records or prints carries its credentials.

def every_text(folder: Path) -> Iterator[tuple[str, str]]:
    """(where, text) of every file under `folder` (bytes read as Latin-1: a checkpoint's
    pickled config too) and every value of every table of its SQLite stores."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix != ".db":
            yield str(path), path.read_bytes().decode("latin-1")
    for database in folder.rglob("*.db"):
        with contextlib.closing(sqlite3.connect(database)) as connection:
            tables = [name for (name,) in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                for row in connection.execute(f"SELECT * FROM {table}"):  # noqa: S608
                    yield f"{database}:{table}", repr(row)


def test_a_sweep_given_credentials_records_and_prints_none_of_them(tmp_path, data_root,
                                                                   store):
    # The store is a SQLite file (no credentials of its own): the swept value and the
    # environment's password are what a sweep over a tracking server would record.
    # Hydra escapes the swept URIs (http\://user\:secret@h/a); trial.study, unused outside
    # an Optuna search, holds a query token.
    result = cli(tmp_path, "-m",
                 "tracking.registered_model_name=http://user:secret@h/a,http://user:secret@h/b",
                 "trial.study='https://h/?token=secret'",
                 "+hydra.job.env_set.MLFLOW_TRACKING_PASSWORD=envsecret",
                 "steps=2", "eval_images=50", "tracking.log_model=false", "batch_size=32",
                 "tracking.system_metrics_seconds=0", f"tracking.uri={store}",
                 data_root=data_root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tracking.registered_model_name=http\\://***@h/a trial.study='https://h/?token=***'" in (
        result.stdout)  # the launcher's line for job #0
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("cifar_exp").experiment_id])
    assert len(runs) == 3  # the parent and its two jobs
    assert list(tmp_path.glob("multirun/*/*/multirun.yaml"))
    assert list(tmp_path.glob("multirun/*/*/report/report.md"))
    leaks = [where for where, text in [("stdout", result.stdout), ("stderr", result.stderr),
                                       *every_text(tmp_path)] if "secret" in text]
    assert not leaks


@pytest.mark.slow  # an MLflow server's start (its schema migrations), then the sweep: 20-45 s
def test_a_sweep_to_a_server_with_credentials_records_and_prints_none_of_them(tmp_path,
                                                                              data_root):
    # The server ignores the credentials; the client prints MLflow's "View run ... at:
    # <url>" lines with the URI as given, and the report names the store.
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path) as url:
        secret_url = url.replace("http://", "http://user:secret@")
        result = cli(tmp_path, "-m", "seed=0,1", "steps=2", "eval_images=50",
                     "tracking.log_model=false", "batch_size=32",
                     "tracking.system_metrics_seconds=0", f"tracking.uri={secret_url}",
                     data_root=data_root)
    assert result.returncode == 0, result.stderr[-3000:]
    masked = url.replace("http://", "http://***@")
    assert f"View run tf_cnn-adam seed=0 at: {masked}/#/experiments/" in result.stdout
    [report] = tmp_path.glob("multirun/*/*/report/report.md")
    assert f"tracking store {masked}." in report.read_text()
    leaks = [where for where, text in [("stdout", result.stdout), ("stderr", result.stderr),
                                       *every_text(tmp_path)] if "secret" in text]
    assert not leaks
