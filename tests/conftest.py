"""Shared fixtures: the real CIFAR-10 (from $CIFAR_EXP_DATA) and tiny synthetic layouts."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import pickle
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pytest
import requests
import torch
from omegaconf import DictConfig

from cifar_exp.data import CifarData, load_cifar
from cifar_exp.training.batches import BatchMaker
from cifar_exp.training.loop import TrainResult
from cifar_exp.training.parts import TrainSettings
from tests.warm_python import WarmProcess, WarmPython, preload, shared_warm_python

REPO = Path(__file__).resolve().parent.parent


def share_the_cores() -> None:
    """Under pytest-xdist, give each worker its share of the cores: torch threads, and
    OMP_NUM_THREADS for the commands it starts. More threads than cores in all makes
    OpenMP's waiting threads spin against each other, several times slower."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


share_the_cores()


# Fixtures that train or sweep once for many tests: under pytest-xdist (`-n`,
# `--dist loadgroup`) the tests that use one of them run on one worker, which makes it once.
SHARED_RUNS = ("trained_run", "sweep_store", "uninterrupted", "first_search")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        shared = [name for name in SHARED_RUNS if name in getattr(item, "fixturenames", ())]
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared[0]))
    if not config.option.collectonly and any(
            "data_root" in getattr(item, "fixturenames", ()) for item in items):
        # Tests on the real data run commands and train in this process: the imports of
        # both are paid here, once, rather than by whichever test comes first.
        warm_python()
        preload()
        warm_python().wait_until_ready()
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def run_command(*args: str, processes: int = 1) -> list[str]:
    """`python -m cifar_exp.run ARGS`; with `processes` > 1, under
    `torchrun --standalone --nproc_per_node=PROCESSES`."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable])
    return [*launcher, "-m", "cifar_exp.run", *args]


def data_env(data_root: Path) -> dict[str, str]:
    """This environment, with the real data set at `data_root`."""
    return {**os.environ, "CIFAR_EXP_DATA": str(data_root)}


def warm_python() -> WarmPython:
    """This test process's warm interpreter (tests/warm_python.py), started on first use
    or when collection finds tests on the real data."""
    return shared_warm_python()


def start_command(cwd: Path, *args: str, data_root: Path, output: Path,
                  errors: Path | None = None) -> WarmProcess:
    """`python -m cifar_exp.run ARGS` in folder `cwd`, on the real data, in the background;
    its stdout goes to the file `output`, made empty now, and its stderr there too, or to
    `errors`."""
    output.write_bytes(b"")
    return warm_python().start("cifar_exp.run", args, cwd, data_env(data_root), output,
                               errors or output)


def cli(cwd: Path, *args: str, data_root: Path, timeout: float = 600, processes: int = 1,
        fresh: bool = False) -> subprocess.CompletedProcess:
    """run_command(ARGS) in folder `cwd`, on the real data, to its end. In a fresh interpreter
    where `fresh` or `processes` > 1 (the end-to-end tests: the command as a user types it);
    otherwise in a child of the warm interpreter, which has the imports done already."""
    if fresh or processes > 1:
        return subprocess.run(run_command(*args, processes=processes), cwd=cwd,
                              env=data_env(data_root), capture_output=True, text=True,
                              timeout=timeout)
    with tempfile.TemporaryDirectory() as streams:
        stdout, stderr = Path(streams) / "stdout", Path(streams) / "stderr"
        process = start_command(cwd, *args, data_root=data_root, output=stdout, errors=stderr)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        return subprocess.CompletedProcess(process.args, process.returncode,
                                           stdout.read_text(), stderr.read_text())


class AsGiven:
    """Stands in for an augmentation: the drawn images as they are (already float)."""

    def __init__(self, image_size: int = 24) -> None:
        self.image_size = image_size

    def train(self, images: torch.Tensor, generator: torch.Generator,
              indices: torch.Tensor | None = None, epoch: int = 0) -> torch.Tensor:
        return images

    def eval(self, images: torch.Tensor) -> torch.Tensor:
        return images


def made_of(inputs: torch.Tensor, labels: torch.Tensor,
            layout: torch.memory_format = torch.contiguous_format) -> BatchMaker:
    """A batch maker whose training set is these images, as they are: the step's batch for
    indices `torch.arange(len(labels))` is `inputs` and `labels` whole."""
    data = CifarData(inputs, labels, inputs[:0], labels[:0], [str(c) for c in range(10)])
    return BatchMaker(data, AsGiven(inputs.shape[-1]), torch.Generator(inputs.device), layout)


@functools.cache
def _default_settings() -> TrainSettings:
    from cifar_exp.config import compose_config
    from cifar_exp.training.build import build_settings

    return build_settings(compose_config([]), torch.device("cpu"))


def train_settings(**changes: object) -> TrainSettings:
    """The trainer's settings as the default config gives them on the CPU, with `changes`
    (the schema holds the defaults: tests do not repeat them)."""
    return dataclasses.replace(_default_settings(), **changes)


def run_experiment(cfg: DictConfig, folder: Path | None = None) -> TrainResult:
    """Train the job `cfg` describes in this process, as `python -m cifar_exp.run` would;
    `folder` stands for the output folder outside a Hydra app (default: the current one)."""
    from cifar_exp import run as run_module
    from cifar_exp.job import job

    return job.run_job(cfg, run_module.job_context(cfg, folder))


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The folder holding the real cifar-10-batches-bin/ (or -py/)."""
    root = Path(os.environ.get("CIFAR_EXP_DATA", REPO / "data"))
    if not (root / "cifar-10-batches-bin").is_dir() and not (root / "cifar-10-batches-py").is_dir():
        pytest.fail(f"the tests need the real CIFAR-10: set CIFAR_EXP_DATA to the folder that "
                    f"holds cifar-10-batches-bin/ (looked in {root})")
    return root


