"""``planner profile``: measure a model layer by layer into a profile.

Each layer is run as the one-layer stage the executor would build (``planner.split``), on the
inputs it receives in the real model, so that what is measured is what later runs. Per layer and
micro-batch size: forward and backward time (and the backward's input- and weight-gradient parts,
with the engine's own split), bytes saved for backward, transient bytes, output bytes. Then the
whole model is timed at once and the profile records the scale that makes the layer sum agree
with it. The model's parameters, buffers, gradients and training mode are restored afterwards.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from planner.errors import InputError, ModelError
from planner.formats import (
    INPUT,
    LOSS,
    BatchInfo,
    DeviceInfo,
    Dtype,
    Edge,
    Layer,
    LayerCost,
    LossCost,
    Measurement,
    ModelRef,
    Profile,
    TiedGroup,
    WholeCost,
)
from planner.model import ModelSpec, user_code
from planner.profile.layer import LayerResult, Subject, measure
from planner.profile.measure import Stat, Timer, stat, tensors
from planner.split import INPUT as SPLIT_INPUT
from planner.split import LayeredModel, fingerprint, layered, run_whole

__all__ = ["profile_model", "resolve_device", "cpu_threads", "make_batch", "Options", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAUNCH_BOUND_SCALE = 0.85  # layer sum over 1/0.85 of the whole: launch or dispatch overhead dominates


@dataclass(frozen=True)
class Options:
    device: str = "auto"
    dtype: str = "float32"
    mbs: tuple[int, ...] = (1, 2)
    depth: int | None = None
    repeats: int = 10
    warmup: int = 3
    threads: int | None = None
    seed: int = 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise InputError(f"--device {name!r}: choose auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is available here")
    return torch.device(name)


_WORKSPACE: dict[str, int] = {}  # per device, measured once per process


def _workspace(device: torch.device, dtype: torch.dtype) -> int:
    """Bytes the runtime keeps after its first matrix product (the cuBLAS workspace). Only the
    first product of a process allocates it, so the first measurement is kept for later ones."""
    if device.type != "cuda":
        return 0
    if str(device) in _WORKSPACE:
        return _WORKSPACE[str(device)]
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    a = torch.ones(64, 64, device=device, dtype=dtype)
    b = a @ a
    torch.cuda.synchronize(device)
    kept = torch.cuda.memory_allocated(device) - before - a.untyped_storage().nbytes() - b.untyped_storage().nbytes()
    _WORKSPACE[str(device)] = max(int(kept), 0)
    return _WORKSPACE[str(device)]


def _device_info(device: torch.device, workspace: int = 0) -> DeviceInfo:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return DeviceInfo(type="cuda", name=props.name, memory_bytes=props.total_memory, workspace_bytes=workspace)
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = 0
    return DeviceInfo(type="cpu", name=platform.processor() or platform.machine() or "cpu", memory_bytes=mem)


def _cast(value, device: torch.device, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        value = value.to(device)
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_cast(v, device, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, device, dtype) for v in value]
    return value


def make_batch(spec: ModelSpec, size: int, seed: int, device: torch.device, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(seed)
    what = f"the factory's batch({size}, generator)"
    with user_code(what):
        batch = spec.batch(size, gen)
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ModelError(f"{what} returned a {type(batch).__name__}, not a pair (inputs, target)")
    inputs, target = batch
    if not isinstance(inputs, tuple):
        inputs = (inputs,)
    return _cast(inputs, device, dtype), _cast(target, device, dtype)


# ----------------------------------------------------------------------------- state guard


class _Restore:
    """Put parameters, buffers, gradients and training flags back as they were."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        m = self.model
        self.values = {k: v.detach().clone() for k, v in m.state_dict(keep_vars=True).items()
                       if isinstance(v, torch.Tensor)}
        self.grads = {n: (p.grad.detach().clone() if p.grad is not None else None)
                      for n, p in m.named_parameters()}
        self.training = {n: mod.training for n, mod in m.named_modules()}
        return self

    def __exit__(self, *exc):
        m = self.model
        with torch.no_grad():
            current = m.state_dict(keep_vars=True)
            for k, v in self.values.items():
                current[k].data.copy_(v.to(current[k].device, current[k].dtype))
        for n, p in m.named_parameters():
            g = self.grads[n]
            p.grad = None if g is None else g.to(p.device, p.dtype)
        for n, mod in m.named_modules():
            mod.train(self.training[n])


