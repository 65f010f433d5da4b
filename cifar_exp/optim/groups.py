"""Parameter groups: the model's trainable parameters split into normalization-layer
parameters and the rest, so that optimizers can give them their own lr and weight decay."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from cifar_exp.errors import ConfigError

NORMALIZATION_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                        nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
                        nn.GroupNorm, nn.LayerNorm)


def parameter_groups(model: nn.Module) -> list[dict[str, Any]]:
    """[the other parameters, those of normalization layers] as optimizer parameter groups,
    the latter marked `normalization: True`. Frozen parameters are left out; empty groups
    are dropped. The first group's lr is the one the trainer logs."""
    in_norm_layers = {id(p) for module in model.modules()
                      if isinstance(module, NORMALIZATION_LAYERS) for p in module.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in in_norm_layers],
               "normalization": False},
              {"params": [p for p in trainable if id(p) in in_norm_layers],
               "normalization": True}]
    return [group for group in groups if group["params"]]


def scaled_groups(params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float,
                  weight_decay: float, norm_lr_scale: float = 1.0,
                  decoupled_weight_decay: bool = False) -> list[dict[str, Any]]:
    """Give each group its lr and weight decay.

    `norm_lr_scale` multiplies the lr of groups marked `normalization`. `weight_decay` is
    torch's coefficient, which SGD multiplies by the lr; with `decoupled_weight_decay` it is
    that product instead, the decay term of a step at the schedule's peak, the same for
    every group whatever its lr (torch's coefficient becomes weight_decay / lr), as airbench
    sets it. A group's own `lr` or `weight_decay` key replaces the option before scaling."""
    if norm_lr_scale <= 0:
        raise ConfigError(f"optimizer.norm_lr_scale={norm_lr_scale} must be positive")
    params = list(params)
    groups = ([dict(group) for group in params] if params and isinstance(params[0], dict)
              else [{"params": params}])
    for group in groups:
        scale = norm_lr_scale if group.get("normalization", False) else 1.0
        group["lr"] = group.get("lr", lr) * scale
        decay = group.get("weight_decay", weight_decay)
        group["weight_decay"] = decay / group["lr"] if decoupled_weight_decay else decay
    return groups
