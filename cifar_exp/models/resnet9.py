"""The DAWNBench ResNet-9 (Myrtle.ai, David Page's 'How to train your ResNet'): about 6.6M
parameters.

prep conv 64; layer1 conv 128 + max-pool, plus a residual of two convs; layer2 conv 256 +
max-pool; layer3 conv 512 + max-pool, plus a residual; global max-pool; a bias-free linear
layer whose logits are scaled by 0.125. Every conv is 3x3 -> BatchNorm -> ReLU."""

from __future__ import annotations

import torch
from torch import nn

from cifar_exp.models import MODELS


def conv_bn(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(channels_out), nn.ReLU(inplace=True))


class Residual(nn.Module):
    """x + (conv_bn -> conv_bn)(x)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Sequential):
    def __init__(self, num_classes: int, widths: list[int], logit_scale: float) -> None:
        prep, w1, w2, w3 = widths
        super().__init__(
            conv_bn(3, prep),
            nn.Sequential(conv_bn(prep, w1), nn.MaxPool2d(2), Residual(w1)),
            nn.Sequential(conv_bn(w1, w2), nn.MaxPool2d(2)),
            nn.Sequential(conv_bn(w2, w3), nn.MaxPool2d(2), Residual(w3)),
            nn.AdaptiveMaxPool2d(1),  # the 4x4 max-pool on 32x32 inputs
            nn.Flatten(),
            nn.Linear(w3, num_classes, bias=False),
        )
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.logit_scale


@MODELS.register("resnet9")
def build(num_classes: int, image_size: int, widths: list[int] = (64, 128, 256, 512),
          logit_scale: float = 0.125) -> ResNet9:
    return ResNet9(num_classes, list(widths), logit_scale)
