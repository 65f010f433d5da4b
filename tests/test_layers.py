"""TF-exact layers against direct NumPy formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cifar_exp.models.layers import LocalResponseNorm, MaxPoolSame, same_padding


def numpy_lrn(x: np.ndarray, radius: int, bias: float, alpha: float, beta: float) -> np.ndarray:
    """tf.nn.lrn's documented formula, channel by channel (NCHW)."""
    out = np.empty_like(x)
    channels = x.shape[1]
    for c in range(channels):
        window = x[:, max(0, c - radius) : min(channels, c + radius + 1)]
        out[:, c] = x[:, c] / (bias + alpha * (window**2).sum(axis=1)) ** beta
    return out


def numpy_max_pool_same(x: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    """TF 'SAME' max pooling: output ceil(n / stride), the odd padding row/column at the end."""
    n, c, h, w = x.shape
    out_h, out_w = -(-h // stride), -(-w // stride)
    pad_h = max((out_h - 1) * stride + kernel - h, 0)
    pad_w = max((out_w - 1) * stride + kernel - w, 0)
    top, left = pad_h // 2, pad_w // 2
    out = np.empty((n, c, out_h, out_w), dtype=x.dtype)
    for i in range(out_h):
        for j in range(out_w):
            r0, c0 = i * stride - top, j * stride - left
            rows = slice(max(r0, 0), min(r0 + kernel, h))
            cols = slice(max(c0, 0), min(c0 + kernel, w))
            out[:, :, i, j] = x[:, :, rows, cols].max(axis=(2, 3))
    return out


@pytest.mark.parametrize("channels", [64, 5])
def test_lrn_matches_tf_formula(channels):
    x = np.random.default_rng(0).normal(0, 3, (2, channels, 4, 5)).astype(np.float32)
    layer = LocalResponseNorm(4, bias=1.0, alpha=0.001 / 9, beta=0.75)
    expected = numpy_lrn(x, 4, 1.0, 0.001 / 9, 0.75)
    got = layer(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_lrn_matches_torch_with_scaled_alpha():
    # PyTorch averages over the window where TF sums: alpha_torch = alpha_tf * size.
    x = torch.randn(3, 64, 6, 6) * 5
    ours = LocalResponseNorm(4, bias=1.0, alpha=0.001 / 9, beta=0.75)(x)
    theirs = torch.nn.LocalResponseNorm(9, alpha=0.001, beta=0.75, k=1.0)(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def torch_lrn(x: torch.Tensor, radius: int, bias: float, alpha: float,
              beta: float) -> torch.Tensor:
    """The same formula in torch ops, channel by channel, for autograd's own gradient."""
    channels = x.shape[1]
    outputs = []
    for c in range(channels):
        window = x[:, max(0, c - radius) : min(channels, c + radius + 1)]
        outputs.append(x[:, c] / (bias + alpha * window.square().sum(1)) ** beta)
    return torch.stack(outputs, 1)


@pytest.mark.parametrize("radius, bias, alpha, beta, channels",
                         [(4, 1.0, 0.001 / 9, 0.75, 64), (4, 1.0, 0.5, 0.75, 7),
                          (1, 0.5, 0.3, 1.5, 5), (2, 2.0, 1.0, 0.5, 3)])
def test_lrn_gradient_is_the_formula_s(radius, bias, alpha, beta, channels):
    # The written-out gradient against autograd through the plain formula (float64),
    # with alphas large enough for the window term to matter.
    x = torch.randn(2, channels, 3, 4, dtype=torch.float64, generator=torch.Generator()
                    .manual_seed(channels)).mul(3).requires_grad_()
    layer = LocalResponseNorm(radius, bias=bias, alpha=alpha, beta=beta)
    upstream = torch.randn_like(x)
    [ours] = torch.autograd.grad(layer(x), x, upstream)
    [formula] = torch.autograd.grad(torch_lrn(x, radius, bias, alpha, beta), x, upstream)
    torch.testing.assert_close(ours, formula, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(layer, (x,))


def test_lrn_keeps_channels_last_and_gives_the_same_output_with_and_without_grad():
    x = torch.randn(4, 64, 12, 12).mul(5).contiguous(memory_format=torch.channels_last)
    layer = LocalResponseNorm(4, bias=1.0, alpha=0.001 / 9, beta=0.75)
    with torch.no_grad():
        inference = layer(x)
    training = layer(x.clone().requires_grad_())
    training.sum().backward()
    assert torch.equal(inference, training.detach())
    assert training.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("size", [24, 12, 25, 7])
def test_max_pool_same_matches_tf_formula(size):
    x = np.random.default_rng(size).normal(0, 1, (2, 3, size, size)).astype(np.float32)
    got = MaxPoolSame(3, 2)(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, numpy_max_pool_same(x, 3, 2))


def test_max_pool_same_differs_from_symmetric_padding():
    # The reason for the layer: PyTorch's padding=1 shifts every window by one pixel.
    x = torch.arange(24.0).repeat(24, 1).view(1, 1, 24, 24)
    ours = MaxPoolSame(3, 2)(x)
    symmetric = torch.nn.functional.max_pool2d(x, 3, 2, padding=1)
    assert ours.shape == symmetric.shape == (1, 1, 12, 12)
    assert ours[0, 0, 0, 0] == 2 and symmetric[0, 0, 0, 0] == 1


def test_same_padding_puts_the_odd_pixel_after():
    assert same_padding(24, 3, 2) == (0, 1)
    assert same_padding(25, 3, 2) == (1, 1)
    assert same_padding(24, 5, 1) == (2, 2)
