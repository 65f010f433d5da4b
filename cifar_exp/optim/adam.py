"""Adam, as the seed uses it (TF's defaults match torch's: betas 0.9/0.999, eps 1e-8)."""

from __future__ import annotations

import torch

from cifar_exp.optim import OPTIMIZERS


@OPTIMIZERS.register("adam")
def build(params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
          eps: float = 1e-8, weight_decay: float = 0.0, fused: bool | None = None,
          foreach: bool | None = None) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                            fused=fused, foreach=foreach)
