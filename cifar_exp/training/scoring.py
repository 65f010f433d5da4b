"""Scores over a whole test set by name (precision@1, loss, precision@5), in large batches,
with one host sync; optionally with test-time augmentation (logits averaged over flipped
and shifted views). The predicted class of each image can be kept too: a run's results
per class are made from its final evaluation's predictions (tracking.class_results)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cifar_exp.augment import Augmentation
from cifar_exp.augment.ops import crop
from cifar_exp.speed import TTA_MODES
from cifar_exp.training.distributed import shard, share_buffers_of_main, sum_over_ranks
from cifar_exp.training.step import autocast
from cifar_exp.world import SINGLE, World


def _shifted(inputs: torch.Tensor, offset: int) -> torch.Tensor:
    """Each image moved by `offset` pixels down and right (negative: up and left), the
    border filled by reflection."""
    count, size = inputs.shape[0], inputs.shape[-1]
    corner = torch.full((count,), -offset, device=inputs.device)
    return crop(inputs, corner, corner, size)


def tta_views(inputs: torch.Tensor, mode: str) -> list[tuple[float, torch.Tensor]]:
    """(weight, view) pairs whose weighted logits make the prediction, weights summing to 1.

    flip: the image and its mirror, 1/2 each. flip_translate (airbench's level 2): half on
    those two, half on the same pair for the image shifted by one pixel up-left and by one
    down-right (1/8 each)."""
    if mode == "none":
        return [(1.0, inputs)]
    views = [(0.5, inputs), (0.5, inputs.flip(-1))]
    if mode == "flip":
        return views
    if mode != "flip_translate":
        raise ValueError(f"unknown test-time augmentation {mode!r}; use one of {TTA_MODES}")
    shifted = [_shifted(inputs, -1), _shifted(inputs, 1)]
    return ([(0.25, view) for _, view in views]
            + [(0.125, view) for image in shifted for view in (image, image.flip(-1))])


def tta_logits(model: nn.Module, inputs: torch.Tensor, tta: str = "none",
            memory_format: torch.memory_format = torch.contiguous_format,
            amp: str = "fp32") -> torch.Tensor:
    """The model's fp32 logits for `inputs`, averaged over the views of `tta`."""
    logits = None
    for weight, view in tta_views(inputs, tta):
        with autocast(inputs.device, amp):
            out = model(view.contiguous(memory_format=memory_format)).float()
        logits = weight * out if logits is None else logits + weight * out
    return logits


def _in_top(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """How many labels are among their image's `k` highest logits (all, with fewer classes)."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(1).sum()


# What score() reports, by name: each metric's sum over a batch of (fp32 logits, labels),
# which score() divides by the number of images. A new metric is one line here.
METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "precision": lambda logits, labels: (logits.argmax(1) == labels).sum(),
    "test_loss": lambda logits, labels: F.cross_entropy(logits, labels, reduction="sum"),
    "precision_top5": lambda logits, labels: _in_top(logits, labels, 5),
}


class Scored(NamedTuple):
    scores: dict[str, float]  # as score() returns them
    predicted: torch.Tensor  # each image's predicted class, in the images' order (int64)


@torch.no_grad()
def score(model: nn.Module, augmentation: Augmentation, images: torch.Tensor,
          labels: torch.Tensor, batch_size: int = 500, *,
          memory_format: torch.memory_format = torch.contiguous_format,
          amp: str = "fp32", tta: str = "none", world: World = SINGLE) -> dict[str, float]:
    """Each of METRICS over every image exactly once, by name: `precision` (@1, a
    fraction), `test_loss` (mean cross-entropy), `precision_top5` (a fraction).

    In a distributed `world` every rank must call it: each scores its part of the images
    with rank 0's BatchNorm statistics, and all get the totals over the ranks."""
    return score_with_predictions(model, augmentation, images, labels, batch_size,
                                  memory_format=memory_format, amp=amp, tta=tta,
                                  world=world).scores


@torch.no_grad()
def score_with_predictions(model: nn.Module, augmentation: Augmentation, images: torch.Tensor,
                           labels: torch.Tensor, batch_size: int = 500, *,
                           memory_format: torch.memory_format = torch.contiguous_format,
                           amp: str = "fp32", tta: str = "none",
                           world: World = SINGLE) -> Scored:
    """score()'s scores, and the class the model predicts for each image, in the same
    single pass: a final evaluation keeps them for the results per class instead of
    scoring the test set again. In a distributed `world` every rank gets every image's
    prediction (one more sum over the ranks, of one integer per image)."""
    count = labels.numel()
    if world.distributed:
        share_buffers_of_main(model)
        images, labels = shard(world, images), shard(world, labels)
    was_training = model.training
    model.eval()
    # One tensor for the sums and the count, so a distributed run adds them at once.
    totals = torch.zeros(len(METRICS) + 1, dtype=torch.float64, device=labels.device)
    predicted = []
    for image_batch, label_batch in zip(images.split(batch_size), labels.split(batch_size),
                                        strict=True):
        logits = tta_logits(model, augmentation.eval(image_batch), tta, memory_format, amp)
        totals[:-1] += torch.stack([batch_sum(logits, label_batch).double()
                                    for batch_sum in METRICS.values()])
        predicted.append(logits.argmax(1))
    model.train(was_training)
    totals[-1] = labels.numel()
    predictions = torch.cat(predicted) if predicted else labels.new_empty(0)
    if world.distributed:
        totals = sum_over_ranks(totals)
        predictions = _from_every_rank(world, predictions, count)
    *sums, scored = totals.tolist()
    return Scored({name: total / scored for name, total in zip(METRICS, sums, strict=True)},
                  predictions)


def _from_every_rank(world: World, part: torch.Tensor, count: int) -> torch.Tensor:
    """All `count` predictions, from each rank's contiguous `part` (shard's): each rank
    puts its part in place among zeros, and the sum over the ranks fills every place."""
    every = torch.zeros(count, dtype=part.dtype, device=part.device)
    shard(world, every).copy_(part)  # a view: the copy lands in `every`
    return sum_over_ranks(every)
