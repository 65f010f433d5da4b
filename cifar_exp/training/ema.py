"""Exponential moving average of the weights, as tf.train.ExponentialMovingAverage with
num_updates: the decay ramps up as min(decay, (1 + n) / (10 + n)) so early averages
are not dominated by the random initialisation."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """A shadow copy of a model whose parameters trail the trained ones."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._shadow = list(self.model.parameters())
        self._shadow_buffers = list(self.model.buffers())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._shadow, list(model.parameters()), 1.0 - decay)
        for shadow, current in zip(self._shadow_buffers, model.buffers(), strict=True):
            shadow.copy_(current)  # e.g. batch-norm statistics follow the live model

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
