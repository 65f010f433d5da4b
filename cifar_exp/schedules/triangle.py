"""A triangular (piecewise-linear) schedule, as airbench trains: the lr factor rises
linearly from `start_factor` to 1 at `peak_fraction` of the run, then falls linearly to
`end_factor` at the end."""

from __future__ import annotations

from torch.optim.lr_scheduler import LambdaLR

from cifar_exp.errors import ConfigError
from cifar_exp.schedules import SCHEDULES


class TriangleFactor:
    """The lr factor at a (0-based) step: a picklable callable for LambdaLR."""

    def __init__(self, total_steps: int, start: float, peak_step: int, end: float) -> None:
        self.total_steps, self.start, self.peak_step, self.end = total_steps, start, peak_step, end

    def __call__(self, step: int) -> float:
        if step < self.peak_step:
            return self.start + (1.0 - self.start) * step / self.peak_step
        fall = max(self.total_steps - self.peak_step, 1)
        return 1.0 + (self.end - 1.0) * min(step - self.peak_step, fall) / fall


@SCHEDULES.register("triangle")
def triangle(optimizer, total_steps: int, steps_per_epoch: float, start_factor: float = 0.2,
             peak_fraction: float = 0.23, end_factor: float = 0.07) -> LambdaLR:
    if not 0 <= peak_fraction <= 1:
        raise ConfigError(f"schedule.peak_fraction={peak_fraction} must lie in [0, 1]")
    if start_factor < 0 or end_factor < 0:
        raise ConfigError(f"schedule.start_factor={start_factor} and schedule.end_factor="
                          f"{end_factor} must be >= 0 (a factor of the lr)")
    peak_step = int(peak_fraction * total_steps)
    return LambdaLR(optimizer, TriangleFactor(total_steps, start_factor, peak_step, end_factor))
