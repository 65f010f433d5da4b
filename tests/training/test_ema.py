"""The weights' moving average follows TF's ExponentialMovingAverage(decay, num_updates)."""

from __future__ import annotations

import torch

from cifar_exp.training.ema import WeightAverage


def test_average_follows_tf_formula_with_warm_up():
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, decay=0.9999)
    shadow = model.weight.detach().clone()
    for n in range(1, 6):
        with torch.no_grad():
            model.weight.add_(1.0)
        average.update(model)
        decay = min(0.9999, (1 + n) / (10 + n))
        shadow = decay * shadow + (1 - decay) * model.weight.detach()
        torch.testing.assert_close(average.model.weight, shadow)
    assert not average.model.weight.requires_grad and not average.model.training


def test_decay_caps_the_warm_up():
    model = torch.nn.Linear(1, 1, bias=False)
    average = WeightAverage(model, decay=0.5)
    average.updates = 1000
    before = average.model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    average.update(model)
    torch.testing.assert_close(average.model.weight, 0.5 * before + 0.5 * model.weight)


def test_buffers_follow_the_live_model():
    model = torch.nn.BatchNorm1d(2)
    average = WeightAverage(model, decay=0.9)
    model(torch.randn(8, 2) + 5)
    average.update(model)
    torch.testing.assert_close(average.model.running_mean, model.running_mean)
