"""The MLflow tracking store: which URIs are accepted, checked before any work starts, and
opening it (schema and experiment) one process at a time.

Accepted: `sqlite:///<file>` (the default; the file may be new), `http(s)://<server>`
(an MLflow tracking server), and the databases MLflow supports (`postgresql://`,
`mysql://`, `mssql://`). Refused, each with one line: folder stores (`./mlruns`, `file:`),
which this project never writes; an SQLite store that keeps nothing once the command ends,
however it is spelled (`sqlite:///:memory:`, `sqlite://`, an SQLite URI filename with
`mode=memory`, `vfs=memdb` or no name: a temporary database); a path that is a folder, a
device or not an SQLite file, or an SQLite file of another program; an SQLite file with a
broken page (quick_check); a path with `~` (SQLite does not expand it); a store that cannot
be written (`mode=ro` too); a server or database that does not answer. A transaction that a
writer which stopped left unfinished (a hot journal) is rolled back, as SQLite does, where
the store can be written, and refused in one line where it cannot."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote

import requests
from mlflow.entities import DatasetInput, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cifar_exp.config import DEFAULT_TRACKING_URI, check_experiment_name
from cifar_exp.errors import CheckpointError, ConfigError, one_line
from cifar_exp.job.locks import exclusive
from cifar_exp.tracking.redact import redact

log = logging.getLogger(__name__)
T = TypeVar("T")

SQLITE_HEADER = b"SQLite format 3\x00"
# MLflow's HTTP client retries for minutes by default; a tracking server that went away
# must not hold a run up that long. And no progress bar for each artifact it reads back.
# A user's own settings win.
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
                   "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")
CONNECT_TIMEOUT = 5  # seconds, for a server or database that may not answer


def use_client_defaults() -> None:
    """Apply CLIENT_DEFAULTS where the environment does not set them."""
    for name, value in CLIENT_DEFAULTS.items():
        os.environ.setdefault(name, value)


def sqlite_path(uri: str) -> Path | None:
    """The database file a `sqlite:` tracking URI opens, as MLflow's engine (SQLAlchemy) and
    SQLite read it: no query (`?timeout=30`), a `file:` URI filename decoded, no `~`
    expanded. None for any other store, and for an SQLite store that keeps nothing."""
    if not uri.lower().startswith("sqlite://"):
        return None
    name = _sqlite_file_name(uri)
    return None if _keeps_nothing(uri, name) else Path(name).resolve()


def _sqlite_file_name(uri: str) -> str:
    """The file name SQLite opens for a `sqlite:` URI: "" (a temporary database) and
    ":memory:" stand for no file. Made by SQLAlchemy's own SQLite dialect, which MLflow's
    engine uses, so that the checks look at the very file MLflow would write."""
    from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its note on query keys that it ignores
            [filename], options = SQLiteDialect_pysqlite().create_connect_args(make_url(uri))
    except (ArgumentError, ValueError) as error:
        reason = str(error).splitlines()[0]  # not SQLAlchemy's list of forms after it
        raise ConfigError(f"tracking.uri={redact(uri)} is not a valid SQLite URI "
                          f"({redact(reason)}); use sqlite:///<file> (the default is "
                          f"{DEFAULT_TRACKING_URI})") from error
    if not options.get("uri") or not filename.startswith("file:"):
        return filename  # a plain name (SQLAlchemy made it absolute), ":memory:" or ""
    # An SQLite URI filename: file:[//authority]path[?query][#fragment], %HH-encoded.
    rest = filename[len("file:"):].partition("#")[0].partition("?")[0]
    if rest.startswith("//"):
        authority, slash, path = rest[2:].partition("/")
        if authority not in ("", "localhost"):
            raise ConfigError(f"tracking.uri={redact(uri)} names the host {authority!r}; "
                              f"SQLite opens local files only: give a path, "
                              f"sqlite:///<file>")
        rest = slash + path
    return unquote(rest)


# Words of a store that lives only as long as its connections. Read in any case and however
# often percent-encoded, even where SQLite itself would not take the spelling: none of them
# names a file meant to be kept.
MEMORY_WORDS = re.compile(r":memory:|\bmode=memory\b|\bvfs=memdb\b")
READ_ONLY_WORDS = re.compile(r"\bmode=ro\b|\bimmutable=(1|true|yes|on)\b")
HOME_WORDS = re.compile(r"sqlite:///(file:)?~")  # a path meant from the home folder


def _decoded(uri: str) -> str:
    """`uri` percent-decoded until nothing changes (%253A is %3A is :), in lower case."""
    for _ in range(5):
        decoded = unquote(uri)
        if decoded == uri:
            break
        uri = decoded
    return uri.lower()


def _keeps_nothing(uri: str, name: str) -> bool:
    """Whether the SQLite store `uri` (opening file `name`) is in memory or temporary."""
    return name in ("", ":memory:") or MEMORY_WORDS.search(_decoded(uri)) is not None


def default_artifact_location(uri: str) -> str | None:
    """For a SQLite store, artifacts go to `mlartifacts/` beside the database file (MLflow
    would otherwise create a `./mlruns` folder wherever the command runs)."""
    database = sqlite_path(uri)
    if database is None:
        return None  # a tracking server decides for itself
    return (database.parent / "mlartifacts").as_uri()


def check_tracking_uri(uri: str, must_exist: bool = False) -> None:
    """Fail fast, before any work, on a tracking URI that MLflow would refuse, that keeps
    nothing, or whose store does not answer. `must_exist`: the store must hold runs already
    (a report), so a new SQLite file is refused instead of created."""
    shown = redact(uri)
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("http", "https"):
        _check_server(uri, shown)
    elif scheme == "sqlite":
        _check_sqlite(uri, shown, must_exist)
    elif scheme.split("+")[0] in DATABASE_SCHEMES:
        _check_database(uri, shown)
    elif scheme != "databricks":
        raise ConfigError(f"tracking.uri={shown} is not a store this project writes to; use "
                          f"sqlite:///<file> (the default is {DEFAULT_TRACKING_URI}), "
                          f"http(s)://<server> or a database URI such as postgresql://...")


def _check_server(uri: str, shown: str) -> None:
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=CONNECT_TIMEOUT).raise_for_status()
    except requests.RequestException as error:
        raise ConfigError(f"MLflow tracking server {shown} does not answer "
                          f"({redact(one_line(error))}); start it or fix tracking.uri "
                          f"(default {DEFAULT_TRACKING_URI})") from error


def _check_sqlite(uri: str, shown: str, must_exist: bool) -> None:
    database = _persistent_sqlite_file(uri, shown, must_exist)
    if must_exist and not database.is_file():
        raise ConfigError(f"no tracking store at {database}; pass the tracking URI of the "
                          f"store the runs were logged to")
    if not database.parent.is_dir():
        raise ConfigError(f"tracking.uri={shown}: folder {database.parent} does not exist; "
                          f"create it or choose another path")
    if database.is_dir():
        raise ConfigError(f"tracking.uri={shown}: {database} is a folder; name a database "
                          f"file inside it, e.g. sqlite:///{database / 'mlflow.db'}")
    if database.exists() and not database.is_file():
        raise ConfigError(f"tracking.uri={shown}: {database} is not a regular file (a device "
                          f"or a pipe keeps nothing); name a database file (the default is "
                          f"{DEFAULT_TRACKING_URI})")
    writable = os.access(database.parent, os.W_OK) and (not database.exists()
                                                        or os.access(database, os.W_OK))
    if not must_exist and not writable:
        raise ConfigError(f"tracking.uri={shown}: {database} cannot be written (no "
                          f"permission); fix its permissions or choose another file")
    if not database.exists() or database.stat().st_size == 0:
        if must_exist:
            raise ConfigError(f"{database} is empty: no runs to read; pass the tracking "
                              f"URI of the store the runs were logged to")
        return  # a new store: MLflow creates its schema
    _check_sqlite_content(database, shown, writable)


def _check_sqlite_content(database: Path, shown: str, writable: bool) -> None:
    """Refuse an existing file that is not an MLflow store or that is damaged. A transaction
    left unfinished by a writer that stopped is rolled back first, as SQLite itself would on
    the next write: the only change a check makes to a file, and only then."""
    with database.open("rb") as file:
        if file.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            raise ConfigError(f"tracking.uri={shown}: {database} is not an SQLite database; "
                              f"choose another file (or move this one away)")
    tables = _store_tables(database, shown, writable)
    if tables is None:
        return  # another process writes to it right now: in use, so not damaged
    if tables and "experiments" not in tables:
        raise ConfigError(f"tracking.uri={shown}: {database} is another program's SQLite "
                          f"database, not an MLflow store; choose another file")
    _check_pages(database, shown, tables)


# SQLite's words when a read-only connection must write before it can read: a hot journal
# (or WAL) left by a writer that stopped mid-transaction, which only a writer rolls back.
# Matched on the text: Python 3.10 has no error codes on its exceptions.
NEEDS_ROLLBACK = "attempt to write a readonly database"


def _store_tables(database: Path, shown: str, writable: bool) -> set[str] | None:
    """The names of the tables in `database`, after rolling back a transaction that a writer
    which stopped left unfinished; None while another process holds it locked."""
    try:
        return _read_tables(database)
    except sqlite3.DatabaseError as error:
        if NEEDS_ROLLBACK not in str(error):
            return _in_use_or_damaged(database, shown, error)
    if not writable:
        raise _unfinished(database, shown, "no permission")
    try:
        _roll_back_unfinished(database)
    except sqlite3.DatabaseError as error:
        # Writable by its permissions, and yet not (a read-only mount, an ACL): the
        # journal stays, and with it the transaction to roll back.
        if LOCKED in str(error):
            return None  # another process rolls it back right now
        raise _unfinished(database, shown, one_line(error, 60)) from error
    try:
        return _read_tables(database)
    except sqlite3.DatabaseError as error:
        return _in_use_or_damaged(database, shown, error)


def _read_tables(database: Path) -> set[str]:
    # Read-only: a check must not change a file that is fine.
    with _read_only(database) as connection:
        return {name for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}


def _read_only(database: Path) -> contextlib.closing[sqlite3.Connection]:
    return contextlib.closing(sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True,
                                              timeout=CONNECT_TIMEOUT))


def _roll_back_unfinished(database: Path) -> None:
    """Let SQLite roll back the transaction a stopped writer left: it does so on the first
    read of a connection that may write, and the store is then as at its last commit."""
    with contextlib.closing(sqlite3.connect(database, timeout=CONNECT_TIMEOUT)) as writer:
        writer.execute("SELECT count(*) FROM sqlite_master").fetchone()
    log.warning("MLflow store %s: rolled back a transaction that a writer which stopped left "
                "unfinished; the store is as at its last commit", database)


def _in_use_or_damaged(database: Path, shown: str, error: sqlite3.DatabaseError) -> None:
    """None for a store that another process holds locked (in use, so not damaged as far as
    anyone can tell); any other error means damage."""
    if LOCKED not in str(error):
        raise _damaged(database, shown, str(error)) from error


def _unfinished(database: Path, shown: str, reason: str) -> ConfigError:
    return ConfigError(f"tracking.uri={shown}: {database} has an unfinished transaction (a "
                       f"journal beside it, left by a writer that stopped) and cannot be "
                       f"written to roll it back ({reason}); make the file and its folder "
                       f"writable and run the command again")


def _damaged(database: Path, shown: str, reason: str) -> ConfigError:
    return ConfigError(f"tracking.uri={shown}: {database} is damaged ({one_line(reason, 120)})"
                       f"; restore it from a copy or choose another file")


# PRAGMA quick_check reads every page: about 40 ms for a 25 MB store (100 000 metric points),
# 250 ms for 175 MB. Past this budget (a store of some 300 MB) it stops, and the store is
# used checked in part: the tables that opening a store and a run read are checked first.
CHECK_SECONDS = 0.5
KEY_TABLES = ("alembic_version", "experiments", "experiment_tags", "runs", "tags", "params",
              "latest_metrics")


def _check_pages(database: Path, shown: str, tables: set[str]) -> None:
    """Refuse a store with a broken page anywhere in its tables and indexes (the header and
    the schema alone say nothing of those), before any of its data is read."""
    checks = [*(f"PRAGMA quick_check({name})" for name in KEY_TABLES if name in tables),
              "PRAGMA quick_check"]
    with _read_only(database) as connection, _interrupted_after(connection, CHECK_SECONDS):
        try:
            for check in checks:
                if problems := _problems(connection, check):
                    raise _damaged(database, shown, "; ".join(problems))
        except sqlite3.OperationalError as error:
            if "interrupted" not in str(error) and LOCKED not in str(error):
                raise _damaged(database, shown, str(error)) from error
            log.debug("%s: checked in part (%s)", database, error)  # too big, or in use
        except sqlite3.DatabaseError as error:  # a page so broken that the check stops
            raise _damaged(database, shown, str(error)) from error


def _problems(connection: sqlite3.Connection, check: str) -> list[str]:
    """What quick_check `check` reports, one problem an item; none for a whole store."""
    lines = [line for (text,) in connection.execute(check) for line in text.splitlines()]
    return [line for line in lines if line != "ok" and not line.startswith("*** in database")]


@contextlib.contextmanager
def _interrupted_after(connection: sqlite3.Connection, seconds: float) -> Iterator[None]:
    """Interrupt the statement `connection` runs once `seconds` have passed (SQLite's
    progress handler is not called inside quick_check's walk of a table)."""
    timer = threading.Timer(seconds, connection.interrupt)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()  # never interrupting a closed connection


def _persistent_sqlite_file(uri: str, shown: str, must_exist: bool) -> Path:
    """The file of SQLite store `uri`; refused: a store that keeps nothing (in memory or
    temporary, however spelled), one opened read-only where runs are to be written, and a
    `~` that SQLite would take as a folder's name."""
    name = _sqlite_file_name(uri)
    if _keeps_nothing(uri, name):
        raise ConfigError(f"tracking.uri={shown} keeps nothing once the command ends; give a "
                          f"file: sqlite:///<path> (the default is {DEFAULT_TRACKING_URI})")
    if not must_exist and READ_ONLY_WORDS.search(_decoded(uri)):
        raise ConfigError(f"tracking.uri={shown} opens the store read-only: no run could be "
                          f"written; leave out mode=ro and immutable=")
    database = Path(name).resolve()
    if HOME_WORDS.match(_decoded(uri)):
        raise ConfigError(f"tracking.uri={shown}: SQLite does not expand ~ (the store would "
                          f"be {database}); give the full path, e.g. "
                          f"sqlite:///{Path.home() / 'mlflow.db'}")
    return database


def _check_database(uri: str, shown: str) -> None:
    import sqlalchemy  # MLflow's own dependency; only database stores need it here

    dialect = uri.split("://", 1)[0].split("+")[0].lower()
    connect_args = {"login_timeout" if dialect == "mssql" else "connect_timeout":
                    CONNECT_TIMEOUT}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=connect_args)
        with engine.connect():
            pass
    except ModuleNotFoundError as error:
        raise ConfigError(f"tracking.uri={shown} needs the database driver {error.name}; "
                          f"install it, or name one that is installed (pip install -e "
                          f"'.[server]' brings postgresql+psycopg2://)") from error
    except Exception as error:  # refused, unknown host, bad password: all the same here
        raise ConfigError(f"the tracking database {shown} does not answer "
                          f"({redact(one_line(error))}); start it or fix tracking.uri") from error


