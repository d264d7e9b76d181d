"""Calibration: layers timed together, against the sum of their times measured one by one.

Where the whole model fits the device it is timed at once. Where it does not, the longest chain
of consecutive layers that fits is, and its scale stands for the model's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from planner.profile.layer import Subject
from planner.profile.measure import Stat, Timer, stat, tensors

__all__ = ["longest_fit", "WholeTimes", "Calibration", "ChainTimes", "time_chain", "time_optimizer", "CHAIN_FACTOR"]

# A chain may take this many times the memory of the largest layer measured alone, so that the
# profiler's peak stays a small multiple of one layer's, whatever the machine has free.
CHAIN_FACTOR = 2


def longest_fit(costs: list[int], budget: int) -> tuple[int, int] | None:
    """The longest run ``[a, b)`` of consecutive layers whose costs add up to at most ``budget``
    (the first of equal length); None where no single layer fits."""
    best: tuple[int, int] | None = None
    lo, total = 0, 0
    for hi, cost in enumerate(costs):
        total += cost
        while total > budget and lo <= hi:
            total -= costs[lo]
            lo += 1
        if lo <= hi and (best is None or hi + 1 - lo > best[1] - best[0]):
            best = (lo, hi + 1)
    return best


@dataclass(frozen=True)
class WholeTimes:
    """Layers run at once, as training runs them."""

    fwd: Stat
    bwd: Stat
    optimizer_s: float


@dataclass(frozen=True)
class Calibration:
    times: WholeTimes | None  # None where not even one layer fits the memory left
    chain: tuple[int, int] | None  # layers [a, b) timed, where not the whole model


@dataclass(frozen=True)
class ChainTimes:
    fwd: Stat
    bwd: Stat
    optimizer_s: float | None  # None where the optimizer was not timed with the chain


class _WithLoss(nn.Module):
    """The last layers and the loss as one module returning the loss."""

    def __init__(self, body: nn.Module, loss: Callable[[Any, Any], Any], target: Any):
        super().__init__()
        self.body, self.loss, self.target = body, loss, target

    def forward(self, *xs):
        return self.loss(self.body(*xs), self.target)


def time_chain(name: str, module: nn.Module, inputs: tuple, loss: Callable[[Any, Any], Any] | None, target: Any,
               timer: Timer, warmup: int, repeats: int, seed: int, optimizer: bool) -> ChainTimes:
    """Forward and backward of ``module`` (then ``loss`` where given) timed together, and with
    ``optimizer`` an Adam step over its parameters."""
    body = _WithLoss(module, loss, target) if loss is not None else module
    subject = Subject(name, inputs, seed, module=body)
    fwd, bwd = [], []
    for rep in range(warmup + repeats):
        t_f, t_b = _step(subject, timer)
        if rep >= warmup:
            fwd.append(t_f)
            bwd.append(t_b)
    t_opt = time_optimizer(subject.params, timer, repeats) if optimizer else None
    subject.clear()
    return ChainTimes(stat(fwd), stat(bwd), t_opt)


def _step(subject: Subject, timer: Timer) -> tuple[float, float]:
    """One forward and backward, timed; nothing of it kept."""
    xs = subject.leaves()
    t_f, out = timer(lambda: subject.forward(xs))
    outs = [t for t in tensors(out) if t.requires_grad]
    grads = subject.out_grads(outs)
    subject.clear()
    t_b, _ = timer(lambda: subject.backward(outs, grads))
    return t_f, t_b


def time_optimizer(params: list[nn.Parameter], timer: Timer, repeats: int) -> float:
    """Median seconds of one Adam step over ``params`` (gradients made where missing; the step's
    state is allocated by an untimed first step; a zero learning rate leaves the values as they
    are). Gradients are cleared afterwards."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return 0.0
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    opt = torch.optim.Adam(params, lr=0.0)
    opt.step()
    t = stat([timer(opt.step)[0] for _ in range(max(3, repeats))]).median
    del opt
    for p in params:
        p.grad = None
    return t
