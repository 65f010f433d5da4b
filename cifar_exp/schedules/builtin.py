"""torch's own LR schedulers, as the config groups name them: constant, TF's staircase
exponential decay, cosine annealing, linear warm-up then decay, and the one-cycle policy."""

from __future__ import annotations

from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LinearLR,
    OneCycleLR,
    SequentialLR,
    StepLR,
)

from cifar_exp.errors import ConfigError
from cifar_exp.schedules import SCHEDULES


@SCHEDULES.register("constant")
def constant(optimizer, total_steps: int, steps_per_epoch: float) -> ConstantLR:
    return ConstantLR(optimizer, factor=1.0, total_iters=0)


@SCHEDULES.register("staircase")
def staircase(optimizer, total_steps: int, steps_per_epoch: float, factor: float = 0.1,
              every_epochs: float = 350.0) -> StepLR:
    """TF's exponential_decay(staircase=True): lr * factor ** floor(step / decay_steps)."""
    if factor <= 0 or every_epochs <= 0:
        raise ConfigError(f"schedule.factor={factor} and schedule.every_epochs={every_epochs} "
                          f"must both be positive")
    # int() as in the tutorial: 350 epochs of 390.625 batches decay at step 136,718.
    decay_steps = max(int(every_epochs * steps_per_epoch), 1)
    return StepLR(optimizer, step_size=decay_steps, gamma=factor)


@SCHEDULES.register("cosine")
def cosine(optimizer, total_steps: int, steps_per_epoch: float,
           min_lr: float = 0.0) -> CosineAnnealingLR:
    """Cosine annealing from the optimizer's lr to `min_lr` over the whole run."""
    if min_lr < 0:
        raise ConfigError(f"schedule.min_lr={min_lr} must be >= 0")
    return CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=min_lr)


@SCHEDULES.register("warmup_linear")
def warmup_linear(optimizer, total_steps: int, steps_per_epoch: float,
                  warmup_fraction: float = 0.05, start_factor: float = 0.01) -> SequentialLR:
    """Linear warm-up to the optimizer's lr, then linear decay to zero at the last step."""
    if not 0 < warmup_fraction <= 1:
        raise ConfigError(f"schedule.warmup_fraction={warmup_fraction} must lie in (0, 1]")
    warmup = max(int(round(warmup_fraction * total_steps)), 1)
    decay = max(total_steps - warmup, 1)
    return SequentialLR(
        optimizer,
        [LinearLR(optimizer, start_factor, 1.0, total_iters=warmup),
         LinearLR(optimizer, 1.0, 0.0, total_iters=decay)],
        milestones=[warmup],
    )


@SCHEDULES.register("onecycle")
def onecycle(optimizer, total_steps: int, steps_per_epoch: float, *, max_lr: float | None = None,
             pct_start: float = 0.25, anneal_strategy: str = "linear", div_factor: float = 25.0,
             final_div_factor: float = 1e4, cycle_momentum: bool = False) -> OneCycleLR:
    """Warm up to `max_lr` (default: the optimizer's lr), then anneal."""
    if div_factor <= 0 or final_div_factor <= 0:
        raise ConfigError(f"schedule.div_factor={div_factor} and schedule.final_div_factor="
                          f"{final_div_factor} must both be positive")
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
