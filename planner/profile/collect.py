"""The measurements a profile is assembled from: each layer (once per kind of identical layers),
the loss, and a calibration, at every micro-batch size.

Layers are measured one after the other, each made real on the device only while it is measured
(``source.OnMeta``), so that the profiler's peak is the largest layer's, never the model's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from planner.errors import InfeasibleError
from planner.formats import BatchInfo, DeviceInfo, OptimizerName
from planner.model import ModelSpec, user_code
from planner.profile.chain import (
    CHAIN_FACTOR,
    Calibration,
    ChainTimes,
    WholeTimes,
    longest_fit,
    optimizer_peaks,
    time_chain,
    time_optimizer,
)
from planner.profile.layer import LayerResult, Subject, Weights, measure
from planner.profile.measure import Timer, tensors
from planner.profile.meta import available_bytes, param_bytes, value_bytes
from planner.profile.source import Source
from planner.profile.structure import flow_bytes, layer_signature, same_as
from planner.split import LayeredModel

__all__ = ["Measurements", "Steps", "Run", "measure_model", "batch_info", "crossing_keys", "rekey", "layer_module"]

Key = tuple[int, int]


@dataclass
class Measurements:
    """Everything measured, per micro-batch size, from which the profile is assembled."""

    device: DeviceInfo
    lm: LayeredModel
    stages: list[nn.Module]  # the one-layer stages (real, or on the meta device)
    sizes: list[int]  # micro-batch sizes, ascending
    same_as: list[int | None]  # per layer: the identical layer whose costs it shares
    layers: dict[int, list[LayerResult]] = field(default_factory=dict)  # size -> per layer
    loss: dict[int, LayerResult] = field(default_factory=dict)
    whole: dict[int, Calibration] = field(default_factory=dict)
    bytes_of: dict[int, dict[Key, int]] = field(default_factory=dict)  # size -> bytes of each tensor
    batch: BatchInfo | None = None  # at the largest size
    input_bytes: list[int] = field(default_factory=list)  # each model input at the largest size
    optimizer_peak: list[dict[OptimizerName, int]] = field(default_factory=list)  # per layer (chain.optimizer_peaks)


class Steps:
    """Progress through the measurements, reported as ``(label, done, total)``."""

    def __init__(self, progress: Callable[[str, int, int], None] | None, total: int):
        self.report = progress or (lambda label, done, total: None)
        self.done, self.total = 0, total

    def start(self, label: str) -> None:
        self.report(label, self.done, self.total)

    def finish(self) -> None:
        self.done += 1


@dataclass
class Run:
    """What one profiling run needs besides the model: settings and the batches."""

    spec: ModelSpec
    device: torch.device
    warmup: int
    repeats: int
    seed: int
    dedupe: bool
    memory_bytes: int | None  # the memory the profiler may use; None: what the device has free
    batches: dict[int, tuple[tuple, Any]]  # size -> (inputs, target) on the device
    whole: Callable[[int], WholeTimes] | None = None  # time the whole model at a size (in memory)
    optimizer_s: list[float | None] = field(default_factory=list)  # per layer; None: not timed (no room)
    optimizer_peak: list[dict[OptimizerName, int]] = field(default_factory=list)  # per layer; empty: not weighed

    def room(self) -> int:
        return self.memory_bytes if self.memory_bytes is not None else available_bytes(self.device)


def measure_model(source: Source, run: Run, device_info: DeviceInfo, steps: Steps) -> Measurements:
    lm, sizes = source.lm, sorted(run.batches)
    flows = {b: source.flow(run.batches[b][0], f"at micro-batch {b}") for b in sizes}
    signatures = [layer_signature(lm, i, layer_module(lm, i), source.stages[i], [flows[b] for b in sizes])
                  for i in range(lm.n_layers)]
    reps: list[int | None] = same_as(signatures) if run.dedupe else [None] * lm.n_layers
    m = Measurements(device=device_info, lm=lm, stages=source.stages, sizes=sizes, same_as=reps,
                     bytes_of={b: flow_bytes(lm, flows[b]) for b in sizes})
    batch_info(m, run)
    run.optimizer_s = [None] * lm.n_layers
    run.optimizer_peak = [{} for _ in range(lm.n_layers)]
    results: dict[int, list[LayerResult]] = {b: [] for b in sizes}
    for i in range(lm.n_layers):
        _layer(source, run, m, flows, results, i, steps)
    m.layers = results
    m.optimizer_peak = run.optimizer_peak
    for b in sizes:
        steps.start(f"mbs {b}: loss")
        m.loss[b] = _loss(source, run, flows[b], b)
        steps.finish()
        steps.start(f"mbs {b}: calibration")
        m.whole[b] = _calibrate(source, run, m, flows[b], b)
        steps.finish()
    steps.start("done")
    return m


def layer_module(lm: LayeredModel, i: int) -> nn.Module:
    """Layer ``i``'s own module (a traced stage holds it under its path)."""
    modules = getattr(lm, "modules_", None)
    if modules is not None:
        return modules[i]
    return lm.gm.get_submodule(lm.paths[i])  # type: ignore[attr-defined]


