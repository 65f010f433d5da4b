"""Lookahead-style weight averaging, as airbench trains: from epoch `start_epochs` on, a
slow copy of the weights moves toward the trained ones every `every` steps, and the
trained ones are reset to it.

The slow copy starts as the weights at the first of those steps. At step t of T an update
keeps `decay ** every * (t / T) ** 3` of the slow copy: early on it follows the weights,
late in training it averages over the last few dozen steps. After the last step (and with
`reset_each_epoch`, as airbench94, at the end of each epoch) the weights become the slow
copy: the steps since its last update are dropped. Floating-point buffers (BatchNorm
statistics) are averaged with the parameters."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Lookahead:
    def __init__(self, model: nn.Module, every: int, decay: float, steps: int,
                 start_epochs: int = 0, reset_each_epoch: bool = False) -> None:
        self.model = model
        self.every, self.decay, self.steps = every, decay, steps
        self.start_epochs, self.reset_each_epoch = start_epochs, reset_each_epoch
        self._slow: list[torch.Tensor] | None = None  # None until the first update

    def keep(self, step: int) -> float:
        """The share of the slow copy that an update at `step` keeps."""
        return self.decay ** self.every * (step / self.steps) ** 3

    @torch.no_grad()
    def after_step(self, step: int, epoch: int, epoch_ended: bool) -> None:
        """Called after each training step (`epoch` counted from 0; `epoch_ended`: the
        step was its epoch's last)."""
        due = step % self.every == 0
        if self._slow is None:
            if due and epoch >= self.start_epochs:
                self._slow = [tensor.detach().clone() for tensor in _float_tensors(self.model)]
            return
        if not (due or (epoch_ended and self.reset_each_epoch) or step == self.steps):
            return  # most steps: no walk over the model's state
        live = _float_tensors(self.model)  # fetched each time: .to() may replace buffers
        if due:
            torch._foreach_lerp_(self._slow, live, 1.0 - self.keep(step))
        torch._foreach_copy_(live, self._slow)

    def state_dict(self) -> dict[str, Any]:
        return {"slow": None if self._slow is None else [t.clone() for t in self._slow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        slow = state["slow"]
        if slow is None:
            self._slow = None
            return
        live = _float_tensors(self.model)
        if len(slow) != len(live):
            raise ValueError(f"lookahead state holds {len(slow)} tensors, the model "
                             f"{len(live)}")
        self._slow = [saved.to(mine.device, mine.dtype).clone()
                      for saved, mine in zip(slow, live, strict=True)]


def _float_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The model's parameters and floating-point buffers, in state_dict order (the step
    counters of BatchNorm are left alone)."""
    return [tensor for tensor in model.state_dict(keep_vars=True).values()
            if tensor.is_floating_point()]
