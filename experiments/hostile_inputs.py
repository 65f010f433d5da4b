"""Hostile input and faults, run for real: each case in a fresh folder, printed as one row
of a markdown table (command, exit code, first line of what it printed on stderr, the
status of each MLflow run in the store afterwards, whether the data that was there before
is intact).

    CIFAR_EXP_DATA=<data> python experiments/hostile_inputs.py [--only WORD] > table.md

Every case is also a test (tests/); this script is the measurement behind the table in the
measurement log. It takes about ten minutes on 2 CPU cores (the tracking-server case
starts MLflow servers)."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
import torch

PYTHON = sys.executable
QUICK = ("steps=10", "log_every=5", "eval_images=500", "tracking.log_model=false")


@dataclass
class Case:
    name: str
    args: list[str]
    setup: Callable[[Path], list[Path]] | None = None  # returns the files that must survive
    during: Callable[[Path, subprocess.Popen], None] | None = None  # acts while it runs
    wrap: list[str] = field(default_factory=list)  # e.g. a shell prefix (ulimit)
    module: str = "cifar_exp.run"
    server: bool = False  # log to an MLflow server (with credentials) stopped at step 20
    then: list[str] = field(default_factory=list)  # a command run afterwards (a resume)


def run(folder: Path, *args: str, module: str = "cifar_exp.run", wrap: list[str] = (),
        background: bool = False) -> subprocess.Popen | subprocess.CompletedProcess:
    command = [PYTHON, "-m", module, *args]
    if wrap:
        command = ["bash", "-c", f"{' '.join(wrap)}; exec {shlex.join(command)}"]
    if background:
        log = open(folder / "background.txt", "w")  # noqa: SIM115 (closed with the process)
        return subprocess.Popen(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=1200)


def wait_for(path: Path, text: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{text!r} never appeared in {path}")


def digest(path: Path) -> str:
    """The content of a file, or of a folder's files (its lock files and the job's log,
    which a later command may touch, left out)."""
    if path.is_dir():
        return "".join(digest(child) for child in sorted(path.rglob("*"))
                       if child.is_file() and not child.name.endswith((".lock", ".log")))
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


def statuses(folder: Path) -> str:
    """The status of every run in the folder's mlflow.db, read without MLflow (read-only)."""
    database = folder / "mlflow.db"
    if not database.exists() or database.stat().st_size == 0:
        return "no store"
    try:
        with contextlib.closing(sqlite3.connect(f"{database.as_uri()}?mode=ro",
                                                uri=True)) as connection:
            rows = connection.execute("SELECT status FROM runs ORDER BY start_time").fetchall()
    except sqlite3.DatabaseError:
        return "not a store"
    return ", ".join(status for (status,) in rows) or "none"


# --- setups: what a case finds in its folder ------------------------------------------

def stopped_run(folder: Path) -> list[Path]:
    """A run stopped by SIGTERM after its first checkpoint: resumable, in run/."""
    process = run(folder, *QUICK, "steps=400", "checkpoint.every=5", "hydra.run.dir=run",
                  background=True)
    wait_for(folder / "run" / "checkpoint.pt", "")  # exists
    wait_for(folder / "background.txt", "checkpoint saved")
    process.send_signal(signal.SIGTERM)
    process.wait()
    return [folder / "mlflow.db", folder / "run"]


def two_runs(folder: Path) -> list[Path]:
    """A stopped run in run/ and a finished one, with its checkpoint, in other/."""
    stopped_run(folder)
    run(folder, *QUICK, "hydra.run.dir=other")
    return [folder / "mlflow.db", folder / "run", folder / "other"]


def finished_run(folder: Path) -> list[Path]:
    run(folder, *QUICK, "hydra.run.dir=run")
    return [folder / "mlflow.db", folder / "run"]


