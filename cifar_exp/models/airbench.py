"""A compact fast network in the style of Keller Jordan's airbench94 (about 2M parameters).

A frozen 2x2 patch-whitening convolution, set from the eigenvectors of the training
images' patch covariance, then GELU; three blocks of conv3x3 -> max-pool 2 -> BatchNorm
-> GELU -> conv3x3 -> BatchNorm -> GELU (widths 64, 256, 256); a global max-pool; and a
bias-free linear head whose logits are scaled by 1/9. BatchNorm layers train only their
bias (the scale stays 1); each conv starts as the identity on its first input channels.
The whitening bias starts at zero (`whiten_bias_init: uniform`: at nn.Conv2d's default
init, as airbench94_muon's) and trains for the first `whiten_bias_epochs` epochs only.
airbench96's variant (`residual`) adds each block's first stage to the output of its later convs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cifar_exp.errors import ConfigError
from cifar_exp.models import MODELS

# The whitening bias's start: zero, or nn.Conv2d's default (airbench94_muon's).
WHITEN_BIAS_INITS = ("zeros", "uniform")


class PatchWhitening(nn.Conv2d):
    """A k x k convolution whose filters are the patch covariance's eigenvectors scaled by
    1/sqrt(eigenvalue + eps), each also negated (so a following GELU keeps both signs):
    on the training patches its outputs are decorrelated with unit variance. The filters
    are frozen; the bias trains, from zero or (`bias_init="uniform"`) from nn.Conv2d's
    default init, uniform in +-1/sqrt(3 k k)."""

    def __init__(self, kernel_size: int, eps: float, bias_init: str = "zeros") -> None:
        channels = 3 * kernel_size * kernel_size
        super().__init__(3, 2 * channels, kernel_size, bias=True)  # draws both inits
        self.eps = eps
        self.weight.requires_grad_(False)
        if bias_init == "zeros":  # either way the same draws: later layers init alike
            nn.init.zeros_(self.bias)

    @torch.no_grad()
    def initialize_from_data(self, images: torch.Tensor, chunk: int = 500) -> None:
        covariance = patch_covariance(images, self.kernel_size[0], chunk)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        filters = eigenvectors.T / (eigenvalues.clamp(min=0) + self.eps).sqrt()[:, None]
        filters = filters.flip(0).reshape(-1, *self.weight.shape[1:])  # largest first
        self.weight.copy_(torch.cat([filters, -filters]).to(self.weight))


def patch_covariance(images: torch.Tensor, kernel_size: int, chunk: int = 500) -> torch.Tensor:
    """The (uncentered: the images are normalized) covariance of every k x k patch of
    `images`, flattened in a conv filter's (channel, row, column) order; float64."""
    channels, height, width = images.shape[1:]
    rows, cols = height - kernel_size + 1, width - kernel_size + 1
    size = channels * kernel_size * kernel_size
    total = torch.zeros(size, size, dtype=torch.float64, device=images.device)
    count = 0
    for part in images.split(chunk):  # bounded memory: 12 x 961 values per image
        # The k x k shifted copies of the images are the patches' k x k entries.
        shifted = [part[:, :, i : i + rows, j : j + cols]
                   for i in range(kernel_size) for j in range(kernel_size)]
        patches = torch.stack(shifted, 2).double()  # N x C x k*k x rows x cols
        patches = patches.permute(0, 3, 4, 1, 2).reshape(-1, size)
        total += patches.T @ patches
        count += patches.shape[0]
    return total / count


def _conv(channels_in: int, channels_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False)
    with torch.no_grad():  # identity on the first input channels: the block starts near a no-op
        nn.init.dirac_(conv.weight[: min(channels_in, channels_out)])
    return conv


def _batch_norm(channels: int, momentum: float) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=momentum)
    norm.weight.requires_grad_(False)  # scale fixed at 1: only the bias trains
    return norm


def _conv_norm_gelu(channels_in: int, channels_out: int, momentum: float) -> list[nn.Module]:
    return [_conv(channels_in, channels_out), _batch_norm(channels_out, momentum), nn.GELU()]


class ConvBlock(nn.Sequential):
    """conv -> max-pool 2 -> BN -> GELU, then (conv -> BN -> GELU) x (convs - 1)."""

    def __init__(self, channels_in: int, channels_out: int, convs: int, momentum: float) -> None:
        conv, norm, gelu = _conv_norm_gelu(channels_in, channels_out, momentum)
        layers: list[nn.Module] = [conv, nn.MaxPool2d(2), norm, gelu]
        for _ in range(convs - 1):
            layers += _conv_norm_gelu(channels_out, channels_out, momentum)
        super().__init__(*layers)


