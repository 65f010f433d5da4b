"""No augmentation: the full image, normalized per channel (for training and evaluation)."""

from __future__ import annotations

import torch

from cifar_exp.augment import AUGMENTATIONS
from cifar_exp.augment.ops import channel_stats, normalize


class NoAugmentation:
    def __init__(self, mean: list[float], std: list[float]) -> None:
        self.image_size = 32
        self.mean, self.std = mean, std

    def train(self, images: torch.Tensor, generator: torch.Generator,
              indices: torch.Tensor | None = None, epoch: int = 0) -> torch.Tensor:
        return self.eval(images)

    def epoch_key(self, epoch: int) -> int:
        return 0  # every epoch alike

    def eval(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.mean, self.std)


@AUGMENTATIONS.register("none")
def build(train_images: torch.Tensor, mean: list[float] | None = None,
          std: list[float] | None = None) -> NoAugmentation:
    mean, std = channel_stats(train_images, mean, std)
    return NoAugmentation(mean, std)
