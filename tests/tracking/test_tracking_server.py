"""The tracking topology of docker/compose.yaml without Docker: PostgreSQL, an MLflow
server on it, and a parallel sweep logging to the server over HTTP; and the pages a run's
printed address opens in the server's UI."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
import torch
from mlflow.tracking import MlflowClient

from cifar_exp.tracking.runs import MODEL_TRAINING_VIEW, where_to_see
from cifar_exp.tracking.store import open_experiment
from tests.conftest import SWEEP_JOB, cli, free_port, mlflow_server, stop_process_group
from tests.test_run import start, wait_for
from tests.tracking.test_sweep import chromium_driver, tracked_sweep

# PostgreSQL refuses to run as root: as root, the server runs as this user.
UNPRIVILEGED_USER = "nobody"


def postgres_bin() -> Path:
    """The folder of initdb and postgres: on the PATH, or Debian's versioned folder."""
    found = shutil.which("initdb")
    candidates = [found] if found else sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not candidates:
        message = "needs PostgreSQL (initdb, postgres): apt-get install postgresql"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it: never skip there
        pytest.skip(message)
    return Path(candidates[-1]).parent


def as_server_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", UNPRIVILEGED_USER, "--", *command] if os.geteuid() == 0 else command


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL on a free port of 127.0.0.1 with database `mlflow`; its URI."""
    bin_dir = postgres_bin()
    folder = Path(tempfile.mkdtemp(prefix="cifar_exp_pg_"))  # not under pytest's root-only tmp
    if os.geteuid() == 0:
        user = pwd.getpwnam(UNPRIVILEGED_USER)
        os.chown(folder, user.pw_uid, user.pw_gid)
    data, port = folder / "data", free_port()
    server = None
    try:
        subprocess.run(as_server_user([str(bin_dir / "initdb"), "-D", str(data), "-U", "mlflow",
                                       "--auth=trust", "--no-sync"]),
                       check=True, capture_output=True, timeout=120)
        server = subprocess.Popen(
            as_server_user([str(bin_dir / "postgres"), "-D", str(data), "-p", str(port),
                            "-h", "127.0.0.1", "-k", str(folder), "-F"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                connection = psycopg2.connect(host="127.0.0.1", port=port, user="mlflow",
                                              dbname="postgres")
                break
            except psycopg2.OperationalError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE mlflow")
        connection.close()
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        if server is not None:
            stop_process_group(server)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow  # PostgreSQL's and MLflow's start (schema migrations), then a sweep
def test_parallel_sweep_logs_everything_to_a_server_on_postgresql(tmp_path, data_root):
    with postgres_server() as database, mlflow_server(
            database, tmp_path, "--artifacts-destination", str(tmp_path / "artifacts")) as url:
        result = cli(tmp_path, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                     "seed=0,1", *SWEEP_JOB, f"tracking.uri={url}", data_root=data_root)
        assert result.returncode == 0, result.stderr[-3000:]

        # Every point of both jobs reached the server, once.
        parent, children = tracked_sweep(url, {"tf_cnn-adam seed=0", "tf_cnn-adam seed=1"})
        assert parent.data.metrics["jobs_finished"] == 2
        client = MlflowClient(url)
        for run in children:  # artifacts went through the server into its artifact store
            assert any(a.path == "weights.pt" for a in client.list_artifacts(run.info.run_id))
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.slow  # two MLflow server starts around a 200-step job
def test_a_server_that_goes_away_mid_run_holds_nothing_up_and_keeps_every_point(
        tmp_path, data_root):
    backend = f"sqlite:///{tmp_path / 'server.db'}"
    folder = tmp_path / "run"
    args = ("steps=200", "log_every=5", "eval_every=100", "eval_images=500",
            "checkpoint.every=50", "batch_size=32", "tracking.log_model=false",
            "tracking.flush_seconds=0", f"hydra.run.dir={folder}")
    with mlflow_server(backend, tmp_path) as url:
        # Credentials in the URI (the server ignores them) must never be recorded.
        secret_url = url.replace("http://", "http://user:secret@")
        process, output = start(tmp_path, *args, f"tracking.uri={secret_url}",
                                data_root=data_root)
        wait_for(lambda: "step 20, loss = " in output.read_text(), process)
    # The server is gone: training goes on and ends with one line on what to do.
    assert process.wait(timeout=600) == 3
    log = output.read_text()
    last = log.strip().splitlines()[-1]
    assert last.startswith(f"error: the MLflow store {url.replace('http://', 'http://***@')} "
                           f"failed (")
    assert "metric points, " in last and "the run's end (run " in last
    assert last.endswith(f"once the store answers, python -m cifar_exp.run "
                         f"{' '.join(args[:-1])} tracking.uri="
                         f"{url.replace('http://', 'http://***@')} hydra.run.dir={folder} "
                         f"resume=true writes it and closes run {last.rsplit(' ', 1)[-1]}")
    assert "step 200, loss = " in log and "final precision @ 1 = " in log
    assert log.count("metric writes to") == 1  # one warning line, however long it failed

    # The server is back (a new port): resuming writes what it missed, and closes the run.
    with mlflow_server(backend, tmp_path) as url:
        result = cli(tmp_path, *args, f"tracking.uri={url}", "resume=true", data_root=data_root)
        assert result.returncode == 0, result.stderr[-3000:]
        client = MlflowClient(url)
        [run] = client.search_runs([client.get_experiment_by_name("cifar_exp").experiment_id])
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert steps == list(range(5, 201, 5))
        assert run.data.params["tracking.uri"].startswith("http://***@127.0.0.1:")
        recorded = [*run.data.params.values(), *run.data.tags.values()]
    written = [path.read_text(errors="replace") for path in folder.rglob("*") if path.is_file()
               and path.suffix in (".yaml", ".log", ".txt")]
    checkpoint = str(torch.load(folder / "checkpoint.pt", weights_only=True)["config"])
    for text in (*recorded, *written, checkpoint, log, result.stdout, result.stderr):
        assert "secret" not in text


@pytest.mark.slow  # an MLflow server's start, then a headless Chromium
def test_the_printed_address_opens_the_run_and_the_experiment_its_runs_table(tmp_path, store):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    experiment_id = open_experiment(store, "cifar_exp")  # as a job makes it
    client = MlflowClient(store)
    run_id = client.create_run(experiment_id, run_name="tf_cnn-adam-20").info.run_id
    client.set_terminated(run_id)
    browser = chromium_driver()
    try:
        with mlflow_server(store, tmp_path) as url:
            wait = WebDriverWait(browser, 90, poll_frequency=0.5)
            page = lambda _: browser.find_element(By.TAG_NAME, "body").text  # noqa: E731
            runs_table = lambda b: ("/runs?" in b.current_url  # noqa: E731
                                    and {"Run Name", "tf_cnn-adam-20"} <= set(page(b).split("\n")))
            # The run's printed address: its page, in the model-training view (whose side
            # bar has the model registry; the GenAI view's has Observability instead).
            browser.get(where_to_see(url, experiment_id, run_id))
            wait.until(lambda b: "Model metrics" in page(b) and "Model registry" in page(b))
            assert "Observability" not in page(browser)
            # The experiment's address in that view lands on its runs table.
            browser.get(f"{url}/#/experiments/{experiment_id}?{MODEL_TRAINING_VIEW}")
            wait.until(runs_table)
            # Plainly, MLflow 3 opens the GenAI overview, until one click on "Model
            # training", which the browser keeps.
            browser.get(f"{url}/#/experiments/{experiment_id}")
            wait.until(lambda b: "/overview" in b.current_url)
            switch = browser.find_element(
                By.XPATH, "//div[@role='button'][.//*[text()='Model training']]")
            browser.execute_script("arguments[0].click()", switch)
            wait.until(runs_table)
            browser.get(f"{url}/#/experiments")
            browser.get(f"{url}/#/experiments/{experiment_id}")
            wait.until(runs_table)
    finally:
        browser.quit()


@pytest.mark.slow  # an MLflow server's start, then a headless Chromium
def test_a_runs_first_charts_are_its_results_and_its_class_results_show(trained_run):
    """What a researcher sees first on a finished run: loss, precision and examples/sec
    among the first charts (no per-phase seconds/* charts), and the class_results/ files
    (confusion matrix, misclassified images, per-class table) shown in the artifact view."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    client = MlflowClient(trained_run["uri"])
    experiment_id = client.get_run(trained_run["run_id"]).info.experiment_id
    browser = chromium_driver()
    try:
        with mlflow_server(trained_run["uri"], trained_run["folder"]) as url:
            wait = WebDriverWait(browser, 90, poll_frequency=0.5)
            page = f"{url}/#/experiments/{experiment_id}/runs/{trained_run['run_id']}"
            browser.get(f"{page}/model-metrics?{MODEL_TRAINING_VIEW}")
            titles = lambda b: [e.get_attribute("title") for e in  # noqa: E731
                                b.find_elements(By.CSS_SELECTOR, "h4[title]")]
            text = lambda b: b.find_element(By.TAG_NAME, "body").text  # noqa: E731
            # Charts below the fold are drawn as they scroll in: the first ones and the
            # section's count are what the page opens on.
            wait.until(lambda b: "precision" in titles(b))
            # MLflow orders a run's charts by name; lr sorts among the results.
            assert {"examples_per_sec", "loss", "precision"} <= set(titles(browser)[:4])
            metrics = client.get_run(trained_run["run_id"]).data.metrics
            assert f"Model metrics\n({len(metrics)})" in text(browser)
            assert not [key for key in metrics if key.startswith("seconds/")]
            browser.get(f"{page}/artifacts?{MODEL_TRAINING_VIEW}")
            wait.until(lambda b: "class_results" in text(b).split("\n"))
            browser.find_element(By.XPATH, "//*[text()='class_results']").click()  # unfold it
            wait.until(lambda b: "per_class.csv" in text(b))
            shown = ("return [...document.images].filter(i => i.src.startsWith('blob:') "
                     "&& i.complete && i.naturalWidth > 100).map(i => i.src)")
            seen: list[list[str]] = [[]]
            for image in ("confusion_matrix.png", "misclassified.png"):
                browser.find_element(By.XPATH, f"//*[text()='{image}']").click()
                # Shown: a loaded image other than the one before.
                wait.until(lambda b: b.execute_script(shown) not in ([], seen[-1]))
                seen.append(browser.execute_script(shown))
            browser.find_element(By.XPATH, "//*[text()='per_class.csv']").click()
            wait.until(lambda b: {"class", "precision", "airplane", "truck"}
                       <= set(text(b).replace("\n", " ").split()))
    finally:
        browser.quit()
