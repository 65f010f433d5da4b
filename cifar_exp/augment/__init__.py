"""Batched augmentations on tensors, on the training device.

Each module here registers a builder `f(train_images, **options) -> Augmentation`; the
training images (uint8, N x 3 x 32 x 32, on the device) are there for data statistics."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from cifar_exp.registry import Registry

AUGMENTATIONS = Registry("augmentation", __name__)


class Augmentation(Protocol):
    """Turns a uint8 batch N x 3 x 32 x 32 into the model's float input."""

    image_size: int

    def train(self, images: torch.Tensor, generator: torch.Generator,
              indices: torch.Tensor | None = None, epoch: int = 0) -> torch.Tensor:
        """A randomly augmented float batch for training. The trainer also passes which
        training images these are (`indices`) and the epoch they were drawn in, for
        augmentations that treat an image differently from one epoch to the next."""
        ...

    def eval(self, images: torch.Tensor) -> torch.Tensor:
        """The deterministic float batch for evaluation."""
        ...


def epoch_key(augmentation: Augmentation, epoch: int) -> int:
    """What of the epoch the augmentation's training batches depend on, for CUDA graphs of the
    data path (one is captured per key): an augmentation that knows says so with an
    `epoch_key(epoch)` method; one that does not is taken to depend on the epoch itself."""
    own = getattr(augmentation, "epoch_key", None)
    return int(own(epoch)) if own is not None else epoch


def build_augmentation(name: str, train_images: torch.Tensor, **options: Any) -> Augmentation:
    """Build the augmentation registered as `name`."""
    return AUGMENTATIONS.build(name, train_images, **options)