def batch_info(m: Measurements, run: Run) -> None:
    big = m.sizes[-1]
    inputs, target = run.batches[big]
    m.batch = BatchInfo(input_bytes_per_sample=sum(t.numel() * t.element_size() for t in tensors(inputs)) // big,
                        target_bytes_per_sample=sum(t.numel() * t.element_size() for t in tensors(target)) // big)
    m.input_bytes = [x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0 for x in inputs]


def crossing_keys(lm: LayeredModel, k: int) -> list[Key]:
    return [t.key for t in lm.crossing(k)]


def _layer(source: Source, run: Run, m: Measurements, flows: dict, results: dict[int, list[LayerResult]], i: int,
           steps: Steps) -> None:
    """Layer ``i`` at every size: measured, or its identical predecessor's costs."""
    lm, L, rep = m.lm, m.lm.n_layers, m.same_as[i]
    if rep is not None:
        for b in m.sizes:
            steps.start(f"mbs {b}: layer {i + 1}/{L} {lm.names[i]} (same as {lm.names[rep]})")
            results[b].append(rekey(results[b][rep], lm, rep, i))
            steps.finish()
        run.optimizer_s[i] = run.optimizer_s[rep]
        run.optimizer_peak[i] = run.optimizer_peak[rep]
        return
    if source.materialises:
        _check_fits(source, run, m, flows, i)
    with source.module(i, i + 1) as module:
        for b in m.sizes:
            steps.start(f"mbs {b}: layer {i + 1}/{L} {lm.names[i]}")
            gen = torch.Generator().manual_seed(run.seed + i)
            inputs = source.inputs_of(flows[b], i, run.batches[b][0], gen)
            subject = Subject(f"layer {lm.names[i]} at micro-batch {b}", inputs, run.seed, module=module)
            results[b].append(measure(subject, crossing_keys(lm, i), crossing_keys(lm, i + 1), i, run.device,
                                      run.warmup, run.repeats))
            del subject, inputs
            steps.finish()
        # Where Adam's two more copies of the parameters fit, its step is weighed layer by layer,
        # and timed so where the model is not timed whole.
        if 2 * param_bytes(module) <= run.room():
            with user_code(f"layer {lm.names[i]}: an optimizer step over its parameters"):
                run.optimizer_peak[i] = optimizer_peaks(list(module.parameters()), run.device)
                if run.whole is None:
                    run.optimizer_s[i] = time_optimizer(list(module.parameters()), Timer(run.device), run.repeats)


def rekey(r: LayerResult, lm: LayeredModel, src: int, dst: int) -> LayerResult:
    """Layer ``src``'s result for the identical layer ``dst``: tensors renamed by position."""
    ins = dict(zip(crossing_keys(lm, src), crossing_keys(lm, dst), strict=True))
    outs = dict(zip(crossing_keys(lm, src + 1), crossing_keys(lm, dst + 1), strict=True))
    w = r.weights
    weights = Weights(act_bytes=w.act_bytes, peak_bytes=w.peak_bytes, wgrad_bytes=w.wgrad_bytes,
                      saved_inputs={ins[k] for k in w.saved_inputs}, saved_outputs={outs[k] for k in w.saved_outputs},
                      out_bytes={outs[k]: n for k, n in w.out_bytes.items()})
    return LayerResult(r.times, weights)


def _check_fits(source: Source, run: Run, m: Measurements, flows: dict, i: int) -> None:
    """Refuse a layer whose parameters, gradients, inputs and outputs alone exceed the memory."""
    from planner.report import fmt_bytes

    big = m.sizes[-1]
    flow = flows[big]
    need = 2 * param_bytes(source.stages[i]) + value_bytes(tuple(flow[i])) + value_bytes(tuple(flow[i + 1]))
    room = run.room()
    if need > room:
        has = f"--memory gives {fmt_bytes(room)}" if run.memory_bytes is not None else \
            f"the {run.device.type} has {fmt_bytes(room)} free"
        raise InfeasibleError(f"layer {m.lm.names[i]} needs {fmt_bytes(need)} to be measured at micro-batch {big} "
                              f"(its parameters, their gradients, its inputs and outputs); {has}: cut it finer "
                              "with --depth, or profile it on a larger device")


def _loss(source: Source, run: Run, flow: list, b: int) -> LayerResult:
    lm, L = source.lm, source.lm.n_layers
    gen = torch.Generator().manual_seed(run.seed + L)
    final = source.output_of(flow, gen)
    subject = Subject(f"the loss at micro-batch {b}", (final,), run.seed, loss=run.spec.loss,
                      target=run.batches[b][1])
    return measure(subject, crossing_keys(lm, L)[:1], [], L, run.device, run.warmup, run.repeats)


# --------------------------------------------------------------------------- calibration


def _costs(m: Measurements, b: int) -> list[int]:
    """Bytes each layer takes in training at size ``b``: parameters and gradients, what it saves,
    its outputs and its transient peak; the loss's added to the last layer."""
    out = []
    for i, r in enumerate(m.layers[b]):
        w = r.weights
        out.append(2 * param_bytes(m.stages[i]) + w.act_bytes + w.peak_bytes + sum(w.out_bytes.values()))
    loss = m.loss[b].weights
    out[-1] += loss.act_bytes + loss.peak_bytes
    return out


def _calibrate(source: Source, run: Run, m: Measurements, flow: list, b: int) -> Calibration:
    if run.whole is not None:
        with user_code("the whole model, run at once to calibrate the layer times,"):
            return Calibration(run.whole(b), None)
    costs, L = _costs(m, b), m.lm.n_layers
    params = sum(param_bytes(s) for s in m.stages)
    inputs = value_bytes(tuple(flow[0]))
    room = run.room()
    if sum(costs) + 2 * params + inputs <= room:  # Adam keeps two more copies of the parameters
        chain: tuple[int, int] | None = (0, L)
    else:
        budget = run.memory_bytes if run.memory_bytes is not None else min(room, CHAIN_FACTOR * max(costs))
        chain = longest_fit(costs, budget)
    if chain is None:
        return Calibration(None, None)
    times = _time_chain(source, run, flow, b, *chain, optimizer=chain == (0, L))
    opt = times.optimizer_s if times.optimizer_s is not None else _summed_optimizer(run, m)
    return Calibration(WholeTimes(times.fwd, times.bwd, opt), None if chain == (0, L) else chain)


def _summed_optimizer(run: Run, m: Measurements) -> float:
    """The model's optimizer step as the sum of its layers'; a layer not timed is counted at the
    seconds per byte of those that were (Adam's step is elementwise: its time is linear in the
    parameters, Kingma and Ba 2015, Algorithm 1)."""
    timed = [(t, param_bytes(m.stages[i])) for i, t in enumerate(run.optimizer_s) if t is not None]
    per_byte = sum(t for t, _ in timed) / max(sum(n for _, n in timed), 1)
    return sum(t if t is not None else per_byte * param_bytes(m.stages[i]) for i, t in enumerate(run.optimizer_s))


def _time_chain(source: Source, run: Run, flow: list, b: int, a: int, c: int, optimizer: bool) -> ChainTimes:
    lm = source.lm
    what = "the whole model" if (a, c) == (0, lm.n_layers) else f"layers {lm.names[a]} to {lm.names[c - 1]}"
    gen = torch.Generator().manual_seed(run.seed + a)
    inputs = source.inputs_of(flow, a, run.batches[b][0], gen)
    loss = run.spec.loss if c == lm.n_layers else None
    # A GPU's first steps of a new model pick kernels and warm clocks: warm up longer there.
    warmup = max(run.warmup, 10) if run.device.type == "cuda" else run.warmup
    repeats = max(20, 2 * run.repeats) if (a, c) == (0, lm.n_layers) else max(3, run.repeats)
    with source.module(a, c) as module:
        return time_chain(f"{what}, run at once to calibrate the layer times, at micro-batch {b}", module,
                          inputs, loss, run.batches[b][1], Timer(run.device), warmup, repeats, run.seed, optimizer)
