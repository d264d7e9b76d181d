"""Models written the way users write them, for the tests: factories named ``tests/zoo.py:NAME``.

* ``resnet18``: ResNet-18 as torchvision writes it (He et al. 2016, Table 1): ``BasicBlock`` with
  ``nn.ReLU(inplace=True)``, ``out += identity`` and BatchNorm (or GroupNorm, torchvision's
  ``norm_layer``); ``width`` scales the channels (torchvision's is 64) so the tests run in seconds.
* ``albert``: one transformer block called ``n_layer`` times (ALBERT's cross-layer sharing, Lan et
  al. 2020): the block's weights are used by every call.
* ``tied_checked``: the GPT of ``models/gpt.py`` with its head tied to the embedding, whose factory
  runs the model once as a sanity check (so it cannot be built on the meta device).
* ``gpt2_missing_wpe``: an explicit layer list that leaves the position embedding out.
* ``autoencoder``: a decoder that reuses the encoder's weight transposed
  (``F.linear(h, enc.weight.t())``), as tied autoencoders do.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from planner.model import ModelSpec, build_spec

# ----------------------------------------------------------------------------- ResNet-18


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    def __init__(self, layers: list[int], num_classes: int = 1000, width: int = 64, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self._norm_layer = norm_layer
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width * BasicBlock.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * BasicBlock.expansion, stride),
                                       norm_layer(planes * BasicBlock.expansion))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, norm_layer)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes, norm_layer=norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


def resnet18(width: int = 64, image: int = 64, classes: int = 10, norm: str = "batch", seed: int = 0) -> ModelSpec:
    """``norm``: batch (torchvision's) or group (GroupNorm in 2 groups: the same for any
    micro-batch size)."""
    torch.manual_seed(seed)
    norm_layer = nn.BatchNorm2d if norm == "batch" else functools.partial(nn.GroupNorm, 2)

    def batch(size: int, gen: torch.Generator):
        return (torch.randn(size, 3, image, image, generator=gen),), torch.randint(0, classes, (size,), generator=gen)

    model = ResNet([2, 2, 2, 2], classes, width, norm_layer)
    return ModelSpec(model=model, batch=batch, loss=F.cross_entropy, name="resnet18")


# -------------------------------------------------------------------------------- ALBERT


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class Embed(nn.Module):
    def __init__(self, vocab: int, seq: int, d: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok(ids) + self.pos  # (mb, seq, d)


class Albert(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, n_layer: int, seq: int):
        super().__init__()
        self.n_layer = n_layer
        self.embed = Embed(vocab, seq, d)
        self.block = Block(d, heads)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for _ in range(self.n_layer):
            x = self.block(x)
        return self.head(self.norm(x))  # (mb, seq, vocab)


def _lm_batch(vocab: int, seq: int):
    def batch(size: int, gen: torch.Generator):
        ids = torch.randint(0, vocab, (size, seq + 1), generator=gen)
        return (ids[:, :-1].contiguous(),), ids[:, 1:].contiguous()
    return batch


def _lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def albert(n_layer: int = 4, d_model: int = 32, n_head: int = 2, vocab: int = 64, seq: int = 8,
           seed: int = 0) -> ModelSpec:
    torch.manual_seed(seed)
    return ModelSpec(model=Albert(vocab, d_model, n_head, n_layer, seq), batch=_lm_batch(vocab, seq),
                     loss=_lm_loss, name="albert")


def albert_explicit(n_layer: int = 3) -> ModelSpec:
    """The ALBERT model described explicitly, its shared block named once per call."""
    spec = albert(n_layer=n_layer)
    spec.layers = ["embed", *["block"] * n_layer, "norm", "head"]
    return spec


# ---------------------------------------------------------------------------- GPT family


GPT = Path(__file__).resolve().parent.parent / "models" / "gpt.py"


def tied_checked(n_layer: int = 2) -> ModelSpec:
    """A tied-weight GPT whose factory checks, once, that the model runs and gives a finite loss."""
    spec = build_spec(f"{GPT}:build", dict(n_layer=n_layer, d_model=32, n_head=2, vocab=64, seq=8, tied=True))
    inputs, target = spec.batch(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = spec.loss(spec.model(*inputs), target)
    if not torch.isfinite(loss).item():  # needs values: the meta device has none
        raise RuntimeError("the untrained model gives a non-finite loss")
    return spec


class _Positions(nn.Module):
    """Token plus position embedding, as GPT-2 adds them."""

    def __init__(self, vocab: int, seq: int, d: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq, d)
        self.h = nn.ModuleList(nn.Linear(d, d) for _ in range(2))
        self.head = nn.Linear(d, vocab)


def gpt2_missing_wpe() -> ModelSpec:
    """An explicit list that names the token embedding, the blocks and the head, not ``wpe``."""
    model = _Positions(64, 8, 16)
    return ModelSpec(model=model, layers=["wte", "h.0", "h.1", "head"], batch=_lm_batch(64, 8), loss=_lm_loss)


# --------------------------------------------------------------------------- autoencoder


class AutoEncoder(nn.Module):
    """The decoder reuses the encoder's weight transposed: the weight is shared, not copied."""

    def __init__(self, d_in: int, d_hidden: int, n_mid: int):
        super().__init__()
        self.enc = nn.Linear(d_in, d_hidden)
        self.mid = nn.Sequential(*[nn.Sequential(nn.Linear(d_hidden, d_hidden), nn.ReLU()) for _ in range(n_mid)])
        self.dec_bias = nn.Parameter(torch.zeros(d_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(torch.tanh(self.enc(x)))  # (mb, d_hidden)
        return F.linear(h, self.enc.weight.t(), self.dec_bias)  # (mb, d_in)


def autoencoder(d_in: int = 256, d_hidden: int = 64, n_mid: int = 2, seed: int = 0) -> ModelSpec:
    torch.manual_seed(seed)

    def batch(size: int, gen: torch.Generator):
        x = torch.randn(size, d_in, generator=gen)
        return (x,), x

    return ModelSpec(model=AutoEncoder(d_in, d_hidden, n_mid), batch=batch, loss=F.mse_loss, name="autoencoder")