LOCKED = "database is locked"
# Two runs starting at once on one store both insert the same data set row; the loser of
# that race (SQLite's and PostgreSQL's words for it) finds the row there when it tries again.
DATASET_RACE = ("UNIQUE constraint failed: datasets", 'unique constraint "dataset_pk"')


def with_retries(action: Callable[[], T], what: str, tries: int = 6, pause: float = 0.5,
                 transient: tuple[str, ...] = (LOCKED,)) -> T:
    """Run `action`, retrying with doubling pauses while it fails with one of the
    `transient` errors: by default SQLite's lock busy, as parallel jobs writing to one
    database file take turns."""
    for attempt in range(tries):
        try:
            return action()
        except Exception as error:
            reason = next((text for text in transient if text in str(error)), None)
            if reason is None or attempt == tries - 1:
                raise
            log.warning("MLflow: %s: %s, retrying in %.1f s", what, reason, pause)
            time.sleep(pause)
            pause *= 2
    raise AssertionError("unreachable")


def log_data_inputs(client: MlflowClient, run_id: str, inputs: Sequence[DatasetInput]) -> None:
    """Log the data set's splits as run `run_id`'s inputs."""
    with_retries(lambda: client.log_inputs(run_id, datasets=list(inputs)),
                 "log the data set inputs", transient=(LOCKED, *DATASET_RACE))


