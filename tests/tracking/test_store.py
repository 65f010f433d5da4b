"""The tracking store: which URIs are accepted, and opening it one process at a time."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from cifar_exp import evaluate
from cifar_exp.errors import ConfigError, UserError
from cifar_exp.tracking.store import (
    check_tracking_uri,
    default_artifact_location,
    log_data_inputs,
    open_experiment,
    sqlite_path,
    store_opening,
    with_retries,
)
from tests.conftest import cli


def test_artifacts_live_beside_the_database(tmp_path):
    location = default_artifact_location(f"sqlite:///{tmp_path}/x.db")
    assert location == (tmp_path / "mlartifacts").as_uri()
    assert default_artifact_location("http://127.0.0.1:5000") is None


def test_unreachable_tracking_is_reported_up_front(tmp_path):
    with pytest.raises(ConfigError, match=r"MLflow tracking server http://127.0.0.1:9 does "
                                          r"not answer"):
        check_tracking_uri("http://127.0.0.1:9")
    with pytest.raises(ConfigError, match="does not exist; create it"):
        check_tracking_uri(f"sqlite:///{tmp_path}/missing/mlflow.db")
    check_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")  # a new file in a real folder is fine


@pytest.fixture
def mlflow_store(store: str) -> str:
    """A store with one experiment in it."""
    open_experiment(store, "kept")
    return store


def stores(tmp_path: Path) -> dict[str, str]:
    """Files that are not MLflow stores, by what they are."""
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"weights": torch.zeros(3)}, checkpoint)
    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as connection:
        connection.execute("CREATE TABLE notes (text)")
        connection.commit()
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    return {"checkpoint": str(checkpoint), "other": str(other), "damaged": str(damaged)}


@pytest.mark.parametrize("uri,message", [
    ("./mlruns", "tracking.uri=./mlruns is not a store this project writes to"),
    ("file:///tmp/mlruns", "tracking.uri=file:///tmp/mlruns is not a store this project"),
    ("sqlite:///:memory:", "keeps nothing once the command ends; give a file"),
    ("sqlite://", "keeps nothing once the command ends"),
    ("sqlite:///{tmp}", "is a folder; name a database file inside it"),
    ("sqlite:///{checkpoint}", "checkpoint.pt is not an SQLite database; choose another file"),
    ("sqlite:///{other}", "other.db is another program's SQLite database, not an MLflow store"),
    ("sqlite:///{damaged}", "damaged.db is damaged"),
    ("sqlite:///~/mlflow.db", "SQLite does not expand ~ (the store would be "),
    ("sqlite:///file:~/mlflow.db?uri=true", "SQLite does not expand ~ (the store would be "),
    ("sqlite:////dev/null", "/dev/null is not a regular file (a device or a pipe keeps "
                            "nothing)"),
    ("sqlite:///file:{tmp}/m.db?mode=ro&uri=true", "opens the store read-only"),
    ("sqlite:///file://host/m.db?uri=true", "names the host 'host'; SQLite opens local"),
    ("sqlite://host/m.db", "tracking.uri=sqlite://host/m.db is not a valid SQLite URI "
                           "(Invalid SQLite URL: sqlite://host/m.db); use sqlite:///<file>"),
    ("postgresql+psycopg2://mlflow:secret@127.0.0.1:9/mlflow",
     "the tracking database postgresql+psycopg2://***@127.0.0.1:9/mlflow does not answer"),
    ("http://user:secret@127.0.0.1:9", "MLflow tracking server http://***@127.0.0.1:9 does "
                                       "not answer"),
])
def test_stores_mlflow_would_refuse_or_that_keep_nothing_are_refused(tmp_path, uri, message):
    files = stores(tmp_path)
    before = {path: Path(path).read_bytes() for path in files.values()}
    uri = uri.format(tmp=tmp_path, **files)
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        check_tracking_uri(uri)
    assert "secret" not in str(error.value) and "\n" not in str(error.value)
    assert {path: Path(path).read_bytes() for path in files.values()} == before  # untouched


# The same store that keeps nothing, however it is spelled: SQLite URI filenames (SQLAlchemy
# passes uri=true on), an empty name (a temporary database), the memdb VFS, any case, and
# percent-encoded once or twice. Each of these trained and exited 0 with nothing kept.
IN_MEMORY = [
    "sqlite:///:memory:",
    "sqlite://",
    "sqlite:///",
    "sqlite:///?uri=true",
    "sqlite:///%3Amemory%3A",
    "sqlite:///:MEMORY:",
    "sqlite:///file:x?mode=memory&uri=true",
    "sqlite:///file::memory:?cache=shared&uri=true",
    "sqlite:///file:memdb1?mode=memory&cache=shared&uri=true",
    "sqlite:///file:x?MODE=Memory&uri=TRUE",
    "sqlite:///file:x?mode%3Dmemory&uri=true",
    "sqlite:///file:x?mode=mem%6Fry&uri=1",
    "sqlite:///file:x%3Fmode%3Dmemory?uri=true",
    "sqlite:///file:%253Amemory%253A?uri=true",
    "sqlite:///file:?uri=true",
    "sqlite:///file://?uri=true",
    "sqlite:///file:?mode=rwc&uri=true",
    "sqlite:///file:/x?vfs=memdb&uri=true",
    "sqlite:///file:x?mode=memory",
]
KEEPS_NOTHING = "keeps nothing once the command ends; give a file: sqlite:///<path>"


@pytest.mark.parametrize("uri", IN_MEMORY)
@pytest.mark.parametrize("must_exist", [False, True])
def test_every_spelling_of_a_store_that_keeps_nothing_is_refused(tmp_path, monkeypatch, uri,
                                                                 must_exist):
    monkeypatch.chdir(tmp_path)  # a relative name would be made here: nothing may be
    with pytest.raises(ConfigError, match=re.escape(f"tracking.uri={uri} {KEEPS_NOTHING}")):
        check_tracking_uri(uri, must_exist=must_exist)
    assert sqlite_path(uri) is None  # no file: nothing to lock, nothing beside it
    assert os.listdir(tmp_path) == []


def test_the_file_checked_is_the_file_mlflow_opens(tmp_path):
    # A query and an SQLite URI filename are no part of the file's name; ~ is not expanded.
    assert sqlite_path(f"sqlite:///{tmp_path}/m.db?timeout=30") == tmp_path / "m.db"
    assert sqlite_path(f"sqlite:///file:{tmp_path}/a%20b.db?cache=shared&uri=true") == \
        tmp_path / "a b.db"
    assert sqlite_path(f"sqlite:///file://localhost{tmp_path}/m.db?uri=true") == \
        tmp_path / "m.db"
    assert sqlite_path("http://127.0.0.1:5000") is None
    (tmp_path / "~").mkdir()  # a folder that is really named ~, not at the start: fine
    check_tracking_uri(f"sqlite:///{tmp_path}/~/m.db")
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    check_tracking_uri(f"sqlite:///file:{empty}?cache=shared&uri=true")
    with pytest.raises(ConfigError, match="empty.db is empty: no runs to read"):
        check_tracking_uri(f"sqlite:///{empty}?timeout=30", must_exist=True)


@pytest.mark.parametrize("uri", ["sqlite:///file:x?mode=memory&uri=true", "sqlite:///%3Amemory%3A"])
def test_a_run_into_a_store_that_keeps_nothing_is_refused_before_training(tmp_path, data_root,
                                                                          uri):
    result = cli(tmp_path, f"tracking.uri='{uri}'", data_root=data_root)
    assert result.returncode == 2
    assert result.stderr == f"error: tracking.uri={uri} {KEEPS_NOTHING} (the default is " \
                            f"sqlite:///mlflow.db)\n"
    assert "step" not in result.stdout
    assert os.listdir(tmp_path) == []  # no store, no run folder


def test_evaluate_refuses_a_store_that_keeps_nothing_before_scoring(tmp_path, monkeypatch,
                                                                   capsys):
    uri = "sqlite:///file:x?mode=memory&uri=true"
    monkeypatch.chdir(tmp_path)
    # --run: the store it reads the run from (and logs to).
    assert evaluate.main(["--run", "0" * 32, "--tracking-uri", uri]) == 2
    assert capsys.readouterr().err.startswith(f"error: tracking.uri={uri} {KEEPS_NOTHING}")
    # --checkpoint: the store it logs to, the checkpoint's own or the one given; checked
    # before any scoring.
    from cifar_exp.serving import trained
    model = SimpleNamespace(cfg=OmegaConf.create({"tracking": {"uri": uri}}))
    monkeypatch.setattr(trained, "from_checkpoint", lambda path, overrides: model)
    monkeypatch.setattr("cifar_exp.training.scoring.score_with_predictions",
                        lambda *args, **kwargs: pytest.fail("scored before the store was "
                                                            "checked"))
    assert evaluate.main(["--checkpoint", str(tmp_path / "c.pt")]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: tracking.uri={uri} {KEEPS_NOTHING}")
    assert os.listdir(tmp_path) == []


def test_the_stores_lock_never_follows_a_link(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_bytes(b"keep me")
    lock = tmp_path / ".mlflow.db.lock"
    lock.symlink_to(target)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(UserError, match=rf"{lock} is a symbolic link; a lock file must be a "
                                        rf"plain file: remove the link"):
        open_experiment(uri, "kept")
    with pytest.raises(UserError, match="is a symbolic link"), store_opening(uri):
        pytest.fail("opened the store through a linked lock")
    assert target.read_bytes() == b"keep me"
    assert not (tmp_path / "mlflow.db").exists()


def test_a_report_needs_a_store_that_holds_runs(tmp_path):
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match="empty.db is empty: no runs to read"):
        check_tracking_uri(f"sqlite:///{empty}", must_exist=True)
    assert empty.read_bytes() == b""  # no schema written into it
    with pytest.raises(ConfigError, match="no tracking store at"):
        check_tracking_uri(f"sqlite:///{tmp_path / 'none.db'}", must_exist=True)
    assert not (tmp_path / "none.db").exists()


KEPT_TABLES = ("experiments", "runs", "metrics", "params", "tags")


def store_with_runs(store: str, runs: int = 3, points: int = 1000) -> Path:
    """The file of `store` holding `runs` finished runs, each with `points` loss points."""
    client = MlflowClient(store)
    experiment_id = open_experiment(store, "kept")
    for _ in range(runs):
        run_id = client.create_run(experiment_id).info.run_id
        client.log_param(run_id, "lr", "0.1")
        with contextlib.closing(sqlite3.connect(sqlite_path(store))) as connection:
            connection.executemany(  # as log_batch writes them, without its cost per point
                "INSERT INTO metrics VALUES ('loss', ?, ?, ?, ?, 0)",
                [(1 / (step + 1), step, run_id, step) for step in range(points)])
            connection.commit()
        client.set_terminated(run_id)
    return sqlite_path(store)


def row_counts(database: Path) -> dict[str, int]:
    with read_only_connection(database) as connection:
        return {table: connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in KEPT_TABLES}


def read_only_connection(database: Path) -> contextlib.closing[sqlite3.Connection]:
    return contextlib.closing(sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True))


# A run's writer killed mid-transaction: it has deleted every run and written enough pages
# that SQLite spilled them into the database file. Its journal, left beside the file, is
# "hot": SQLite rolls it back on the next connection that may write.
KILLED_WRITER = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("PRAGMA cache_size = 1")
connection.execute("BEGIN")
connection.execute("DELETE FROM runs")
connection.execute("UPDATE metrics SET value = -1")
print("mid-transaction", flush=True)
time.sleep(60)
"""


