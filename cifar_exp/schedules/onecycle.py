"""The one-cycle policy: warm up to `max_lr` (default: the optimizer's lr), then anneal."""

from __future__ import annotations

from torch.optim.lr_scheduler import OneCycleLR

from cifar_exp.schedules import SCHEDULES


@SCHEDULES.register("onecycle")
def build(optimizer, total_steps: int, steps_per_epoch: float, max_lr: float | None = None,
          pct_start: float = 0.25, anneal_strategy: str = "linear", div_factor: float = 25.0,
          final_div_factor: float = 1e4, cycle_momentum: bool = False) -> OneCycleLR:
    return OneCycleLR(
        optimizer,
        max_lr=max_lr if max_lr is not None else [g["lr"] for g in optimizer.param_groups],
        total_steps=total_steps,
        pct_start=pct_start,
        anneal_strategy=anneal_strategy,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        cycle_momentum=cycle_momentum,
    )
