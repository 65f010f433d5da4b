"""The submitit launchers: the SLURM preset's settings, and a sweep run through submitit
(locally) that tracks like any other."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import SWEEP_JOB, cli
from tests.tracking.test_sweep import tracked_sweep


def test_slurm_preset_reads_partition_and_account_from_the_environment(
        tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("SLURM_PARTITION", "gpu")
    monkeypatch.setenv("SLURM_ACCOUNT", "cifar")
    result = cli(tmp_path, "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4",
                 "--cfg", "hydra", "-p", "hydra.launcher", "--resolve", data_root=data_root)
    assert result.returncode == 0, result.stderr[-3000:]
    launcher = yaml.safe_load(result.stdout)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["partition"], launcher["account"]) == ("gpu", "cifar")
    assert launcher["gpus_per_node"] == 4 and launcher["timeout_min"] == 240
    assert launcher["max_num_timeout"] > 0 and launcher["additional_parameters"]["requeue"]


# submitit starts each job in its own Python process; Ray starts a local instance, then
# runs the jobs as its tasks.
@pytest.mark.slow
@pytest.mark.parametrize("launcher,tag", [("submitit_local", "LocalLauncher"),
                                          ("ray", "RayLauncher")])
def test_a_launchers_sweep_leaves_one_parent_and_two_finished_children(tmp_path, data_root,
                                                                        launcher, tag, store):
    result = cli(tmp_path, "-m", f"hydra/launcher={launcher}", "seed=0,1", *SWEEP_JOB,
                 f"tracking.uri={store}", data_root=data_root)
    assert result.returncode == 0, result.stderr[-3000:]

    parent, _ = tracked_sweep(store, {"tf_cnn-adam seed=0", "tf_cnn-adam seed=1"})
    assert parent.data.tags["launcher"] == tag


@pytest.mark.slow  # one job of two submitit tasks on the CPU (gloo)
def test_two_tasks_per_node_train_one_data_parallel_job(tmp_path, data_root, store):
    result = cli(tmp_path, "-m", "hydra/launcher=submitit_local",
                 "hydra.launcher.tasks_per_node=2", "seed=0", *SWEEP_JOB,
                 f"tracking.uri={store}", data_root=data_root)
    assert result.returncode == 0, result.stderr[-3000:]

    _, [child] = tracked_sweep(store, {"tf_cnn-adam-10 #0"})  # one run for the two ranks
    assert child.data.tags["processes"] == "2"
    assert len(list(tmp_path.glob("multirun/*/*/0"))) == 1  # one output folder for the job
