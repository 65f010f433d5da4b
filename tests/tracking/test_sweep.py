"""Sweeps: one parent run per multirun, parallel jobs on one SQLite store, Optuna, failures
inside a sweep, and browsing the result through a tracking server and the MLflow UI."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient

from cifar_exp.tracking.sweep import log_study_result
from tests.conftest import SWEEP_JOB, cli
from tests.conftest import mlflow_server as start_mlflow_server

STEP_METRICS = {"loss": [5, 10], "lr": [5, 10], "examples_per_sec": [5, 10],
                "sec_per_batch": [5, 10], "precision": [10], "test_loss": [10]}
# Each job named by what differs between the jobs (the optimizer is in the name anyway).
CHILD_NAMES = {"tf_cnn-adam seed=0", "tf_cnn-adam seed=1", "tf_cnn-sgd seed=0",
               "tf_cnn-sgd seed=1"}


def parent_and_children(uri: str) -> tuple[list, list]:
    """(sweep parent runs, job runs) of experiment cifar_exp."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cifar_exp")
    runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in runs if run.data.tags.get("sweep") == "parent"]
    return parents, [run for run in runs if run not in parents]


def tracked_sweep(uri: str, child_names: set[str]) -> tuple:
    """(parent, children) of the one sweep in the store at `uri`, checked: all FINISHED,
    the children named `child_names` under that parent, each with every point of
    STEP_METRICS exactly once."""
    [parent], children = parent_and_children(uri)
    assert parent.info.status == "FINISHED"
    assert {run.info.run_name for run in children} == child_names
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {parent.info.run_id}
    assert {run.info.status for run in children} == {"FINISHED"}
    client = MlflowClient(uri)
    for run in children:  # every point of every job reached the store, once
        for key, steps in STEP_METRICS.items():
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == steps, (run.info.run_name, key)
    return parent, children


@pytest.mark.slow  # a fresh interpreter and two joblib workers, each importing torch
def test_parallel_sweep_leaves_one_parent_and_four_finished_children(tmp_path, data_root):
    # End to end: the sweep as a user types it, its jobs two at a time on a new store.
    folder, uri = tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = cli(folder, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                 "optimizer=adam,sgd", "seed=0,1", *SWEEP_JOB, f"tracking.uri={uri}",
                 data_root=data_root, fresh=True)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "database is locked" not in output and "migration" not in output

    parent, children = tracked_sweep(uri, CHILD_NAMES)
    assert parent.info.run_name == "sweep optimizer=adam,sgd seed=0,1"  # what it varies
    client = MlflowClient(uri)
    assert parent.data.tags["launcher"] == "JoblibLauncher"
    assert "optimizer=adam,sgd seed=0,1" in parent.data.tags["command"]
    assert parent.data.metrics["jobs"] == 4 and parent.data.metrics["jobs_finished"] == 4
    best = max(children, key=lambda run: run.data.metrics["precision"])
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.data.metrics["best_precision"] == best.data.metrics["precision"]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/curves.png", "report/params.png",
            "report/speed.png"} <= logged
    summary = parent.data.tags["mlflow.note.content"].replace("&nbsp;", "")
    assert "| optimizer | seeds | precision (mean ± std) |" in summary
    assert "| adam | 2 | " in summary and "| sgd | 2 | " in summary
    assert list(folder.glob("multirun/*/*/report/report.md"))  # also beside the jobs' logs


