"""The MLflow UI screenshots of the docs, retaken on the current code: one short run and a
small sweep trained into a fresh store, `mlflow ui` over it, headless Chromium through
selenium (Debian's chromium and chromium-driver) at 1400x900.

    CIFAR_EXP_DATA=<data> python experiments/screenshots.py [--out docs/images]

Writes mlflow_run_overview.png, mlflow_run_metrics.png, mlflow_system_metrics.png,
mlflow_class_results.png, mlflow_logged_model.png, mlflow_sweep.png and
mlflow_sweep_report.png, then optuna_dashboard.png and optuna_dashboard_trials.png
(optuna-dashboard over a small search of 4 trials, resumed by the same command to 8) into
--out (default: a new temporary
folder) and prints their paths. About four minutes on 2 CPU cores."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import requests
from mlflow.tracking import MlflowClient

from cifar_exp.tracking.runs import MODEL_TRAINING_VIEW, served_model_id

RUN = ("steps=60", "log_every=10", "eval_every=30", "eval_images=1000",
       "tracking.system_metrics_seconds=1")
SWEEP = ("-m", "optimizer=adam,sgd", "seed=0,1", "steps=40", "log_every=10", "eval_every=40",
         "eval_images=500", "tracking.log_model=false", "checkpoint.enabled=false")
# The search, run twice: 4 trials, then the same command resumes the study to 8.
SEARCH = ("-m", "hparams_search=tf_cnn_optuna", "steps=60", "log_every=20", "eval_every=20",
          "eval_images=500", "tracking.log_model=false", "checkpoint.enabled=false",
          "tracking.system_metrics_seconds=0")
SEARCH_TRIALS = (4, 8)
WINDOW = (1400, 900)
WAIT_SECONDS = 90


def train(folder: Path, uri: str) -> None:
    for overrides in (RUN, SWEEP):
        subprocess.run([sys.executable, "-m", "cifar_exp.run", *overrides,
                        f"tracking.uri={uri}"], cwd=folder, check=True,
                       stdout=subprocess.DEVNULL)


def search(folder: Path) -> str:
    """The search, started and resumed (its runs in a store of their own, away from the
    MLflow screenshots' runs); the URL of its study's storage."""
    uri = f"sqlite:///{folder / 'search_mlflow.db'}"
    for trials in SEARCH_TRIALS:
        subprocess.run([sys.executable, "-m", "cifar_exp.run", *SEARCH,
                        f"hydra.sweeper.n_trials={trials}", f"hydra.sweep.dir={folder / 'search'}",
                        f"tracking.uri={uri}"], cwd=folder, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return f"sqlite:///{folder / 'search' / 'optuna.db'}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def mlflow_ui(uri: str, folder: Path) -> Iterator[str]:
    """`mlflow ui` over `uri` for the block; its base URL."""
    port = free_port()
    # The jobs' artifacts lie under the folder they ran in: the UI serves them from there.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(folder / "ui.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=log,
            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"mlflow ui did not start: {(folder / 'ui.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        # Its whole session: the server's workers too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@contextlib.contextmanager
def optuna_dashboard(storage: str) -> Iterator[str]:
    """optuna-dashboard over `storage` for the block; its base URL."""
    port = free_port()
    server = subprocess.Popen(  # as its command starts it
        [sys.executable, "-c", "import sys; from optuna_dashboard._cli import main; "
         "sys.exit(main())", storage, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not healthy(url, "/api/studies"):
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit("optuna-dashboard did not start (pip install -e '.[dashboard]')")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGINT)  # its server stops at once on Ctrl-C
        server.wait(timeout=30)


def healthy(url: str, path: str = "/health") -> bool:
    try:
        return requests.get(f"{url}{path}", timeout=2).ok
    except requests.ConnectionError:
        return False


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        sys.exit("needs Debian's chromium and chromium-driver (apt-get install them)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--hide-scrollbars", f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


class Camera:
    """One browser on the UI; each picture written whole or not at all."""

    def __init__(self, browser, url: str, out: Path) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        self.browser, self.url, self.out = browser, url, out
        self.wait = WebDriverWait(browser, WAIT_SECONDS, poll_frequency=0.5)

    def text(self) -> str:
        from selenium.webdriver.common.by import By

        return self.browser.find_element(By.TAG_NAME, "body").text

    def open(self, page: str, ready: Callable[[], bool]) -> None:
        from selenium.webdriver.common.by import By

        self.browser.get(f"{self.url}/#/{page}?{MODEL_TRAINING_VIEW}")
        self.wait.until(lambda _: ready())
        # The assistant's panel opens by itself and hides half the page.
        for close in self.browser.find_elements(
                By.CSS_SELECTOR, "button[data-component-id='mlflow.assistant.chat_panel.close']"):
            close.click()

    def images_loaded(self, count: int) -> bool:
        """Whether `count` artifact images have loaded (the UI fetches them after the page)."""
        # A note's plots come from get-artifact, the artifact viewer's from a blob.
        script = ("return [...document.images].filter(i => (i.src.includes('get-artifact') "
                  "|| i.src.startsWith('blob:')) && i.complete && i.naturalWidth > 100).length")
        return self.browser.execute_script(script) >= count

    def shoot(self, name: str) -> Path:
        time.sleep(2)  # charts and images fade in after their data arrives
        target = self.out / name
        with tempfile.NamedTemporaryFile(dir=self.out, suffix=".png", delete=False) as part:
            temporary = Path(part.name)
        try:
            if not self.browser.save_screenshot(str(temporary)):
                raise RuntimeError(f"no screenshot for {name}")
            temporary.chmod(0o644)
            temporary.replace(target)
        finally:
            temporary.unlink(missing_ok=True)
        return target


def parent_and_run(uri: str) -> tuple:
    """The sweep's parent run and the single run, both in experiment cifar_exp."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cifar_exp")
    runs = client.search_runs([experiment.experiment_id])
    parents = {run.data.tags.get("mlflow.parentRunId") for run in runs} - {None}
    [parent] = [run for run in runs if run.info.run_id in parents]
    [single] = [run for run in runs if run.info.run_id not in parents
                and "mlflow.parentRunId" not in run.data.tags]
    return parent, single


def take(camera: Camera, parent, run, model_id: str) -> list[Path]:
    from selenium.webdriver.common.by import By

    page = f"experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    shots = []
    camera.open(page, lambda: "About this run" in camera.text()
                and "cifar10-train" in camera.text())
    shots.append(camera.shoot("mlflow_run_overview.png"))
    camera.open(f"{page}/model-metrics", lambda: camera.browser.find_elements(
        By.CSS_SELECTOR, ".js-plotly-plot .scatterlayer .trace"))
    shots.append(camera.shoot("mlflow_run_metrics.png"))
    camera.open(f"{page}/system-metrics", lambda: camera.browser.find_elements(
        By.CSS_SELECTOR, ".js-plotly-plot .scatterlayer .trace"))
    shots.append(camera.shoot("mlflow_system_metrics.png"))
    camera.open(f"{page}/artifactPath/class_results/confusion_matrix.png",
                lambda: camera.images_loaded(1))
    shots.append(camera.shoot("mlflow_class_results.png"))
    camera.open(f"experiments/{run.info.experiment_id}/models/{model_id}",
                lambda: "Metrics" in camera.text() and "test_loss" in camera.text())
    shots.append(camera.shoot("mlflow_logged_model.png"))
    camera.open(f"experiments/{run.info.experiment_id}/runs",
                lambda: parent.info.run_name in camera.text())
    # The jobs are nested under the sweep's row: unfold it.
    camera.browser.find_element(
        By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']").click()
    jobs = [f"tf_cnn-{optimizer} seed={seed}" for optimizer in ("adam", "sgd") for seed in (0, 1)]
    camera.wait.until(lambda _: all(job in camera.text() for job in jobs))
    shots.append(camera.shoot("mlflow_sweep.png"))
    camera.open(f"experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}",
                lambda: camera.images_loaded(3))
    # A long note is folded after its first lines: unfold it, then bring its plots up.
    for more in camera.browser.find_elements(By.XPATH, "//*[text()='Show more']"):
        more.click()
    camera.browser.execute_script(
        "[...document.images].find(i => i.src.includes('get-artifact'))"
        ".scrollIntoView({block: 'start'})")
    shots.append(camera.shoot("mlflow_sweep_report.png"))
    return shots


def take_dashboard(camera: Camera) -> list[Path]:
    """The study's history, then its trials (the first one's values shown)."""
    shots = []
    for page, ready, name in (
            ("", lambda: "History" in camera.text(), "optuna_dashboard.png"),
            ("/trials", lambda: f"{SEARCH_TRIALS[-1]} Trials" in camera.text(),
             "optuna_dashboard_trials.png")):
        camera.browser.get(f"{camera.url}/dashboard/studies/1{page}")
        camera.wait.until(lambda _, ready=ready: ready())
        shots.append(camera.shoot(name))
    return shots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for the PNGs (default: a new one)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="screenshots-"))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="screenshots-") as name:
        folder = Path(name)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        train(folder, uri)
        parent, run = parent_and_run(uri)
        storage = search(folder)
        with mlflow_ui(uri, folder) as url:
            browser = chromium()
            try:
                model_id = served_model_id(MlflowClient(uri), run.info.run_id)
                shots = take(Camera(browser, url, out), parent, run, model_id)
            finally:
                browser.quit()
        with optuna_dashboard(storage) as url:
            browser = chromium()
            try:
                shots += take_dashboard(Camera(browser, url, out))
            finally:
                browser.quit()
    for shot in shots:
        print(shot)


if __name__ == "__main__":
    main()
