"""The TF tutorial's distortions: random crop, flip, brightness, contrast, per-image
standardization."""

from __future__ import annotations

import torch

from cifar_exp.augment import AUGMENTATIONS
from cifar_exp.augment.ops import (
    crop,
    per_image_standardization,
    random_flags,
    random_offsets,
    random_uniform,
)
from cifar_exp.errors import ConfigError


class TfDistort:
    def __init__(self, crop_size: int, flip: bool, max_brightness: float,
                 contrast_lower: float, contrast_upper: float) -> None:
        self.image_size = crop_size
        self.flip = flip
        self.max_brightness = max_brightness
        self.contrast = (contrast_lower, contrast_upper)

    def train(self, images: torch.Tensor, generator: torch.Generator,
              indices: torch.Tensor | None = None, epoch: int = 0) -> torch.Tensor:
        return per_image_standardization(self.distort(images, generator))

    def epoch_key(self, epoch: int) -> int:
        return 0  # every epoch alike

    def distort(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Crop, flip, brightness and contrast, before standardization (0..255 scale)."""
        count, device = images.shape[0], images.device
        limit = images.shape[-1] - self.image_size
        top = random_offsets(count, limit, generator, device)
        left = random_offsets(count, limit, generator, device)
        flip = random_flags(count, generator, device) if self.flip else None
        x = crop(images, top, left, self.image_size, flip).float()  # 0..255 scale, as in TF
        x = x + random_uniform(count, -self.max_brightness, self.max_brightness, generator, device)
        factor = random_uniform(count, *self.contrast, generator, device)
        channel_mean = x.mean(dim=(2, 3), keepdim=True)
        return (x - channel_mean) * factor + channel_mean

    def eval(self, images: torch.Tensor) -> torch.Tensor:
        count, device = images.shape[0], images.device
        offset = torch.full((count,), (images.shape[-1] - self.image_size) // 2, device=device)
        return per_image_standardization(crop(images, offset, offset, self.image_size).float())


@AUGMENTATIONS.register("tf_distort")
def build(train_images: torch.Tensor, crop_size: int = 24, flip: bool = True,
          max_brightness: float = 63.0, contrast_lower: float = 0.2,
          contrast_upper: float = 1.8) -> TfDistort:
    side = train_images.shape[-1]
    if not 1 <= crop_size <= side:
        raise ConfigError(f"augmentation.crop_size={crop_size} must lie in 1..{side}, "
                          f"the size of the images")
    if not 0 <= contrast_lower <= contrast_upper:
        raise ConfigError(f"augmentation.contrast_lower={contrast_lower} and contrast_upper="
                          f"{contrast_upper} must satisfy 0 <= lower <= upper")
    return TfDistort(crop_size, flip, max_brightness, contrast_lower, contrast_upper)
