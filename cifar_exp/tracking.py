"""MLflow: one run per training job, its params, buffered metrics, artifacts and model."""

from __future__ import annotations

import copy
import functools
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import requests
import torch
from mlflow.entities import Metric, Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from cifar_exp.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
# The project's source tree: its git commit goes on every run.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# A sweep's parent run id, set by the sweep callback for the jobs it launches.
PARENT_RUN_ENV = "CIFAR_EXP_PARENT_RUN_ID"
T = TypeVar("T")


def command_line() -> str:
    """The command as the user typed it, for the runs' `command` tag: `python -m
    cifar_exp.run ARGS`, or under torchrun the torchrun command that started this rank."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # set by torchrun for the processes it starts
        launcher = torchrun_arguments(os.getppid())
        if launcher is None:  # its process unreadable: the part torchrun must have had
            launcher = [f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '?')}", "-m",
                        "cifar_exp.run", *sys.argv[1:]]
        return " ".join(["torchrun", *launcher])
    return " ".join(["python -m cifar_exp.run", *sys.argv[1:]])


def torchrun_arguments(pid: int) -> list[str] | None:
    """The arguments of the torchrun (or `python -m torch.distributed.run`) process `pid`,
    read from /proc; None where that cannot be read or `pid` is not torchrun."""
    try:
        argv = [arg.decode() for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        return None
    for index, arg in enumerate(argv):
        if Path(arg).name == "torchrun" or (arg == "torch.distributed.run"
                                            and argv[index - 1] == "-m"):
            return [arg for arg in argv[index + 1:] if arg]
    return None


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: MLflow params are flat."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _git(folder: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True,
                                timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()


@functools.cache
def git_tags(folder: Path = PROJECT_ROOT) -> dict[str, str]:
    """The commit checked out in `folder` and whether tracked files differ from it; empty
    outside a git work tree. Cached: every job of a multirun runs the code imported at
    start, so all its runs carry the commit read then."""
    commit = _git(folder, "rev-parse", "HEAD")
    if not commit:
        return {}
    changes = _git(folder, "status", "--porcelain", "--untracked-files=no")
    return {"mlflow.source.git.commit": commit, "git_dirty": str(bool(changes)).lower()}


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI, None for any other store."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix):]).expanduser().resolve() if uri.startswith(prefix) else None


def default_artifact_location(uri: str) -> str | None:
    """For a SQLite store, artifacts go to `mlartifacts/` beside the database file (MLflow
    would otherwise create a `./mlruns` folder wherever the command runs)."""
    database = sqlite_path(uri)
    if database is None:
        return None  # a tracking server decides for itself
    return (database.parent / "mlartifacts").as_uri()


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any work, on a tracking server that does not answer or a SQLite
    file in a folder that does not exist."""
    if uri.startswith(("http://", "https://")):
        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=timeout).raise_for_status()
        except requests.RequestException as error:
            raise ConfigError(f"MLflow tracking server {uri} does not answer ({error}); start "
                              f"it or fix tracking.uri (default sqlite:///mlflow.db)") from error
    elif (database := sqlite_path(uri)) is not None and not database.parent.is_dir():
        raise ConfigError(f"tracking.uri={uri}: folder {database.parent} does not exist; "
                          f"create it or choose another path")


def with_retries(action: Callable[[], T], what: str, tries: int = 6, pause: float = 0.5) -> T:
    """Run `action`, retrying with doubling pauses while SQLite reports its lock busy:
    parallel jobs writing to one database file take turns."""
    for attempt in range(tries):
        try:
            return action()
        except Exception as error:
            if "database is locked" not in str(error) or attempt == tries - 1:
                raise
            log.warning("MLflow: %s: database is locked, retrying in %.1f s", what, pause)
            time.sleep(pause)
            pause *= 2
    raise AssertionError("unreachable")


