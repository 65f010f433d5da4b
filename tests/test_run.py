"""The command line end to end: real data, a temporary SQLite store, single and multirun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cifar_exp import run as run_module
from cifar_exp.config import compose_config

METRICS = ("loss", "lr", "examples_per_sec", "sec_per_batch", "precision", "test_loss")


def cli(tmp_path: Path, *args: str, data_root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CIFAR_EXP_DATA": str(data_root)}
    return subprocess.run([sys.executable, "-m", "cifar_exp.run", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def runs_in(store: str, experiment: str = "cifar_exp") -> list:
    client = MlflowClient(store)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def test_twenty_step_run_logs_everything(tmp_path, data_root):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = cli(tmp_path, "steps=20", "eval_every=10", f"tracking.uri={store}",
                 data_root=data_root)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "step 20, loss = " in output and "final precision @ 1 = " in output

    [run] = runs_in(store)
    assert run.info.status == "FINISHED" and run.info.run_name == "tf_cnn-adam-20"
    client = MlflowClient(store)
    for key in METRICS:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == ([10, 20]), key
    precision = run.data.metrics["precision"]
    assert 0.0 <= precision <= 1.0
    assert run.data.params["optimizer.lr"] == "0.001"
    assert run.data.params["augmentation.crop_size"] == "24"
    assert run.data.tags["command"].startswith("python -m cifar_exp.run steps=20")
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40
    assert run.data.tags["git_dirty"] in ("true", "false")
    assert run.data.params["precision"] == "auto" and run.data.tags["precision"] == "fp32"
    assert run.data.tags["compile"] == "none" and run.data.tags["device"] == "cpu"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "overrides.txt", "weights.pt"} <= artifacts
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.name for m in logged] == ["model"]
    assert not (tmp_path / "mlruns").exists()  # artifacts go to mlartifacts/ beside the db


def test_task_function_returns_the_final_precision(tmp_path, data_root):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_config(["steps=10", "log_every=5", f"tracking.uri={store}",
                          f"data.root={data_root}", "tracking.log_model=false"])
    precision = run_module.main.__wrapped__(cfg)
    [run] = runs_in(store)
    assert precision == run.data.metrics["precision"]
    assert run.info.run_name == "tf_cnn-adam-10"


def test_multirun_gives_each_job_its_own_run(tmp_path, data_root):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = cli(tmp_path, "-m", "optimizer=adam,sgd", "steps=20", f"tracking.uri={store}",
                 "tracking.log_model=false", data_root=data_root)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = runs_in(store)
    assert sorted(r.info.run_name for r in runs) == ["tf_cnn-adam-20", "tf_cnn-sgd-20"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert all("precision" in r.data.metrics for r in runs)


@pytest.mark.parametrize("args,message", [
    (["data.root=/nonexistent/cifar"], "error: CIFAR-10 not found: no cifar-10-batches-bin/"),
    (["steps=0"], "error: steps=0 must be a positive integer"),
    (["optimizer.lr=-1"], "error: optimizer.lr=-1 must be a positive number"),
    (["augmentation.crop_size=40"], "error: augmentation.crop_size=40 must lie in 1..32"),
    # The JPEG copy has no official MD5s: verifying it needs a manifest.
    (["data.verify=true"], "error: <data>/cifar-10-batches-bin/data_batch_1.bin: no official "
                           "MD5 is known for cifar-10-batches-bin/"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, data_root, args, message):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = cli(tmp_path, *args, f"tracking.uri={store}", data_root=data_root)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(message.replace("<data>", str(data_root)))
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists()  # failed before any run was opened


def test_diverging_run_stops_with_one_line_and_is_marked_failed(tmp_path, data_root):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = cli(tmp_path, "optimizer=sgd", "optimizer.lr=1e6", "steps=40",
                 f"tracking.uri={store}", data_root=data_root)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: loss became ") and "(lr 1e+06)" in line
    [run] = runs_in(store)
    assert run.info.status == "FAILED"


def test_unreachable_tracking_server_fails_before_training(tmp_path, data_root):
    result = cli(tmp_path, "tracking.uri=http://127.0.0.1:9", data_root=data_root)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: MLflow tracking server http://127.0.0.1:9 does not answer")
    assert "step 10" not in result.stdout
