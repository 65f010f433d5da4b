"""The DataLoader baseline: per-image torchvision pipelines that draw what the batched
augmentations draw."""

from __future__ import annotations

import pytest
import torch

from cifar_exp.augment import AUGMENTATIONS, build_augmentation
from cifar_exp.errors import ConfigError
from cifar_exp.tools.loader_baseline import ArrayDataset, endless_batches, per_image_transform


@pytest.mark.parametrize("name", AUGMENTATIONS.names())
def test_per_image_torchvision_equivalent(name, cifar10):
    augmentation = build_augmentation(name, cifar10.train_images)
    transform = per_image_transform(augmentation)
    torch.manual_seed(0)
    images = cifar10.train_images[:300]
    out = torch.stack([transform(image) for image in images])
    batched = augmentation.train(images, torch.Generator().manual_seed(0))
    assert out.shape == batched.shape and out.dtype == batched.dtype
    # Same distribution: both standardized, per image (tf_distort) or per channel.
    assert abs(out.mean() - batched.mean()) < 0.05 and abs(out.std() - batched.std()) < 0.05
    if name == "none":
        torch.testing.assert_close(out, augmentation.eval(images))
    if name == "tf_distort":
        assert out.mean(dim=(1, 2, 3)).abs().max() < 1e-4


def test_per_image_cutout_equivalent(cifar10):
    augmentation = build_augmentation("crop_flip", cifar10.train_images, cutout=8,
                                      mean=[0.0] * 3, std=[1.0] * 3)
    transform = per_image_transform(augmentation)
    white = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    assert (transform(white) == 0).sum() == 3 * 8 * 8


def test_an_augmentation_without_an_equivalent_is_refused_in_one_line():
    class Unknown:
        image_size = 32

    with pytest.raises(ConfigError, match="no per-image equivalent of Unknown"):
        per_image_transform(Unknown())


def test_endless_batches_cross_epochs_with_full_shuffled_batches(cifar10):
    augmentation = build_augmentation("none", cifar10.train_images)
    # Each image labelled with its own index, to see which images a batch holds.
    dataset = ArrayDataset(cifar10.train_images[:10], torch.arange(10),
                           per_image_transform(augmentation))
    batches = endless_batches(dataset, 4, num_workers=0, pin_memory=False)
    drawn = [next(batches)[1] for _ in range(4)]  # 2 full batches an epoch, 2 epochs
    assert all(batch.shape == (4,) for batch in drawn)
    epochs = [torch.cat(drawn[:2]).tolist(), torch.cat(drawn[2:]).tolist()]
    assert all(len(set(epoch)) == 8 for epoch in epochs)  # no image twice in an epoch
    assert epochs[0] != epochs[1]  # a new order each epoch
