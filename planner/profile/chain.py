"""Calibration: layers timed together, against the sum of their times measured one by one.

Where the whole model fits the device it is timed at once. Where it does not, the longest chain
of consecutive layers that fits is, and its scale stands for the model's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

import torch
from torch import nn

from planner.formats import OptimizerName
from planner.profile.layer import Subject
from planner.profile.measure import MemoryProbe, Stat, Timer, stat, storage_key, tensors

__all__ = ["longest_fit", "WholeTimes", "Calibration", "ChainTimes", "time_chain", "time_optimizer", "optimizer_peaks",
           "CHAIN_FACTOR"]

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


def optimizer_peaks(params: list[nn.Parameter], device: torch.device) -> dict[OptimizerName, int]:
    """Per optimizer the executor runs, the bytes its first step over ``params`` allocates above
    what it keeps (its state) and frees again: the temporaries of its update. torch's defaults
    pick the implementation: on a CPU one parameter at a time (Adam's ``exp_avg_sq.sqrt() /
    bias_correction2_sqrt`` makes two parameter-sized temporaries, of the largest parameter); on
    a GPU over every parameter at once (``torch._foreach_sqrt``: one of all of them together)
    (torch/optim/adam.py, ``_single_tensor_adam`` and ``_multi_tensor_adam``; the choice is
    ``_default_to_fused_or_foreach`` in torch/optim/optimizer.py). Gradients are made where
    missing and cleared afterwards; a zero learning rate leaves the values as they are."""
    from planner.execute.train import torch_optimizer

    params = [p for p in params if p.requires_grad]
    out: dict[OptimizerName, int] = {}
    if not params:
        return out
    for p in params:
        p.grad = torch.zeros_like(p)
    # the step updates these in place: on a CPU the live-tensor count would take them for new
    ignore = {storage_key(p) for p in params} | {storage_key(p.grad) for p in params if p.grad is not None}
    for name in get_args(OptimizerName):
        kind, options = torch_optimizer(name)
        opt = kind(params, **{**options, "lr": 0.0})
        with MemoryProbe(device, ignore) as probe:  # the first step: its state is made inside, and kept
            opt.step()
        out[name] = max(probe.peak - probe.final, 0)
        del opt
    for p in params:
        p.grad = None
    return out


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
