"""MLflow: one run per training job, its params, buffered metrics, artifacts and model.
The store itself (which URIs, opening it) is cifar_exp.tracking.store."""

from __future__ import annotations

import copy
import json
import logging
import shlex
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import torch
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, RunStatus
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from cifar_exp.augment import Augmentation
from cifar_exp.data import content_digest, split_files
from cifar_exp.errors import Pruned
from cifar_exp.serving import classifier as serving
from cifar_exp.serving.classifier import Classifier
from cifar_exp.tracking.class_results import Predictions, log_class_results
from cifar_exp.tracking.naming import logged_model_name
from cifar_exp.tracking.redact import redact
from cifar_exp.tracking.store import (
    log_data_inputs,
    open_experiment,
    resumable_run,
    sqlite_path,
    store_error,
    use_client_defaults,
    with_retries,
)

log = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
T = TypeVar("T")


def data_inputs(name: str, root: str, splits: Sequence[str] = ("train", "test")
                ) -> list[DatasetInput]:
    """The data set's splits as MLflow run inputs (the UI's Dataset column and "Datasets
    used"): name, the folder read, and a digest of the files' contents."""
    files = split_files(name, root)
    contexts = {"train": "training", "test": "evaluation"}
    inputs = []
    for split in splits:
        folder = files[split][0].parent.resolve()
        dataset = Dataset(name=f"{name}-{split}", digest=content_digest(files[split]),
                          source_type="local",
                          source=json.dumps({"uri": folder.as_uri()}),
                          profile=json.dumps({"files": [path.name for path in files[split]]}))
        inputs.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, contexts[split])]))
    return inputs


# MLflow 3's UI shows an experiment as the browser's workflow type says (GenAI, unless
# switched), whatever the experiment's kind tag; this opens the model-training view.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"
SERVE_PORT = 5001  # `mlflow ui` takes 5000


def shown_store(uri: str) -> str:
    """The store as a command run from any folder names it: a SQLite file by its absolute
    path; credentials masked."""
    if (database := sqlite_path(uri)) is not None:
        return redact(f"sqlite:///{database}")
    return redact(uri)


