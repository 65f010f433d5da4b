"""The fast recipes end to end on the CPU, through run_experiment, on the real training
data; evaluated on the first 250 test images (eval_images), as a full evaluation with
test-time augmentation (six views of 10,000 images) takes minutes on a CPU."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from cifar_exp.config import compose_config
from cifar_exp.speed import resolve_cuda_graph
from tests.conftest import run_experiment


def run_recipe(store: str, tmp_path, data_root, recipe: str, *overrides: str):
    """Run `+experiment=<recipe>` with `overrides`, tracked in `store`; return the MLflow
    client and its run."""
    cfg = compose_config([f"+experiment={recipe}", "eval_images=250", f"data.root={data_root}",
                          f"tracking.uri={store}", f"checkpoint.path={tmp_path / 'checkpoint.pt'}",
                          *overrides])
    result = run_experiment(cfg)
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name(recipe).experiment_id])
    assert run.data.metrics["precision"] == result.precision
    assert result.precision <= run.data.metrics["precision_top5"] <= 1.0
    return client, run


def test_fast94_trains_a_few_steps(tmp_path, data_root, store):
    # The recipe as written, but 3 steps of 128 images, scored on 50 test images.
    client, run = run_recipe(store, tmp_path, data_root, "fast94", "steps=3",
                             "batch_size=128", "log_every=1", "tracking.log_model=false",
                             "eval_images=50")
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
@pytest.mark.parametrize("recipe", ["fast94", "fast94_muon", "fast96", "resnet18"])
def test_every_recipe_trains_two_steps_and_exports_both_models(tmp_path, data_root, recipe,
                                                              store):
    # The recipe as written but for two steps of 128 images, scored on 50 test images: the
    # model's export is the point here. A step of fast96 at its batch of 1,024 takes 26 s on
    # 2 CPU cores; the batch size changes nothing that is exported.
    client, run = run_recipe(store, tmp_path, data_root, recipe, "steps=2", "batch_size=128",
                             "eval_images=50")
    assert run.info.status == "FINISHED"
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    # Both models export (torch.export): the served one and the plain network.
    assert sorted(m.name for m in logged) == [run.info.run_name,
                                              f"{run.info.run_name}-network"]


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["tf_tutorial_adam", "tf_tutorial_sgd_decay", "fast94",
                                    "fast94_muon", "fast96", "resnet18"])
def test_every_recipe_trains_on_the_gpu_in_bf16(tmp_path, data_root, recipe, store):
    _, run = run_recipe(store, tmp_path, data_root, recipe, "steps=20", "log_every=10",
                        "device=cuda", "tracking.log_model=false")
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["device"] == torch.cuda.get_device_name()  # the card's name
    assert (tags["amp"], tags["compile"], tags["cuda_graph"]) == ("bf16", "none", "true")
    assert math.isfinite(run.data.metrics["loss"])
    assert 0.0 < run.data.metrics["precision"] <= 1.0


def test_fast94_muon_is_airbench94_muon_as_published():
    cfg = compose_config(["+experiment=fast94_muon"])
    assert cfg.steps == 200 and cfg.batch_size == 2000  # 8 epochs of 25 batches
    assert cfg.model.name == "airbench" and list(cfg.model.widths) == [64, 256, 256]
    assert cfg.label_smoothing == 0.2 and cfg.tta == "flip_translate"
    assert cfg.lookahead.every is None and cfg.ema.decay is None
    opt = cfg.optimizer
    assert opt.name == "muon" and opt.lr == 0.24 and opt.momentum == 0.6 and opt.nesterov
    assert opt.ns_steps == 3 and opt.normalize_filters and opt.weight_decay == 0.0
    # Per mean loss over 2000: airbench's per-example (summed-loss) values x 2000.
    assert opt.sgd_bias_lr == pytest.approx(0.053 * 2000)
    assert opt.sgd_weight_decay == pytest.approx(2e-6 * 2000)
    # The head: logits (w / 256) . x with w of std 1, lr 0.67 per example; here torch's
    # default init (std 1/sqrt(768)) and scale sqrt(3)/16 give the same initial logits,
    # and the lr that makes the same steps of the logits' weights: lr x scale**2 equal.
    scale = cfg.model.logit_scale
    assert scale / math.sqrt(768) == pytest.approx(1 / 256)
    assert opt.sgd_lr * scale**2 == pytest.approx(0.67 * 2000 / 256**2, rel=1e-4)
    assert opt.sgd_momentum == 0.85 and opt.sgd_nesterov and opt.sgd_decoupled_weight_decay
    assert (cfg.schedule.name, cfg.schedule.start_factor, cfg.schedule.peak_fraction,
            cfg.schedule.end_factor) == ("triangle", 1.0, 0.0, 0.0)
    # The whitening bias starts as airbench94_muon's: at nn.Conv2d's default init.
    assert cfg.model.whiten_bias_init == "uniform" and cfg.model.whiten_bias_epochs == 3
    # The Muon step can be captured: `auto` graphs it on a GPU (op by op on the CPU).
    assert opt.fused and resolve_cuda_graph("auto", torch.device("cuda"), "bf16", "none",
                                            fused_optimizer=bool(opt.fused),
                                            data_parallel=False)
    assert not resolve_cuda_graph("auto", torch.device("cpu"), "fp32", "none",
                                  fused_optimizer=bool(opt.fused), data_parallel=False)


def test_fast94_muon_trains_a_few_steps(tmp_path, data_root, store):
    # The recipe as written, but 2 steps of 128 images, scored on 50 test images, and one
    # Newton-Schulz iteration instead of 3: Muon runs them in bf16, about 1.1 s each
    # on 2 CPU cores; the schedule is the point here.
    client, run = run_recipe(store, tmp_path, data_root, "fast94_muon", "steps=2",
                             "batch_size=128", "log_every=1", "tracking.log_model=false",
                             "eval_images=50", "optimizer.ns_steps=1")
    assert run.info.status == "FINISHED" and run.info.run_name == "airbench-muon-2"
    assert run.data.params["optimizer.sgd_bias_lr"] == str(106 * 128 / 2000)
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    lrs = [m.value for m in client.get_metric_history(run.info.run_id, "lr")]
    assert lrs == pytest.approx([0.24, 0.12])  # Muon's lr, falling linearly to 0
    assert 0.0 <= run.data.metrics["precision"] <= 1.0
