"""Cosine annealing from the optimizer's lr to `min_lr` over the whole run."""

from __future__ import annotations

from torch.optim.lr_scheduler import CosineAnnealingLR

from cifar_exp.schedules import SCHEDULES


@SCHEDULES.register("cosine")
def build(optimizer, total_steps: int, steps_per_epoch: float,
          min_lr: float = 0.0) -> CosineAnnealingLR:
    return CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=min_lr)