def where_to_see(uri: str, experiment_id: str, run_id: str) -> str:
    """How to open run `run_id` in the MLflow UI, in its model-training view."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING_VIEW}"
    if uri.startswith(("http://", "https://")):
        return f"{redact(uri).rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {shown_store(uri)}, then http://127.0.0.1:5000/{page}"


def how_to_serve(uri: str, model_id: str, port: int = SERVE_PORT) -> tuple[str, str]:
    """The command that serves logged model `model_id` (`m-...`) of the store at `uri` over
    HTTP on `port`, and one that asks it about an image (black; uint8, 1 x 32 x 32 x 3)."""
    serve = shlex.join(["mlflow", "models", "serve", "-m", f"models:/{model_id}",
                        "--env-manager", "local", "--port", str(port)])
    side = serving.IMAGE_SIDE
    image = f"{{'inputs': [[[[0, 0, 0]] * {side}] * {side}]}}"
    ask = (f'python -c "import json; print(json.dumps({image}))" | curl -s '
           f"http://127.0.0.1:{port}/invocations -H 'Content-Type: application/json' -d @-")
    return f"MLFLOW_TRACKING_URI={shlex.quote(shown_store(uri))} {serve}", ask


def serve_lines(uri: str, model_id: str) -> list[str]:
    """What a run (and an evaluation of it) prints about serving its model `model_id`."""
    serve, ask = how_to_serve(uri, model_id)
    return [f"serve its model: {serve}", f"then ask it: {ask}"]


def served_model_id(client: MlflowClient, run_id: str) -> str:
    """The id (`m-...`) of the model run `run_id` logged to serve (named as the run), ""
    if it logged none."""
    run = client.get_run(run_id)
    name = logged_model_name(run.info.run_name)
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    return next((model.model_id for model in models
                 if model.source_run_id == run_id and model.name == name), "")


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


# A metric point as a checkpoint stores it: (key, value, timestamp in ms, step).
PointTuple = tuple[str, float, int, int]
RETRY_SECONDS = 10.0  # between tries while the store fails
FINAL_PAUSES = (0, 1, 2, 4)  # seconds before each last try to write the last points
RUN_DIR_TAG = "run_dir"  # the run's output folder: a run left RUNNING there can be closed


class RunTracker:
    """An MLflow run used as a context manager: it ends FINISHED, or FAILED when the body
    raises (KILLED on Ctrl-C or a stop signal). Metrics are buffered and written by a
    background thread at most every `flush_seconds`, so the training steps never wait for
    the store, even one that stopped answering: its points are kept (and go into the next
    checkpoint) and written once it answers again.

    With `run_id` it reopens that run instead of starting one (a resumed job): the points
    `pending` from its checkpoint are written first, and any point whose (key, step) is
    already in the store is dropped, so a step redone after a kill is not recorded twice.

    What could not be written (metric points, artifacts, the run's end) is in `failures`,
    and the first error in `failure_cause`, for the caller to report once training is over."""

    def __init__(self, uri: str, experiment: str, run_name: str, *,
                 tags: Mapping[str, str] | None = None, flush_seconds: float = 10.0,
                 parent_run_id: str | None = None, run_id: str | None = None,
                 pending: Sequence[PointTuple] = (), system_metrics_seconds: float = 0) -> None:
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.tags = {key: limited(redact(value), MAX_TAG_VAL_LENGTH)
                     for key, value in (tags or {}).items()}
        if parent_run_id:  # a job of a sweep: shown nested under the sweep's run
            self.tags["mlflow.parentRunId"] = parent_run_id
        self.flush_seconds = flush_seconds
        self.system_metrics_seconds = system_metrics_seconds  # 0: none
        self._buffer: list[Metric] = []
        self._pending = list(pending)
        self._written: set[tuple[str, int]] = set()  # (key, step) already in a resumed run
        self.stored_up_to = 0  # the last step with a point in the store (a resumed run)
        self._last_flush = time.monotonic()
        self.failed_writes = 0
        self.failures: list[str] = []  # what could not be written, one entry per kind
        self.failure_cause = ""  # the first store error, masked, on one line
        self._failing = False
        self.run_id = run_id or ""
        self.experiment_id = ""
        self._points = threading.Lock()  # guards _buffer
        self._store = threading.Lock()  # one call into the store at a time
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._writer: threading.Thread | None = None

    def __enter__(self) -> RunTracker:
        use_client_defaults()
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        system_metrics = self.system_metrics_seconds > 0
        if system_metrics:  # CPU, memory, disk, network, and GPUs where NVML sees them
            mlflow.set_system_metrics_sampling_interval(self.system_metrics_seconds)
        if self.run_id:
            existing = resumable_run(self.uri, self.run_id)
            mlflow.set_experiment(experiment_id=existing.info.experiment_id)
            with_retries(lambda: mlflow.start_run(run_id=self.run_id, tags=self.tags,
                                                  log_system_metrics=system_metrics),
                         "reopen run")
            self._written = {(key, point.step) for key in existing.data.metrics
                             for point in self.client.get_metric_history(self.run_id, key)}
            self.stored_up_to = max((step for _, step in self._written), default=0)
            for key, value, timestamp, step in self._pending:
                self._add(Metric(key, value, timestamp, step))
            self.experiment_id = existing.info.experiment_id
        else:
            experiment_id = self.experiment_id = open_experiment(self.uri, self.experiment)
            run = with_retries(lambda: mlflow.start_run(
                experiment_id=experiment_id, run_name=self.run_name, tags=self.tags,
                log_system_metrics=system_metrics), "start run")
            self.run_id = run.info.run_id
        self._writer = threading.Thread(target=self._write_in_background, daemon=True,
                                        name="mlflow-metrics")
        self._writer.start()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._closing.set()
        self._wake.set()
        if self._writer is not None:
            self._writer.join()
        for pause in FINAL_PAUSES:  # the last points get a few more tries
            time.sleep(pause)
            if self.flush():
                break
        else:
            self._fail(f"{len(self._buffer)} metric points")
        if exc_type is None:
            status = RunStatus.FINISHED
        elif issubclass(exc_type, KeyboardInterrupt | Pruned):  # Ctrl-C, Stopped, a pruner
            status = RunStatus.KILLED
        else:
            status = RunStatus.FAILED
        if isinstance(exc, Pruned):  # told apart from a stop, and from a failure
            self._guarded("the tag pruned", lambda: mlflow.set_tag("pruned", str(exc)))
        if self.failed_writes:
            self._guarded("the tag metric_write_failures", lambda: mlflow.set_tag(
                "metric_write_failures", str(self.failed_writes)))
        self._end_run(RunStatus.to_string(status))

    def _end_run(self, status: str) -> None:
        """Close the run with `status`; the process is left with no active run either way."""
        with self._store:
            try:
                mlflow.end_run(status)  # forgets the active run first, then writes
                return
            except Exception:  # e.g. SQLite busy: the run is no longer active; write again
                pass
            try:
                with_retries(lambda: self.client.set_terminated(self.run_id, status),
                             "end run")
            except Exception as error:  # the training itself is done: report, don't crash
                self._fail(f"the run's end (run {self.run_id} is left RUNNING)", error)

    def log_params(self, params: Mapping[str, Any]) -> None:
        with self._store:
            mlflow.log_params({key: limited(redact(str(value)), MAX_PARAM_VAL_LENGTH)
                               for key, value in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer the points; the background writer takes them to the store."""
        timestamp = int(time.time() * 1000)
        with self._points:
            for key, value in metrics.items():
                self._add(Metric(key, float(value), timestamp, step))
            full = len(self._buffer) >= MAX_METRICS_PER_BATCH
        if full or time.monotonic() - self._last_flush >= self.flush_seconds:
            self._wake.set()

    def _add(self, point: Metric) -> None:
        if (point.key, point.step) not in self._written:
            self._buffer.append(point)

    def _write_in_background(self) -> None:
        while not self._closing.is_set():
            if self._failing:  # a store that fails is tried again now and then, not hammered
                self._closing.wait(max(self.flush_seconds, RETRY_SECONDS))
            else:
                self._wake.wait(self.flush_seconds if self.flush_seconds > 0 else None)
            self._wake.clear()
            if not self._closing.is_set():
                self.flush()

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint must hold for a resumed job to continue this run: its id, and
        the points the store has not taken. Written first where the store answers, so the
        file never runs ahead of the store; not waited for where it is failing."""
        if not self._failing:
            self.flush()
        with self._points:
            pending: list[PointTuple] = [(m.key, m.value, m.timestamp, m.step)
                                         for m in self._buffer]
        return {"run_id": self.run_id, "pending": pending}

    def flush(self) -> bool:
        """Write the buffered points. A failed write keeps them for the next try, so a
        hiccup of the store or the server costs no points and does not stop training."""
        with self._store:
            self._last_flush = time.monotonic()
            try:
                while True:
                    with self._points:
                        batch = self._buffer[:MAX_METRICS_PER_BATCH]
                    if not batch:
                        break
                    self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
                    with self._points:
                        del self._buffer[: len(batch)]
            except Exception as error:  # any store or network failure: keep the points
                self.failed_writes += 1
                self.failure_cause = self.failure_cause or store_error(error)
                if not self._failing:
                    log.warning("MLflow: metric writes to %s are failing (%s); training goes "
                                "on and %d points are kept for the next try",
                                redact(self.uri), store_error(error), len(self._buffer))
                self._failing = True
                return False
            if self._failing:
                log.warning("MLflow: metric writes recovered after %d failed tries; no points "
                            "lost", self.failed_writes)
                self._failing = False
            return True

    def log_text(self, text: str, artifact_file: str) -> None:
        self._guarded(f"the artifact {artifact_file}",
                      lambda: mlflow.log_text(redact(text), artifact_file))

    def log_state_dict(self, model: torch.nn.Module, filename: str) -> None:
        def save_and_log() -> None:
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / filename
                torch.save(model.state_dict(), path)
                mlflow.log_artifact(str(path))

        self._guarded(f"the artifact {filename}", save_and_log)

    def log_inputs(self, inputs: Sequence[DatasetInput]) -> None:
        """Log the data set's splits as the run's inputs."""
        self._guarded("the data set inputs",
                      lambda: log_data_inputs(self.client, self.run_id, inputs))

    def log_class_results(self, predictions: Predictions) -> None:
        """The final evaluation's results per class, under class_results/: a table of
        precision per class, the confusion matrix and misclassified images (PNGs)."""
        self._guarded("the class results",
                      lambda: log_class_results(self.client, self.run_id, predictions))

    def log_models(self, network: torch.nn.Module, augmentation: Augmentation,
                   test_images: torch.Tensor, classes: Sequence[str], step: int,
                   registered_name: str | None = None) -> str:
        """Log the run's two models, named after the run, and return the served one's id
        (`m-...`; "" where it could not be logged):

        - `<run name>`, the one to serve: an MLflow pyfunc model that takes raw uint8
          images N x 32 x 32 x 3 and returns each image's class, its probability and every
          class's probability (the evaluation preprocessing, the network and a softmax,
          exported with torch.export); registered as `registered_name` when given;
        - `<run name>-network`: the plain torch module for mlflow.pytorch.load_model,
          taking preprocessed images (exported with torch.export, `data/model.pt2`).

        Both are logged at `step`, the weights' step: MLflow links to a model the metrics
        its run logged at that step, so the final `precision` and `test_loss` become the
        models' (at step 0 it would link the system metrics' first sample instead).
        The examples hold 8 test images: a batch of one would pin an export to batch size
        1."""
        self.flush()  # MLflow links the points it finds in the store
        name = logged_model_name(self.run_name)
        # CPU copies: the logged models load on any machine.
        network = copy.deepcopy(network).cpu().to(memory_format=torch.contiguous_format).eval()
        preprocessing = serving.on_cpu(augmentation)
        images = test_images[:8].cpu().permute(0, 2, 3, 1).contiguous()  # N x 32 x 32 x 3
        inputs = preprocessing.eval(images.permute(0, 3, 1, 2)).float()
        with torch.no_grad():
            outputs = network(inputs)
        requirements = [f"torch=={torch.__version__.split('+')[0]}",
                        f"mlflow=={mlflow.__version__}", "pandas", "numpy"]
        self._guarded("the network model", lambda: mlflow.pytorch.log_model(
            network, name=f"{name}-network",
            signature=infer_signature(inputs.numpy(), outputs.numpy()),
            input_example=inputs.numpy(), pip_requirements=requirements[:1], step=step,
            serialization_format="pt2"))  # MLflow's default, except on Databricks
        mlflow.clear_active_model()  # not the one the run's metrics go to
        with tempfile.TemporaryDirectory() as folder:
            artifacts = serving.write_artifacts(Classifier(network, preprocessing), images,
                                                classes, Path(folder))
            example = images.numpy()
            predicted = serving.load_served(artifacts).predict(None, example)
            with warnings.catch_warnings(record=True):  # MLflow's advice on type hints
                served = self._guarded("the served model", lambda: mlflow.pyfunc.log_model(
                    name=name, python_model=str(serving.PYFUNC_CODE), artifacts=artifacts,
                    signature=serving.served_signature(predicted), input_example=example,
                    pip_requirements=requirements, registered_model_name=registered_name,
                    step=step))
        mlflow.clear_active_model()  # the run's later system metrics are its own
        return served.model_id if served is not None else ""

    def served_model_id(self) -> str:
        """The id of the model this run logged to serve, "" if none yet (a run resumed
        after its last step has it already)."""
        with self._store:
            return served_model_id(self.client, self.run_id)

    def _guarded(self, what: str, action: Callable[[], T]) -> T | None:
        """Run a store call and return its result; a failure is recorded for the final
        status, not raised (None)."""
        try:
            with self._store:
                return action()
        except Exception as error:
            self._fail(what, error)
            return None

    def _fail(self, what: str, error: BaseException | None = None) -> None:
        """Note that `what` was not written, because of `error` when there is one."""
        if error is not None:
            self.failure_cause = self.failure_cause or store_error(error)
        log.error("MLflow: %s not written%s", what,
                  f" ({store_error(error)})" if error is not None else "")
        self.failures.append(what)


def limited(text: str, length: int) -> str:
    """`text` cut to the `length` characters MLflow stores, marked as cut."""
    return text if len(text) <= length else text[: length - 3] + "..."


def close_abandoned_runs(uri: str, experiment: str, folder: Path, keep: str = "") -> list[str]:
    """Mark KILLED the runs of `experiment` still RUNNING in the run folder `folder`: the
    caller holds that folder's lock, so their process is gone (a SIGKILL, a lost node).
    `keep` is a run about to be resumed. Returns the ids closed."""
    experiment_id = open_experiment(uri, experiment)
    client = MlflowClient(uri)
    running = client.search_runs([experiment_id], "attributes.status = 'RUNNING'")
    closed = []
    for run in running:
        if run.data.tags.get(RUN_DIR_TAG) != str(folder) or run.info.run_id == keep:
            continue
        client.set_tag(run.info.run_id, "killed_because", "its process was gone")
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
        log.warning("MLflow run %s was left RUNNING in %s by a process that is gone: marked "
                    "KILLED", run.info.run_id, folder)
        closed.append(run.info.run_id)
    return closed


class NoTracking:
    """RunTracker's interface, doing nothing: the tracker of a distributed job's ranks other
    than 0, so that one training job makes exactly one MLflow run."""

    run_id = experiment_id = ""
    stored_up_to = 0
    failures: list[str] = []
    failure_cause = ""

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

    def log_inputs(self, inputs: Sequence[DatasetInput]) -> None:
        return None

    def log_class_results(self, predictions: Predictions) -> None:
        return None

    def log_models(self, *args: Any, **kwargs: Any) -> str:
        return ""

    def served_model_id(self) -> str:
        return ""
