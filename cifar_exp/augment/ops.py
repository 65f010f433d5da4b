"""Whole-batch image operations shared by the augmentations: no per-image Python."""

from __future__ import annotations

import functools

import torch


def crop(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int,
         flip: torch.Tensor | None = None) -> torch.Tensor:
    """Cut a size x size window at (top, left) from each image, optionally mirrored.

    Offsets may reach past the border (negative, or beyond the edge): those pixels are
    reflected back inside, as reflect padding would give, without materialising a pad."""
    height, width = images.shape[-2:]
    steps = torch.arange(size, device=images.device)
    rows = _reflect(top[:, None] + steps, height)
    cols = left[:, None] + steps
    if flip is not None:
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    cols = _reflect(cols, width)
    flat = (rows[:, :, None] * width + cols[:, None, :]).flatten(1)  # N x size*size
    channels = images.shape[1]
    pixels = images.flatten(2).gather(2, flat[:, None, :].expand(-1, channels, -1))
    return pixels.view(images.shape[0], channels, size, size)


def _reflect(index: torch.Tensor, length: int) -> torch.Tensor:
    index = index.abs()
    return torch.where(index >= length, 2 * (length - 1) - index, index)


def random_offsets(count: int, limit: int, generator: torch.Generator,
                   device: torch.device, low: int = 0) -> torch.Tensor:
    """Uniform integer offsets in [low, limit]."""
    return torch.randint(low, limit + 1, (count,), generator=generator, device=device)


def random_flags(count: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """A fair coin per image."""
    return torch.rand(count, generator=generator, device=device) < 0.5


def cutout(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
           size: int) -> torch.Tensor:
    """Zero a size x size square at (top, left) of each image: on normalized images, the
    mean colour."""
    height, width = images.shape[-2:]
    rows = torch.arange(height, device=images.device) - top[:, None]
    cols = torch.arange(width, device=images.device) - left[:, None]
    inside = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None]
    return images.masked_fill(inside[:, None], 0)


def random_uniform(count: int, low: float, high: float, generator: torch.Generator,
                   device: torch.device) -> torch.Tensor:
    """One value per image in [low, high), shaped to broadcast over N x C x H x W."""
    values = torch.rand(count, generator=generator, device=device) * (high - low) + low
    return values.view(count, 1, 1, 1)


def per_image_standardization(images: torch.Tensor) -> torch.Tensor:
    """tf.image.per_image_standardization: (x - mean) / max(std, 1/sqrt(numel)) per image."""
    numel = images[0].numel()
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    std = images.std(dim=(1, 2, 3), keepdim=True, correction=0)
    return (images - mean) / std.clamp(min=numel**-0.5)


def channel_stats(images: torch.Tensor, mean: list[float] | None = None,
                  std: list[float] | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images on the [0, 1] scale; values given by the
    config are kept, the others measured exactly from a histogram of each channel."""
    if mean is not None and std is not None:
        return list(mean), list(std)
    values = torch.arange(256, dtype=torch.float64, device=images.device) / 255
    counts = torch.stack(
        [torch.bincount(images[:, c].flatten(), minlength=256) for c in range(images.shape[1])]
    ).double()
    total = counts.sum(1)
    measured_mean = (counts * values).sum(1) / total
    measured_std = ((counts * values.square()).sum(1) / total - measured_mean.square()).sqrt()
    return list(mean or measured_mean.tolist()), list(std or measured_std.tolist())


def normalize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 -> float on [0, 1], then (x - mean) / std per channel."""
    # Under torch.export or torch.compile the constants are the trace's own: one kept in
    # the cache would be a fake tensor that the next export finds.
    make = _channel_tensors.__wrapped__ if torch.compiler.is_compiling() else _channel_tensors
    mean_t, std_t = make(images.device, tuple(mean), tuple(std))
    return (images.float() / 255 - mean_t) / std_t


@functools.lru_cache(maxsize=16)
def _channel_tensors(device: torch.device, mean: tuple[float, ...],
                     std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel constants on the device, made once: a copy from the host each batch
    would cost a transfer, and inside a CUDA graph's capture it is not allowed."""
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1),
            torch.tensor(std, device=device).view(1, -1, 1, 1))
