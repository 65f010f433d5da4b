"""A training job when its record fails: the tracking store or the checkpoint's disk going
away mid-run. Training goes on, nothing already written is lost, the command ends with one
line that says what failed and how to finish, and resuming finishes it."""

from __future__ import annotations

import csv
import errno
import io

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from cifar_exp.config import compose_config
from cifar_exp.errors import RecordFailure
from cifar_exp.job import checkpoint
from cifar_exp.tracking import runs
from cifar_exp.tracking.runs import how_to_serve, where_to_see
from cifar_exp.training.timeline import PHASES
from tests.conftest import run_experiment

JOB = ("steps=20", "log_every=5", "eval_every=20", "eval_images=500", "checkpoint.every=10",
       "batch_size=32",
       "tracking.log_model=false", "tracking.flush_seconds=0")


def job_config(tmp_path, data_root, store: str, *extra: str):
    return compose_config([*JOB, f"data.root={data_root}", f"tracking.uri={store}",
                           f"checkpoint.path={tmp_path / 'checkpoint.pt'}", *extra])


def test_a_store_that_fails_mid_run_ends_in_one_line_and_resuming_finishes(
        tmp_path, data_root, monkeypatch, store):
    log_batch = MlflowClient.log_batch

    def store_gone_after_step_12(client, run_id, metrics=(), **kwargs):
        if any(point.step > 12 for point in metrics):
            raise ConnectionError("store gone")
        return log_batch(client, run_id, metrics=metrics, **kwargs)

    def cannot_close(*args, **kwargs):
        raise ConnectionError("store gone")

    monkeypatch.setattr(MlflowClient, "log_batch", store_gone_after_step_12)
    monkeypatch.setattr(MlflowClient, "set_terminated", cannot_close)
    monkeypatch.setattr(runs, "FINAL_PAUSES", (0, 0, 0, 0))  # the same tries, 7 s sooner
    with pytest.raises(RecordFailure) as failure:
        run_experiment(job_config(tmp_path, data_root, store), folder=tmp_path)
    monkeypatch.undo()
    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith(f"the MLflow store {store} failed (store gone); not written: ")
    [run] = MlflowClient(store).search_runs(
        [MlflowClient(store).get_experiment_by_name("cifar_exp").experiment_id])
    # 11 training points of steps 15 and 20 (precision_top5 at 20 among them), and the
    # job's time in `seconds`
    assert f"not written: 12 metric points, the run's end (run {run.info.run_id} is left " \
           f"RUNNING)" in message
    assert message.endswith(f"once the store answers, python -m cifar_exp.run "
                            f"resume={tmp_path / 'checkpoint.pt'} writes it and closes run "
                            f"{run.info.run_id}")
    assert run.info.status == "RUNNING"
    kept = checkpoint.load_checkpoint(tmp_path / "checkpoint.pt")
    assert kept["step"] == 20
    assert {step for _, _, _, step in kept["tracking"]["pending"]} == {15, 20}

    # The store is back: the command in the message writes what it missed.
    run_experiment(job_config(tmp_path, data_root, store,
                                         f"resume={tmp_path / 'checkpoint.pt'}"),
                              folder=tmp_path)
    client = MlflowClient(store)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    for key in ("loss", "lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [
            5, 10, 15, 20], key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "precision")] == [20]
    # The resumed session, which closed the run, says where its own time went.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "seconds")] == [20]


def test_a_job_ends_with_how_to_serve_its_model_and_where_to_see_its_run(
        tmp_path, data_root, store, caplog):
    tiny = ("steps=2", "log_every=1", "eval_images=100", "tracking.system_metrics_seconds=0")
    with caplog.at_level("INFO", logger="cifar_exp.job.job"):
        run_experiment(job_config(tmp_path, data_root, store, *tiny, "tracking.log_model=true"),
                       folder=tmp_path)
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("cifar_exp").experiment_id])
    run_id, experiment_id = run.info.run_id, run.info.experiment_id
    [served] = [model for model in client.search_logged_models(experiment_ids=[experiment_id])
                if model.name == run.info.run_name]
    serve, ask = how_to_serve(store, served.model_id)
    assert caplog.messages[-3:] == [f"serve its model: {serve}", f"then ask it: {ask}",
                                    f"MLflow run {run_id}: "
                                    f"{where_to_see(store, experiment_id, run_id)}"]
    # Its time: one metric, the total, at the last step; each phase in a small table.
    assert {key for key in run.data.metrics if key.startswith("seconds")} == {"seconds"}
    assert [m.step for m in client.get_metric_history(run_id, "seconds")] == [2]
    table = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/timeline.csv")
    seconds = {row["phase"]: float(row["seconds"]) for row in csv.DictReader(io.StringIO(table))}
    assert list(seconds) == [*PHASES, "total"]  # startup: 0 but in a process's first job
    assert seconds["total"] == pytest.approx(run.data.metrics["seconds"], abs=0.5)

    # Without a logged model, nothing to serve: the run's address is the last line.
    caplog.clear()
    with caplog.at_level("INFO", logger="cifar_exp.job.job"):
        run_experiment(job_config(tmp_path / "plain", data_root, store, *tiny,
                                  "tracking.log_model=false"), folder=tmp_path / "plain")
    assert caplog.messages[-2].startswith("time: ")
    assert caplog.messages[-1].startswith("MLflow run ")


def test_a_full_disk_keeps_the_last_checkpoint_and_training_goes_on(
        tmp_path, data_root, monkeypatch, caplog, store):
    real_save, saves = checkpoint.atomic_save, []

    def disk_full_after_the_first(content, path):
        saves.append(content["step"])
        if len(saves) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(content, path)

    monkeypatch.setattr(checkpoint, "atomic_save", disk_full_after_the_first)
    with caplog.at_level("WARNING", logger="cifar_exp.job.checkpoint"), \
            pytest.raises(RecordFailure) as failure:
        run_experiment(job_config(tmp_path, data_root, store), folder=tmp_path)
    assert saves == [10, 20]
    assert str(failure.value) == (
        f"checkpoint {tmp_path / 'checkpoint.pt'} could not be written at step 20 (No space "
        f"left on device); it holds step 10")
    assert checkpoint.load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 10
    assert any("step 20, checkpoint not written" in m and "it still holds step 10" in m
               for m in caplog.messages)
    # The run itself finished and holds its final weights.
    mlflow.set_tracking_uri(store)
    [run] = mlflow.search_runs(experiment_names=["cifar_exp"], output_format="list")
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert "weights.pt" in artifacts


def test_resuming_names_the_device_as_it_likes_where_it_is_the_same_device():
    from cifar_exp.job.job import same_device_as_saved

    here = "cuda" if torch.cuda.is_available() else "cpu"
    elsewhere = "cpu" if here == "cuda" else "cuda"
    saved = {"device": "auto", "steps": 20}
    assert same_device_as_saved(saved, {"device": here, "steps": 20})["device"] == "auto"
    assert same_device_as_saved({"device": here}, {"device": "auto"}) == {"device": here}
    # Another device is still another config, which check_config refuses.
    assert same_device_as_saved(saved, {"device": elsewhere}) == {"device": elsewhere}
