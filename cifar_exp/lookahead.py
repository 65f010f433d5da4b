"""Lookahead-style weight averaging, as airbench94 trains: every `every` steps a slow copy
of the weights moves toward the trained ones, and the trained ones are reset to it.

At step t of T the slow copy keeps `decay ** every * (t / T) ** 3` of itself: early on it
simply follows the weights, late in training it averages over the last few dozen steps.
After the last step the weights become the slow copy. Floating-point buffers (BatchNorm
statistics) are averaged with the parameters."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Lookahead:
    def __init__(self, model: nn.Module, every: int, decay: float, steps: int) -> None:
        self.every, self.decay, self.steps = every, decay, steps
        self._slow = [tensor.detach().clone() for tensor in _float_tensors(model)]

    def keep(self, step: int) -> float:
        """The share of the slow copy that an update at `step` keeps."""
        return self.decay ** self.every * (step / self.steps) ** 3

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        """Average and reset `model`'s weights if `step` is one of every `every`; after
        the last step the weights become the slow copy."""
        live = _float_tensors(model)  # fetched each time: .to() may have replaced buffers
        if step % self.every == 0:
            torch._foreach_lerp_(self._slow, live, 1.0 - self.keep(step))
            torch._foreach_copy_(live, self._slow)
        elif step == self.steps:
            torch._foreach_copy_(live, self._slow)

    def state_dict(self) -> dict[str, Any]:
        return {"slow": [tensor.clone() for tensor in self._slow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        slow = state["slow"]
        if len(slow) != len(self._slow):
            raise ValueError(f"lookahead state holds {len(slow)} tensors, the model "
                             f"{len(self._slow)}")
        for mine, saved in zip(self._slow, slow, strict=True):
            mine.copy_(saved)


def _float_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The model's parameters and floating-point buffers, in state_dict order (the step
    counters of BatchNorm are left alone)."""
    return [tensor for tensor in model.state_dict(keep_vars=True).values()
            if tensor.is_floating_point()]
