"""Precision@1 and loss over a whole test set, in large batches, with one host sync."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cifar_exp.augment import Augmentation
from cifar_exp.step import autocast


@torch.no_grad()
def evaluate(model: nn.Module, augmentation: Augmentation, images: torch.Tensor,
             labels: torch.Tensor, batch_size: int = 500,
             memory_format: torch.memory_format = torch.contiguous_format,
             precision: str = "fp32") -> tuple[float, float]:
    """Return (precision@1, mean cross-entropy) over every image exactly once."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=labels.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=labels.device)
    for image_batch, label_batch in zip(images.split(batch_size), labels.split(batch_size),
                                        strict=True):
        inputs = augmentation.eval(image_batch).contiguous(memory_format=memory_format)
        with autocast(labels.device, precision):
            logits = model(inputs).float()
        correct += (logits.argmax(1) == label_batch).sum()
        loss_sum += F.cross_entropy(logits, label_batch, reduction="sum").double()
    model.train(was_training)
    count = labels.numel()
    return correct.item() / count, loss_sum.item() / count
