"""ResNet-18 for CIFAR (He et al. 2016, in its common CIFAR form): a 3x3 stem with no
initial max-pool, BasicBlocks [2, 2, 2, 2] of widths 64, 128, 256, 512 (stride 2 from the
second stage on, 1x1 projection shortcuts where the shape changes), global average pool,
linear layer. 11,173,962 parameters for 10 classes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cifar_exp.models import MODELS


class BasicBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False),
                nn.BatchNorm2d(channels_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int, widths: list[int], blocks: list[int]) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, channels = [], widths[0]
        for index, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if index == 0 else 2
            for block in range(count):
                stages.append(BasicBlock(channels, width, stride if block == 0 else 1))
                channels = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


@MODELS.register("resnet18")
def build(num_classes: int, image_size: int, widths: list[int] = (64, 128, 256, 512),
          blocks: list[int] = (2, 2, 2, 2)) -> ResNet18:
    return ResNet18(num_classes, list(widths), list(blocks))
