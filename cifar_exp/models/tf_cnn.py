"""The TensorFlow CIFAR-10 tutorial's CNN (cuda-convnet style), initialised as the tutorial does."""

from __future__ import annotations

import torch
from torch import nn

from cifar_exp.models import MODELS
from cifar_exp.models.layers import LocalResponseNorm, MaxPoolSame, same_padding


def _truncated_normal_(tensor: torch.Tensor, std: float) -> None:
    # tf.truncated_normal redraws values beyond two standard deviations.
    nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std)


def _init(layer: nn.Conv2d | nn.Linear, std: float, bias: float) -> None:
    _truncated_normal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)


class TfCnn(nn.Module):
    """conv5x5(64)-pool-lrn, conv5x5(64)-lrn-pool, fc384, fc192, logits."""

    def __init__(self, num_classes: int, image_size: int, weight_decay: float) -> None:
        super().__init__()
        self.weight_decay = weight_decay
        self.conv1 = nn.Conv2d(3, 64, 5, padding=2)
        self.pool1 = MaxPoolSame(3, 2)
        self.norm1 = LocalResponseNorm(4, bias=1.0, alpha=0.001 / 9.0, beta=0.75)
        self.conv2 = nn.Conv2d(64, 64, 5, padding=2)
        self.norm2 = LocalResponseNorm(4, bias=1.0, alpha=0.001 / 9.0, beta=0.75)
        self.pool2 = MaxPoolSame(3, 2)
        side = image_size
        for _ in range(2):
            before, after = same_padding(side, 3, 2)
            side = (side + before + after - 3) // 2 + 1
        self.local3 = nn.Linear(64 * side * side, 384)
        self.local4 = nn.Linear(384, 192)
        self.logits = nn.Linear(192, num_classes)
        self.relu = nn.ReLU(inplace=True)
        _init(self.conv1, 5e-2, 0.0)
        _init(self.conv2, 5e-2, 0.1)
        _init(self.local3, 0.04, 0.1)
        _init(self.local4, 0.04, 0.1)
        _init(self.logits, 1 / 192.0, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.pool1(self.relu(self.conv1(x))))
        x = self.pool2(self.norm2(self.relu(self.conv2(x))))
        x = self.relu(self.local3(x.flatten(1)))
        x = self.relu(self.local4(x))
        return self.logits(x)

    def regularization_loss(self) -> torch.Tensor:
        """The TF tutorial's weight decay: wd * sum(w^2) / 2 on the local3 and local4 weights
        only."""
        # w * w: a third of the time of w.square() (a pow) with its gradient, on the CPU.
        local3, local4 = self.local3.weight, self.local4.weight
        squares = (local3 * local3).sum() + (local4 * local4).sum()
        return self.weight_decay * squares / 2


@MODELS.register("tf_cnn")
def build(num_classes: int, image_size: int, weight_decay: float = 0.004) -> TfCnn:
    return TfCnn(num_classes, image_size, weight_decay)