@contextlib.contextmanager
def store_opening(uri: str) -> Iterator[None]:
    """One process at a time opens a SQLite store (MLflow creates or upgrades its schema on
    first use: two processes doing it at once collide); other stores need no lock."""
    database = sqlite_path(uri)
    if database is None:
        yield
        return
    with exclusive(database.with_name(f".{database.name}.lock"), "", wait=True):
        yield


def open_experiment(uri: str, name: str) -> str:
    """The id of experiment `name` in the store at `uri`, creating the store's schema and the
    experiment if needed, one process at a time, so that parallel jobs or runs started at
    the same moment never race to migrate a new database or to create the same experiment.
    A deleted experiment is refused (MLflow would not log to it)."""
    check_experiment_name(name)
    with store_opening(uri):
        client = MlflowClient(uri)
        found = with_retries(lambda: client.get_experiment_by_name(name), "read experiment")
        if found is not None:
            if found.lifecycle_stage == "deleted":
                raise ConfigError(
                    f"experiment {name!r} was deleted from {redact(uri)}; restore it (mlflow "
                    f"experiments restore --experiment-id {found.experiment_id}) or choose "
                    f"another tracking.experiment")
            return found.experiment_id
        # Says what the experiment is; MLflow 3's UI still opens on its GenAI overview unless
        # the address carries ?workflowType=machine_learning (the one runs print).
        tags = {"mlflow.experimentKind": "custom_model_development"}
        return with_retries(lambda: client.create_experiment(
            name, default_artifact_location(uri), tags), "create experiment")


