"""The served model: raw images in, class names and probabilities out, over HTTP too."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import scoring_server
from mlflow.tracking import MlflowClient

from cifar_exp.augment import build_augmentation
from cifar_exp.models import build_model
from cifar_exp.serving.classifier import (
    PYFUNC_CODE,
    Classifier,
    load_served,
    on_cpu,
    served_signature,
    write_artifacts,
)
from cifar_exp.tracking.naming import logged_model_name
from cifar_exp.tracking.runs import RunTracker
from tests.conftest import free_port, stop_process_group

RULE = ("images must be integers 0..255 (uint8), N x 32 x 32 x 3 (rows, columns, RGB) or "
        "N x 3 x 32 x 32; got ")


@pytest.fixture(scope="module")
def network_and_augmentation(cifar10):
    torch.manual_seed(0)
    return (build_model("tf_cnn", 10, 24).eval(),
            build_augmentation("tf_distort", cifar10.train_images))


def test_the_classifier_is_preprocessing_network_and_softmax(cifar10, network_and_augmentation):
    network, augmentation = network_and_augmentation
    images = cifar10.test_images[:6]
    with torch.no_grad():
        probabilities = Classifier(network, augmentation)(images.permute(0, 2, 3, 1))
        expected = network(augmentation.eval(images)).softmax(-1)
    torch.testing.assert_close(probabilities, expected)


@pytest.mark.parametrize("name", ["tf_distort", "crop_flip", "none"])
def test_the_exported_classifier_takes_any_batch_size(tmp_path, cifar10, name):
    augmentation = on_cpu(build_augmentation(name, cifar10.train_images))
    network = build_model("tf_cnn", 10, augmentation.image_size).eval()
    images = cifar10.test_images[:8].permute(0, 2, 3, 1).contiguous()
    served = load_served(write_artifacts(Classifier(network, augmentation), images,
                                         cifar10.classes, tmp_path))
    for count in (1, 3, 8):
        answer = served.predict(None, images[:count].numpy())
        assert len(answer) == count and answer["probability"].between(0, 1).all()
        assert answer[cifar10.classes].sum(axis=1).round(5).eq(1).all()


@pytest.fixture(scope="module")
def served(tmp_path_factory, cifar10, network_and_augmentation):
    """The served model as MLflow loads it, and its artifacts."""
    network, augmentation = network_and_augmentation
    images = cifar10.test_images[:8].permute(0, 2, 3, 1).contiguous()
    artifacts = write_artifacts(Classifier(network, on_cpu(augmentation)), images,
                                cifar10.classes, tmp_path_factory.mktemp("served"))
    return load_served(artifacts), artifacts


@pytest.fixture(scope="module")
def images(cifar10):
    """Five test images as the served model takes them: uint8, N x 32 x 32 x 3."""
    return cifar10.test_images[:5].permute(0, 2, 3, 1).numpy()


def refusal(model, model_input) -> str:
    """The one-line reason `model` refuses `model_input` with, as HTTP 400."""
    with pytest.raises(MlflowException) as caught:
        model.predict(None, model_input)
    assert caught.value.get_http_status_code() == 400
    assert "\n" not in caught.value.message
    return caught.value.message


def test_the_classifier_takes_only_uint8(network_and_augmentation, images):
    with pytest.raises(TypeError, match="images must be uint8 0..255, not torch.float32"):
        Classifier(*network_and_augmentation)(torch.as_tensor(images) / 255)


def test_floats_are_refused_not_read_as_black_images(served, images):
    model, _ = served
    assert refusal(model, images / 255) == (
        f"{RULE}float64 values (multiply images in 0..1 by 255 and round)")
    assert refusal(model, images.astype(np.float32)) == (  # whole numbers too: still floats
        f"{RULE}float32 values (multiply images in 0..1 by 255 and round)")


@pytest.mark.parametrize(("make", "got"), [
    (lambda x: x[0], "an array of shape (32, 32, 3) (put a single image in a list)"),
    (lambda x: x.repeat(2, axis=1), "an array of shape (5, 64, 32, 3)"),
    (lambda x: x[..., :2], "an array of shape (5, 32, 32, 2)"),
    (lambda x: x.astype(np.int64) * 2, "values 0..510"),
    (lambda x: x.astype(np.int16) - 1, "values -1..254"),
    (lambda x: x > 128, "bool values"),
    (lambda x: x.astype(str), "<U3 values"),
    (lambda x: [x[0].tolist(), x[1, :5].tolist()], "an array that is not rectangular"),
], ids=["one image", "64 rows", "two channels", "over 255", "negative", "bool", "text",
        "ragged"])
def test_what_is_not_a_uint8_image_batch_is_refused_in_one_line(served, images, make, got):
    assert refusal(served[0], make(images)) == RULE + got


def test_integers_in_range_and_channels_first_are_the_same_images(served, images):
    model, _ = served
    expected = model.predict(None, images)
    for same in (images.astype(np.int64).tolist(), images.transpose(0, 3, 1, 2),
                 torch.as_tensor(images)):
        assert model.predict(None, same).equals(expected)


def test_an_empty_batch_gets_an_empty_table(served, cifar10):
    model, _ = served
    for empty in ([], np.zeros((0, 32, 32, 3), np.uint8)):
        answer = model.predict(None, empty)
        assert len(answer) == 0
        assert list(answer.columns) == ["class", "probability", *cifar10.classes]


def test_a_batch_over_the_exported_size_is_classified_in_pieces(served, images, monkeypatch):
    model, artifacts = served
    code = sys.modules[type(model).__module__]  # pyfunc_model.py
    program = torch.export.load(artifacts["program"])
    [batch_range] = program.range_constraints.values()
    assert batch_range.upper == code.MAX_BATCH >= code.CHUNK
    whole = model.predict(None, images)
    monkeypatch.setattr(code, "CHUNK", 2)  # 5 images: pieces of 2, 2 and 1
    pieces = model.predict(None, images)
    assert list(pieces["class"]) == list(whole["class"])
    np.testing.assert_allclose(pieces["probability"], whole["probability"], atol=1e-6)


@pytest.fixture(scope="module")
def saved_model(served, tmp_path_factory, images):
    """The served model saved as MLflow's pyfunc with `served_signature`, and loaded."""
    model, artifacts = served
    folder = tmp_path_factory.mktemp("pyfunc") / "model"
    with warnings.catch_warnings(record=True):  # MLflow's advice on type hints
        mlflow.pyfunc.save_model(folder, python_model=str(PYFUNC_CODE), artifacts=artifacts,
                                 signature=served_signature(model.predict(None, images)),
                                 pip_requirements=["torch"])  # not inferred: seconds saved
        return mlflow.pyfunc.load_model(str(folder))


