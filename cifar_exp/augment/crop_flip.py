"""The standard CIFAR recipe: reflect-pad, random crop back to full size (a random
translation by up to `padding` pixels), flip, normalize; optionally airbench's alternating
flip and cutout."""

from __future__ import annotations

import torch

from cifar_exp.augment import AUGMENTATIONS
from cifar_exp.augment.ops import (
    channel_stats,
    crop,
    cutout,
    normalize,
    random_flags,
    random_offsets,
)
from cifar_exp.errors import ConfigError


class CropFlip:
    def __init__(self, padding: int, flip: bool, mean: list[float], std: list[float],
                 cutout: int = 0, first_flips: torch.Tensor | None = None) -> None:
        self.image_size = 32
        self.padding = padding
        self.flip = flip
        self.mean, self.std = mean, std
        self.cutout = cutout
        # Alternating flip: image i is mirrored in even epochs iff first_flips[i], and the
        # other way round in odd epochs, so it is seen both ways in any two epochs in a row.
        self.first_flips = first_flips

    def flips(self, count: int, generator: torch.Generator, device: torch.device,
              indices: torch.Tensor | None, epoch: int) -> torch.Tensor | None:
        """Which images of the batch to mirror (None: none)."""
        if not self.flip:
            return None
        if self.first_flips is None or indices is None:  # a batch the trainer did not draw
            return random_flags(count, generator, device)
        return self.first_flips[indices] ^ (epoch % 2 == 1)

    def epoch_key(self, epoch: int) -> int:
        """Alternating flips differ between even and odd epochs; nothing else does."""
        return epoch % 2 if self.first_flips is not None else 0

    def train(self, images: torch.Tensor, generator: torch.Generator,
              indices: torch.Tensor | None = None, epoch: int = 0) -> torch.Tensor:
        count, device = images.shape[0], images.device
        top = random_offsets(count, self.padding, generator, device, low=-self.padding)
        left = random_offsets(count, self.padding, generator, device, low=-self.padding)
        flip = self.flips(count, generator, device, indices, epoch)
        out = normalize(crop(images, top, left, self.image_size, flip), self.mean, self.std)
        if self.cutout:
            limit = self.image_size - self.cutout
            top = random_offsets(count, limit, generator, device)
            left = random_offsets(count, limit, generator, device)
            out = cutout(out, top, left, self.cutout)
        return out

    def eval(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.mean, self.std)


@AUGMENTATIONS.register("crop_flip")
def build(train_images: torch.Tensor, *, padding: int = 4, flip: bool = True,
          alternating_flip: bool = False, cutout: int = 0, mean: list[float] | None = None,
          std: list[float] | None = None) -> CropFlip:
    side = train_images.shape[-1]
    if not 0 <= padding < side:
        raise ConfigError(f"augmentation.padding={padding} must lie in 0..{side - 1}")
    if not 0 <= cutout <= side:
        raise ConfigError(f"augmentation.cutout={cutout} must lie in 0..{side}")
    if alternating_flip and not flip:
        raise ConfigError("augmentation.alternating_flip=true needs augmentation.flip=true")
    mean, std = channel_stats(train_images, mean, std)
    first_flips = None
    if alternating_flip:  # seeded by the run's seed (build_parts seeds torch first)
        first_flips = (torch.rand(train_images.shape[0]) < 0.5).to(train_images.device)
    return CropFlip(padding, flip, mean, std, cutout, first_flips)
