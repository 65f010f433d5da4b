"""The pipeline a user would otherwise write, for the benchmark to beat: a map-style
Dataset over the same uint8 arrays, per-image torchvision.transforms.v2 augmentation,
and torch.utils.data.DataLoader with worker processes and pinned memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset


class ArrayDataset(Dataset):
    """Images N x 3 x 32 x 32 uint8 and labels, transformed one image at a time."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
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