@pytest.fixture(scope="session")
def cifar10(data_root: Path) -> CifarData:
    """The real CIFAR-10, loaded once per session."""
    return load_cifar("cifar10", data_root)


class MkdirPayload:
    """What an attacker would pickle: unpickling it calls os.mkdir(marker). A loader that
    refuses it leaves `marker` absent; one that runs code from the file creates it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def synthetic_images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)


def write_binary_batch(path: Path, images: np.ndarray, labels: np.ndarray,
                       coarse: np.ndarray | None = None) -> None:
    """One file of the official binary layout (<coarse>?<label><3072 pixels> records)."""
    columns = [labels.astype(np.uint8)[:, None], images.reshape(len(images), -1)]
    if coarse is not None:
        columns.insert(0, coarse.astype(np.uint8)[:, None])
    np.concatenate(columns, axis=1).tofile(path)


def write_pickle(path: Path, content: dict) -> None:
    # Keys as bytes, as in the official files written by Python 2.
    with open(path, "wb") as file:
        pickle.dump({k.encode(): v for k, v in content.items()}, file, protocol=2)


@pytest.fixture
def tiny_cifar10_binary(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for i in range(1, 6):
        write_binary_batch(folder / f"data_batch_{i}.bin", synthetic_images(4, i), np.arange(4) + i)
    write_binary_batch(folder / "test_batch.bin", synthetic_images(3, 0), np.array([0, 9, 5]))
    (folder / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n\n")
    return tmp_path


@pytest.fixture
def tiny_cifar10_python(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        write_pickle(folder / f"data_batch_{i}", {
            "data": synthetic_images(4, i).reshape(4, -1), "labels": list(range(i, i + 4))})
    write_pickle(folder / "test_batch", {
        "data": synthetic_images(3, 0).reshape(3, -1), "labels": [0, 9, 5]})
    names = [f"class{i}".encode() for i in range(10)]
    write_pickle(folder / "batches.meta", {"label_names": names})
    return tmp_path


@pytest.fixture(scope="session")
def store_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow store (SQLite file) with its schema made, once per session; tests get
    copies of it (`store`, `copy_store`). A new store runs every schema migration, about 2 s;
    a copy takes milliseconds. Never written to after this."""
    from mlflow.tracking import MlflowClient

    from cifar_exp.tracking.store import store_opening

    database = tmp_path_factory.mktemp("store_template") / "mlflow.db"
    uri = f"sqlite:///{database}"
    with store_opening(uri):  # opened as the project opens a store
        MlflowClient(uri).search_experiments()  # creates the schema and its Default experiment
    return database


