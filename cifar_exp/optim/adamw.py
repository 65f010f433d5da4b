"""AdamW: Adam with decoupled weight decay."""

from __future__ import annotations

import torch

from cifar_exp.optim import OPTIMIZERS


@OPTIMIZERS.register("adamw")
def build(params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
          eps: float = 1e-8, weight_decay: float = 0.01, fused: bool | None = None,
          foreach: bool | None = None) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps,
                             weight_decay=weight_decay, fused=fused, foreach=foreach)
