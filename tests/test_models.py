"""The model registry and the seed's CNN."""

from __future__ import annotations

import pytest
import torch

from cifar_exp.errors import ConfigError
from cifar_exp.models import MODELS, build_model, regularization_loss


def test_tf_cnn_has_the_seed_parameter_count():
    model = build_model("tf_cnn", 10, 24)
    assert sum(p.numel() for p in model.parameters()) == 1_068_298


def test_tf_cnn_shapes():
    model = build_model("tf_cnn", 10, 24)
    x = torch.randn(5, 3, 24, 24)
    assert model(x).shape == (5, 10)
    assert model.local3.in_features == 6 * 6 * 64
    assert model.local4.weight.shape == (192, 384)
    # Full-size images and CIFAR-100 change only the first dense layer and the logits.
    big = build_model("tf_cnn", 100, 32)
    assert big(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert big.local3.in_features == 8 * 8 * 64


def test_tf_cnn_initialisation_follows_the_seed():
    torch.manual_seed(0)
    model = build_model("tf_cnn", 10, 24)
    expected = {"conv1": (5e-2, 0.0), "conv2": (5e-2, 0.1), "local3": (0.04, 0.1),
                "local4": (0.04, 0.1), "logits": (1 / 192, 0.0)}
    for name, (std, bias) in expected.items():
        layer = getattr(model, name)
        weight = layer.weight.detach()
        assert weight.abs().max() <= 2 * std + 1e-7, name  # truncated at two std
        # A normal truncated at 2 sigma has std 0.88 sigma.
        assert weight.std().item() == pytest.approx(0.88 * std, rel=0.1), name
        assert torch.all(layer.bias == bias), name


def test_tf_cnn_weight_decay_covers_local3_and_local4_only():
    model = build_model("tf_cnn", 10, 24, weight_decay=0.004)
    expected = 0.004 * (model.local3.weight.square().sum()
                        + model.local4.weight.square().sum()) / 2
    torch.testing.assert_close(regularization_loss(model), expected)
    model.local3.weight.grad = None
    regularization_loss(model).backward()
    assert model.local3.weight.grad is not None and model.conv1.weight.grad is None


def test_models_without_a_penalty_add_nothing():
    assert regularization_loss(torch.nn.Linear(2, 2)) == 0.0


def test_registry_errors_are_clear():
    assert "tf_cnn" in MODELS.names()
    with pytest.raises(ConfigError, match=r"unknown model 'resnet999'; choose one of"):
        build_model("resnet999", 10, 24)
    with pytest.raises(ConfigError, match=r"model 'tf_cnn' has no option\(s\) \['depth'\]"):
        build_model("tf_cnn", 10, 24, depth=3)