def resumable_run(uri: str, run_id: str) -> Run:
    """The run a checkpoint continues, checked before any work: it must be in the store."""
    shown = redact(uri)
    if (database := sqlite_path(uri)) is not None and not database.is_file():
        # Checked first: opening a SQLite store that is not there would create it.
        raise CheckpointError(f"the checkpoint's MLflow run {run_id} is not in {shown} (no "
                              f"such file); resume with the tracking.uri the run was started "
                              f"with")
    try:
        with store_opening(uri):
            run = MlflowClient(uri).get_run(run_id)
    except MlflowException as error:
        raise CheckpointError(f"the checkpoint's MLflow run {run_id} is not in {shown}; resume "
                              f"with the tracking.uri the run was started with") from error
    if run.info.lifecycle_stage == "deleted":
        raise CheckpointError(f"the checkpoint's MLflow run {run_id} was deleted from {shown}; "
                              f"restore it (mlflow runs restore) or start a new run")
    return run



_DRIVER_ERROR = re.compile(r"\((\w+(?:\.\w+)*(?:Error|Exception))\) ([^\[\n(]+)")


def store_error(error: BaseException) -> str:
    """What a failed store call says, on one line and with credentials masked: for a
    database error the driver's own words (SQLAlchemy wraps them in its statement, its
    parameters and advice), else the message cut short."""
    found = _DRIVER_ERROR.search(str(error))
    text = f"{found[1]}: {found[2].strip()}" if found else one_line(error, 200)
    return redact(text)
