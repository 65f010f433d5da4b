"""The command line end to end: real data, a temporary SQLite store, single and multirun."""

from __future__ import annotations

import csv
import io
import os
import pickle
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from cifar_exp import run as run_module
from cifar_exp.config import compose_config
from cifar_exp.errors import CheckpointError, ConfigError
from cifar_exp.job import job
from cifar_exp.tracking.naming import git_tags
from cifar_exp.training.timeline import PHASES, TABLE_ARTIFACT, TOTAL_METRIC
from tests.conftest import (
    MkdirPayload,
    cli,
    copy_store,
    run_experiment,
    start_command,
)
from tests.warm_python import WarmProcess

METRICS = ("loss", "lr", "examples_per_sec", "sec_per_batch", "precision", "test_loss")


def start(tmp_path: Path, *args: str, data_root: Path) -> tuple[WarmProcess, Path]:
    """The command running in the background, its stdout and stderr going to a file."""
    output = tmp_path / "output.txt"
    return start_command(tmp_path, *args, data_root=data_root, output=output), output


def wait_for(condition: Callable[[], bool], process: subprocess.Popen,
             timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit code {process.returncode}) before the condition")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the condition was not met in time")
        time.sleep(0.1)


def runs_in(store: str, experiment: str = "cifar_exp") -> list:
    client = MlflowClient(store)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def test_twenty_step_run_logs_everything(tmp_path, data_root, store):
    result = cli(tmp_path, "steps=20", "eval_every=10", "eval_images=500", "batch_size=32",
                 f"tracking.uri={store}", "tracking.system_metrics_seconds=1",
                 data_root=data_root)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "step 20, loss = " in output and "final precision @ 1 = " in output
    # It says which data it read, and ends with how to open the run in the UI.
    assert f"CIFAR-10: 50000 training and 10000 test images from " \
           f"{data_root / 'cifar-10-batches-bin'}" in output

    [run] = runs_in(store)
    assert run.info.status == "FINISHED" and run.info.run_name == "tf_cnn-adam-20"
    last = output.strip().splitlines()[-1]
    assert last.endswith(f"MLflow run {run.info.run_id}: mlflow ui --backend-store-uri "
                         f"{store}, then http://127.0.0.1:5000/#/experiments/"
                         f"{run.info.experiment_id}/runs/{run.info.run_id}"
                         f"?workflowType=machine_learning")
    assert "serve its model: MLFLOW_TRACKING_URI=" in output
    assert {(d.dataset.name, d.tags[0].value) for d in run.inputs.dataset_inputs} == {
        ("cifar10-train", "training"), ("cifar10-test", "evaluation")}
    assert run.data.tags["data"] == "cifar10"
    assert "system/cpu_utilization_percentage" in run.data.metrics  # MLflow's own sampling
    client = MlflowClient(store)
    for key in METRICS:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == ([10, 20]), key
    precision = run.data.metrics["precision"]
    assert 0.0 <= precision <= 1.0
    assert run.data.params["optimizer.lr"] == "0.001"
    assert run.data.params["augmentation.crop_size"] == "24"
    assert run.data.tags["command"].startswith("python -m cifar_exp.run steps=20")
    # The checkout's commit, where the project is a git work tree (no tags elsewhere).
    for key, value in git_tags().items():
        assert run.data.tags[key] == value, key
    assert run.data.params["amp"] == "auto" and run.data.tags["amp"] == "fp32"
    assert run.data.tags["compile"] == "none" and run.data.tags["device"] == "cpu"
    assert run.data.tags["cuda_graph"] == "false" and run.data.tags["processes"] == "1"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "overrides.txt", "weights.pt"} <= artifacts
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert sorted(m.name for m in logged) == ["tf_cnn-adam-20", "tf_cnn-adam-20-network"]
    assert not (tmp_path / "mlruns").exists()  # artifacts go to mlartifacts/ beside the db
    # Where the time went: every phase, at the last step, adding up to the total.
    # One metric (the charts open on loss and precision), the phases in a small table.
    assert {key for key in run.data.metrics if key.startswith("seconds")} == {TOTAL_METRIC}
    assert [m.step for m in client.get_metric_history(run.info.run_id, TOTAL_METRIC)] == [20]
    table = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/{TABLE_ARTIFACT}")
    seconds = {row["phase"]: float(row["seconds"]) for row in csv.DictReader(io.StringIO(table))}
    assert list(seconds) == [*PHASES, "total"]
    assert all(value >= 0 for value in seconds.values())
    assert seconds["training"] > 0 and seconds["evaluation"] > 0 and seconds["startup"] > 0
    assert sum(seconds[phase] for phase in PHASES) == pytest.approx(seconds["total"], abs=0.01)
    assert seconds["total"] == pytest.approx(run.data.metrics[TOTAL_METRIC], abs=0.5)
    assert re.search(r"time: [0-9.]+ s in all: startup [0-9.]+ s, .*training [0-9.]+ s", output)