# ------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class WholeTimes:
    """The whole model run at once, as training runs it."""

    fwd: Stat
    bwd: Stat
    optimizer_s: float


@dataclass
class Measurements:
    """Everything measured, per micro-batch size, from which the profile is assembled."""

    device: DeviceInfo
    lm: LayeredModel
    stages: list[nn.Module]  # the one-layer stages that were measured
    sizes: list[int]  # micro-batch sizes, ascending
    layers: dict[int, list[LayerResult]] = field(default_factory=dict)  # size -> per layer
    loss: dict[int, LayerResult] = field(default_factory=dict)
    whole: dict[int, WholeTimes] = field(default_factory=dict)
    batch: BatchInfo | None = None  # at the largest size
    input_bytes: list[int] = field(default_factory=list)  # each model input at the largest size


class _Steps:
    """Progress through the measurements, reported as ``(label, done, total)``."""

    def __init__(self, progress: Callable[[str, int, int], None] | None, total: int):
        self.report = progress or (lambda label, done, total: None)
        self.done, self.total = 0, total

    def start(self, label: str) -> None:
        self.report(label, self.done, self.total)

    def finish(self) -> None:
        self.done += 1


def _param_bytes(module: nn.Module) -> tuple[int, dict[int, int]]:
    seen = {}
    for p in module.parameters():
        seen[id(p)] = p.numel() * p.element_size()
    return sum(seen.values()), seen


def _time_whole(spec: ModelSpec, inputs, target, device, opts: Options) -> WholeTimes:
    with user_code("the whole model, run at once to calibrate the layer times,"):
        return _time_whole_model(spec, inputs, target, device, opts)


def _time_whole_model(spec: ModelSpec, inputs, target, device, opts: Options) -> WholeTimes:
    model = spec.model
    timer = Timer(device)
    fwd, bwd = [], []
    # A GPU's first steps of a new model pick kernels and warm clocks: warm up longer there.
    warmup = max(opts.warmup, 10) if device.type == "cuda" else opts.warmup
    for rep in range(warmup + max(20, 2 * opts.repeats)):
        for p in model.parameters():
            p.grad = None
        t_f, loss = timer(lambda: spec.loss(run_whole(model, spec.layers, inputs), target))
        t_b, _ = timer(loss.backward)
        if rep >= warmup:
            fwd.append(t_f)
            bwd.append(t_b)
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    opt = torch.optim.Adam(params, lr=0.0)
    opt.step()  # allocate state outside the timing
    t_opt = stat([timer(opt.step)[0] for _ in range(max(3, opts.repeats))]).median
    del opt
    for p in model.parameters():
        p.grad = None
    return WholeTimes(stat(fwd), stat(bwd), t_opt)


def _check_options(opts: Options) -> None:
    if opts.dtype not in DTYPES:
        raise InputError(f"--dtype {opts.dtype!r}: choose float32, bfloat16 or float16")
    if not opts.mbs or any(b < 1 for b in opts.mbs):
        raise InputError("--mbs needs positive micro-batch sizes")
    if opts.threads is not None and opts.threads < 1:
        raise InputError(f"--threads {opts.threads}: give at least 1")
    if opts.repeats < 1 or opts.warmup < 0:
        raise InputError("--repeats needs at least 1 and --warmup at least 0")


def cpu_threads(opts: Options, device: torch.device) -> int | None:
    """CPU threads to measure with: ``--threads``, else one on a CPU, which is what each
    ``planner execute`` worker runs with (a profile measured on every core would describe a
    run that never happens); on a GPU, torch's own default."""
    if opts.threads is not None:
        return opts.threads
    return 1 if device.type == "cpu" else None