def running(folder: Path) -> list[Path]:
    """A long run in run/, still training when the case starts (stopped afterwards)."""
    process = run(folder, *QUICK, "steps=100000", "checkpoint.every=5", "hydra.run.dir=run",
                  background=True)
    wait_for(folder / "background.txt", "checkpoint saved")
    RUNNING[folder] = process
    return [folder / "mlflow.db"]


RUNNING: dict[Path, subprocess.Popen] = {}


def killed_before_checkpoint(folder: Path) -> list[Path]:
    process = run(folder, *QUICK, "steps=3000", "checkpoint.every=1000",
                  "tracking.flush_seconds=0", "hydra.run.dir=run", "resume=auto",
                  background=True)
    wait_for(folder / "background.txt", "step 5, loss")
    process.send_signal(signal.SIGKILL)
    process.wait()
    return []  # the store is meant to change: the abandoned run closed, a new one


def evil_recipe(folder: Path) -> list[Path]:
    recipes = folder / "conf" / "experiment"
    recipes.mkdir(parents=True)
    (recipes / "evil.yaml").write_text(
        "# @package _global_\nhydra:\n  callbacks:\n    copy:\n      _target_: shutil.copy\n"
        f"      src: {recipes / 'evil.yaml'}\n      dst: {folder / 'copied'}\n")
    return []


# Each payload, given as the `hydra:` node of a recipe, would create MARKER if Hydra or
# logging called what it names. {marker} is the marker file's path.
CODE_PAYLOADS = {
    "another module's function": "callbacks:\n  x:\n    _target_: shutil.copy\n"
                                 "    src: /etc/hostname\n    dst: {marker}\n",
    "a trusted prefix reaching os": "callbacks:\n  x:\n    _target_: logging.os.system\n"
                                    "    _args_: ['touch {marker}']\n",
    "Hydra's own module reaching os": "callbacks:\n  x:\n"
                                      "    _target_: hydra._internal.utils.os.system\n"
                                      "    _args_: ['touch {marker}']\n",
    "a callable behind an interpolation": "callbacks:\n  x:\n"
                                          "    _target_: ${{hydra.job.env_set.CODE}}\n"
                                          "    _args_: ['touch {marker}']\njob:\n  env_set:\n"
                                          "    CODE: os.system\n",
    "a project class in the wrong slot": "launcher:\n"
                                         "  _target_: cifar_exp.tracking.sweep.SweepTracking\n",
    "code nested in a callback's options": "callbacks:\n  x:\n"
                                           "    _target_: cifar_exp.tracking.sweep.SweepTracking\n"
                                           "    inner:\n      _target_: os.system\n"
                                           "      _args_: ['touch {marker}']\n",
    "a log handler that is a function": "job_logging:\n  handlers:\n    x:\n"
                                        "      (): os.system\n      command: touch {marker}\n",
    "a log handler of another kind": "job_logging:\n  handlers:\n    x:\n"
                                     "      class: logging.handlers.SocketHandler\n"
                                     "      host: localhost\n      port: 9\n",
    "a log file outside the job's folder": "job_logging:\n  handlers:\n    file:\n"
                                           "      filename: {marker}\n",
    "a log stream imported from a module": "job_logging:\n  handlers:\n    console:\n"
                                           "      stream: ext://os.sep\n",
    "attributes set on a log handler": "job_logging:\n  handlers:\n    console:\n"
                                       "      .:\n        baseFilename: {marker}\n",
}


def code_recipe(name: str) -> Callable[[Path], list[Path]]:
    """A case's setup: conf/experiment/evil.yaml with CODE_PAYLOADS[name] as its `hydra:`
    node, in the case's folder."""
    def setup(folder: Path) -> list[Path]:
        recipes = folder / "conf" / "experiment"
        recipes.mkdir(parents=True)
        body = "".join(f"  {line}\n" for line in
                       CODE_PAYLOADS[name].format(marker=folder / "marker").splitlines())
        (recipes / "evil.yaml").write_text(f"# @package _global_\nhydra:\n{body}")
        return []
    return setup