def open_experiment(uri: str, name: str) -> str:
    """The id of experiment `name` in the store at `uri`, creating the store's schema and the
    experiment if needed. A sweep calls this once before its jobs start, so parallel jobs
    never race to migrate a new database or to create the same experiment."""
    client = MlflowClient(uri)
    found = with_retries(lambda: client.get_experiment_by_name(name), "read experiment")
    if found is not None:
        return found.experiment_id
    # The UI then opens on the runs table, not on its GenAI overview.
    tags = {"mlflow.experimentKind": "custom_model_development"}
    return with_retries(lambda: client.create_experiment(name, default_artifact_location(uri),
                                                         tags), "create experiment")


def resumable_run(uri: str, run_id: str) -> Run:
    """The run a checkpoint continues, checked before any work: it must be in the store."""
    if (database := sqlite_path(uri)) is not None and not database.is_file():
        # Checked first: opening a SQLite store that is not there would create it.
        raise CheckpointError(f"the checkpoint's MLflow run {run_id} is not in {uri} (no such "
                              f"file); resume with the tracking.uri the run was started with")
    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException as error:
        raise CheckpointError(f"the checkpoint's MLflow run {run_id} is not in {uri}; resume "
                              f"with the tracking.uri the run was started with") from error
    if run.info.lifecycle_stage == "deleted":
        raise CheckpointError(f"the checkpoint's MLflow run {run_id} was deleted from {uri}; "
                              f"restore it (mlflow runs restore) or start a new run")
    return run


# A metric point as a checkpoint stores it: (key, value, timestamp in ms, step).
PointTuple = tuple[str, float, int, int]


