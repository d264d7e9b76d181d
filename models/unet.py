"""A U-Net for per-pixel classification (segmentation): an encoder of conv blocks that halve the
resolution and double the channels level by level, a bottleneck, and a decoder whose blocks
upsample and concatenate the output of the encoder block at the same resolution.

Encoder blocks, the bottleneck and decoder blocks are separate layers (``down.i``, ``mid``,
``up.i``, ``head``), so the skip connection from encoder level i to its decoder block crosses every
cut between them: ``down.0``'s output travels all the way to the last decoder block. Decoder
blocks run deepest first: ``up.0`` pairs with the deepest encoder block, ``up.{levels-1}`` with
``down.0``.

Small by default so that it profiles on a CPU in seconds; scale it with factory arguments:

    planner profile models/unet.py:build --arg levels=5 --arg width=64 --arg image=256 \\
        --arg classes=21
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from planner.model import ModelSpec


@dataclass(frozen=True)
class UNetConfig:
    levels: int = 3  # encoder blocks (and decoder blocks); the bottleneck is one level deeper
    width: int = 16  # channels at full resolution; doubled at every level below
    image: int = 32  # square images; must be divisible by 2 ** levels
    in_channels: int = 3
    classes: int = 4


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, 8), channels)


class DoubleConv(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm1 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _norm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(x)))


class Down(nn.Module):
    """Encoder block: 2x2 max pooling (except at full resolution), then two convolutions."""

    def __init__(self, c_in: int, c_out: int, pool: bool):
        super().__init__()
        self.pool = pool
        self.conv = DoubleConv(c_in, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool:
            x = F.max_pool2d(x, 2)
        return self.conv(x)


class Up(nn.Module):
    """Decoder block: a 2x2 transposed convolution doubles the resolution and halves the channels,
    the encoder's output at that resolution is concatenated, then two convolutions."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
        self.conv = DoubleConv(2 * c_out, c_out)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class Head(nn.Module):
    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # (mb, classes, image, image)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        chans = [cfg.width * 2 ** i for i in range(cfg.levels + 1)]  # the last one: bottleneck
        self.down = nn.ModuleList(
            Down(cfg.in_channels if i == 0 else chans[i - 1], chans[i], pool=i > 0)
            for i in range(cfg.levels))
        self.mid = Down(chans[cfg.levels - 1], chans[cfg.levels], pool=True)
        self.up = nn.ModuleList(Up(chans[i + 1], chans[i]) for i in reversed(range(cfg.levels)))
        self.head = Head(chans[0], cfg.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        x = self.mid(x)
        for block, skip in zip(self.up, reversed(skips), strict=True):
            x = block(x, skip)
        return self.head(x)


def build(levels: int = 3, width: int = 16, image: int = 32, classes: int = 4, in_channels: int = 3,
          seed: int = 0) -> ModelSpec:
    if levels < 1 or width < 1 or in_channels < 1 or classes < 2:
        raise ValueError(f"levels={levels}, width={width}, in_channels={in_channels}, classes={classes}: "
                         "levels, width and in_channels must be positive and classes at least 2")
    if image < 2 ** levels or image % 2 ** levels:
        raise ValueError(f"image={image} must be a multiple of 2 ** levels = {2 ** levels}")
    cfg = UNetConfig(levels=levels, width=width, image=image, in_channels=in_channels, classes=classes)
    torch.manual_seed(seed)
    model = UNet(cfg)

    def batch(size: int, gen: torch.Generator):
        images = torch.randn(size, in_channels, image, image, generator=gen)
        masks = torch.randint(0, classes, (size, image, image), generator=gen)
        return (images,), masks

    return ModelSpec(model=model, batch=batch, loss=F.cross_entropy, name="unet")
