"""Optimizer registry: each module here registers a builder `f(params, lr, **options)`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from cifar_exp.registry import Registry

OPTIMIZERS = Registry("optimizer", __name__)


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter] | Iterable[dict],
                    **options: Any) -> torch.optim.Optimizer:
    """Build the optimizer registered as `name` over `params` (tensors or parameter groups)."""
    return OPTIMIZERS.build(name, params, **options)
