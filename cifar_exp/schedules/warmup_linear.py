"""Linear warm-up to the optimizer's lr, then linear decay to zero at the last step."""

from __future__ import annotations

from torch.optim.lr_scheduler import LinearLR, SequentialLR

from cifar_exp.schedules import SCHEDULES


@SCHEDULES.register("warmup_linear")
def build(optimizer, total_steps: int, steps_per_epoch: float, warmup_fraction: float = 0.05,
          start_factor: float = 0.01) -> SequentialLR:
    warmup = max(int(round(warmup_fraction * total_steps)), 1)
    decay = max(total_steps - warmup, 1)
    return SequentialLR(
        optimizer,
        [LinearLR(optimizer, start_factor, 1.0, total_iters=warmup),
         LinearLR(optimizer, 1.0, 0.0, total_iters=decay)],
        milestones=[warmup],
    )