def linked_lock(name: str) -> Callable[[Path], list[Path]]:
    """A case's setup: the lock file `name` is a symbolic link to precious.txt, which must
    keep its bytes."""
    def setup(folder: Path) -> list[Path]:
        precious = folder / "precious.txt"
        precious.write_text("keep me\n")
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).symlink_to(precious)
        return [precious]
    return setup


def evil_checkpoint(folder: Path) -> list[Path]:
    class Exec:
        def __reduce__(self):
            return (exec, (f"open({str(folder / 'ran')!r}, 'w')",))

    torch.save({"format": 2, "step": 1, "states": {"model": Exec()}}, folder / "evil.pt")
    return [folder / "evil.pt"]


def cut_checkpoint(folder: Path) -> list[Path]:
    stopped_run(folder)
    path = folder / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    del state["states"]
    torch.save(state, path)
    return [folder / "mlflow.db", path]


def tampered_checkpoint(folder: Path) -> list[Path]:
    stopped_run(folder)
    path = folder / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state["loop"]["sampler"]["order"] = torch.zeros(50000, dtype=torch.long)  # not a walk
    torch.save(state, path)
    return [folder / "mlflow.db", path]


def deleted_experiment(folder: Path) -> list[Path]:
    finished_run(folder)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    client.delete_experiment(client.get_experiment_by_name("cifar_exp").experiment_id)
    return [folder / "mlflow.db"]


def damaged_store(folder: Path) -> list[Path]:
    (folder / "mlflow.db").write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    return [folder / "mlflow.db"]


