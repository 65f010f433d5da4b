"""Model registry: each module here registers a builder `f(num_classes, image_size, **options)`."""

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
    """The model's own penalty term (e.g. the seed's L2 on two layers), or 0 if it has none."""
    penalty = getattr(model, "regularization_loss", None)
    return penalty() if penalty is not None else 0.0