def test_a_recipe_and_debug_quick_compose_from_the_command_line(tmp_path, data_root):
    result = cli(tmp_path, "experiment=fast94", "debug=quick", "--cfg", "job",
                 data_root=data_root)
    assert result.returncode == 0, result.stderr[-3000:]
    job = yaml.safe_load(result.stdout)
    assert job["model"]["name"] == "airbench" and job["batch_size"] == 1024
    assert job["steps"] == 20 and job["eval_images"] == 500
    assert not (tmp_path / "outputs").exists()  # printing the config runs nothing


def test_debug_quick_runs_without_a_checkpoint_or_a_logged_model(tmp_path, data_root, store):
    # End to end: the README's quick check as a user types it, in a fresh interpreter.
    result = cli(tmp_path, "debug=quick", "batch_size=32", f"tracking.uri={store}",
                 f"hydra.run.dir={tmp_path / 'run'}", data_root=data_root, fresh=True)
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = runs_in(store)
    assert run.info.status == "FINISHED" and run.data.params["eval_images"] == "500"
    client = MlflowClient(store)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [5, 10, 15, 20]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert client.search_logged_models(experiment_ids=[run.info.experiment_id]) == []


def test_task_function_returns_the_final_precision(tmp_path, data_root, store):
    cfg = compose_config(["steps=10", "log_every=5", "eval_images=200", "batch_size=32",
                          f"tracking.uri={store}", f"data.root={data_root}",
                          "tracking.log_model=false",
                          f"checkpoint.path={tmp_path / 'checkpoint.pt'}"])
    precision = run_module.main.__wrapped__(cfg)
    [run] = runs_in(store)
    assert precision == run.data.metrics["precision"]
    assert run.info.run_name == "tf_cnn-adam-10"


def test_eval_images_scores_the_first_test_images_and_says_so(tmp_path, data_root, caplog,
                                                             store):
    cfg = compose_config(["steps=10", "eval_images=300", f"tracking.uri={store}",
                          f"data.root={data_root}", "tracking.log_model=false",
                          f"checkpoint.path={tmp_path / 'checkpoint.pt'}"])
    with caplog.at_level("INFO", logger="cifar_exp"):
        precision = run_module.main.__wrapped__(cfg)
    assert precision * 300 == pytest.approx(round(precision * 300))  # a count out of 300
    assert "evaluating on the first 300 of the 10000 test images" in caplog.text
    [run] = runs_in(store)
    assert run.data.params["eval_images"] == "300"


def test_more_eval_images_than_the_test_set_is_refused_before_any_run(tmp_path, data_root):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_config(["eval_images=20000", f"tracking.uri={store}", f"data.root={data_root}",
                          f"checkpoint.path={tmp_path / 'checkpoint.pt'}"])
    with pytest.raises(ConfigError, match="eval_images=20000 is more than the 10000 test images; "
                                          "use at most 10000, or null"):
        run_experiment(cfg)
    assert not (tmp_path / "mlflow.db").exists()


def test_resume_true_looks_where_checkpoint_path_points(tmp_path):
    cfg = compose_config([f"checkpoint.path={tmp_path / 'kept.pt'}", "resume=true"])
    with pytest.raises(CheckpointError, match=f"no checkpoint at {tmp_path / 'kept.pt'}"):
        job.load_resumed(cfg, {}, tmp_path)


