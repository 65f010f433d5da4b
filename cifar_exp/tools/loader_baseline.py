"""The pipeline a user would otherwise write, for the benchmark to beat: a map-style
Dataset over the same uint8 arrays, per-image torchvision.transforms.v2 augmentation
equivalent to the batched one, and torch.utils.data.DataLoader with worker processes and
pinned memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from cifar_exp.augment import Augmentation
from cifar_exp.augment.crop_flip import CropFlip
from cifar_exp.augment.none import NoAugmentation
from cifar_exp.augment.ops import cutout, per_image_standardization
from cifar_exp.augment.tf_distort import TfDistort
from cifar_exp.errors import ConfigError

Transform = Callable[[torch.Tensor], torch.Tensor]


class ArrayDataset(Dataset):
    """Images N x 3 x 32 x 32 uint8 and labels, transformed one image at a time."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index]), self.labels[index]


def endless_batches(dataset: Dataset, batch_size: int, num_workers: int, pin_memory: bool,
                    seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled full batches, epoch after epoch, as a training loop would draw them."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=num_workers, pin_memory=pin_memory,
                        persistent_workers=num_workers > 0,
                        generator=torch.Generator().manual_seed(seed))
    while True:
        yield from loader


def per_image_transform(augmentation: Augmentation) -> Transform:
    """The torchvision.transforms.v2 pipeline (uint8 3x32x32 -> float) that draws, one image
    at a time, what `augmentation.train` draws for a whole batch."""
    if isinstance(augmentation, TfDistort):
        return _tf_distort(augmentation)
    if isinstance(augmentation, CropFlip):
        return _crop_flip(augmentation)
    if isinstance(augmentation, NoAugmentation):
        return v2.Compose([v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(augmentation.mean, augmentation.std)])
    raise ConfigError(f"the DataLoader baseline has no per-image equivalent of "
                      f"{type(augmentation).__name__}; benchmark another augmentation")


def _tf_distort(augmentation: TfDistort) -> Transform:
    steps: list[Transform] = [v2.RandomCrop(augmentation.image_size)]
    if augmentation.flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32), _Brightness(augmentation.max_brightness),
              _Contrast(*augmentation.contrast), _standardize]
    return v2.Compose(steps)


def _crop_flip(augmentation: CropFlip) -> Transform:
    # One image at a time there is no epoch to alternate with: a coin per image.
    steps: list[Transform] = [v2.RandomCrop(augmentation.image_size,
                                            padding=augmentation.padding,
                                            padding_mode="reflect")]
    if augmentation.flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True),
              v2.Normalize(augmentation.mean, augmentation.std)]
    if augmentation.cutout:
        steps.append(_Cutout(augmentation.cutout))
    return v2.Compose(steps)


# Per-image versions of the steps torchvision lacks.
class _Brightness:
    def __init__(self, max_delta: float) -> None:
        self.max_delta = max_delta

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image + (torch.rand(()) * 2 - 1) * self.max_delta


class _Contrast:
    def __init__(self, lower: float, upper: float) -> None:
        self.lower, self.upper = lower, upper

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        factor = torch.rand(()) * (self.upper - self.lower) + self.lower
        mean = image.mean(dim=(1, 2), keepdim=True)
        return (image - mean) * factor + mean


class _Cutout:
    """A square inside the image, zeroed."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        corner = torch.randint(0, image.shape[-1] - self.size + 1, (2,))
        return cutout(image[None], corner[:1], corner[1:], self.size)[0]


def _standardize(image: torch.Tensor) -> torch.Tensor:
    return per_image_standardization(image[None])[0]
