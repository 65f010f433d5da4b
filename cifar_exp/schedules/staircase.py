"""TF's exponential_decay(staircase=True): lr * factor ** floor(step / decay_steps)."""

from __future__ import annotations

from torch.optim.lr_scheduler import StepLR

from cifar_exp.schedules import SCHEDULES


@SCHEDULES.register("staircase")
def build(optimizer, total_steps: int, steps_per_epoch: float, factor: float = 0.1,
          every_epochs: float = 350.0) -> StepLR:
    # int() as in the tutorial: 350 epochs of 390.625 batches decay at step 136,718.
    decay_steps = max(int(every_epochs * steps_per_epoch), 1)
    return StepLR(optimizer, step_size=decay_steps, gamma=factor)
