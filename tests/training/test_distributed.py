"""Data-parallel training under torchrun: the same run as one process, one output folder,
one MLflow run; and the helpers that make it so."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from cifar_exp.errors import ConfigError
from cifar_exp.training.distributed import shard
from cifar_exp.world import SINGLE, World, check_batch_size, current_world, hydra_overrides
from tests.conftest import cli, copy_store, data_env, run_command

# SGD at a small rate: its update is linear in the gradient, so the runs differ only by the
# order of floating-point sums (Adam, or lr=0.1, amplifies them: max-pool and ReLU choices flip).
# Lookahead averages every 5 steps: each rank averages the same weights the same way.
JOB = ("optimizer=sgd", "optimizer.lr=0.01", "steps=20", "log_every=10", "eval_every=20",
       "eval_images=500", "lookahead.every=5", "tracking.log_model=false")


def test_world_from_torchrun_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert current_world() == SINGLE and not SINGLE.distributed
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert current_world() == World(rank=3, size=4, local_rank=1)


def test_each_rank_keeps_its_own_slice_of_the_global_batch():
    batch = torch.arange(8)
    slices = [shard(World(rank, 4), batch) for rank in range(4)]
    assert torch.equal(torch.cat(slices), batch)
    assert [s.tolist() for s in slices] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_only_rank_0_gets_a_hydra_output_folder():
    assert hydra_overrides(World(0, 2)) == []
    assert "hydra.output_subdir=null" in hydra_overrides(World(1, 2))


def test_batch_that_does_not_divide_among_ranks_is_refused():
    check_batch_size(128, World(0, 2))
    with pytest.raises(ConfigError, match="batch_size=10 does not divide into 4"):
        check_batch_size(10, World(0, 4))


def finished_job(folder: Path) -> tuple[list, dict[str, torch.Tensor], list[Path]]:
    """(MLflow runs, final weights, output folders) of the job run in `folder`."""
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cifar_exp").experiment_id])
    outputs = sorted(folder.glob("outputs/*/*"))
    [checkpoint] = folder.glob("outputs/*/*/checkpoint.pt")
    weights = torch.load(checkpoint, weights_only=True)["states"]["model"]
    return runs, weights, outputs


@pytest.mark.slow  # two jobs of 20 steps, each evaluated on the 10,000 test images
def test_two_processes_train_as_one_does(tmp_path, data_root, store_template):
    runs = {}
    for processes in (1, 2):
        folder = tmp_path / f"{processes}"
        folder.mkdir()
        args = (*JOB, f"tracking.uri={copy_store(store_template, folder)}")
        result = cli(folder, *args, data_root=data_root, processes=processes)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes] = finished_job(folder)
        # Nothing but the store (with the lock that serialises opening it), its artifacts
        # and the one output folder is created.
        assert {p.name for p in folder.iterdir()} == {
            "mlflow.db", ".mlflow.db.lock", "mlartifacts", "outputs"}

    (single_runs, single_weights, _), (ddp_runs, ddp_weights, ddp_outputs) = runs[1], runs[2]
    assert len(ddp_runs) == 1 and len(ddp_outputs) == 1
    [single], [ddp] = single_runs, ddp_runs
    assert ddp.info.status == "FINISHED" and ddp.data.tags["processes"] == "2"
    assert ddp.data.tags["command"] == ("torchrun --standalone --nproc_per_node=2 -m "
                                        f"cifar_exp.run {' '.join(args)}")
    assert ddp.data.metrics["loss"] == pytest.approx(single.data.metrics["loss"], rel=1e-5)
    assert ddp.data.metrics["precision"] == pytest.approx(single.data.metrics["precision"],
                                                          abs=2e-3)
    for name, weight in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], weight, rtol=1e-4, atol=1e-5)


def test_a_sweep_under_torchrun_is_refused(tmp_path, data_root):
    result = cli(tmp_path, "-m", "seed=0,1", data_root=data_root, processes=2)
    assert result.returncode != 0
    assert "error: a sweep (-m) under torchrun would run once per process" in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing created


def kill_job(agent: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers at once, as a lost node would. torchrun starts each
    worker in a session of its own, so killing torchrun's process group alone would leave
    the workers training on (and writing the same MLflow run as the resumed job)."""
    children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
    os.killpg(agent.pid, signal.SIGKILL)
    for pid in map(int, children):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    agent.wait()


@pytest.mark.slow  # three 2-process jobs of 30 steps
def test_killed_two_process_job_resumes_to_the_uninterrupted_weights(tmp_path, data_root,
                                                                     store_template):
    job = ("optimizer=sgd", "optimizer.lr=0.01", "steps=30", "log_every=10", "eval_every=30",
           "eval_images=500", "checkpoint.every=10", "tracking.log_model=false")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for folder in (whole, cut):
        folder.mkdir()
    args = (*job, f"tracking.uri={copy_store(store_template, whole)}",
            f"hydra.run.dir={whole / 'run'}")
    assert cli(whole, *args, data_root=data_root, processes=2).returncode == 0

    args = (*job, f"tracking.uri={copy_store(store_template, cut)}",
            f"hydra.run.dir={cut / 'run'}")
    checkpoint = cut / "run" / "checkpoint.pt"
    process = subprocess.Popen(run_command(*args, processes=2), cwd=cut,
                               env=data_env(data_root), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not checkpoint.exists():  # a first checkpoint (step 10 or 20): kill every process
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(0.5)  # the file is renamed into place whole: let torch.load read it
    kill_job(process)
    killed_at = torch.load(checkpoint, weights_only=True)["step"]
    assert killed_at in (10, 20)

    result = cli(cut, *args, "resume=true", data_root=data_root, processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{cut / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("cifar_exp").experiment_id])
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [
        10, 20, 30]
    resumed = torch.load(checkpoint, weights_only=True)["states"]["model"]
    for name, weight in torch.load(whole / "run" / "checkpoint.pt",
                                   weights_only=True)["states"]["model"].items():
        torch.testing.assert_close(resumed[name], weight, rtol=0, atol=0)