def test_optuna_search_returns_and_logs_its_best(tmp_path, data_root, store):
    # The search chooses batch_size itself (64, 128, 256): 3 steps a trial are enough. Its
    # 3 trials score 0.082, 0.152, 0.102 on 500 test images: one best, by a margin.
    result = cli(tmp_path, "-m", "hparams_search=tf_cnn_optuna", "hydra.sweeper.n_trials=3",
                 *SWEEP_JOB, "steps=3", "log_every=3", "eval_every=3",
                 "tracking.system_metrics_seconds=0", "checkpoint.enabled=false",
                 f"tracking.uri={store}", data_root=data_root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "best of 3 complete trials: " in result.stdout + result.stderr

    [parent], children = parent_and_children(store)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweeper"] == "OptunaSweeper"
    assert len(children) == 3 and {run.info.status for run in children} == {"FINISHED"}
    best = max(children, key=lambda run: run.data.metrics["precision"])
    assert parent.data.metrics["best_value"] == pytest.approx(best.data.metrics["precision"])
    assert float(parent.data.params["best.optimizer.lr"]) == pytest.approx(
        float(best.data.params["optimizer.lr"]))
    assert {"best.batch_size", "best.optimizer.weight_decay", "best.augmentation.max_brightness",
            "best.augmentation.contrast_lower"} <= set(parent.data.params)
    # The trials sampled distinct learning rates from the search space.
    lrs = {float(run.data.params["optimizer.lr"]) for run in children}
    assert len(lrs) == 3 and all(1e-4 <= lr <= 1e-2 for lr in lrs)


def test_a_diverging_job_is_marked_failed_and_the_sweep_goes_on(tmp_path, data_root, store):
    result = cli(tmp_path, "-m", "optimizer=sgd", "optimizer.lr=1e6,0.01", "steps=5",
                 "log_every=5", "eval_every=5", "batch_size=16", "eval_images=200",
                 "tracking.log_model=false", "tracking.system_metrics_seconds=0",
                 "checkpoint.enabled=false", f"tracking.uri={store}", data_root=data_root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "error: loss became nan at step" in result.stderr

    [parent], children = parent_and_children(store)
    status = {run.data.params["optimizer.lr"]: run.info.status for run in children}
    assert status == {"1000000.0": "FAILED", "0.01": "FINISHED"}
    assert parent.info.status == "FINISHED" and parent.data.metrics["jobs_finished"] == 1


@pytest.mark.parametrize("swept,message", [
    ("steps=5,0", "error: steps=0 must be a positive integer"),
    ("seed=1,abc", "error: seed=abc: Value 'abc' of type 'str' could not be converted to "
                   "Integer; give seed a value of its type"),
])
def test_a_bad_value_in_a_sweep_is_refused_before_its_parent_opens(tmp_path, data_root, store,
                                                                   swept, message):
    result = cli(tmp_path, "-m", swept, f"tracking.uri={store}", data_root=data_root)
    assert result.returncode == 2
    assert result.stderr.strip() == message  # one line, no traceback
    client = MlflowClient(store)  # no parent, and no job trained
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_unreachable_tracking_server_stops_a_sweep_before_any_job(tmp_path, data_root):
    result = cli(tmp_path, "-m", "seed=0,1", "tracking.uri=http://127.0.0.1:9",
                 data_root=data_root)
    assert result.returncode == 2
    assert result.stderr.startswith("error: MLflow tracking server http://127.0.0.1:9 does not")


def test_study_result_is_logged_on_the_parent(tmp_path, store):
    client = MlflowClient(store)
    run = client.create_run(client.create_experiment("study"))
    results = tmp_path / "optimization_results.yaml"
    results.write_text(yaml.safe_dump({"name": "optuna", "best_value": 0.42,
                                       "best_params": {"optimizer.lr": 0.003, "batch_size": 64}}))
    log_study_result(client, run.info.run_id, results)
    logged = client.get_run(run.info.run_id).data
    assert logged.params == {"best.optimizer.lr": "0.003", "best.batch_size": "64"}
    assert logged.metrics == {"best_value": 0.42}
    log_study_result(client, run.info.run_id, tmp_path / "absent.yaml")  # a grid sweep: no-op


def test_a_sweep_one_job_after_another_leaves_one_parent_and_its_report(sweep_store):
    # The shared sweep (Hydra's basic launcher) that the server and UI tests below browse.
    folder, uri, result = sweep_store
    assert result.returncode == 0, result.stderr[-3000:]
    parent, children = tracked_sweep(uri, CHILD_NAMES)
    assert parent.data.tags["launcher"] == "BasicLauncher"
    assert parent.data.metrics["jobs"] == 4 and parent.data.metrics["jobs_finished"] == 4
    best = max(children, key=lambda run: run.data.metrics["precision"])
    assert parent.data.tags["best_run_id"] == best.info.run_id
    logged = {a.path for a in MlflowClient(uri).list_artifacts(parent.info.run_id, "report")}
    assert "report/report.md" in logged
    assert list(folder.glob("multirun/*/*/report/report.md"))


# Browsing: a tracking server over the sweep's store, its REST API and its web UI.

@pytest.fixture(scope="module")
def mlflow_server(sweep_store) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 over the sweep's store; its base URL."""
    folder, uri, _ = sweep_store
    with start_mlflow_server(uri, folder, timeout=90) as url:
        yield url


def test_tracking_server_serves_the_parent_children_and_histories(mlflow_server):
    api = f"{mlflow_server}/api/2.0/mlflow"
    experiment = requests.get(f"{api}/experiments/get-by-name",
                              params={"experiment_name": "cifar_exp"}, timeout=10).json()
    runs = requests.post(f"{api}/runs/search", timeout=10, json={
        "experiment_ids": [experiment["experiment"]["experiment_id"]]}).json()["runs"]
    tags = [{tag["key"]: tag["value"] for tag in run["data"].get("tags", [])} for run in runs]
    [parent_id] = [run["info"]["run_id"] for run, tag in zip(runs, tags, strict=True)
                   if tag.get("sweep") == "parent"]
    children = [run for run, tag in zip(runs, tags, strict=True)
                if tag.get("mlflow.parentRunId") == parent_id]
    assert {run["info"]["run_name"] for run in children} == CHILD_NAMES
    for run in children:
        for key, steps in STEP_METRICS.items():
            history = requests.get(f"{api}/metrics/get-history", timeout=10, params={
                "run_id": run["info"]["run_id"], "metric_key": key}).json()["metrics"]
            assert sorted(point["step"] for point in history) == steps


def chromium_driver():
    """Headless Debian Chromium through its own chromedriver (nothing downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        message = "needs Debian's chromium and chromium-driver (apt-get install them)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs them: never skip there
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1600,1000"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_mlflow_ui_shows_the_sweep_and_its_children(mlflow_server, sweep_store):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    [parent], _ = parent_and_children(sweep_store[1])
    browser = chromium_driver()
    try:
        browser.get(f"{mlflow_server}/#/experiments/{parent.info.experiment_id}/runs")
        wait = WebDriverWait(browser, 90, poll_frequency=0.5)
        page = lambda _: browser.find_element(By.TAG_NAME, "body").text  # noqa: E731
        wait.until(lambda b: parent.info.run_name in page(b))
        # Children are nested under the sweep's row: unfold it.
        browser.find_element(By.CSS_SELECTOR,
                             "button[data-component-id*='runnamecellrenderer']").click()
        wait.until(lambda b: all(name in page(b) for name in CHILD_NAMES))
        # The sweep's report on the parent's page: its plots load from the run's artifacts.
        browser.get(f"{mlflow_server}/#/experiments/{parent.info.experiment_id}/runs/"
                    f"{parent.info.run_id}")
        loaded = ("return [...document.images].filter(i => i.src.includes('get-artifact') "
                  "&& i.complete && i.naturalWidth > 100).length")
        wait.until(lambda b: b.execute_script(loaded) == 3)
        if os.environ.get("CIFAR_EXP_SCREENSHOTS"):  # for the docs
            browser.save_screenshot(os.environ["CIFAR_EXP_SCREENSHOTS"] + "/sweep_parent.png")
    finally:
        browser.quit()