class RunTracker:
    """An MLflow run used as a context manager: it ends FINISHED, or FAILED when the body
    raises (KILLED on Ctrl-C or a stop signal). Metrics are buffered and written with
    log_batch, at most every `flush_seconds`, so logging costs no time on the training
    steps in between.

    With `run_id` it reopens that run instead of starting one (a resumed job): the points
    `pending` from its checkpoint are written first, and any point whose (key, step) is
    already in the store is dropped, so a step redone after a kill is not recorded twice."""

    def __init__(self, uri: str, experiment: str, run_name: str,
                 tags: Mapping[str, str] | None = None, flush_seconds: float = 10.0,
                 parent_run_id: str | None = None, run_id: str | None = None,
                 pending: Sequence[PointTuple] = ()) -> None:
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.tags = dict(tags or {})
        if parent_run_id:  # a job of a sweep: shown nested under the sweep's run
            self.tags["mlflow.parentRunId"] = parent_run_id
        self.flush_seconds = flush_seconds
        self._buffer: list[Metric] = []
        self._pending = list(pending)
        self._written: set[tuple[str, int]] = set()  # (key, step) already in a resumed run
        self.stored_up_to = 0  # the last step with a point in the store (a resumed run)
        self._last_flush = time.monotonic()
        self.failed_writes = 0
        self._failing = self._recovery_logged = False
        self.run_id = run_id or ""

    def __enter__(self) -> RunTracker:
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        if self.run_id:
            existing = resumable_run(self.uri, self.run_id)
            mlflow.set_experiment(experiment_id=existing.info.experiment_id)
            with_retries(lambda: mlflow.start_run(run_id=self.run_id, tags=self.tags),
                         "reopen run")
            self._written = {(key, point.step) for key in existing.data.metrics
                             for point in self.client.get_metric_history(self.run_id, key)}
            self.stored_up_to = max((step for _, step in self._written), default=0)
            for key, value, timestamp, step in self._pending:
                self._add(Metric(key, value, timestamp, step))
            return self
        experiment_id = open_experiment(self.uri, self.experiment)
        run = with_retries(lambda: mlflow.start_run(experiment_id=experiment_id,
                                                    run_name=self.run_name, tags=self.tags),
                           "start run")
        self.run_id = run.info.run_id
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        for pause in (0, 1, 2, 4):  # the last points get a few more tries
            time.sleep(pause)
            if self.flush():
                break
        else:
            log.error("MLflow: %d metric points could not be written after %d tries",
                      len(self._buffer), self.failed_writes)
        if exc_type is None:
            status = RunStatus.FINISHED
        elif issubclass(exc_type, KeyboardInterrupt):  # Ctrl-C, or cifar_exp's Stopped
            status = RunStatus.KILLED
        else:
            status = RunStatus.FAILED
        try:
            if self.failed_writes:
                mlflow.set_tag("metric_write_failures", str(self.failed_writes))
            with_retries(lambda: mlflow.end_run(RunStatus.to_string(status)), "end run")
        except Exception as error:  # the training itself is done: report, don't crash
            log.error("MLflow: could not close run %s (%s)", self.run_id, error)

    def log_params(self, params: Mapping[str, Any]) -> None:
        mlflow.log_params({key: str(value) for key, value in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)
        for key, value in metrics.items():
            self._add(Metric(key, float(value), timestamp, step))
        full = len(self._buffer) >= MAX_METRICS_PER_BATCH and not self._failing
        if full or time.monotonic() - self._last_flush >= self.flush_seconds:
            self._failing = not self.flush()  # while failing, retry every flush_seconds

    def _add(self, point: Metric) -> None:
        if (point.key, point.step) not in self._written:
            self._buffer.append(point)

    def checkpoint_state(self) -> dict[str, Any]:
        """Write the buffered points, then return what a checkpoint must hold for a resumed
        job to continue this run: its id, and the points the store did not take (if it is
        failing), so that no point up to the checkpoint's step is lost."""
        self._failing = not self.flush()
        pending: list[PointTuple] = [(m.key, m.value, m.timestamp, m.step)
                                     for m in self._buffer]
        return {"run_id": self.run_id, "pending": pending}

    def flush(self) -> bool:
        """Write the buffered points. A failed write keeps them for the next try, so a
        hiccup of the store or the server costs no points and does not stop training."""
        self._last_flush = time.monotonic()
        try:
            while self._buffer:
                batch = self._buffer[:MAX_METRICS_PER_BATCH]
                self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
                del self._buffer[: len(batch)]
        except Exception as error:  # any store or network failure: keep the points
            self.failed_writes += 1
            log.warning("MLflow metric write failed (%s); %d points kept for the next try",
                        error, len(self._buffer))
            return False
        if self.failed_writes and not self._recovery_logged:
            log.warning("MLflow metric writes recovered after %d failed tries; no points lost",
                        self.failed_writes)
            self._recovery_logged = True
        return True

    def log_text(self, text: str, artifact_file: str) -> None:
        mlflow.log_text(text, artifact_file)

    def log_state_dict(self, model: torch.nn.Module, filename: str) -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / filename
            torch.save(model.state_dict(), path)
            mlflow.log_artifact(str(path))

    def log_model(self, model: torch.nn.Module, example: torch.Tensor) -> None:
        """Log `model` as the MLflow PyTorch model 'model', taking preprocessed images,
        exported with torch.export (`data/model.pt2`: a program and its weights, not a
        pickle). The example holds several images: a batch of one would pin the exported
        model to batch size 1."""
        # A contiguous CPU copy: the logged model loads on any machine.
        model = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format).eval()
        example = example.cpu().float()
        with torch.no_grad():
            output = model(example).numpy()
        inputs = example.numpy()
        mlflow.pytorch.log_model(
            model,
            name="model",
            signature=infer_signature(inputs, output),
            input_example=inputs,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            serialization_format="pt2",  # MLflow's default, except on Databricks
        )


class NoTracking:
    """RunTracker's interface, doing nothing: the tracker of a distributed job's ranks other
    than 0, so that one training job makes exactly one MLflow run."""

    run_id = ""
    stored_up_to = 0

    def __enter__(self) -> NoTracking:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        return None

    def checkpoint_state(self) -> dict[str, Any]:
        return {}

    def log_text(self, text: str, artifact_file: str) -> None:
        return None

    def log_state_dict(self, model: torch.nn.Module, filename: str) -> None:
        return None

    def log_model(self, model: torch.nn.Module, example: torch.Tensor) -> None:
        return None
