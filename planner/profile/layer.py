"""One layer measured: its forward and backward timed, then its memory weighed.

A layer is measured as the one-layer stage the executor builds, on the inputs it receives in the
real model; the loss is measured the same way, called as ``loss(output, target)``. Timing and
weighing are separate passes: the live-tensor count that weighs on a CPU slows every operation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from planner.errors import ModelError
from planner.model import user_code
from planner.profile.measure import MemoryProbe, Stat, Timer, nbytes, saved_storages, stat, storage_key, tensors

Key = tuple[int, int]  # (producing layer, output index) of a tensor between layers


@dataclass(frozen=True)
class Times:
    fwd: Stat
    bwd: Stat
    bwd_input: Stat | None  # None where the engine's split backward does not apply
    bwd_weight: Stat | None


@dataclass(frozen=True)
class Weights:
    act_bytes: int  # saved for backward, beyond the layer's inputs and outputs
    peak_bytes: int  # transient, above what the forward keeps
    wgrad_bytes: int  # kept by the input-gradient pass for the weight-gradient pass
    saved_inputs: set[Key]
    saved_outputs: set[Key]
    out_bytes: dict[Key, int]


@dataclass(frozen=True)
class LayerResult:
    times: Times
    weights: Weights


def _leaves(inputs: tuple) -> tuple:
    """The inputs as leaves of a new graph; tensors inside a structure too (a model's output the
    loss reads, such as a Hugging Face ``ModelOutput``)."""
    return tuple(tree_map(lambda t: t.detach().requires_grad_(t.is_floating_point())
                          if isinstance(t, torch.Tensor) else t, inputs))


def _grads_for(outs: list[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(o.shape, generator=gen, dtype=torch.float32).to(o.device, o.dtype) for o in outs]


def _differentiable(value) -> list[torch.Tensor]:
    return [t for t in tensors(value) if t.requires_grad]


def _check_loss(value: Any, what: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise ModelError(f"{what} returned a {type(value).__name__}, not a tensor")
    if value.numel() != 1:
        raise ModelError(f"{what} returned a tensor of shape {tuple(value.shape)}, not a scalar: "
                         "reduce it (mean or sum)")
    if not value.requires_grad:
        raise ModelError(f"{what} returned a tensor that needs no gradient: compute it from the "
                         "model's output")


class Subject:
    """What one measurement runs: a stage module on its inputs, or the loss on the model's output
    and the target. Its forward and backward run the factory's code; what they raise names
    ``name`` (``layer transformer.h.3 at micro-batch 2``)."""

    def __init__(self, name: str, inputs: tuple, seed: int, module: nn.Module | None = None,
                 loss: Callable | None = None, target: Any = None):
        self.name, self.inputs, self.module, self.loss, self.target = name, inputs, module, loss, target
        self.params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
        self.fixed = set() if module is None else \
            {storage_key(p) for p in module.parameters()} | {storage_key(b) for b in module.buffers()}
        self.gen = torch.Generator().manual_seed(seed + 17)

    @property
    def is_loss(self) -> bool:
        return self.loss is not None

    def leaves(self) -> tuple:
        return _leaves(self.inputs)

    def forward(self, xs: tuple):
        with user_code(f"{self.name}: its forward"):
            if self.loss is None:
                assert self.module is not None  # a Subject runs a module or the loss
                return self.module(*xs)
            value = self.loss(xs[0], self.target)
        _check_loss(value, self.name)
        return value

    def backward(self, outs: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        with user_code(f"{self.name}: its backward"):
            torch.autograd.backward(outs, grads)

    def out_grads(self, outs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Random output gradients; the loss's own gradient is 1."""
        return [torch.ones_like(o) for o in outs] if self.is_loss else _grads_for(outs, self.gen)

    def fresh(self):
        xs = self.leaves()
        out = self.forward(xs)
        outs = _differentiable(out)
        return xs, out, outs, self.out_grads(outs)

    def clear(self) -> None:
        for p in self.params:
            p.grad = None

    def zero_grads(self) -> set[int]:
        """Every parameter given a zero gradient; their storages (for a probe to ignore)."""
        for p in self.params:
            p.grad = torch.zeros_like(p)
        return {storage_key(p.grad) for p in self.params if p.grad is not None}


def measure(subject: Subject, in_keys: list[Key], out_keys: list[Key], produced_by: int,
            device: torch.device, warmup: int, repeats: int) -> LayerResult:
    """Time, then weigh, one subject; its parameters have no gradient afterwards."""
    times = time_subject(subject, Timer(device), warmup, repeats)
    weights = weigh(subject, in_keys, out_keys, produced_by, device, split=times.bwd_input is not None)
    return LayerResult(times, weights)


# ------------------------------------------------------------------------------------ time


def time_subject(subject: Subject, timer: Timer, warmup: int, repeats: int) -> Times:
    """Median forward and backward times over ``repeats`` after ``warmup``, and the backward's
    input- and weight-gradient parts where the engine's split backward runs on this subject."""
    fwd, bwd, b_input, b_weight = [], [], [], []
    split_ok = True
    for rep in range(warmup + repeats):
        t_f, t_b, has_outputs = _time_step(subject, timer)
        if rep >= warmup:
            fwd.append(t_f)
            bwd.append(t_b)
        if split_ok and has_outputs:
            split = _time_split(subject, timer)
            split_ok = split is not None
            if split is not None and rep >= warmup:
                b_input.append(split[0])
                b_weight.append(split[1])
    subject.clear()
    split_times = split_ok and b_input
    return Times(fwd=stat(fwd), bwd=stat(bwd), bwd_input=stat(b_input) if split_times else None,
                 bwd_weight=stat(b_weight) if split_times else None)


