"""Model registry: each module here registers a builder `f(num_classes, image_size, **options)`.

Three optional model methods are hooks for the rest of the framework:
`regularization_loss()` (added to the training loss), `initialize_from_data(images)`
(called once, before training, with normalized training images) and
`frozen_parameters(epoch)` (parameters that get no update in that epoch)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cifar_exp.registry import Registry

MODELS = Registry("model", __name__)


def build_model(name: str, num_classes: int, image_size: int, **options: Any) -> nn.Module:
    """Build the model registered as `name` for images of `image_size` pixels square."""
    return MODELS.build(name, num_classes, image_size, **options)


def regularization_loss(model: nn.Module) -> torch.Tensor | float:
    """The model's own penalty term (e.g. the TF tutorial's L2 on two layers), or 0 if it
    has none."""
    penalty = getattr(model, "regularization_loss", None)
    return penalty() if penalty is not None else 0.0


def wants_data(model: nn.Module) -> bool:
    """Whether `model` initializes part of itself from the training images."""
    return callable(getattr(model, "initialize_from_data", None))


@torch.no_grad()
def initialize_from_data(model: nn.Module, images: torch.Tensor) -> None:
    """Let `model` set weights from training images (float N x 3 x H x W, normalized as its
    evaluation inputs are), e.g. a whitening layer from their patch covariance; models
    without an `initialize_from_data` method are left as they are."""
    if wants_data(model):
        model.initialize_from_data(images)


def frozen_parameters(model: nn.Module, epoch: int) -> list[nn.Parameter]:
    """The parameters `model` keeps fixed during `epoch` (counted from 0), e.g. airbench's
    whitening bias after its first epochs; none for models without the hook."""
    frozen = getattr(model, "frozen_parameters", None)
    return frozen(epoch) if frozen is not None else []