def copy_store(template: Path, folder: Path) -> str:
    """The tracking URI of a copy of the store `template` at `folder`/mlflow.db: a migrated
    store of its own, for tests that are not about creating one."""
    folder.mkdir(parents=True, exist_ok=True)
    database = folder / "mlflow.db"
    shutil.copyfile(template, database)  # the database alone: the project makes its own lock
    # MLflow put the template's Default experiment's artifacts in mlruns/ of the directory
    # pytest runs in; a store a run in `folder` makes has them in `folder`/mlruns, and so
    # does the copy: no two tests share that folder.
    with contextlib.closing(sqlite3.connect(database)) as connection:
        connection.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                           (str(folder / "mlruns" / "0"),))
        connection.commit()
    return f"sqlite:///{database}"


@pytest.fixture
def store(tmp_path: Path, store_template: Path) -> str:
    """The tracking URI of a migrated, empty MLflow store at tmp_path/mlflow.db, a copy of
    the session's template. Tests about creating a store (a new file, its lock, two
    processes at once) must not use it: they start from no file."""
    return copy_store(store_template, tmp_path)


SWEEP_JOB = ("steps=10", "log_every=5", "eval_every=10", "eval_images=500",
             "tracking.log_model=false")


@pytest.fixture(scope="session")
def sweep_store(tmp_path_factory: pytest.TempPathFactory, data_root: Path,
                store_template: Path) -> tuple[Path, str, subprocess.CompletedProcess]:
    """A 2 x 2 sweep (optimizer x seed, 10 steps a job), its jobs one after another, into
    one store: (folder, tracking URI, the finished command). The parallel sweep is a slow
    test of tests/tracking/test_sweep.py."""
    folder = tmp_path_factory.mktemp("sweep")
    uri = copy_store(store_template, folder)
    result = cli(folder, "-m", "optimizer=adam,sgd", "seed=0,1", *SWEEP_JOB, "batch_size=32",
                 f"tracking.uri={uri}", data_root=data_root)
    return folder, uri, result


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_process_group(process: subprocess.Popen, signum: int = signal.SIGTERM) -> None:
    """`signum` to the process and every process it started (its own session), then wait;
    SIGKILL after 30 s. SIGINT (Ctrl-C) for servers that stop at once on it, where SIGTERM
    can wait for a worker to end gracefully."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@contextlib.contextmanager
def mlflow_server(backend_uri: str, cwd: Path, *options: str, timeout: float = 180
                  ) -> Iterator[str]:
    """`mlflow server` on a free port of 127.0.0.1 over `backend_uri`, for the block; its
    base URL. The server and its workers are stopped at the end."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    # Its log goes to a file, not a pipe: a full pipe would block the server.
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *options],
            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_healthy(server, url, log, timeout)
            yield url
        finally:
            stop_process_group(server)


def wait_until_healthy(server: subprocess.Popen, url: str, log: IO[bytes],
                       timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            pytest.fail(f"mlflow server exited: {log.read().decode()[-2000:]}")
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                return
        except requests.ConnectionError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server did not answer within {timeout:.0f} s")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, data_root: Path,
                store_template: Path) -> dict:
    """A finished 20-step run with EMA, its models logged, its checkpoint kept: the store's
    URI, the run's id and name, the checkpoint, and the final precision and test loss (on
    the first 500 test images, as the run scored them)."""
    from mlflow.tracking import MlflowClient

    from cifar_exp.config import compose_config

    folder = tmp_path_factory.mktemp("trained")
    uri = copy_store(store_template, folder)
    cfg = compose_config(["steps=20", "log_every=10", "eval_images=500", "ema.decay=0.9",
                          f"data.root={data_root}", f"tracking.uri={uri}",
                          "tracking.system_metrics_seconds=0",
                          f"checkpoint.path={folder / 'checkpoint.pt'}"])
    result = run_experiment(cfg, folder=folder)
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("cifar_exp").experiment_id])
    return {"uri": uri, "run_id": run.info.run_id, "name": run.info.run_name,
            "checkpoint": folder / "checkpoint.pt", "precision": result.precision,
            "test_loss": result.test_loss, "folder": folder}
