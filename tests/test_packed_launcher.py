"""hydra/launcher=packed: a sweep's jobs trained together on one device, each still a job of
its own (run folder, log, MLflow child run, checkpoint, result)."""

from __future__ import annotations

import signal

import pytest
import torch
from mlflow.tracking import MlflowClient

from hydra_plugins.cifar_exp_packed.packed_launcher import PackedLauncher, resolve_mode
from tests.conftest import SWEEP_JOB, cli
from tests.test_run import start, wait_for
from tests.tracking.test_sweep import parent_and_children, tracked_sweep

STACKED = ("hydra/launcher=packed", "hydra.launcher.mode=stacked")
# These tests look at how the jobs are launched and tracked, not at what they learn: steps
# on small batches, scores on the first 200 test images, no system-metrics sampler. (An
# Optuna search chooses batch_size itself: it takes LIGHT_EVAL alone.)
LIGHT_EVAL = ("eval_images=200", "tracking.system_metrics_seconds=0")
LIGHT = ("batch_size=16", *LIGHT_EVAL)


def test_a_stacked_sweep_gives_every_member_its_own_run_folder_log_and_checkpoint(
        tmp_path, data_root, store):
    result = cli(tmp_path, "-m", *STACKED, "hydra.launcher.jobs_per_device=2", "seed=0,1,2",
                 *SWEEP_JOB, *LIGHT, f"tracking.uri={store}", data_root=data_root)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "packing 2 jobs onto one device" in output and "packing 1 jobs" in output
    assert "jobs packed" not in output  # no progress bar drawn into a file

    parent, children = tracked_sweep(store, {f"tf_cnn-adam seed={seed}" for seed in range(3)})
    assert parent.data.tags["launcher"] == "PackedLauncher"
    assert parent.data.metrics["jobs"] == parent.data.metrics["jobs_finished"] == 3
    [sweep_dir] = tmp_path.glob("multirun/*/*")
    for run in children:
        number = run.data.params["seed"]  # seed i is job i
        folder = sweep_dir / number
        assert run.data.tags["run_dir"] == str(folder)
        assert (run.data.tags["compile"], run.data.tags["cuda_graph"]) == ("none", "false")
        assert (folder / "checkpoint.pt").is_file()
        assert (folder / ".hydra" / "overrides.yaml").is_file()
        log = (folder / "run.log").read_text()
        assert run.info.run_id in log and "final precision @ 1 = " in log
        others = [other.info.run_id for other in children if other is not run]
        assert not any(other in log for other in others)  # only its own lines
        assert "weights.pt" in {a.path for a in MlflowClient(store).list_artifacts(
            run.info.run_id)}
    # Different seeds, different results: not one job's numbers three times.
    assert len({run.data.metrics["loss"] for run in children}) == 3


def test_an_optuna_search_sees_one_result_per_packed_trial(tmp_path, data_root, store):
    """Its trials differ in batch size: members of other shapes share a pack, not a stack."""
    result = cli(tmp_path, "-m", *STACKED, "hparams_search=tf_cnn_optuna",
                 "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", *SWEEP_JOB,
                 "steps=2", "log_every=2", "eval_every=2", *LIGHT_EVAL,
                 "checkpoint.enabled=false",
                 f"tracking.uri={store}", data_root=data_root)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "packing 2 jobs onto one device" in output
    assert "best of 2 complete trials: " in output
    [parent], children = parent_and_children(store)
    assert parent.data.tags["sweeper"] == "OptunaSweeper"
    assert len(children) == 2 and {run.info.status for run in children} == {"FINISHED"}