def profile_model(spec: ModelSpec, factory: str, args: dict, opts: Options,
                  progress: Callable[[str, int, int], None] | None = None) -> Profile:
    """Measure ``spec`` into a profile. ``progress(label, done, total)`` is called per layer."""
    device = resolve_device(opts.device)
    _check_options(opts)
    model = spec.model
    if not isinstance(model, nn.Module):
        raise ModelError(f"the factory's model is a {type(model).__name__}, not a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError("the model has no trainable parameters: there is nothing to train or to place on stages")
    before, threads = torch.get_num_threads(), cpu_threads(opts, device)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        dtype = DTYPES[opts.dtype]
        workspace = _workspace(device, dtype)
        with user_code(f"moving the model to {device} in {opts.dtype}"):
            model.to(device=device, dtype=dtype)
        with _Restore(model):
            model.train()
            measured = _measure(spec, opts, device, dtype, workspace, progress)
            return _assemble(spec, factory, args, opts, measured)
    finally:
        torch.set_num_threads(before)


def _measure(spec: ModelSpec, opts: Options, device: torch.device, dtype: torch.dtype, workspace: int,
             progress: Callable[[str, int, int], None] | None) -> Measurements:
    sizes = sorted(set(opts.mbs))
    if progress:
        progress("tracing the model into layers", 0, 1)
    first_inputs, _ = make_batch(spec, sizes[0], opts.seed, device, dtype)
    lm = layered(spec.model, first_inputs, spec.layers, opts.depth)
    m = Measurements(device=_device_info(device, workspace), lm=lm,
                     stages=[lm.stage(i, i + 1) for i in range(lm.n_layers)], sizes=sizes)
    steps = _Steps(progress, len(sizes) * (lm.n_layers + 2))
    for b in sizes:
        _measure_size(spec, m, b, opts, device, dtype, steps)
    steps.start("done")
    return m


def _measure_size(spec: ModelSpec, m: Measurements, b: int, opts: Options, device: torch.device,
                  dtype: torch.dtype, steps: _Steps) -> None:
    """Every layer, the loss and the whole model at micro-batch size ``b``."""
    lm, L = m.lm, m.lm.n_layers
    inputs, target = make_batch(spec, b, opts.seed, device, dtype)
    if b == m.sizes[-1]:
        m.batch = BatchInfo(
            input_bytes_per_sample=sum(t.numel() * t.element_size() for t in tensors(inputs)) // b,
            target_bytes_per_sample=sum(t.numel() * t.element_size() for t in tensors(target)) // b)
        m.input_bytes = [x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0 for x in inputs]
    *layer_inputs, final = lm.layer_inputs(inputs, m.stages, where=f"at micro-batch {b}")
    m.layers[b] = []
    for i in range(L):
        steps.start(f"mbs {b}: layer {i + 1}/{L} {lm.names[i]}")
        subject = Subject(f"layer {lm.names[i]} at micro-batch {b}", layer_inputs[i], opts.seed, module=m.stages[i])
        m.layers[b].append(measure(subject, [t.key for t in lm.crossing(i)], [t.key for t in lm.crossing(i + 1)],
                                   i, device, opts.warmup, opts.repeats))
        steps.finish()
    steps.start(f"mbs {b}: loss")
    subject = Subject(f"the loss at micro-batch {b}", (final,), opts.seed, loss=spec.loss, target=target)
    m.loss[b] = measure(subject, [t.key for t in lm.crossing(L)][:1], [], L, device, opts.warmup, opts.repeats)
    steps.finish()
    steps.start(f"mbs {b}: whole model (calibration)")
    m.whole[b] = _time_whole(spec, inputs, target, device, opts)
    steps.finish()


# ---------------------------------------------------------------------------- the profile


def _cost(r: LayerResult, out_total: int) -> LayerCost:
    t, w = r.times, r.weights
    return LayerCost(fwd_s=t.fwd.median, bwd_s=t.bwd.median,
                     bwd_input_s=t.bwd_input.median if t.bwd_input else None,
                     bwd_weight_s=t.bwd_weight.median if t.bwd_weight else None,
                     act_bytes=w.act_bytes, out_bytes=out_total, peak_bytes=w.peak_bytes,
                     wgrad_bytes=w.wgrad_bytes,
                     fwd_spread=round(t.fwd.spread, 4), bwd_spread=round(t.bwd.spread, 4))


def _layers(m: Measurements) -> tuple[list[Layer], list[TiedGroup]]:
    """Each layer's parameters and costs, and the parameters that several layers share."""
    names = m.lm.names
    layers = []
    owners: dict[int, list[int]] = {}
    sizes_of: dict[int, int] = {}
    for i, stage in enumerate(m.stages):
        pbytes, ids = _param_bytes(stage)
        for pid, n in ids.items():
            owners.setdefault(pid, []).append(i)
            sizes_of[pid] = n
        by = {str(b): _cost(m.layers[b][i], sum(m.layers[b][i].weights.out_bytes.values())) for b in m.sizes}
        layers.append(Layer(name=names[i], param_bytes=pbytes, by_mbs=by))
    tied_groups: dict[tuple[int, ...], int] = {}
    for pid, where in owners.items():
        if len(where) > 1:
            tied_groups[tuple(where)] = tied_groups.get(tuple(where), 0) + sizes_of[pid]
    tied = [TiedGroup(layers=[names[i] for i in where], param_bytes=n) for where, n in tied_groups.items()]
    return layers, tied


def _edges(m: Measurements) -> list[Edge]:
    """Every tensor from its producer to each consumer, with its bytes per sample at the largest
    size and whether either side saves it for backward."""
    names, L, big = m.lm.names, m.lm.n_layers, m.sizes[-1]
    results = [r.weights for r in m.layers[big]]
    loss_saves = bool(m.loss[big].weights.saved_inputs)
    saved_by_producer = {k for r in results for k in r.saved_outputs}
    edges = []
    for t in m.lm.tensors:
        if t.producer == SPLIT_INPUT:
            src, nb = INPUT, m.input_bytes[t.index]
        else:
            src, nb = names[t.producer], results[t.producer].out_bytes.get(t.key, 0)
        for c in t.consumers:
            consumer_saved = (c < L and t.key in results[c].saved_inputs) or (c == L and loss_saves)
            edges.append(Edge(src=src, dst=names[c] if c < L else LOSS, bytes_per_sample=nb // big,
                              tensor=t.index, saved=bool(consumer_saved or t.key in saved_by_producer)))
    return edges


def _whole(m: Measurements) -> dict[str, WholeCost]:
    """The whole model's times and the scale that makes the layer sum agree with them."""
    whole = {}
    for b in m.sizes:
        w, loss = m.whole[b], m.loss[b].times
        lsum = sum(r.times.fwd.median + r.times.bwd.median for r in m.layers[b])
        lsum += loss.fwd.median + loss.bwd.median
        measured = w.fwd.median + w.bwd.median
        scale = measured / lsum if lsum > 0 else 1.0
        whole[str(b)] = WholeCost(fwd_s=w.fwd.median, bwd_s=w.bwd.median, optimizer_s=w.optimizer_s,
                                  layer_sum_s=lsum, scale=scale, launch_bound=scale < LAUNCH_BOUND_SCALE)
    return whole


def _assemble(spec: ModelSpec, factory: str, args: dict, opts: Options, m: Measurements) -> Profile:
    """The profile from the measurements."""
    layers, tied = _layers(m)
    cpu = m.device.type == "cpu"
    assert m.batch is not None  # recorded at the largest size, which is always measured
    dtype = cast(Dtype, opts.dtype)  # one of DTYPES: _check_options refused any other
    return Profile(
        model=ModelRef(name=spec.name or "model", factory=factory, args=args, depth=opts.depth,
                       fingerprint=fingerprint(spec.model)),
        device=m.device, dtype=dtype, layers=layers, edges=_edges(m),
        loss=LossCost(by_mbs={str(b): _cost(m.loss[b], 0) for b in m.sizes}),
        tied=tied, batch=m.batch, whole=_whole(m),
        measurement=Measurement(timer="perf_counter" if cpu else "cuda-events", repeats=opts.repeats,
                                warmup=opts.warmup, threads=torch.get_num_threads() if cpu else None),
    )
