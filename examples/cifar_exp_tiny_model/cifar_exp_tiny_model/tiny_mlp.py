"""A one-hidden-layer perceptron: small enough to train a few steps anywhere."""

from __future__ import annotations

from torch import nn


def build(num_classes: int, image_size: int, hidden: int = 128) -> nn.Module:
    """The builder cifar_exp calls for `model=tiny_mlp`; `hidden` is an option of the YAML
    (conf/model/tiny_mlp.yaml), so `model.hidden=256` changes it."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(3 * image_size * image_size, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
