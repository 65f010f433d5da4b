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
    faster on the CPU than nn.LocalResponseNorm (which also averages, where TF sums). In
    training the gradient is written out (`_LrnFunction`): autograd's own takes about twice
    the operators and two more fractional powers, the costliest element-wise op here."""

    def __init__(self, depth_radius: int, bias: float, alpha: float, beta: float) -> None:
        super().__init__()
        self.depth_radius, self.bias, self.alpha, self.beta = depth_radius, bias, alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _LrnFunction.apply(x, self.depth_radius, self.bias, self.alpha, self.beta)
        scale, _ = _lrn_scale(x, self.depth_radius, self.bias, self.alpha, self.beta)
        return x * scale


def _window_sum(x: torch.Tensor, radius: int) -> torch.Tensor:
    """The sum over channels c-radius..c+radius (within range) at each channel c."""
    running = F.pad(x, (0, 0, 0, 0, radius + 1, radius)).cumsum(1)
    return running[:, 2 * radius + 1 :] - running[:, : -(2 * radius + 1)]


def _lrn_scale(x: torch.Tensor, radius: int, bias: float, alpha: float,
               beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(d ** -beta, d) with d = bias + alpha * the windowed sum of squares."""
    denominator = _window_sum(x * x, radius).mul_(alpha).add_(bias)
    return denominator.pow(-beta), denominator


class _LrnFunction(torch.autograd.Function):
    """y = x * d^-beta. Its gradient, with y_c / d_c = x_c d_c^(-beta-1) and a window that is
    symmetric (j is in c's window iff c is in j's):
    dx = dy * d^-beta - 2 alpha beta * x * window_sum(dy * y / d)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, radius: int, bias: float, alpha: float,
                beta: float) -> torch.Tensor:
        scale, denominator = _lrn_scale(x, radius, bias, alpha, beta)
        ctx.save_for_backward(x, scale, denominator)
        ctx.radius, ctx.alpha, ctx.beta = radius, alpha, beta
        return x * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, scale, denominator = ctx.saved_tensors
        through_window = _window_sum(grad * x * scale / denominator, ctx.radius)
        grad_x = grad * scale - (2 * ctx.alpha * ctx.beta) * x * through_window
        return grad_x, None, None, None, None
