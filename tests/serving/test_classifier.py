"""The served model: raw images in, class names and probabilities out, over HTTP too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
from mlflow.tracking import MlflowClient

from cifar_exp.augment import build_augmentation
from cifar_exp.models import build_model
from cifar_exp.serving.classifier import Classifier, load_served, on_cpu, write_artifacts
from cifar_exp.tracking.runs import RunTracker
from tests.conftest import free_port, stop_process_group


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
    finally:
        stop_process_group(server)
        log.close()
