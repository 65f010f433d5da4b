"""torch's own optimizers, as the config groups name them: Adam (the TF tutorial's; TF's
defaults match torch's: betas 0.9/0.999, eps 1e-8), AdamW (decoupled weight decay), and SGD
with optional (Nesterov) momentum, a separate lr for normalization layers and weight decay
decoupled from the lr (as airbench trains)."""

from __future__ import annotations

import torch

from cifar_exp.optim import OPTIMIZERS
from cifar_exp.optim.groups import scaled_groups


@OPTIMIZERS.register("adam")
def adam(params, *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
         eps: float = 1e-8, weight_decay: float = 0.0, fused: bool | None = None,
         foreach: bool | None = None) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                            fused=fused, foreach=foreach)


@OPTIMIZERS.register("adamw")
def adamw(params, *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
          eps: float = 1e-8, weight_decay: float = 0.01, fused: bool | None = None,
          foreach: bool | None = None) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps,
                             weight_decay=weight_decay, fused=fused, foreach=foreach)


@OPTIMIZERS.register("sgd")
def sgd(params, *, lr: float = 0.1, momentum: float = 0.9, nesterov: bool = False,
        weight_decay: float = 0.0, norm_lr_scale: float = 1.0,
        decoupled_weight_decay: bool = False, fused: bool | None = None,
        foreach: bool | None = None) -> torch.optim.SGD:
    groups = scaled_groups(params, lr, weight_decay, norm_lr_scale, decoupled_weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov,
                           weight_decay=weight_decay, fused=fused, foreach=foreach)
