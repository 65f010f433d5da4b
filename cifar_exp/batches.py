"""Mini-batches drawn on the training device: one seeded permutation per epoch."""

from __future__ import annotations

from typing import Any

import torch


class EpochSampler:
    """Yields index tensors of `batch_size` (at most `num_items`: build_experiment refuses a
    larger batch), walking a fresh random permutation of the training set each epoch; the
    last partial batch of an epoch is dropped so every step has the same shape."""

    def __init__(self, num_items: int, batch_size: int, generator: torch.Generator,
                 device: torch.device) -> None:
        self.num_items, self.batch_size = num_items, batch_size
        self.generator, self.device = generator, device
        self.epoch = 0
        self._order = self._permutation()
        self._position = 0

    def _permutation(self) -> torch.Tensor:
        return torch.randperm(self.num_items, generator=self.generator, device=self.device)

    def next(self) -> torch.Tensor:
        if self._position + self.batch_size > self.num_items:
            self.epoch += 1
            self._order = self._permutation()
            self._position = 0
        indices = self._order[self._position : self._position + self.batch_size]
        self._position += self.batch_size
        return indices

    @property
    def epoch_ended(self) -> bool:
        """Whether the batch just drawn was its epoch's last."""
        return self._position + self.batch_size > self.num_items

    def state_dict(self) -> dict[str, Any]:
        """Where the walk stands: this epoch's permutation, the position in it, the epoch.
        (The generator's own state is saved by whoever owns the generator.)"""
        return {"order": self._order.cpu(), "position": self._position, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        order = state["order"]
        if order.shape != (self.num_items,):
            raise ValueError(f"sampler state walks {order.numel()} items, not {self.num_items}")
        self._order = order.to(self.device)
        self._position, self.epoch = int(state["position"]), int(state["epoch"])
