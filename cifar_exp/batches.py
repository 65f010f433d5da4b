"""Mini-batches drawn on the training device: one seeded permutation per epoch."""

from __future__ import annotations

import torch


class EpochSampler:
    """Yields index tensors of `batch_size`, walking a fresh random permutation of the
    training set each epoch; the last partial batch of an epoch is dropped so every step
    has the same shape."""

    def __init__(self, num_items: int, batch_size: int, generator: torch.Generator,
                 device: torch.device) -> None:
        if batch_size > num_items:
            raise ValueError(f"batch_size {batch_size} exceeds the {num_items} training images")
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