class ResidualConvBlock(nn.Module):
    """airbench96's block: conv -> max-pool 2 -> BN -> GELU, then (conv -> BN -> GELU) x
    (convs - 2) -> conv -> BN, added to the first stage's output, then GELU."""

    def __init__(self, channels_in: int, channels_out: int, convs: int, momentum: float) -> None:
        super().__init__()
        self.entry = ConvBlock(channels_in, channels_out, 1, momentum)
        later = [layer for _ in range(convs - 1)
                 for layer in _conv_norm_gelu(channels_out, channels_out, momentum)]
        self.body = nn.Sequential(*later[:-1])  # its last GELU comes after the sum
        self.activation = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.entry(x)
        return self.activation(x + self.body(x))


class Airbench(nn.Module):
    def __init__(self, num_classes: int, widths: list[int], convs_per_block: int, *,
                 bn_momentum: float, logit_scale: float, whiten_kernel: int,
                 whiten_eps: float, whiten_bias_epochs: int | None = None,
                 whiten_bias_init: str = "zeros", residual: bool = False) -> None:
        super().__init__()
        self.whiten_bias_epochs = whiten_bias_epochs
        self.whiten = PatchWhitening(whiten_kernel, whiten_eps, whiten_bias_init)
        channels = [self.whiten.out_channels, *widths]
        block = ResidualConvBlock if residual else ConvBlock
        self.blocks = nn.Sequential(*(
            block(channels[i], channels[i + 1], convs_per_block, bn_momentum)
            for i in range(len(widths))))
        self.pool = nn.AdaptiveMaxPool2d(1)  # 3x3 -> 1x1 on 32x32 inputs, as airbench's pool 3
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        self.logit_scale = logit_scale

    def initialize_from_data(self, images: torch.Tensor) -> None:
        self.whiten.initialize_from_data(images)

    def frozen_parameters(self, epoch: int) -> list[nn.Parameter]:
        """The whitening bias once its `whiten_bias_epochs` are over (None: never)."""
        done = self.whiten_bias_epochs is not None and epoch >= self.whiten_bias_epochs
        return [self.whiten.bias] if done else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.gelu(self.whiten(x)))
        return self.head(self.pool(x).flatten(1)) * self.logit_scale


@MODELS.register("airbench")
def build(num_classes: int, image_size: int, *, widths: list[int] = (64, 256, 256),
          convs_per_block: int = 2, bn_momentum: float = 0.4, logit_scale: float = 1 / 9,
          whiten_kernel: int = 2, whiten_eps: float = 5e-4,
          whiten_bias_epochs: int | None = 3, whiten_bias_init: str = "zeros",
          residual: bool = False) -> Airbench:
    widths = list(widths)
    # Each block halves the side; the whitening conv takes whiten_kernel - 1 pixels.
    side = image_size - whiten_kernel + 1
    for _ in widths:
        side //= 2
    if side < 1:
        raise ConfigError(f"model airbench: {len(widths)} blocks need images larger than "
                          f"{image_size}x{image_size}")
    if convs_per_block < 1:
        raise ConfigError(f"model.convs_per_block={convs_per_block} must be at least 1")
    if residual and convs_per_block < 2:
        raise ConfigError(f"model.residual=true needs model.convs_per_block >= 2 (the residual "
                          f"spans a block's later convs), not {convs_per_block}")
    if whiten_bias_epochs is not None and whiten_bias_epochs < 0:
        raise ConfigError(f"model.whiten_bias_epochs={whiten_bias_epochs} must be >= 0, or "
                          f"null to train the whitening bias throughout")
    if whiten_bias_init not in WHITEN_BIAS_INITS:
        raise ConfigError(f"model.whiten_bias_init={whiten_bias_init} is unknown; use one of "
                          f"{', '.join(WHITEN_BIAS_INITS)}")
    return Airbench(num_classes, widths, convs_per_block, bn_momentum=bn_momentum,
                    logit_scale=logit_scale, whiten_kernel=whiten_kernel, whiten_eps=whiten_eps,
                    whiten_bias_epochs=whiten_bias_epochs, whiten_bias_init=whiten_bias_init,
                    residual=residual)
