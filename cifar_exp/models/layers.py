"""Layers that reproduce TensorFlow behaviour exactly where PyTorch differs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding (before, after) along one axis: the odd pixel goes after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class MaxPoolSame(nn.Module):
    """Max pooling with TF 'SAME' padding (PyTorch's `padding=` pads both sides equally)."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel, self.stride)
        left, right = same_padding(x.shape[-1], self.kernel, self.stride)
        if top == left == 0:
            # Padding only after: ceil_mode's partial last window is the same (and no copy).
            return F.max_pool2d(x, self.kernel, self.stride, ceil_mode=True)
        x = F.pad(x, (left, right, top, bottom), value=-math.inf)
        return F.max_pool2d(x, self.kernel, self.stride)


class LocalResponseNorm(nn.Module):
    """tf.nn.lrn: x / (bias + alpha * sum of x^2 over channels c-r..c+r) ** beta.

    The windowed sum is a difference of cumulative sums over channels: several times
    faster on the CPU than nn.LocalResponseNorm (which also averages, where TF sums)."""

    def __init__(self, depth_radius: int, bias: float, alpha: float, beta: float) -> None:
        super().__init__()
        self.depth_radius, self.bias, self.alpha, self.beta = depth_radius, bias, alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.depth_radius
        running = F.pad(x.square(), (0, 0, 0, 0, r + 1, r)).cumsum(1)
        window_sum = running[:, 2 * r + 1 :] - running[:, : -(2 * r + 1)]
        return x * (self.bias + self.alpha * window_sum).pow(-self.beta)