def _time_step(subject: Subject, timer: Timer) -> tuple[float, float, bool]:
    xs = subject.leaves()
    t_f, out = timer(lambda: subject.forward(xs))
    outs = _differentiable(out)
    grads = subject.out_grads(outs)
    subject.clear()
    t_b = timer(lambda: subject.backward(outs, grads))[0] if outs else 0.0
    return t_f, t_b, bool(outs)


def _time_split(subject: Subject, timer: Timer) -> tuple[float, float] | None:
    """Input- then weight-gradient time of a fresh forward; None where the engine's functions
    refuse the subject (they then are not used for it)."""
    xs, _, outs, grads = subject.fresh()
    subject.clear()
    try:
        return _split_backward(timer, outs, grads, xs, subject.params)
    except Exception:
        return None


def _split_backward(timer: Timer, outs, grads, xs, params) -> tuple[float, float]:
    """Input-gradient then weight-gradient time, with the functions the engine's zero-bubble
    schedules call (planner's split backward, ``planner.execute.runtime``)."""
    from planner.execute.runtime import backward_input, backward_weight

    float_inputs = [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad]
    if not params:
        t_i, _ = timer(lambda: torch.autograd.backward(outs, grads))
        return t_i, 0.0
    if not float_inputs:
        t_w, _ = timer(lambda: torch.autograd.backward(outs, grads))
        return 0.0, t_w
    t_i, (_, work) = timer(lambda: backward_input(outs, grads, float_inputs, iter(params)))
    t_w, _ = timer(lambda: backward_weight(work))
    return t_i, t_w


# ----------------------------------------------------------------------------------- weigh


def weigh(subject: Subject, in_keys: list[Key], out_keys: list[Key], produced_by: int,
          device: torch.device, split: bool) -> Weights:
    """One forward with saved-tensor accounting and one backward, each probed; with ``split``,
    also the input-gradient pass alone."""
    xs = subject.leaves()
    in_storage = {storage_key(x): key for key, x in zip(in_keys, xs, strict=False) if isinstance(x, torch.Tensor)}
    ignore = subject.fixed | set(in_storage)
    with MemoryProbe(device, ignore) as fwd_probe:
        out, saved = saved_storages(lambda: subject.forward(xs), subject.fixed)
    out_storage, out_bytes = ({}, {}) if subject.is_loss else _outputs(out, out_keys, produced_by)
    internal = sum(n for k, n in saved.items() if k not in in_storage and k not in out_storage)
    bwd_peak = _backward_peak(subject, out, device, ignore)
    wgrad = _wgrad_bytes(subject, device, ignore) if split and subject.params and not subject.is_loss else 0
    subject.clear()
    return Weights(act_bytes=internal, peak_bytes=max(fwd_probe.peak - fwd_probe.final, bwd_peak, 0),
                   wgrad_bytes=wgrad, saved_inputs={in_storage[k] for k in saved if k in in_storage},
                   saved_outputs={out_storage[k] for k in saved if k in out_storage}, out_bytes=out_bytes)


def _outputs(out, out_keys: list[Key], produced_by: int) -> tuple[dict[int, Key], dict[Key, int]]:
    """The storages of the tensors this layer produces (key by storage) and their bytes."""
    storage, sizes = {}, {}
    for key, t in zip(out_keys, tensors(out), strict=False):
        if key[0] == produced_by:
            storage[storage_key(t)] = key
            sizes[key] = t.numel() * t.element_size()
    return storage, sizes


def _backward_peak(subject: Subject, out, device: torch.device, ignore: set[int]) -> int:
    """Transient bytes of the backward, plus the output gradients it is given. It runs with the
    parameters' gradients already there (zeros, made outside the probe), as from the second
    micro-batch of a step on (and in every micro-batch after the first step: the executor zeroes
    them in place): each new weight gradient is then a temporary of the weight's size until
    autograd adds it into ``.grad`` (torch/csrc/autograd/functions/accumulate_grad.h,
    ``accumulateGrad``: ``variable_grad += new_grad``). Where the gradients start as None the new
    one is kept as ``.grad`` instead, which the stage's static bytes already count; measured that
    way, a peak early in the backward would also be less the gradients made only after it."""
    outs = _differentiable(out)
    grads = subject.out_grads(outs)
    subject.clear()
    if not outs:
        return 0
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    present = subject.zero_grads()
    with MemoryProbe(device, ignore | present | {storage_key(g) for g in grads}) as probe:
        subject.backward(outs, grads)
    subject.clear()
    return probe.peak + grad_bytes


def _wgrad_bytes(subject: Subject, device: torch.device, ignore: set[int]) -> int:
    """Bytes the input-gradient pass leaves for the weight-gradient pass (the intermediate
    gradients it keeps), beyond the input gradients it returns."""
    from planner.execute.runtime import backward_input, backward_weight

    xs = subject.leaves()
    outs = _differentiable(subject.forward(xs))
    float_inputs = [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad]
    if not outs or not float_inputs:
        return 0
    grads = _grads_for(outs, subject.gen)
    params = subject.params
    with MemoryProbe(device, ignore | {storage_key(g) for g in grads}) as probe:
        dinputs, work = backward_input(outs, grads, float_inputs, iter(params))
    returned = sum(nbytes(d) for d in dinputs if isinstance(d, torch.Tensor))
    backward_weight(work)
    return max(int(probe.final - returned), 0)
