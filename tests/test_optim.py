"""Optimizer builders and parameter groups."""

from __future__ import annotations

import pytest
import torch

from cifar_exp.errors import ConfigError
from cifar_exp.optim import OPTIMIZERS, build_optimizer
from cifar_exp.optim.groups import parameter_groups


def params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.ones(3))]


def test_registered_optimizers():
    assert {"adam", "adamw", "sgd"} <= set(OPTIMIZERS.names())


def test_adam_defaults_are_the_tutorials():
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


class TinyNet(torch.nn.Module):
    """A conv with a bias, a BatchNorm with a frozen scale, a bias-free linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.norm = torch.nn.BatchNorm2d(4)
        self.norm.weight.requires_grad_(False)
        self.head = torch.nn.Linear(4, 2, bias=False)


def test_parameter_groups_split_normalization_layers_and_drop_frozen():
    net = TinyNet()
    others, norms = parameter_groups(net)
    assert others["params"] == [net.conv.weight, net.conv.bias, net.head.weight]
    assert norms["params"] == [net.norm.bias] and norms["normalization"]
    assert not others["normalization"]
    assert len(parameter_groups(torch.nn.Linear(2, 2))) == 1  # no empty group


def test_norm_lr_scale_and_coupled_weight_decay():
    net = TinyNet()
    optimizer = build_optimizer("sgd", parameter_groups(net), lr=0.1, weight_decay=5e-4,
                                norm_lr_scale=64.0)
    others, norms = optimizer.param_groups
    assert others["lr"] == 0.1 and norms["lr"] == pytest.approx(6.4)
    assert others["weight_decay"] == norms["weight_decay"] == 5e-4
    assert optimizer.defaults["lr"] == 0.1  # the configured lr, as the trainer reports it


def test_decoupled_weight_decay_is_the_same_decay_term_for_every_group():
    net = TinyNet()
    with torch.no_grad():
        net.norm.bias.fill_(1.0)
        net.conv.bias.fill_(1.0)
    optimizer = build_optimizer("sgd", parameter_groups(net), lr=1.5, momentum=0.0,
                                weight_decay=0.002, norm_lr_scale=64.0,
                                decoupled_weight_decay=True)
    others, norms = optimizer.param_groups
    assert others["weight_decay"] == pytest.approx(0.002 / 1.5)
    assert norms["weight_decay"] == pytest.approx(0.002 / 96)
    for p in net.parameters():  # a zero gradient: the step is the decay alone
        p.grad = torch.zeros_like(p)
    optimizer.step()
    # Each weight lost the same 0.2% whatever its group's lr (1.5 or 96).
    torch.testing.assert_close(net.conv.bias, torch.full((4,), 0.998))
    torch.testing.assert_close(net.norm.bias, torch.full((4,), 0.998))


def test_group_keys_override_the_options():
    groups = [{"params": params(), "lr": 0.01, "normalization": True}, {"params": params()}]
    optimizer = build_optimizer("sgd", groups, lr=0.1, weight_decay=0.1, norm_lr_scale=2.0,
                                decoupled_weight_decay=True)
    assert [g["lr"] for g in optimizer.param_groups] == [0.02, 0.1]
    assert [g["weight_decay"] for g in optimizer.param_groups] == pytest.approx([5.0, 1.0])