@pytest.mark.parametrize("args,message", [
    (["data.root=/nonexistent/cifar"], "error: CIFAR-10 not found: no cifar-10-batches-bin/"),
    (["steps=0"], "error: steps=0 must be a positive integer"),
    (["precision=bf16"], "error: precision=bf16: `precision` was renamed to `amp`; write "
                         "amp=bf16"),
    (["optimizer.lr=-1"], "error: optimizer.lr=-1 must be a positive number"),
    (["augmentation.crop_size=40"], "error: augmentation.crop_size=40 must lie in 1..32"),
    (["checkpoint.every=-5"], "error: checkpoint.every=-5 must be a number of steps"),
    (["resume=/nonexistent/checkpoint.pt"],
     "error: resume=/nonexistent/checkpoint.pt: no such checkpoint file"),
    # The JPEG copy has no official MD5s: verifying it needs a manifest.
    (["data.verify=true"], "error: <data>/cifar-10-batches-bin/data_batch_1.bin: no official "
                           "MD5 is known for cifar-10-batches-bin/"),
    # Values torch would refuse, or that would train nonsense, are refused up front.
    (["optimizer=sgd", "optimizer.momentum=-1"],
     "error: optimizer 'sgd' refused its options (Invalid momentum value: -1)"),
    (["optimizer.lr=nan"], "error: optimizer.lr=nan is not a finite number"),
    (["schedule=staircase", "schedule.factor=-1"], "error: schedule.factor=-1 and "
                                                   "schedule.every_epochs=350 must both be"),
    (["seed=18446744073709551616"], "error: seed=18446744073709551616 must lie in [-2**63"),
    (["+stpes=5"], "error: stpes is not a config key (set with +stpes=...)"),
    (["tracking.experiment="], "error: tracking.experiment='' must be a name of 1 to 500"),
    (["checkpoint.path=/proc/self/checkpoint.pt"],
     "error: checkpoints cannot be written to /proc/self ("),
    (["steps=many"], "error: steps=many: Value 'many' of type 'str' could not be converted"),
    (["stepz=10"], "error: stepz is not a config key (did you mean steps?"),
    (["optimizer=adamx"], "error: optimizer=adamx: there is no such option; choose one of"),
    (["eval_images=${nope}"], "error: eval_images: Interpolation key 'nope' not found; give "
                              "the value itself or an interpolation that resolves"),
    (["~tracking.uri"], "error: ~tracking.uri removes a key every run needs; give it a value "
                        "(tracking.uri=...)"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, data_root, args, message):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = cli(tmp_path, *args, f"tracking.uri={store}", data_root=data_root)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(message.replace("<data>", str(data_root)))
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists()  # failed before any run was opened


def test_diverging_run_stops_with_one_line_and_is_marked_failed(tmp_path, data_root, store):
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


# 60 steps, checkpoints at 20 and 40 (and 60), evaluations at 30 and 60; every log line is
# written to the store at once, so points past the last checkpoint reach it before a kill.
RESUMABLE = ("steps=60", "eval_every=30", "eval_images=500", "tracking.log_model=false",
             "tracking.flush_seconds=0", "batch_size=32")


def histories(store: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient(store)
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            for key in METRICS}


def logged_weights(store: str, run_id: str, folder: Path) -> dict[str, torch.Tensor]:
    mlflow.set_tracking_uri(store)
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="weights.pt",
                                               dst_path=str(folder))
    return torch.load(path, weights_only=True)


def assert_same_run(store: str, reference: dict, folder: Path) -> None:
    """One FINISHED run whose metric histories hold each step once, with the uninterrupted
    run's values (timings aside), and whose final weights are the same to the bit."""
    [run] = runs_in(store)
    assert run.info.status == "FINISHED"
    logged = histories(store, run.info.run_id)
    for key in METRICS:
        steps = [step for step, _ in logged[key]]
        assert steps == [step for step, _ in reference["histories"][key]], key
    for key in ("loss", "lr", "precision", "test_loss"):
        assert logged[key] == reference["histories"][key], key
    weights = logged_weights(store, run.info.run_id, folder)
    assert weights.keys() == reference["weights"].keys()
    for name, tensor in reference["weights"].items():
        assert torch.equal(weights[name], tensor), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_root, store_template) -> dict:
    folder = tmp_path_factory.mktemp("uninterrupted")
    store = copy_store(store_template, folder)
    result = cli(folder, *RESUMABLE, f"tracking.uri={store}", f"hydra.run.dir={folder / 'run'}",
                 data_root=data_root)
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = runs_in(store)
    return {"histories": histories(store, run.info.run_id),
            "weights": logged_weights(store, run.info.run_id, folder)}


