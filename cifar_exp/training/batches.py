"""Mini-batches drawn on the training device: one seeded permutation per epoch, and the
data path that turns the drawn indices into a step's inputs and labels."""

from __future__ import annotations

from typing import Any

import torch

from cifar_exp.augment import Augmentation, epoch_key
from cifar_exp.data import CifarData
from cifar_exp.training.distributed import shard
from cifar_exp.world import SINGLE, World


class EpochSampler:
    """Yields index tensors of `batch_size` (at most `num_items`: build_parts refuses a
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


class BatchMaker:
    """The data path of a step: `batches(indices, epoch) -> (inputs, labels)`, the drawn
    training images gathered and augmented (under torchrun, this rank's slice of the global
    batch), in the activation layout, with their labels. The step is built with it
    (cifar_exp.training.step). Every op runs on the device, so with CUDA graphs the whole
    path is captured with the step."""

    def __init__(self, data: CifarData, augmentation: Augmentation,
                 generator: torch.Generator, layout: torch.memory_format,
                 world: World = SINGLE) -> None:
        self.images, self.labels = data.train_images, data.train_labels
        self.augmentation, self.generator = augmentation, generator
        self.layout, self.world = layout, world

    def __call__(self, indices: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.augmentation.train(self.images[indices], self.generator, indices, epoch)
        labels = self.labels[indices]
        if self.world.distributed:  # the global batch was drawn whole: keep this rank's slice
            inputs, labels = shard(self.world, inputs), shard(self.world, labels)
        return inputs.contiguous(memory_format=self.layout), labels

    def epoch_key(self, epoch: int) -> int:
        """What of the epoch the batches depend on (a graph of the path is kept per key)."""
        return epoch_key(self.augmentation, epoch)