def posted(model, body: dict) -> tuple[int, dict]:
    """What `mlflow models serve` of `model` answers to POST /invocations with JSON `body`:
    its status and content, from the server's own handling (without starting one)."""
    try:
        answer = scoring_server.invocations(json.dumps(body), "application/json", model,
                                            model.metadata.get_input_schema())
    except MlflowException as error:
        return error.get_http_status_code(), json.loads(error.serialize_as_json())
    return answer.status, json.loads(answer.response)


def test_over_http_as_in_python(saved_model, images):
    status, answer = posted(saved_model, {"inputs": images.tolist()})
    assert status == 200
    assert answer["predictions"] == saved_model.predict(images).to_dict("records")
    status, answer = posted(saved_model, {"inputs": (images / 255).tolist()})
    assert status == 400
    reason = f"{RULE}float64 values (multiply images in 0..1 by 255 and round)"
    assert answer["message"].splitlines()[-1] == f"Error: {reason}"
    with pytest.raises(MlflowException, match=re.escape(reason)):
        saved_model.predict(images / 255)
    assert posted(saved_model, {"inputs": []}) == (200, {"predictions": []})
    status, answer = posted(saved_model, {"inputs": [images[0].tolist()[:3]]})
    assert status == 400 and answer["message"].endswith("got an array of shape (1, 3, 32, 3)")


def test_the_logged_model_refuses_floats_over_http(trained_run, images):
    client = MlflowClient(trained_run["uri"])
    [logged] = [m for m in client.search_logged_models(
        experiment_ids=[client.get_experiment_by_name("cifar_exp").experiment_id])
        if m.name == logged_model_name(trained_run["name"])]
    with warnings.catch_warnings(record=True):  # MLflow's advice on type hints
        model = mlflow.pyfunc.load_model(logged.artifact_location)
    status, _ = posted(model, {"inputs": (images / 255).tolist()})
    assert status == 400


@pytest.mark.slow  # mlflow models serve: its command, uvicorn and the model loaded
def test_mlflow_models_serve_answers_a_posted_test_image(tmp_path, cifar10,
                                                         network_and_augmentation, store):
    network, augmentation = network_and_augmentation
    with RunTracker(store, "unit", "served") as run:
        run.log_models(network, augmentation, cifar10.test_images, cifar10.classes, 10)
    client = MlflowClient(store)
    [served] = [m for m in client.search_logged_models(
        experiment_ids=[client.get_experiment_by_name("unit").experiment_id])
        if m.name == "served"]
    port = free_port()
    # mlflow starts `uvicorn` by name: the environment's own, as in an activated venv.
    env = {**os.environ, "MLFLOW_TRACKING_URI": store,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{served.model_id}",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        image = cifar10.test_images[0].permute(1, 2, 0)  # a real test image, 32 x 32 x 3
        response = requests.post(f"http://127.0.0.1:{port}/invocations",
                                 data=json.dumps({"inputs": [image.tolist()]}),
                                 headers={"Content-Type": "application/json"}, timeout=60)
        assert response.ok, response.text
        [prediction] = response.json()["predictions"]
        with torch.no_grad():
            expected = network(augmentation.eval(cifar10.test_images[:1])).softmax(-1)[0]
        assert prediction["class"] == cifar10.classes[int(expected.argmax())]
        assert prediction["probability"] == pytest.approx(float(expected.max()), abs=1e-5)
        assert [prediction[name] for name in cifar10.classes] == pytest.approx(
            expected.tolist(), abs=1e-5)
        # Images in 0..1 are refused with the reason, not answered as black ones.
        floats = requests.post(f"http://127.0.0.1:{port}/invocations",
                               data=json.dumps({"inputs": [(image / 255).tolist()]}),
                               headers={"Content-Type": "application/json"}, timeout=60)
        assert floats.status_code == 400 and "got float" in floats.json()["message"]
    finally:
        stop_process_group(server)
        log.close()
