"""The fast recipes end to end on the CPU, through run_experiment, on the real training
data; evaluated on the first 250 test images (eval_images), as a full evaluation with
test-time augmentation (six views of 10,000 images) takes minutes on a CPU."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from cifar_exp import run as run_module
from cifar_exp.config import compose_config


def run_recipe(tmp_path, data_root, recipe: str, *overrides: str):
    """Run `+experiment=<recipe>` with `overrides`; return the MLflow client and its run."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_config([f"+experiment={recipe}", "eval_images=250", f"data.root={data_root}",
                          f"tracking.uri={store}", f"checkpoint.path={tmp_path / 'checkpoint.pt'}",
                          *overrides])
    result = run_module.run_experiment(cfg)
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name(recipe).experiment_id])
    assert run.data.metrics["precision"] == result.precision
    return client, run


def test_fast94_trains_a_few_steps(tmp_path, data_root):
    # The recipe as written, but 3 steps of 128 images.
    client, run = run_recipe(tmp_path, data_root, "fast94", "steps=3",
                             "batch_size=128", "log_every=1", "tracking.log_model=false")
    assert run.info.status == "FINISHED" and run.info.run_name == "airbench-sgd-3"
    params = run.data.params
    assert params["model.name"] == "airbench" and params["label_smoothing"] == "0.2"
    assert params["optimizer.lr"] == "0.1875"  # 1.5 per 1024 examples, at batch 128
    assert params["augmentation.alternating_flip"] == "True"
    assert params["tta"] == "flip_translate"
    assert params["lookahead.every"] == "5" and params["lookahead.start_epochs"] == "3"
    assert params["model.whiten_bias_epochs"] == "3"
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    lrs = [m.value for m in client.get_metric_history(run.info.run_id, "lr")]
    # The triangle stretched to 3 steps: its peak, int(0.23 * 3) = 0, is the first step;
    # then down towards 0.07 x lr at step 3.
    assert lrs == pytest.approx([0.1875 * (1 - 0.93 * k / 3) for k in range(3)])
    assert 0.0 <= run.data.metrics["precision"] <= 1.0


def test_fast96_is_airbench96_as_published():
    cfg = compose_config(["+experiment=fast96"])
    assert cfg.steps == 1488 and cfg.batch_size == 1024  # 31 epochs of 48 batches
    assert list(cfg.model.widths) == [128, 512, 512] and cfg.model.residual
    assert cfg.model.convs_per_block == 3 and cfg.model.bn_momentum == 0.1
    assert cfg.augmentation.padding == 4 and cfg.augmentation.cutout == 12
    assert cfg.optimizer.lr == pytest.approx(9.0 / (1 + 1 / 0.15), rel=1e-4)
    assert cfg.optimizer.weight_decay == pytest.approx(0.012 / (1 + 1 / 0.15), rel=1e-4)
    assert (cfg.schedule.start_factor, cfg.schedule.peak_fraction,
            cfg.schedule.end_factor) == (0.2, 0.1, 0.0)
    assert cfg.lookahead.every == 5 and cfg.lookahead.start_epochs == 0
    assert not cfg.lookahead.reset_each_epoch and cfg.model.whiten_bias_epochs == 3


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["fast94", "fast96", "resnet18"])
def test_every_recipe_runs_as_written_for_two_steps(tmp_path, data_root, recipe):
    client, run = run_recipe(tmp_path, data_root, recipe, "steps=2")
    assert run.info.status == "FINISHED"
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    # Both models export (torch.export): the served one and the plain network.
    assert sorted(m.name for m in logged) == [run.info.run_name,
                                              f"{run.info.run_name}-network"]


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["tf_tutorial_adam", "tf_tutorial_sgd_decay", "fast94",
                                    "fast96", "resnet18"])
def test_every_recipe_trains_on_the_gpu_in_bf16(tmp_path, data_root, recipe):
    _, run = run_recipe(tmp_path, data_root, recipe, "steps=20", "log_every=10",
                        "device=cuda", "tracking.log_model=false")
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["device"] == torch.cuda.get_device_name()  # the card's name
    assert (tags["amp"], tags["compile"], tags["cuda_graph"]) == ("bf16", "none", "true")
    assert math.isfinite(run.data.metrics["loss"])
    assert 0.0 < run.data.metrics["precision"] <= 1.0
