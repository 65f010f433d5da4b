"""SGD, with optional (Nesterov) momentum."""

from __future__ import annotations

import torch

from cifar_exp.optim import OPTIMIZERS


@OPTIMIZERS.register("sgd")
def build(params, lr: float = 0.1, momentum: float = 0.9, nesterov: bool = False,
          weight_decay: float = 0.0, fused: bool | None = None,
          foreach: bool | None = None) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov,
                           weight_decay=weight_decay, fused=fused, foreach=foreach)
