"""Batched augmentations: crop geometry, flip rate and alternation, cutout, distortion ranges,
normalization."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cifar_exp.augment import AUGMENTATIONS, build_augmentation
from cifar_exp.augment.ops import (
    _channel_tensors,
    channel_stats,
    crop,
    cutout,
    normalize,
    per_image_standardization,
)
from cifar_exp.errors import ConfigError

COLUMNS = torch.arange(32, dtype=torch.uint8).mul(8).repeat(32, 1)  # value = 8 * column


def column_images(count: int) -> torch.Tensor:
    return COLUMNS.expand(count, 3, 32, 32).contiguous()


def test_crop_matches_numpy_reflect_padding():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    top = torch.tensor([-4, 0, 4, 3, -2, 1])
    left = torch.tensor([4, -4, 0, -1, 2, 3])
    flip = torch.tensor([False, True, False, True, True, False])
    got = crop(images, top, left, 32, flip).numpy()
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (4, 4), (4, 4)), mode="reflect")
    for i in range(6):
        window = padded[i, :, top[i] + 4 : top[i] + 36, left[i] + 4 : left[i] + 36]
        expected = window[:, :, ::-1] if flip[i] else window
        np.testing.assert_array_equal(got[i], expected)


def test_tf_distort_crop_size_flip_rate_and_standardization(cifar10):
    augmentation = build_augmentation("tf_distort", cifar10.train_images)
    generator = torch.Generator().manual_seed(0)
    out = augmentation.train(column_images(4000), generator)
    assert out.shape == (4000, 3, 24, 24) and out.dtype == torch.float32
    # Brightness, contrast and standardization keep the column order: a falling row = flipped.
    flipped = (out[:, 0, 0, 0] > out[:, 0, 0, -1]).float().mean().item()
    assert 0.45 < flipped < 0.55
    real = augmentation.train(cifar10.train_images[:512], generator)
    assert real.mean(dim=(1, 2, 3)).abs().max() < 1e-4
    assert torch.allclose(real.std(dim=(1, 2, 3), correction=0), torch.ones(512), atol=1e-3)


def test_tf_distort_crop_offsets_cover_the_whole_range():
    augmentation = build_augmentation("tf_distort", column_images(1), max_brightness=0.0,
                                      contrast_lower=1.0, contrast_upper=1.0, flip=False)
    out = augmentation.distort(column_images(2000), torch.Generator().manual_seed(1))
    offsets = (out[:, 0, 0, 0] / 8).round().long()
    assert sorted(offsets.unique().tolist()) == list(range(9))  # 32 - 24 + 1 positions


def test_tf_distort_brightness_range():
    augmentation = build_augmentation("tf_distort", column_images(1), contrast_lower=1.0,
                                      contrast_upper=1.0)
    black = torch.zeros(5000, 3, 32, 32, dtype=torch.uint8)
    delta = augmentation.distort(black, torch.Generator().manual_seed(2))[:, 0, 0, 0]
    assert delta.min() >= -63 and delta.max() <= 63
    assert delta.min() < -60 and delta.max() > 60 and abs(delta.mean()) < 2


def test_tf_distort_contrast_range(cifar10):
    augmentation = build_augmentation("tf_distort", cifar10.train_images, max_brightness=0.0,
                                      flip=False)
    images = column_images(3000)
    out = augmentation.distort(images, torch.Generator().manual_seed(3))
    # Each row is a ramp: contrast scales its spread about the mean by the factor.
    factor = (out[:, 0, 0, -1] - out[:, 0, 0, 0]) / (23 * 8)
    assert factor.min() >= 0.2 - 1e-5 and factor.max() <= 1.8 + 1e-5
    assert factor.min() < 0.25 and factor.max() > 1.75


def test_tf_distort_eval_is_the_central_crop_standardized(cifar10):
    augmentation = build_augmentation("tf_distort", cifar10.train_images)
    images = cifar10.test_images[:8]
    expected = per_image_standardization(images[:, :, 4:28, 4:28].float())
    torch.testing.assert_close(augmentation.eval(images), expected)


def test_per_image_standardization_floors_the_std():
    flat = torch.full((1, 3, 4, 4), 7.0)
    assert torch.equal(per_image_standardization(flat), torch.zeros_like(flat))


def test_crop_flip_pads_crops_flips_and_normalizes(cifar10):
    augmentation = build_augmentation("crop_flip", cifar10.train_images)
    generator = torch.Generator().manual_seed(4)
    out = augmentation.train(cifar10.train_images[:2000], generator)
    assert out.shape == (2000, 3, 32, 32)
    channel_mean = out.mean(dim=(0, 2, 3))
    channel_std = out.std(dim=(0, 2, 3))
    assert channel_mean.abs().max() < 0.05 and (channel_std - 1).abs().max() < 0.05
    ramps = augmentation.train(column_images(4000), generator)
    flipped = (ramps[:, 0, 16, 10] > ramps[:, 0, 16, 20]).float().mean().item()
    assert 0.45 < flipped < 0.55


def test_none_normalizes_only(cifar10):
    augmentation = build_augmentation("none", cifar10.train_images)
    images = cifar10.test_images[:4]
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(augmentation.train(images, generator), augmentation.eval(images))
    assert augmentation.image_size == 32


def test_channel_stats_are_exact_and_keep_configured_values(cifar10):
    mean, std = channel_stats(cifar10.train_images[:1000])
    scaled = cifar10.train_images[:1000].double() / 255
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64),
                               scaled.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64),
                               scaled.std(dim=(0, 2, 3), correction=0))
    assert channel_stats(cifar10.train_images, [0.5] * 3, [0.25] * 3) == ([0.5] * 3, [0.25] * 3)


@pytest.mark.parametrize("name", AUGMENTATIONS.names())
def test_every_augmentation_is_deterministic_for_a_seed(name, cifar10):
    augmentation = build_augmentation(name, cifar10.train_images)
    batch = cifar10.train_images[:64]
    first = augmentation.train(batch, torch.Generator().manual_seed(9))
    second = augmentation.train(batch, torch.Generator().manual_seed(9))
    assert torch.equal(first, second)
    assert first.shape[-1] == augmentation.image_size


@pytest.mark.parametrize("name,options,message", [
    ("tf_distort", {"crop_size": 40}, "augmentation.crop_size=40 must lie in 1..32"),
    ("tf_distort", {"contrast_lower": 2.0}, "must satisfy 0 <= lower <= upper"),
    ("crop_flip", {"padding": -1}, "augmentation.padding=-1 must lie in 0..31"),
    ("crop_flip", {"cutout": 33}, "augmentation.cutout=33 must lie in 0..32"),
    ("crop_flip", {"flip": False, "alternating_flip": True}, "alternating_flip=true needs"),
])
def test_impossible_options_are_refused(name, options, message):
    with pytest.raises(ConfigError, match=message):
        build_augmentation(name, column_images(2), **options)


def mirrored(out: torch.Tensor) -> torch.Tensor:
    """Which outputs of column_images() are mirrored: their ramp falls."""
    return out[:, 0, 16, 10] > out[:, 0, 16, 20]


def test_alternating_flip_mirrors_each_image_every_other_epoch():
    torch.manual_seed(0)
    augmentation = build_augmentation("crop_flip", column_images(4000), padding=2,
                                      alternating_flip=True)
    images, indices = column_images(4000), torch.arange(4000)
    generator = torch.Generator().manual_seed(5)
    by_epoch = [mirrored(augmentation.train(images, generator, indices, epoch))
                for epoch in range(4)]
    assert 0.45 < by_epoch[0].float().mean() < 0.55  # a seeded coin per image, once
    assert torch.equal(by_epoch[1], ~by_epoch[0])  # then each image the other way round
    assert torch.equal(by_epoch[2], by_epoch[0]) and torch.equal(by_epoch[3], by_epoch[1])
    # The pattern belongs to the image, not to its place in the batch.
    shuffled = torch.randperm(4000)
    again = mirrored(augmentation.train(images[shuffled], generator, shuffled, 1))
    assert torch.equal(again, by_epoch[1][shuffled])
    # The run's seed decides the first flips.
    torch.manual_seed(1)
    other = build_augmentation("crop_flip", column_images(4000), alternating_flip=True)
    assert not torch.equal(other.first_flips, augmentation.first_flips)


def test_translate_moves_by_up_to_padding_pixels():
    augmentation = build_augmentation("crop_flip", column_images(1), padding=2, flip=False,
                                      mean=[0.0] * 3, std=[1 / 255] * 3)
    out = augmentation.train(column_images(3000), torch.Generator().manual_seed(6))
    # Column 10 of the output is column 10 + dx of the image (value 8 * column).
    shift = (out[:, 0, 16, 10] / 8 - 10).round().long()
    assert sorted(shift.unique().tolist()) == [-2, -1, 0, 1, 2]
    counts = torch.bincount(shift + 2).float()
    assert counts.min() > 0.8 * counts.mean()  # uniform over the 5 positions


def test_cutout_zeroes_one_square_inside_each_image():
    augmentation = build_augmentation("crop_flip", column_images(1), padding=0, flip=False,
                                      cutout=12, mean=[0.0] * 3, std=[1.0] * 3)
    white = torch.full((2000, 3, 32, 32), 255, dtype=torch.uint8)
    out = augmentation.train(white, torch.Generator().manual_seed(7))
    zeroed = out == 0
    assert torch.equal(zeroed.sum(dim=(1, 2, 3)), torch.full((2000,), 3 * 12 * 12))
    rows, cols = zeroed[:, 0].any(2), zeroed[:, 0].any(1)  # N x 32: the square's extent
    assert torch.equal(rows.sum(1), torch.full((2000,), 12))
    assert torch.equal(cols.sum(1), torch.full((2000,), 12))
    tops = rows.float().argmax(1)
    assert sorted(tops.unique().tolist()) == list(range(21))  # every corner, inside only


def test_cutout_op_matches_slicing():
    images = torch.randn(3, 2, 10, 10)
    top, left = torch.tensor([0, 3, 6]), torch.tensor([6, 0, 2])
    expected = images.clone()
    for i in range(3):
        expected[i, :, top[i] : top[i] + 4, left[i] : left[i] + 4] = 0
    torch.testing.assert_close(cutout(images, top, left, 4), expected)


def test_normalize_makes_its_channel_constants_once_per_device():
    images = column_images(2)
    mean, std = [0.5, 0.25, 0.125], [0.25, 0.5, 1.0]
    out = normalize(images, mean, std)
    expected = torch.stack([(images[:, c].float() / 255 - mean[c]) / std[c] for c in range(3)], 1)
    torch.testing.assert_close(out, expected)
    # The constants are made once, then reused: no copy from the host each batch (inside a
    # CUDA graph's capture such a copy is not allowed).
    first = _channel_tensors(images.device, tuple(mean), tuple(std))
    normalize(images, mean, std)
    assert _channel_tensors(images.device, tuple(mean), tuple(std))[0] is first[0]


def test_exporting_twice_keeps_no_traced_constant_in_the_cache():
    # The channel constants made while torch.export traces are the trace's own: a cached
    # one would be a fake tensor that the next export (or an eager call) finds.
    from cifar_exp.augment import ops

    class Normalized(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return ops.normalize(images, [0.25, 0.5, 0.75], [0.5, 0.5, 0.5])

    ops._channel_tensors.cache_clear()
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    for _ in range(2):
        program = torch.export.export(Normalized(), (images,))
        torch.testing.assert_close(program.module()(images), Normalized()(images))
    assert Normalized()(images)[0, :, 0, 0].tolist() == [1.5, 1.0, 0.5]