def test_a_diverging_member_is_failed_and_the_others_finish(tmp_path, data_root, store):
    result = cli(tmp_path, "-m", *STACKED, "optimizer=sgd", "optimizer.lr=1e6,0.01,0.02",
                 "steps=5", "log_every=5", "eval_every=5", "tracking.log_model=false", *LIGHT,
                 "checkpoint.enabled=false", f"tracking.uri={store}", data_root=data_root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "error: loss became nan at step" in result.stderr

    [parent], children = parent_and_children(store)
    status = {run.data.params["optimizer.lr"]: run.info.status for run in children}
    assert status == {"1000000.0": "FAILED", "0.01": "FINISHED", "0.02": "FINISHED"}
    assert parent.info.status == "FINISHED" and parent.data.metrics["jobs_finished"] == 2


def test_a_bad_member_is_refused_before_any_member_trains(tmp_path, data_root, store):
    result = cli(tmp_path, "-m", *STACKED, "steps=5,0", f"tracking.uri={store}",
                 data_root=data_root)
    assert result.returncode == 2
    assert "error: steps=0 must be a positive integer" in result.stderr
    assert "Traceback" not in result.stderr
    client = MlflowClient(store)  # refused before the sweep opened its parent
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_a_job_whose_builder_refuses_stops_the_sweep_before_any_job_trains(tmp_path,
                                                                          data_root, store):
    """With the optimizer swept, the sweep's own check leaves the builders to each job
    (sweep_values); the launcher builds every job's parts before any trains."""
    result = cli(tmp_path, "-m", "hydra/launcher=packed", "optimizer=adam,adamw",
                 "optimizer.betas=[1.5,0.999]", "steps=5", "log_every=5", *LIGHT,
                 f"tracking.uri={store}", data_root=data_root)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: optimizer 'adam' refused its options (Invalid beta parameter at index 0: "
        "1.5); fix the optimizer.* values")
    assert "Traceback" not in result.stderr
    [parent], children = parent_and_children(store)
    assert parent.info.status == "FAILED" and children == []
    [sweep_dir] = tmp_path.glob("multirun/*/*")
    assert not [path for path in sweep_dir.iterdir() if path.is_dir()]  # no job's folder


@pytest.mark.parametrize(("option", "message"), [
    ("hydra.launcher.mode=threads",
     "error: hydra.launcher.mode=threads is not one of auto, stacked, processes, "
     "sequential"),
    ("hydra.launcher.jobs_per_device=0",
     "error: hydra.launcher.jobs_per_device=0 must be a positive integer")])
def test_bad_launcher_options_are_one_line_and_exit_2(tmp_path, data_root, option, message,
                                                      store):
    result = cli(tmp_path, "-m", "hydra/launcher=packed", option, "seed=0,1",
                 f"tracking.uri={store}", data_root=data_root)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == message


def test_auto_stacks_on_a_gpu_and_runs_one_job_after_another_on_the_cpu():
    expected = "stacked" if torch.cuda.is_available() else "sequential"
    assert resolve_mode("auto") == expected
    assert resolve_mode("stacked") == "stacked"
    assert PackedLauncher(jobs_per_device=3).jobs_per_device == 3


def test_auto_on_the_cpu_runs_the_jobs_one_after_another(tmp_path, data_root, store):
    if torch.cuda.is_available():
        pytest.skip("auto stacks on a GPU: the stacked tests cover it")
    result = cli(tmp_path, "-m", "hydra/launcher=packed", "seed=0,1", *SWEEP_JOB, *LIGHT,
                 "checkpoint.enabled=false", f"tracking.uri={store}", data_root=data_root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "packing" not in result.stdout + result.stderr
    assert "hydra/launcher=packed on the CPU: the 2 jobs run one after another" in \
        result.stdout + result.stderr  # said, not silent
    parent, _ = tracked_sweep(store, {"tf_cnn-adam seed=0", "tf_cnn-adam seed=1"})
    assert parent.data.tags["launcher"] == "PackedLauncher"


@pytest.mark.slow  # two short trainings, stopped, then resumed
def test_sigterm_checkpoints_every_member_and_resume_true_finishes_them_all(
        tmp_path, data_root, store):
    sweep_dir, total = tmp_path / "sweep", 100  # stopped soon after step 10 of 100
    args = ("-m", *STACKED, "seed=0,1", f"steps={total}", "log_every=10",
            f"eval_every={total // 2}", "tracking.log_model=false", "tracking.flush_seconds=0",
            "checkpoint.every=0", *LIGHT, f"tracking.uri={store}",
            f"hydra.sweep.dir={sweep_dir}")
    process, output = start(tmp_path, *args, data_root=data_root)
    wait_for(lambda: output.read_text().count("step 10, loss = ") == 2, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 143
    text = output.read_text()
    assert text.count("stopped by SIGTERM at step") == 2
    steps = [torch.load(sweep_dir / str(job) / "checkpoint.pt", weights_only=True)["step"]
             for job in (0, 1)]
    assert all(10 <= step < total for step in steps)
    _, children = parent_and_children(store)
    assert {run.info.status for run in children} == {"KILLED"}

    result = cli(tmp_path, *args, "resume=true", data_root=data_root)
    assert result.returncode == 0, result.stderr[-3000:]
    _, resumed = parent_and_children(store)
    jobs = [run for run in resumed if "resumed_from_step" in run.data.tags]
    assert {run.info.run_id for run in jobs} == {run.info.run_id for run in children}
    assert {run.info.status for run in jobs} == {"FINISHED"}
    client = MlflowClient(store)
    for run in jobs:  # every step's loss once, across the stop
        history = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(point.step for point in history) == list(range(10, total + 1, 10))


@pytest.mark.slow  # two jobs in two worker processes
def test_processes_mode_runs_the_jobs_side_by_side_as_processes(tmp_path, data_root, store):
    result = cli(tmp_path, "-m", "hydra/launcher=packed", "hydra.launcher.mode=processes",
                 "hydra.launcher.jobs_per_device=2", "seed=0,1", *SWEEP_JOB,
                 *LIGHT, "checkpoint.enabled=false", f"tracking.uri={store}",
                 data_root=data_root)
    assert result.returncode == 0, result.stderr[-3000:]
    parent, _ = tracked_sweep(store, {"tf_cnn-adam seed=0", "tf_cnn-adam seed=1"})
    assert parent.data.tags["launcher"] == "PackedLauncher"
