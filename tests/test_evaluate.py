"""Evaluation sees every test image exactly once."""

from __future__ import annotations

import math

import pytest
import torch

from cifar_exp.augment import build_augmentation
from cifar_exp.evaluate import evaluate


class ConstantClassifier(torch.nn.Module):
    """Always answers class 3 with logits (0, ..., 0, 1 at class 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 10)
        logits[:, 3] = 1.0
        return logits


@pytest.mark.parametrize("batch_size", [500, 3000, 10_000])
def test_whole_test_set_exactly_once(cifar10, batch_size):
    augmentation = build_augmentation("tf_distort", cifar10.train_images)
    precision, loss = evaluate(ConstantClassifier(), augmentation, cifar10.test_images,
                               cifar10.test_labels, batch_size)
    assert precision == 0.1  # 1,000 of the 10,000 test images are cats
    # These logits' cross-entropy is log(9 + e) - 1 for the cats, log(9 + e) for the rest.
    expected = math.log(9 + math.e) - 0.1
    assert loss == pytest.approx(expected, rel=1e-6)


def test_evaluation_restores_training_mode(cifar10):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 24 * 24, 10))
    augmentation = build_augmentation("tf_distort", cifar10.train_images)
    model.train()
    evaluate(model, augmentation, cifar10.test_images[:100], cifar10.test_labels[:100])
    assert model.training