KILLED_WRITER = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("PRAGMA cache_size = 1")  # changed pages spill into the file
connection.execute("BEGIN")
connection.execute("DELETE FROM runs")
connection.execute("UPDATE metrics SET value = -1")
print("mid-transaction", flush=True)
time.sleep(60)
"""


def store_left_mid_transaction(folder: Path) -> list[Path]:
    """A finished run's store, then a writer killed mid-transaction: a hot journal beside
    it (as a read-only episode or a crash leaves one)."""
    finished_run(folder)
    writer = subprocess.Popen([PYTHON, "-c", KILLED_WRITER, str(folder / "mlflow.db")],
                              stdout=subprocess.PIPE, text=True)
    writer.stdout.readline()
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    return []  # rolled back to its last commit: the file changes, as it must


def broken_page_store(folder: Path) -> list[Path]:
    """A finished run's store with one table page in its middle overwritten (a torn write
    deep in the file, the header whole)."""
    finished_run(folder)
    database = folder / "mlflow.db"
    content = bytearray(database.read_bytes())
    size = int.from_bytes(content[16:18], "big")
    leaves = [n for n in range(1, len(content) // size) if content[n * size] == 13]
    middle = leaves[len(leaves) // 2]
    content[middle * size:(middle + 1) * size] = b"\x5a" * size
    database.write_bytes(bytes(content))
    return [database]


def other_program_db(folder: Path) -> list[Path]:
    with contextlib.closing(sqlite3.connect(folder / "mlflow.db")) as connection:
        connection.execute("CREATE TABLE notes (text)")
        connection.commit()
    return [folder / "mlflow.db"]


def checkpoint_as_store(folder: Path) -> list[Path]:
    torch.save({"weights": torch.zeros(3)}, folder / "mlflow.db")
    return [folder / "mlflow.db"]


def empty_store(folder: Path) -> list[Path]:
    (folder / "mlflow.db").write_bytes(b"")
    return [folder / "mlflow.db"]


def escaping_experiment(folder: Path) -> list[Path]:
    run(folder, *QUICK, "tracking.experiment=../../escaped")
    return []


def out_is_a_file(folder: Path) -> list[Path]:
    finished_run(folder)
    (folder / "report.md").write_text("mine")
    return [folder / "mlflow.db", folder / "report.md"]


def python_layout(labels: list) -> Callable[[Path], list[Path]]:
    """A tiny CIFAR-10 in the python layout whose second training file has `labels`."""
    import pickle

    def setup(folder: Path) -> list[Path]:
        data = folder / "data" / "cifar-10-batches-py"
        data.mkdir(parents=True)
        images = np.random.default_rng(0).integers(0, 256, (4, 3072), dtype=np.uint8)
        for index in range(1, 6):
            batch = {b"data": images, b"labels": labels if index == 2 else [0, 1, 2, 3]}
            (data / f"data_batch_{index}").write_bytes(pickle.dumps(batch, protocol=2))
        (data / "test_batch").write_bytes(pickle.dumps({b"data": images,
                                                        b"labels": [0, 1, 2, 3]}, protocol=2))
        (data / "batches.meta").write_bytes(pickle.dumps(
            {b"label_names": [f"c{i}".encode() for i in range(10)]}, protocol=2))
        return [data]

    return setup


# --- while it runs ---------------------------------------------------------------------

def delete_store(folder: Path, process: subprocess.Popen) -> None:
    """The store file deleted under the running job (kept aside, then put back)."""
    wait_for(folder / "background.txt", "step 20, loss")
    shutil.copy(folder / "mlflow.db", folder / "kept.db")
    (folder / "mlflow.db").unlink()


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [PYTHON, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{folder / 'server.db'}", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()


def cases() -> list[Case]:
    store = "tracking.uri=sqlite:///mlflow.db"
    long_name = "x" * 600
    return [
        # Data loss, as reported.
        Case("resume into the store file", [*QUICK, "steps=400", "checkpoint.every=5",
                                             "hydra.run.dir=run", "resume=run/checkpoint.pt",
                                             "checkpoint.path=mlflow.db"], stopped_run),
        Case("resume into another run's checkpoint",
             [*QUICK, "steps=400", "checkpoint.every=5", "hydra.run.dir=run",
              "resume=run/checkpoint.pt", "checkpoint.path=other/checkpoint.pt"], two_runs),
        Case("a refused command in an existing run folder", [*QUICK, "steps=0",
                                                             "hydra.run.dir=run"],
             finished_run),
        Case("resume=true while the original job is alive",
             [*QUICK, "steps=100000", "checkpoint.every=5", "hydra.run.dir=run",
              "resume=true"], running),
        Case("a second new run in the same hydra.run.dir",
             [*QUICK, "steps=100000", "checkpoint.every=5", "hydra.run.dir=run"], running),
        Case("the store deleted mid-run (then put back, then resumed)",
             [*QUICK, "steps=200", "checkpoint.every=50", "tracking.flush_seconds=0",
              "hydra.run.dir=run"], during=delete_store,
             then=[*QUICK, "steps=200", "checkpoint.every=50", "tracking.flush_seconds=0",
                   "hydra.run.dir=run", "resume=true"]),
        Case("the tracking server goes away mid-run (credentials in its URI)",
             [*QUICK, "steps=200", "checkpoint.every=50", "tracking.flush_seconds=0",
              "hydra.run.dir=run"], server=True),
        Case("checkpoint destination unwritable", [*QUICK, "checkpoint.path=/proc/self/c.pt"]),
        Case("a full disk at the checkpoint (file size limit 6 MB)",
             [*QUICK, "steps=20", "checkpoint.every=10", "hydra.run.dir=run"],
             wrap=["ulimit -f 6000"]),
        Case("SIGKILL before the first checkpoint, then resume=auto",
             [*QUICK, "steps=3000", "checkpoint.every=1000", "tracking.flush_seconds=0",
              "hydra.run.dir=run", "resume=auto", "steps=10"], killed_before_checkpoint),
        # Security.
        Case("`~steps` (a key every run needs, deleted)", [*QUICK, "~steps"]),
        Case("hydra.run.dir that cannot be made", [*QUICK, "hydra.run.dir=/proc/cifar_exp/run"]),
        Case("a store that keeps nothing, as an SQLite URI filename",
             [*QUICK, "tracking.uri='sqlite:///file:x?mode=memory&uri=true'"]),
        Case("a store that keeps nothing, percent-encoded",
             [*QUICK, "tracking.uri=sqlite:///%3Amemory%3A"]),
        Case("a device as the store", [*QUICK, "tracking.uri=sqlite:////dev/null"]),
        *(Case(f"{what}'s lock is a link", [*QUICK, "hydra.run.dir=run"], linked_lock(name))
          for what, name in (("the run folder", "run/.lock"),
                             ("the checkpoint", "run/.checkpoint.pt.lock"),
                             ("the store", ".mlflow.db.lock"))),
        Case("hydra.callbacks in a recipe from --config-dir",
             ["--config-dir", "conf", "experiment=evil", *QUICK], evil_recipe),
        *(Case(f"a recipe naming code: {name}", ["--config-dir", "conf", "experiment=evil",
                                                  *QUICK], code_recipe(name))
          for name in CODE_PAYLOADS),
        Case("a checkpoint carrying an exec payload", [*QUICK, "resume=evil.pt"],
             evil_checkpoint),
        # Values refused before a run is opened.
        Case("momentum torch refuses", [*QUICK, "optimizer=sgd", "optimizer.momentum=-1"]),
        Case("betas torch refuses", [*QUICK, "optimizer.betas=[1.5,0.999]"]),
        Case("a non-finite lr", [*QUICK, "optimizer.lr=nan"]),
        Case("a schedule factor", [*QUICK, "schedule=staircase", "schedule.factor=-1"]),
        Case("a seed beyond 64 bits", [*QUICK, "seed=18446744073709551616"]),
        Case("log_every=10**12 (no terabyte buffer)", [*QUICK, "log_every=1000000000000"]),
        Case("an empty experiment name", [*QUICK, "tracking.experiment="]),
        Case("a 600-character experiment name", [*QUICK, f"tracking.experiment={long_name}"]),
        Case("a deleted experiment", [*QUICK], deleted_experiment),
        Case("a folder store", [*QUICK, "tracking.uri=./mlruns"]),
        Case("a store that keeps nothing", [*QUICK, "tracking.uri=sqlite:///:memory:"]),
        Case("a store path that is a folder", [*QUICK, "tracking.uri=sqlite:////tmp"]),
        Case("an unreachable database", [*QUICK, "tracking.uri=postgresql+psycopg2://"
                                                  "mlflow:secret@127.0.0.1:9/mlflow"]),
        Case("a store left mid-transaction (a hot journal)", [*QUICK],
             store_left_mid_transaction),
        Case("a store with a broken page inside a table", [*QUICK], broken_page_store),
        Case("a damaged store", [*QUICK], damaged_store),
        Case("a negative label in a python-layout file", [*QUICK, "data.root=data"],
             python_layout([0, -1, 2, 3])),
        Case("an unknown +key", [*QUICK, "+stpes=5"]),
        Case("a checkpoint missing a part", [*QUICK, "steps=400", "checkpoint.every=5",
                                             "hydra.run.dir=run", "resume=true"],
             cut_checkpoint),
        # The report command.
        Case("report: --out is a file", ["--tracking-uri", "sqlite:///mlflow.db", "--out",
                                         "report.md"], out_is_a_file, module="cifar_exp.report"),
        Case("report: a damaged store", ["--tracking-uri", "sqlite:///mlflow.db"],
             damaged_store, module="cifar_exp.report"),
        Case("report: a 0-byte store", ["--tracking-uri", "sqlite:///mlflow.db"], empty_store,
             module="cifar_exp.report"),
        Case("report: `..` in the experiment name", ["--tracking-uri", "sqlite:///mlflow.db",
                                                    "--experiment", "../../escaped"],
             escaping_experiment, module="cifar_exp.report"),
        # Cases of our own.
        Case("checkpoint.path is a folder", [*QUICK, "checkpoint.path=/tmp"]),
        Case("checkpoint.path under a file", [*QUICK, "checkpoint.path=mlflow.db/c.pt"],
             finished_run),
        Case("checkpoint.path is a data file", [*QUICK, "checkpoint.path=data.bin"],
             lambda folder: [shutil.copy(Path(os.environ["CIFAR_EXP_DATA"])
                                         / "cifar-10-batches-bin" / "test_batch.bin",
                                         folder / "data.bin") and folder / "data.bin"]),
        Case("checkpoint.path of 5,000 characters", [*QUICK, f"checkpoint.path={'c' * 5000}"]),
        Case("resume= a path of 5,000 characters", [*QUICK, f"resume={'c' * 5000}"]),
        Case("data.root is a file", [*QUICK, "data.root=/etc/hostname"]),
        Case("tracking.uri at a checkpoint file", [*QUICK, store], checkpoint_as_store),
        Case("tracking.uri at another program's SQLite file", [*QUICK, store],
             other_program_db),
        Case("data.manifest is a binary file", [*QUICK, "data.manifest=manifest.bin"],
             lambda folder: (folder / "manifest.bin").write_bytes(bytes(range(256)) * 64)
             and [folder / "manifest.bin"]),
        Case("labels that are not numbers", [*QUICK, "data.root=data"],
             python_layout(["cat", 1, 2, 3])),
        Case("a checkpoint whose batch order was edited", [*QUICK, "steps=400",
                                                          "checkpoint.every=5",
                                                          "hydra.run.dir=run", "resume=true"],
             tampered_checkpoint),
        Case("a log handler class outside logging",
             [*QUICK, "+hydra.job_logging.handlers.x.class=os.system"]),
        Case("credentials in an unreachable tracking URI",
             [*QUICK, "tracking.uri=http://user:secret@127.0.0.1:9"]),
        # Hydra's own composition errors, and sweeps refused before their parent opens.
        Case("a value of the wrong type", [*QUICK, "steps=many"]),
        Case("a misspelt key", [*QUICK, "optimizer=sgd", "optimizer.momentm=0.5"]),
        Case("a group option that does not exist", [*QUICK, "optimizer=adamx"]),
        Case("an override the grammar cannot read", [*QUICK, "steps=("]),
        Case("a sweep with a value of the wrong type", ["-m", *QUICK, "seed=1,abc"]),
        Case("a sweep with a value that cannot work", ["-m", *QUICK, "steps=5,0"]),
        Case("a sweep with a group option that does not exist",
             ["-m", *QUICK, "optimizer=adam,adamx"]),
        Case("a sweep of data roots, one holding no data",
             ["-m", *QUICK, "data.root=${oc.env:CIFAR_EXP_DATA},nowhere"]),
        Case("a study storage that is not a database",
             ["-m", *QUICK, "hparams_search=tf_cnn_optuna", "hydra.sweeper.storage=bogus://"]),
        Case("a study storage with credentials and no driver",
             ["-m", *QUICK, "hparams_search=tf_cnn_optuna",
              "hydra.sweeper.storage=mysql+nodriver://u:secret@h/db"]),
        Case("a sampler Optuna sweeps do not have",
             ["-m", *QUICK, "hparams_search=tf_cnn_optuna", "hydra.sweeper.sampler=grid"]),
        Case("a launcher option of the wrong type",
             ["-m", *QUICK, "hydra/launcher=joblib", "hydra.launcher.n_jobs=abc", "seed=1,2"]),
        Case("a packed sweep with one job a builder refuses",
             ["-m", *QUICK, "hydra/launcher=packed", "optimizer=adam,adamw",
              "optimizer.betas=[1.5,0.999]"]),
        Case("a sweep with one value a builder refuses",
             ["-m", *QUICK, "optimizer=sgd", "optimizer.momentum=0.9,-1"]),
        *[Case(f"evaluate: {arg}", ["--checkpoint", "c.pt", "--no-log", arg],
               module="cifar_exp.evaluate")
          for arg in ("eval_images=abc", "eval_images=", "data.root=[1,2]",
                      "eval_batch_size=1.5", "tta=maybe", "device=gpu9", "steps=5",
                      "eval_images=1,2", "eval_images=${eval_batch_size}",
                      "data.root=${oc.env:NOPE}",
                      "tracking.uri=postgresql://u@h/db?sslmode=require")],
        Case("an interpolation that cannot be resolved", [*QUICK, "eval_images=${nope}"]),
        Case("a packed launcher mode that does not exist",
             ["-m", *QUICK, "hydra/launcher=packed", "hydra.launcher.mode=bogus", "seed=1,2"]),
    ]


def run_case(case: Case, root: Path) -> str:
    folder = Path(tempfile.mkdtemp(dir=root))
    kept = case.setup(folder) if case.setup else []
    before = {path: digest(path) for path in kept}
    try:
        if case.server:
            with mlflow_server(folder) as url:
                process = run(folder, *case.args,
                              f"tracking.uri={url.replace('http://', 'http://user:secret@')}",
                              background=True)
                wait_for(folder / "background.txt", "step 20, loss")
            code = process.wait(timeout=1200)
            output = (folder / "background.txt").read_text(errors="replace")
            first = next(line for line in output.splitlines() if line.startswith("error:"))
            if "secret" in output + "".join(p.read_text(errors="replace") for p in
                                            folder.rglob("*.yaml")):
                first = "CREDENTIALS LEAKED: " + first
        elif case.during is not None:
            process = run(folder, *case.args, module=case.module, wrap=case.wrap,
                          background=True)
            case.during(folder, process)
            code = process.wait(timeout=1200)
            output = (folder / "background.txt").read_text(errors="replace")
            lines = [line for line in output.splitlines() if line.startswith("error:")]
            first = lines[0] if lines else output.strip().splitlines()[-1]
            if (folder / "kept.db").exists():  # put the store back, as its owner would
                shutil.move(folder / "kept.db", folder / "mlflow.db")
        else:
            result = run(folder, *case.args, module=case.module, wrap=case.wrap)
            code = result.returncode
            lines = (result.stderr + result.stdout).strip().splitlines()
            first = next((line for line in lines if line.startswith("error:")), None)
            if first is None:  # it ran: what it said about the store, or its last line
                first = next((line.split("] ", 1)[-1] for line in lines
                              if "KILLED" in line or "report written" in line),
                             lines[-1] if lines else "(nothing)")
        if case.then:
            after = run(folder, *case.then, module=case.module)
            first += f" / then `{case.then[-1]}`: exit {after.returncode}"
    finally:
        if folder in RUNNING:
            RUNNING.pop(folder).send_signal(signal.SIGTERM)
    intact = all(digest(path) == sha for path, sha in before.items()) if before else "-"
    if case.name.startswith("hydra.callbacks"):
        intact = not (folder / "copied").exists()
    if case.name.startswith("a recipe naming code"):
        intact = not (folder / "marker").exists()
    if case.name.startswith("a checkpoint carrying"):
        intact = not (folder / "ran").exists()
    if case.name.startswith("report: `..`"):
        intact = not (root / "escaped").exists() and not (root.parent / "escaped").exists()
    first = first.replace(str(folder), "<folder>").replace(str(root), "<root>")
    if len(first) > 400:
        first = first[:397] + "..."
    args = " ".join(case.args).replace("x" * 600, "x…x").replace("c" * 5000, "c…c")
    wrap = f"`{'; '.join(case.wrap)}` " if case.wrap else ""
    return (f"| {case.name} | {wrap}`python -m {case.module} {args}` | {code} | "
            f"{first.replace('|', '/')} | {statuses(folder)} | {intact} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run only the cases whose name contains this")
    args = parser.parse_args()
    print("| case | command | exit code | first line | runs in the store after | data "
          "intact |\n| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="hostile_") as root:
        for case in cases():
            if args.only and args.only not in case.name:
                continue
            print(run_case(case, Path(root)), flush=True)


if __name__ == "__main__":
    main()
