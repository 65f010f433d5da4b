"""MLflow runs on a SQLite store: params, buffered metrics, artifacts, model, status."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import requests
import torch
from mlflow.tracking import MlflowClient

from cifar_exp.augment import build_augmentation
from cifar_exp.errors import CheckpointError
from cifar_exp.models import build_model
from cifar_exp.tracking.runs import (
    RunTracker,
    data_inputs,
    flatten,
    how_to_serve,
    served_model_id,
    where_to_see,
)
from cifar_exp.tracking.store import resumable_run
from tests.conftest import copy_store, free_port, stop_process_group


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, store_template: Path) -> str:
    """One store for the module's runs (in place of conftest's store, one per test)."""
    return copy_store(store_template, tmp_path_factory.mktemp("mlflow"))


def test_flatten_nests_with_dots():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {
        "a.b": 1, "a.c.d": [1, 2], "e": None}


def test_finished_run_keeps_every_point(store):
    with RunTracker(store, "unit", "ok-run", tags={"command": "test"}, flush_seconds=3600) as run:
        run.log_params({"optimizer.lr": 0.001, "model.name": "tf_cnn"})
        for step in range(1, 1201):  # more than one log_batch worth of metrics
            run.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step)
        deadline = time.monotonic() + 30  # the background writer takes full batches
        while len(run._buffer) >= 1000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(run._buffer) < 1000  # flushed in batches on the way
    client = MlflowClient(store)
    finished = client.get_run(run.run_id)
    assert finished.info.status == "FINISHED" and finished.info.run_name == "ok-run"
    assert finished.data.params == {"optimizer.lr": "0.001", "model.name": "tf_cnn"}
    assert finished.data.tags["command"] == "test"
    history = client.get_metric_history(run.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 1201))


def test_failed_and_interrupted_runs_are_marked(store):
    with pytest.raises(RuntimeError), RunTracker(store, "unit", "bad-run") as failed:
        failed.log_metrics({"loss": 2.0}, 1)
        raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt), RunTracker(store, "unit", "stopped") as killed:
        raise KeyboardInterrupt
    client = MlflowClient(store)
    assert client.get_run(failed.run_id).info.status == "FAILED"
    assert [m.value for m in client.get_metric_history(failed.run_id, "loss")] == [2.0]
    assert client.get_run(killed.run_id).info.status == "KILLED"


def test_a_run_logs_a_model_to_serve_and_its_plain_network(store, tmp_path, cifar10,
                                                           data_root):
    augmentation = build_augmentation("tf_distort", cifar10.train_images)
    network = build_model("tf_cnn", 10, 24).eval().to(memory_format=torch.channels_last)
    with RunTracker(store, "unit", "tf_cnn-adam lr=0.003", system_metrics_seconds=1) as run:
        run.log_inputs(data_inputs("cifar10", str(data_root)))
        run.log_metrics({"precision": 0.25, "test_loss": 2.0}, 10)
        run.flush()
        served_id = run.log_models(network, augmentation, cifar10.test_images,
                                   cifar10.classes, 10, registered_name="cifar-unit")
        run.log_state_dict(network, "weights.pt")
    client = MlflowClient(store)
    logged = {m.name: m for m in client.search_logged_models(
        experiment_ids=[client.get_experiment_by_name("unit").experiment_id])
        if m.source_run_id == run.run_id}
    # Named after the run (MLflow takes no "." in a model's name).
    assert set(logged) == {"tf_cnn-adam lr=0_003", "tf_cnn-adam lr=0_003-network"}
    served, plain = logged["tf_cnn-adam lr=0_003"], logged["tf_cnn-adam lr=0_003-network"]
    assert served_id == run.served_model_id() == served.model_id  # the one to serve
    assert served_model_id(client, run.run_id) == served.model_id

    # The plain network: exported with torch.export (a .pt2 program, not a pickle), for
    # preprocessed images of any batch size.
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{plain.model_id}",
                                                      dst_path=str(tmp_path / "net")))
    assert [p.name for p in (folder / "data").iterdir() if p.suffix == ".pt2"] == ["model.pt2"]
    loaded = mlflow.pytorch.load_model(f"models:/{plain.model_id}")
    batch = augmentation.eval(cifar10.test_images[:3])
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), network(batch), rtol=1e-4, atol=1e-5)

    # The served model: raw uint8 images in (N x 32 x 32 x 3), classes and probabilities out.
    model = mlflow.pyfunc.load_model(f"models:/{served.model_id}")
    images = cifar10.test_images[:5]
    answer = model.predict(images.permute(0, 2, 3, 1).numpy())
    with torch.no_grad():
        expected = network(augmentation.eval(images)).softmax(-1)
    assert list(answer.columns) == ["class", "probability", *cifar10.classes]
    torch.testing.assert_close(torch.tensor(answer[cifar10.classes].to_numpy()), expected,
                               rtol=1e-4, atol=1e-6)
    assert list(answer["class"]) == [cifar10.classes[i] for i in expected.argmax(1)]

    # The final metrics are both models' (the same weights), and the run's history holds
    # them once; the system metrics stay the run's own.
    for model in (served, plain):
        assert {(m.key, m.value, m.step) for m in
                client.get_logged_model(model.model_id).metrics} == {
            ("precision", 0.25, 10), ("test_loss", 2.0, 10)}
    assert len(client.get_metric_history(run.run_id, "precision")) == 1
    assert client.get_registered_model("cifar-unit").latest_versions[0].run_id == run.run_id
    state = torch.load(Path(mlflow.artifacts.download_artifacts(
        run_id=run.run_id, artifact_path="weights.pt", dst_path=str(tmp_path))),
        weights_only=True)
    assert set(state) == set(network.state_dict())


def test_the_printed_commands_open_the_training_view_and_serve_from_any_folder(
        tmp_path, monkeypatch):
    folder = tmp_path / "my runs"  # a space: the serve command quotes the store
    folder.mkdir()
    monkeypatch.chdir(folder)
    database = f"sqlite:///{folder / 'mlflow.db'}"
    assert where_to_see("sqlite:///mlflow.db", "1", "abc") == (
        f"mlflow ui --backend-store-uri {database}, then http://127.0.0.1:5000/#/experiments/1/"
        f"runs/abc?workflowType=machine_learning")
    assert where_to_see("https://user:secret@host:5000/", "2", "abc") == (
        "https://***@host:5000/#/experiments/2/runs/abc?workflowType=machine_learning")
    serve, ask = how_to_serve("sqlite:///mlflow.db", "m-0123")
    assert serve == (f"MLFLOW_TRACKING_URI={shlex.quote(database)} mlflow models serve -m "
                     f"models:/m-0123 --env-manager local --port 5001")
    body, request = ask.split(" | ")
    assert request == ("curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: "
                       "application/json' -d @-")
    [_, flag, code] = shlex.split(body)
    printed = subprocess.run([sys.executable, flag, code], capture_output=True, text=True,
                             check=True).stdout
    assert json.loads(printed) == {"inputs": [[[[0, 0, 0]] * 32] * 32]}  # 1 x 32 x 32 x 3
    assert how_to_serve("http://user:pw@host:5000", "m-1")[0].startswith(
        "MLFLOW_TRACKING_URI='http://***@host:5000' mlflow models serve")  # masked, quoted


@pytest.mark.slow  # `mlflow models serve` starts in about 20 s, after a 20-step run
def test_the_printed_serve_commands_answer_as_pasted(trained_run, tmp_path):
    client = MlflowClient(trained_run["uri"])
    [served] = [model for model in client.search_logged_models(
        experiment_ids=[client.get_experiment_by_name("cifar_exp").experiment_id])
        if model.name == trained_run["name"]]
    port = free_port()
    serve, ask = how_to_serve(trained_run["uri"], served.model_id, port)
    # Pasted into a shell of this environment (its `python` and `mlflow`), in another folder.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    server = subprocess.Popen(["bash", "-c", serve], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not ping(port):
            assert server.poll() is None and time.monotonic() < deadline, "no server"
            time.sleep(1)
        answer = subprocess.run(["bash", "-c", ask], cwd=tmp_path, env=env, text=True,
                                capture_output=True, timeout=60, check=True).stdout
    finally:
        stop_process_group(server)
    [prediction] = json.loads(answer)["predictions"]
    assert prediction["class"] in prediction and 0 < prediction["probability"] <= 1


def ping(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).ok
    except requests.ConnectionError:
        return False


def test_failed_metric_writes_are_retried_and_nothing_is_lost(store, monkeypatch, caplog):
    with RunTracker(store, "unit", "flaky", flush_seconds=0) as run:
        real_log_batch = run.client.log_batch
        failures = iter([True, True])

        def flaky_log_batch(*args, **kwargs):
            if next(failures, False):
                raise ConnectionError("store went away")
            return real_log_batch(*args, **kwargs)

        monkeypatch.setattr(run.client, "log_batch", flaky_log_batch)
        for step in range(1, 6):
            run.log_metrics({"loss": float(step)}, step)  # the first two writes fail
    client = MlflowClient(store)
    finished = client.get_run(run.run_id)
    assert finished.info.status == "FINISHED"
    assert finished.data.tags["metric_write_failures"] == "2"
    history = client.get_metric_history(run.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(1, 6)]
    assert any("recovered after 2 failed tries" in m for m in caplog.messages)


def test_resumed_run_records_each_point_once(store):
    with pytest.raises(KeyboardInterrupt), \
            RunTracker(store, "unit", "resumable", flush_seconds=0) as first:
        for step in range(1, 5):
            first.log_metrics({"loss": float(step)}, step)
        raise KeyboardInterrupt  # killed after step 4; say its checkpoint is from step 2
    assert MlflowClient(store).get_run(first.run_id).info.status == "KILLED"
    pending = [("lr", 0.5, 1000, 2)]  # a point the store had not taken at the checkpoint
    with RunTracker(store, "unit", "ignored", tags={"resumed_from_step": "2"}, run_id=first.run_id,
                    pending=pending) as second:
        for step in range(3, 7):  # steps 3 and 4 again, as the resumed job redoes them
            second.log_metrics({"loss": float(step), "lr": 0.5}, step)
    assert second.run_id == first.run_id and second.stored_up_to == 4
    client = MlflowClient(store)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "resumable"
    assert run.data.tags["resumed_from_step"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == \
        [1, 2, 3, 4, 5, 6]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "lr")) == \
        [2, 3, 4, 5, 6]


def test_checkpoint_state_keeps_the_points_a_failing_store_did_not_take(store, monkeypatch):
    with RunTracker(store, "unit", "failing", flush_seconds=3600) as run:
        run.log_metrics({"loss": 1.0}, 1)
        assert run.checkpoint_state() == {"run_id": run.run_id, "pending": []}

        def down(*args, **kwargs):
            raise ConnectionError("store went away")

        monkeypatch.setattr(run.client, "log_batch", down)
        run.log_metrics({"loss": 2.0}, 2)
        state = run.checkpoint_state()
        assert [(key, value, step) for key, value, _, step in state["pending"]] == \
            [("loss", 2.0, 2)]
        monkeypatch.undo()


def test_resuming_a_run_that_is_not_in_the_store_is_refused(store, tmp_path):
    tracker = RunTracker(store, "unit", "x", run_id="0123abcd")
    with pytest.raises(CheckpointError, match="MLflow run 0123abcd is not in sqlite:///"):
        tracker.__enter__()
    elsewhere = tmp_path / "other.db"
    with pytest.raises(CheckpointError, match=r"other.db \(no such file\); resume with the "):
        resumable_run(f"sqlite:///{elsewhere}", "0123abcd")
    assert not elsewhere.exists()  # looking did not create an empty store