def max_logged_step(database: Path, key: str) -> int:
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as connection:
            [(step,)] = connection.execute("SELECT MAX(step) FROM metrics WHERE key = ?", (key,))
    except sqlite3.OperationalError:  # not created yet
        return 0
    return step or 0


def test_killed_run_resumes_to_the_same_weights_and_metrics(tmp_path, data_root, uninterrupted,
                                                            store):
    database = tmp_path / "mlflow.db"  # the store's file
    args = (*RESUMABLE, "checkpoint.every=20", f"tracking.uri={store}",
            f"hydra.run.dir={tmp_path / 'run'}")
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    process, _ = start(tmp_path, *args, data_root=data_root)

    def points_past_the_checkpoint() -> bool:
        if not checkpoint.exists():
            return False
        saved_at = torch.load(checkpoint, weights_only=True)["step"]
        return max_logged_step(database, "loss") > saved_at

    wait_for(points_past_the_checkpoint, process)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    killed_at = torch.load(checkpoint, weights_only=True)["step"]
    assert killed_at in (20, 40)
    assert max_logged_step(database, "loss") > killed_at  # to be redone, not logged twice
    [run] = runs_in(store)
    assert run.info.status == "RUNNING"  # SIGKILL leaves no chance to close it

    result = cli(tmp_path, *args, "resume=true", data_root=data_root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from step {killed_at} of {checkpoint}" in result.stdout + result.stderr
    assert_same_run(store, uninterrupted, tmp_path)
    assert runs_in(store)[0].info.run_id == run.info.run_id


def test_sigterm_saves_a_checkpoint_marks_the_run_killed_and_resume_finishes(
        tmp_path, data_root, uninterrupted, store):
    args = (*RESUMABLE, "checkpoint.every=0", f"tracking.uri={store}",
            f"hydra.run.dir={tmp_path / 'run'}")
    process, output = start(tmp_path, *args, data_root=data_root)
    wait_for(lambda: "step 10, loss = " in output.read_text(), process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 143
    last_line = output.read_text().strip().splitlines()[-1]
    stopped = re.match(r"stopped by SIGTERM at step (\d+); the MLflow run is marked KILLED; "
                       r"checkpoint (\S+); continue with: python -m cifar_exp.run (.*)",
                       last_line)
    assert stopped, last_line
    step, checkpoint = int(stopped[1]), Path(stopped[2])
    assert checkpoint == tmp_path / "run" / "checkpoint.pt"
    assert torch.load(checkpoint, weights_only=True)["step"] == step < 60
    assert stopped[3].endswith(f"hydra.run.dir={tmp_path / 'run'} resume=true")
    [run] = runs_in(store)
    assert run.info.status == "KILLED"

    # Resuming under a config that trains something else is refused before any work.
    other = cli(tmp_path, *args, "steps=80", "resume=true", data_root=data_root)
    assert other.returncode == 2
    assert other.stderr.strip() == (
        f"error: {checkpoint} was written with another config (steps=60 there, 80 here); "
        f"resume with the run's own overrides (its .hydra/overrides.yaml)")

    result = cli(tmp_path, *args, "resume=true", data_root=data_root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(store, uninterrupted, tmp_path)


def test_malicious_checkpoint_is_refused_before_any_work(tmp_path, data_root):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "checkpoint.pt"
    evil.write_bytes(pickle.dumps({"format": 1, "model": MkdirPayload(marker)}, protocol=2))
    result = cli(tmp_path, f"resume={evil}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
                 data_root=data_root)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {evil}: refused to load (it names posix.mkdir, code to call, which a "
        f"checkpoint never holds); a cifar_exp checkpoint holds only tensors and plain "
        f"values, so this file is not one: do not trust it")
    assert not marker.exists()


def test_a_stopped_run_without_checkpoints_says_there_is_none(tmp_path, data_root, store):
    process, output = start(tmp_path, "debug=quick", "steps=400", f"tracking.uri={store}",
                            f"hydra.run.dir={tmp_path / 'run'}", data_root=data_root)
    wait_for(lambda: "step 10, loss = " in output.read_text(), process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 143
    last_line = output.read_text().strip().splitlines()[-1]
    assert re.fullmatch(r"stopped by SIGTERM at step \d+; the MLflow run is marked KILLED; no "
                        r"checkpoint was written \(checkpoint.enabled=false\)", last_line)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    [run] = runs_in(store)
    assert run.info.status == "KILLED"



def test_resuming_into_the_store_file_is_refused_and_the_store_kept(tmp_path, data_root, store):
    # The reported case: a resumed run wrote its checkpoint over the whole MLflow store.
    database = tmp_path / "mlflow.db"  # the store's file
    args = ("debug=quick", "steps=400", "checkpoint.enabled=true",
            f"tracking.uri={store}", f"hydra.run.dir={tmp_path / 'run'}")
    process, output = start(tmp_path, *args, data_root=data_root)
    wait_for(lambda: "step 5, loss = " in output.read_text(), process)
    process.send_signal(signal.SIGTERM)  # stopped: its checkpoint can be resumed
    assert process.wait(timeout=300) == 143
    before = database.read_bytes()
    result = cli(tmp_path, *args, f"resume={tmp_path / 'run' / 'checkpoint.pt'}",
                 f"checkpoint.path={database}", data_root=data_root)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: checkpoint.path={database} is the MLflow store " \
                                    f"itself; choose another file"
    assert database.read_bytes() == before


def test_a_refused_command_leaves_the_run_folder_as_it_was(tmp_path, data_root, store):
    folder, tracking = tmp_path / "run", f"tracking.uri={store}"
    assert cli(tmp_path, "debug=quick", "steps=5", tracking, f"hydra.run.dir={folder}",
               data_root=data_root).returncode == 0
    record = {path.name: path.read_bytes() for path in (folder / ".hydra").iterdir()}
    assert set(record) == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    result = cli(tmp_path, "debug=quick", "steps=0", tracking, f"hydra.run.dir={folder}",
                 data_root=data_root)
    assert result.returncode == 2
    assert {path.name: path.read_bytes() for path in (folder / ".hydra").iterdir()} == record


def test_a_second_process_in_a_busy_run_folder_is_refused(tmp_path, data_root, store):
    folder = tmp_path / "run"
    args = ("steps=400", "log_every=5", "eval_images=500", "tracking.log_model=false",
            "checkpoint.every=10", "batch_size=32", f"tracking.uri={store}",
            f"hydra.run.dir={folder}")
    process, output = start(tmp_path, *args, data_root=data_root)
    try:
        wait_for(lambda: (folder / "checkpoint.pt").exists(), process)
        for extra in ((), ("resume=true",)):  # a second new run, or a resume, alongside
            result = cli(tmp_path, *args, *extra, data_root=data_root)
            assert result.returncode == 2
            assert re.fullmatch(rf"error: {folder} is in use: another process is running a job "
                                rf"there; wait for it to end, or choose another hydra.run.dir "
                                rf"\(held by pid {process.pid} on .+\)", result.stderr.strip())
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=300)
    [run] = runs_in(store)
    steps = [m.step for m in MlflowClient(store).get_metric_history(run.info.run_id, "loss")]
    assert steps == sorted(set(steps))  # each step once: nothing else wrote to the run


def test_two_runs_started_at_once_on_a_new_store_both_finish(tmp_path, data_root):
    store = f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"
    processes = [start(tmp_path / str(n), "debug=quick", "steps=5", store,
                       f"hydra.run.dir={tmp_path / str(n) / 'run'}", data_root=data_root)
                 for n in range(2) if (tmp_path / str(n)).mkdir() is None]
    assert [process.wait(timeout=300) for process, _ in processes] == [0, 0], [
        output.read_text()[-2000:] for _, output in processes]
    assert sorted(run.info.status for run in runs_in(store.split("=", 1)[1])) == [
        "FINISHED", "FINISHED"]


def test_a_run_killed_before_its_first_checkpoint_is_closed_by_the_next_start(
        tmp_path, data_root, store):
    folder = tmp_path / "run"
    args = ("steps=10", "log_every=5", "eval_images=200", "tracking.log_model=false",
            "tracking.flush_seconds=0", "batch_size=32", f"tracking.uri={store}",
            f"hydra.run.dir={folder}", "resume=auto")
    process, output = start(tmp_path, *args, "steps=3000", data_root=data_root)
    wait_for(lambda: "step 5, loss = " in output.read_text(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    [killed] = runs_in(store)
    assert killed.info.status == "RUNNING" and not (folder / "checkpoint.pt").exists()
    result = cli(tmp_path, *args, data_root=data_root)  # resubmitted: no checkpoint, a new run
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"MLflow run {killed.info.run_id} was left RUNNING in {folder} by a process that " \
           f"is gone: marked KILLED" in result.stdout + result.stderr
    statuses = {run.info.run_id: run.info.status for run in runs_in(store)}
    assert statuses.pop(killed.info.run_id) == "KILLED"
    assert list(statuses.values()) == ["FINISHED"]
    tags = MlflowClient(store).get_run(killed.info.run_id).data.tags
    assert tags["killed_because"] == "its process was gone"


def test_a_config_file_cannot_run_code_through_hydra_callbacks(tmp_path, data_root):
    recipes = tmp_path / "conf" / "experiment"
    recipes.mkdir(parents=True)
    (recipes / "evil.yaml").write_text(
        "# @package _global_\nhydra:\n  callbacks:\n    copy:\n      _target_: shutil.copy\n"
        f"      src: {recipes / 'evil.yaml'}\n      dst: {tmp_path / 'copied'}\n")
    result = cli(tmp_path, "--config-dir", str(tmp_path / "conf"), "experiment=evil",
                 "debug=quick", data_root=data_root)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: hydra.callbacks.copy._target_=shutil.copy is not one of the Hydra callbacks "
        "the project supports (cifar_exp.tracking.sweep.SweepTracking, "
        "hydra.experimental.callbacks.LogJobReturnCallback); a config file may not run other "
        "code: remove it")
    assert not (tmp_path / "copied").exists() and not (tmp_path / "outputs").exists()


def test_help_gives_usage_examples_and_the_groups(tmp_path, data_root):
    result = cli(tmp_path, "--help", data_root=data_root)
    assert result.returncode == 0
    assert result.stdout.startswith("cifar-exp: train CIFAR-10/100 models")
    assert "cifar-exp experiment=fast94 debug=quick" in result.stdout
    assert "optimizer: adam, adamw, muon, sgd, sgd_decay" in result.stdout
    assert list(tmp_path.iterdir()) == []  # nothing made


def test_the_command_completes_groups_and_options_with_tab(tmp_path):
    command = Path(sys.executable).parent / "cifar-exp"  # installed with the package
    for line, expected in (("cifar-exp optim", "optimizer="),
                           ("cifar-exp optimizer=", "optimizer=sgd_decay"),
                           ("cifar-exp experiment=fa", "experiment=fast96")):
        env = {**os.environ, "COMP_LINE": line, "COMP_POINT": str(len(line))}
        result = subprocess.run([str(command), "-sc", "query=bash"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
        assert expected in result.stdout.split(), (line, result.stdout, result.stderr)


@pytest.mark.parametrize("line", ["cifar-exp hydra.searchpath=[bogus://x] ",
                                  "cifar-exp steps=many "])
def test_tab_completion_offers_nothing_where_a_line_cannot_be_completed(tmp_path, line):
    command = Path(sys.executable).parent / "cifar-exp"
    env = {**os.environ, "COMP_LINE": line, "COMP_POINT": str(len(line))}
    result = subprocess.run([str(command), "-sc", "query=bash"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout.strip(), result.stderr) == (0, "", "")


def test_a_refused_command_leaves_no_empty_run_folder(tmp_path, data_root):
    result = cli(tmp_path, "steps=0", data_root=data_root)
    assert result.returncode == 2
    assert not (tmp_path / "outputs").exists()
