"""The standard CIFAR recipe: reflect-pad, random crop back to full size, flip, normalize."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from cifar_exp.augment import AUGMENTATIONS
from cifar_exp.augment.ops import channel_stats, crop, normalize, random_flags, random_offsets
from cifar_exp.errors import ConfigError


class CropFlip:
    def __init__(self, padding: int, flip: bool, mean: list[float], std: list[float]) -> None:
        self.image_size = 32
        self.padding = padding
        self.flip = flip
        self.mean, self.std = mean, std

    def train(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        count, device = images.shape[0], images.device
        top = random_offsets(count, self.padding, generator, device, low=-self.padding)
        left = random_offsets(count, self.padding, generator, device, low=-self.padding)
        flip = random_flags(count, generator, device) if self.flip else None
        return normalize(crop(images, top, left, self.image_size, flip), self.mean, self.std)

    def per_image_transform(self) -> v2.Compose:
        steps = [v2.RandomCrop(self.image_size, padding=self.padding, padding_mode="reflect")]
        if self.flip:
            steps.append(v2.RandomHorizontalFlip())
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        return v2.Compose(steps)

    def eval(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.mean, self.std)


@AUGMENTATIONS.register("crop_flip")
def build(train_images: torch.Tensor, padding: int = 4, flip: bool = True,
          mean: list[float] | None = None, std: list[float] | None = None) -> CropFlip:
    if not 0 <= padding < train_images.shape[-1]:
        raise ConfigError(f"augmentation.padding={padding} must lie in "
                          f"0..{train_images.shape[-1] - 1}")
    mean, std = channel_stats(train_images, mean, std)
    return CropFlip(padding, flip, mean, std)
