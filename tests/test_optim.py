"""Optimizer builders."""

from __future__ import annotations

import pytest
import torch

from cifar_exp.errors import ConfigError
from cifar_exp.optim import OPTIMIZERS, build_optimizer


def params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.ones(3))]


def test_registered_optimizers():
    assert {"adam", "adamw", "sgd"} <= set(OPTIMIZERS.names())


def test_adam_defaults_are_the_seeds():
    optimizer = build_optimizer("adam", params())
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.Adam)
    assert group["lr"] == 1e-3 and group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8


def test_sgd_momentum_and_nesterov_options():
    optimizer = build_optimizer("sgd", params(), lr=0.05, momentum=0.8, nesterov=True)
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.05 and group["momentum"] == 0.8 and group["nesterov"]


def test_adamw_decouples_weight_decay():
    optimizer = build_optimizer("adamw", params(), weight_decay=0.05, betas=[0.8, 0.99])
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.99)


def test_parameter_groups_are_accepted():
    groups = [{"params": params(), "weight_decay": 0.0}, {"params": params()}]
    optimizer = build_optimizer("sgd", groups, lr=0.1, weight_decay=5e-4)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 5e-4]


def test_unknown_option_is_named():
    with pytest.raises(ConfigError, match=r"optimizer 'adam' has no option\(s\) \['momentum'\]"):
        build_optimizer("adam", params(), momentum=0.9)
