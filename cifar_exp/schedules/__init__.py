"""Learning-rate schedule registry: each module here registers a builder
`f(optimizer, total_steps, steps_per_epoch, **options)` returning a torch LR scheduler
that the trainer steps once per training step."""

from __future__ import annotations

from typing import Any

import torch

from cifar_exp.registry import Registry

SCHEDULES = Registry("schedule", __name__)


def build_schedule(name: str, optimizer: torch.optim.Optimizer, total_steps: int,
                   steps_per_epoch: float, **options: Any) -> torch.optim.lr_scheduler.LRScheduler:
    """Build the schedule registered as `name`; `steps_per_epoch` may be fractional
    (50,000 / 128), as TF's tutorial computes its decay steps."""
    return SCHEDULES.build(name, optimizer, total_steps, steps_per_epoch, **options)