def kill_a_writer_mid_transaction(database: Path) -> Path:
    """Leave `database` with a hot journal, as a run killed while it wrote does; the
    journal's path."""
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(database)],
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "mid-transaction\n"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    writer.stdout.close()
    journal = database.with_name(f"{database.name}-journal")
    # What made the check call such a store damaged: a read-only connection cannot roll
    # the journal back.
    with pytest.raises(sqlite3.OperationalError, match="attempt to write a readonly"):
        row_counts(database)
    return journal


def test_a_store_left_mid_transaction_is_rolled_back_and_keeps_every_run(store, caplog):
    database = store_with_runs(store)
    before = row_counts(database)
    journal = kill_a_writer_mid_transaction(database)
    with caplog.at_level("WARNING", logger="cifar_exp.tracking.store"):
        check_tracking_uri(store)
    assert not journal.exists()
    assert row_counts(database) == before  # the last commit, whole
    assert any("rolled back a transaction" in message for message in caplog.messages)
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("kept").experiment_id])
    assert {run.info.status for run in runs} == {"FINISHED"} and len(runs) == 3


@contextlib.contextmanager
def read_only(database: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`database` and its folder read-only while inside; for root too, which the
    permissions do not stop: os.access then answers as for their owner."""
    modes = {path: path.stat().st_mode for path in (database, database.parent)}
    database.chmod(0o444)
    database.parent.chmod(0o555)
    if os.geteuid() == 0:
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: real_access(path, mode) and (
            not mode & os.W_OK or bool(os.stat(path).st_mode & stat.S_IWUSR)))
    try:
        yield
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


@pytest.mark.parametrize("must_exist,message", [
    (True, "has an unfinished transaction (a journal beside it, left by a writer that "
           "stopped) and cannot be written to roll it back (no permission); make the file "
           "and its folder writable and run the command again"),
    # A run must write, so it is refused earlier; made writable, the check rolls it back.
    (False, "cannot be written (no permission); fix its permissions or choose another file"),
], ids=["to-read", "to-write"])
def test_a_read_only_store_left_mid_transaction_is_not_called_damaged(
        store, monkeypatch, must_exist, message):
    database = store_with_runs(store, runs=1)
    journal = kill_a_writer_mid_transaction(database)
    files = {path: path.read_bytes() for path in (database, journal)}
    with read_only(database, monkeypatch), pytest.raises(ConfigError) as error:
        check_tracking_uri(store, must_exist=must_exist)
    assert str(error.value) == f"tracking.uri={store}: {database} {message}"  # one line
    assert {path: path.read_bytes() for path in files} == files  # nothing rolled back


def test_a_store_another_process_holds_locked_is_not_called_damaged(store, monkeypatch):
    monkeypatch.setattr("cifar_exp.tracking.store.CONNECT_TIMEOUT", 0.1)
    with contextlib.closing(sqlite3.connect(sqlite_path(store), isolation_level=None)) as other:
        other.execute("BEGIN EXCLUSIVE")  # a writer mid-commit: no one may read
        check_tracking_uri(store)  # in use, not damaged: MLflow's retries wait for it
        other.execute("ROLLBACK")


def table_leaf_pages(database: Path, marker: bytes) -> list[int]:
    """The numbers of the pages of `database` that are leaves of a table (type 13) holding
    `marker`, read from the file as SQLite lays it out."""
    content = database.read_bytes()
    page_size = int.from_bytes(content[16:18], "big")
    return [number + 1 for number in range(1, len(content) // page_size)
            if content[number * page_size] == 13
            and marker in content[number * page_size:(number + 1) * page_size]]


@pytest.mark.parametrize("must_exist", [False, True])
def test_a_store_with_a_broken_page_deep_in_a_table_is_refused(store, must_exist):
    database = store_with_runs(store, runs=1, points=3000)
    whole = database.read_bytes()
    check_tracking_uri(store, must_exist=must_exist)  # a whole store passes, untouched
    assert database.read_bytes() == whole
    with contextlib.closing(sqlite3.connect(database)) as connection:
        run_id = connection.execute("SELECT run_uuid FROM runs").fetchone()[0]
    pages = table_leaf_pages(database, run_id.encode())
    middle, page_size = pages[len(pages) // 2], int.from_bytes(whole[16:18], "big")
    with database.open("r+b") as file:  # a torn write: one page of the metrics, garbage
        file.seek((middle - 1) * page_size)
        file.write(b"\x5a" * page_size)
    broken = database.read_bytes()
    with read_only_connection(database) as connection:
        # All the check read before: the header and the schema, and the runs too, read fine;
        # the metrics do not.
        assert connection.execute("SELECT count(*) FROM runs").fetchone() == (1,)
        with pytest.raises(sqlite3.DatabaseError, match="malformed"):
            connection.execute("SELECT sum(value) FROM metrics").fetchone()
    with pytest.raises(ConfigError, match=re.escape(
            f"tracking.uri={store}: {database} is damaged (")) as error:
        check_tracking_uri(store, must_exist=must_exist)
    assert str(error.value).endswith("; restore it from a copy or choose another file")
    assert "\n" not in str(error.value)
    assert database.read_bytes() == broken


def test_a_deleted_experiment_is_refused_with_how_to_restore_it(mlflow_store):
    client = MlflowClient(mlflow_store)
    experiment_id = client.get_experiment_by_name("kept").experiment_id
    client.delete_experiment(experiment_id)
    with pytest.raises(ConfigError, match=rf"experiment 'kept' was deleted from sqlite:///.*; "
                                          rf"restore it \(mlflow experiments restore "
                                          rf"--experiment-id {experiment_id}\)"):
        open_experiment(mlflow_store, "kept")


def _open_in_a_process(uri: str) -> str:
    return open_experiment(uri, "race")


@pytest.mark.slow  # several fresh interpreters, each migrating the new store
def test_processes_opening_a_new_store_at_once_all_get_the_experiment(tmp_path):
    # MLflow creates the schema on first use; without the lock, two processes doing it at
    # the same moment collide ("duplicate column name").
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        ids = pool.map(_open_in_a_process, [uri] * 4)
    assert len(set(ids)) == 1


class RacingClient:
    """A client whose first log_inputs loses a race to another run inserting the same
    data set row, as two runs starting at once on one store do."""

    def __init__(self, error: str) -> None:
        self.error, self.calls = error, []

    def log_inputs(self, run_id, datasets):
        self.calls.append((run_id, datasets))
        if len(self.calls) == 1:
            raise Exception(self.error)


@pytest.mark.parametrize("error", [
    "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
    "datasets.name, datasets.digest",
    'duplicate key value violates unique constraint "dataset_pk"',
    "database is locked",
])
def test_data_inputs_that_lose_a_race_for_the_same_row_are_logged_again(error, monkeypatch):
    monkeypatch.setattr("time.sleep", lambda seconds: None)
    client = RacingClient(error)
    log_data_inputs(client, "run", ["train", "test"])
    assert client.calls == [("run", ["train", "test"])] * 2


def test_only_transient_errors_are_retried(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda seconds: None)
    client = RacingClient("UNIQUE constraint failed: runs.run_uuid")  # no race: a real fault
    with pytest.raises(Exception, match="runs.run_uuid"):
        log_data_inputs(client, "run", [])
    assert len(client.calls) == 1
    # Elsewhere (creating a run, an experiment) a duplicate row is no race to retry.
    racing = RacingClient("UNIQUE constraint failed: datasets")
    with pytest.raises(Exception, match="UNIQUE constraint failed: datasets"):
        with_retries(lambda: racing.log_inputs("run", []), "create a run")
    assert len(racing.calls) == 1
