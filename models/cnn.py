"""A small residual convolutional image classifier: a stem convolution, a list of residual conv
blocks that double their channels and halve the resolution every few blocks (so the blocks differ
in cost, memory and output size), then global average pooling and a linear head.

GroupNorm rather than BatchNorm, so that a block computes the same thing whatever the micro-batch
size. Small by default so that it profiles on a CPU in seconds; scale it with factory arguments:

    planner profile models/cnn.py:build --arg depth=12 --arg width=64 --arg image=224 \\
        --arg classes=1000 --arg down_every=3
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from planner.model import ModelSpec


@dataclass(frozen=True)
class CNNConfig:
    depth: int = 6  # residual blocks
    width: int = 16  # channels of the stem and the first blocks
    image: int = 32  # square images, image x image pixels
    in_channels: int = 3
    classes: int = 10
    down_every: int = 2  # blocks per resolution: block i > 0 with i % down_every == 0 downsamples


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, 8), channels)


class Stem(nn.Module):
    def __init__(self, cfg: CNNConfig):
        super().__init__()
        self.conv = nn.Conv2d(cfg.in_channels, cfg.width, 3, padding=1, bias=False)
        self.norm = _norm(cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))  # (mb, width, image, image)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection; a strided 1x1 projection on the shortcut
    when the block changes channels or resolution."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _norm(c_out)
        self.proj = None
        if stride != 1 or c_in != c_out:
            self.proj = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        shortcut = x if self.proj is None else self.proj(x)
        return F.relu(y + shortcut)


class Head(nn.Module):
    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))  # (mb, classes)


class CNN(nn.Module):
    def __init__(self, cfg: CNNConfig):
        super().__init__()
        self.cfg = cfg
        self.stem = Stem(cfg)
        blocks = []
        c = cfg.width
        for i in range(cfg.depth):
            down = i > 0 and i % cfg.down_every == 0
            c_out = 2 * c if down else c
            blocks.append(ResBlock(c, c_out, stride=2 if down else 1))
            c = c_out
        self.blocks = nn.ModuleList(blocks)
        self.head = Head(c, cfg.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build(depth: int = 6, width: int = 16, image: int = 32, classes: int = 10, in_channels: int = 3,
          down_every: int = 2, seed: int = 0) -> ModelSpec:
    if depth < 1 or width < 1 or image < 1 or in_channels < 1 or classes < 2 or down_every < 1:
        raise ValueError(f"depth={depth}, width={width}, image={image}, in_channels={in_channels}, "
                         f"down_every={down_every}, classes={classes}: depth, width, image, in_channels "
                         "and down_every must be positive and classes at least 2")
    downsamples = (depth - 1) // down_every
    if image < 2 ** downsamples:
        raise ValueError(f"image={image} is too small for {downsamples} downsamplings "
                         f"(depth={depth}, down_every={down_every})")
    cfg = CNNConfig(depth=depth, width=width, image=image, in_channels=in_channels, classes=classes,
                    down_every=down_every)
    torch.manual_seed(seed)
    model = CNN(cfg)

    def batch(size: int, gen: torch.Generator):
        images = torch.randn(size, in_channels, image, image, generator=gen)
        labels = torch.randint(0, classes, (size,), generator=gen)
        return (images,), labels

    return ModelSpec(model=model, batch=batch, loss=F.cross_entropy, name="cnn")
