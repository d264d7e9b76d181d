"""``planner profile``: measure a model layer by layer into a profile.

Each layer is run as the one-layer stage the executor would build (``planner.split``), so that
what is measured is what later runs. Per layer and micro-batch size: forward and backward time
(and the backward's input- and weight-gradient parts, with the engine's own split), bytes saved
for backward, transient bytes, output bytes. Identical layers (same module class, parameter
shapes, input shapes and dtypes) are measured once and share their costs. Then the whole model,
or where it does not fit the device the longest chain of layers that does, is timed at once and
the profile records the scale that makes the layer sum agree with it.

A model built on the meta device (the default of ``planner profile``) is never whole in memory:
each layer is made real on the device while it is measured, on inputs of the shapes the meta run
gave, then freed. A model built in memory is moved to the device, each layer measured on the
inputs it receives in the real model, and its parameters, buffers, gradients and training mode
are restored afterwards.
"""

from __future__ import annotations

import copy
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from planner.clusters import device_peaks
from planner.errors import InputError, ModelError
from planner.formats import (
    INPUT,
    LOSS,
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
from planner.host import check_per_core
from planner.model import ModelSpec, runs_sequence_parallel, user_code
from planner.profile.chain import WholeTimes, time_optimizer
from planner.profile.collect import Measurements, Run, Steps, measure_model
from planner.profile.estimate import estimate_model
from planner.profile.layer import LayerResult
from planner.profile.measure import Timer, stat, tensors
from planner.profile.meta import build_meta_spec, is_meta
from planner.profile.source import InMemory, OnMeta, Source
from planner.split import INPUT as SPLIT_INPUT
from planner.split import fingerprint, keep_ties, run_whole

__all__ = ["profile_model", "build_meta_spec", "resolve_device", "cpu_threads", "make_batch", "Options", "DTYPES"]

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
    dedupe: bool = True  # identical layers measured once
    memory_bytes: int | None = None  # what the profiler may use; None: what the device has free
    estimate: str | None = None  # a device kind (h100): FLOPs and bytes priced at its peaks, nothing run
    tp: tuple[int, ...] = ()  # tensor-parallel degrees to measure each layer at too (Layer.tp_costs)
    sequence_parallel: bool = True  # how the tp degrees are measured
    tp_timeout_s: float = 3600.0  # each degree's run of workers


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
    if any(t.is_meta for t in tensors(batch)):
        raise ModelError(f"{what} returned meta tensors: make them when batch is called, not while the "
                         "factory builds the model, or pass --no-meta to build it in memory")
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


def _param_bytes(module: nn.Module) -> tuple[int, dict[int, int]]:
    seen = {}
    for p in module.parameters():
        seen[id(p)] = p.numel() * p.element_size()
    return sum(seen.values()), seen


def _time_whole_model(spec: ModelSpec, inputs, target, device, opts: Options) -> WholeTimes:
    """The model as built, in memory on the device, timed at once as training runs it."""
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
    t_opt = time_optimizer(params, timer, opts.repeats)
    for p in model.parameters():
        p.grad = None
    return WholeTimes(stat(fwd), stat(bwd), t_opt)


def _check_options(opts: Options) -> None:
    if opts.dtype not in DTYPES:
        raise InputError(f"--dtype {opts.dtype!r}: choose float32, bfloat16 or float16")
    if not opts.mbs or any(b < 1 for b in opts.mbs):
        raise InputError("--mbs needs positive micro-batch sizes")
    check_per_core(opts.threads, "--threads", "threads")
    if opts.repeats < 1 or opts.warmup < 0:
        raise InputError("--repeats needs at least 1 and --warmup at least 0")
    if any(t < 2 for t in opts.tp):
        raise InputError(f"--tp {','.join(map(str, opts.tp))}: give degrees of 2 or more (tp 1 is the profile itself)")
    if opts.tp and opts.estimate is not None:
        raise InputError("--tp measures the layers split over processes; --estimate runs nothing: choose one")


def _check_tp(spec: ModelSpec, opts: Options, device: torch.device) -> None:
    """A model measured at tp > 1 needs its tp_plan, and a GPU a rank."""
    if not opts.tp:
        return
    if spec.tp_plan is None:
        raise InputError(f"--tp {max(opts.tp)}: the model gives no tp_plan (ModelSpec.tp_plan: module path -> "
                         "colwise, rowwise, ...) to split it by: add one, or profile without --tp")
    if device.type == "cuda" and max(opts.tp) > torch.cuda.device_count():
        raise InputError(f"--tp {max(opts.tp)} needs a GPU a rank; {torch.cuda.device_count()} visible")
    if device.type == "cpu":  # a process a rank: more than the cores share them, and time that sharing
        check_per_core(max(opts.tp), "--tp", "processes (one a rank on a CPU)")


def cpu_threads(opts: Options, device: torch.device) -> int | None:
    """CPU threads to measure with: ``--threads``, else one on a CPU, which is what each
    ``planner execute`` worker runs with (a profile measured on every core would describe a
    run that never happens); on a GPU, torch's own default."""
    if opts.threads is not None:
        return opts.threads
    return 1 if device.type == "cpu" else None


def profile_model(spec: ModelSpec, factory: str, args: dict, opts: Options,
                  progress: Callable[[str, int, int], None] | None = None) -> Profile:
    """Measure ``spec`` into a profile. ``progress(label, done, total)`` is called per layer.

    A model built on the meta device (``build_meta_spec``) is measured one layer at a time, each
    made real on the device only while it is; a model built in memory is moved to the device
    whole, and put back as it was afterwards."""
    device = resolve_device(opts.device)
    _check_options(opts)
    _check_tp(spec, opts, device)
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
        if opts.estimate is not None:
            return _assemble(spec, factory, args, opts, _estimate(spec, opts, dtype, progress))
        workspace = _workspace(device, dtype)
        if is_meta(model):
            prof = _assemble(spec, factory, args, opts, _measure(spec, opts, device, dtype, workspace, progress))
        else:
            with user_code(f"moving the model to {device} in {opts.dtype}"):
                keep_ties(model, lambda m: m.to(device=device, dtype=dtype))
            with _Restore(model):
                model.train()
                prof = _assemble(spec, factory, args, opts, _measure(spec, opts, device, dtype, workspace, progress))
    finally:
        torch.set_num_threads(before)
    return _measure_tp(prof, opts, device, meta=is_meta(model), progress=progress) if opts.tp else prof


def _measure_tp(prof: Profile, opts: Options, device: torch.device, *, meta: bool,
                progress: Callable[[str, int, int], None] | None) -> Profile:
    """Each distinct layer measured again split over each of ``opts.tp`` processes."""
    from planner.profile.tp import TpJob, measure_tp

    job = TpJob(factory=prof.model.factory, args=dict(prof.model.args), depth=opts.depth, dtype=opts.dtype,
                device=device.type, no_meta=not meta, mbs=tuple(prof.mbs_sizes), seed=opts.seed,
                repeats=opts.repeats, warmup=opts.warmup, threads=cpu_threads(opts, device),
                sequence_parallel=opts.sequence_parallel and prof.model.sequence_parallel is not False,
                names=tuple(layer.name for layer in prof.layers),
                measure=tuple(layer.name for layer in prof.layers if layer.same_as is None),
                timeout_s=opts.tp_timeout_s, progress_path="")
    return measure_tp(prof, job, sorted(set(opts.tp)), progress)


def _estimate(spec: ModelSpec, opts: Options, dtype: torch.dtype,
              progress: Callable[[str, int, int], None] | None) -> Measurements:
    """Counted on the meta device and priced at the device's datasheet peaks: nothing is run."""
    assert opts.estimate is not None
    kind, peaks = device_peaks(opts.estimate)
    cpu = torch.device("cpu")
    sizes = sorted(set(opts.mbs))
    batches = {b: make_batch(spec, b, opts.seed, cpu, dtype) for b in sizes}
    model = spec.model if is_meta(spec.model) else keep_ties(copy.deepcopy(spec.model), lambda m: m.to("meta"))
    source = OnMeta(model, batches[sizes[0]][0], spec.layers, opts.depth, cpu, dtype, spec.trace)
    run = Run(spec=spec, device=cpu, warmup=0, repeats=1, seed=opts.seed, dedupe=opts.dedupe,
              memory_bytes=None, batches=batches)
    info = DeviceInfo(type=kind.device.type, name=kind.device.name, memory_bytes=kind.device.memory_bytes)
    return estimate_model(source, run, peaks, opts.dtype, info, Steps(progress, len(sizes) * (source.lm.n_layers + 1)))


def _measure(spec: ModelSpec, opts: Options, device: torch.device, dtype: torch.dtype, workspace: int,
             progress: Callable[[str, int, int], None] | None) -> Measurements:
    sizes = sorted(set(opts.mbs))
    if progress:
        progress("tracing the model into layers", 0, 1)
    batches = {b: make_batch(spec, b, opts.seed, device, dtype) for b in sizes}
    first = batches[sizes[0]][0]
    run = Run(spec=spec, device=device, warmup=opts.warmup, repeats=opts.repeats, seed=opts.seed,
              dedupe=opts.dedupe, memory_bytes=opts.memory_bytes, batches=batches)
    source: Source
    if is_meta(spec.model):
        source = OnMeta(spec.model, first, spec.layers, opts.depth, device, dtype, spec.trace)
    else:
        source = InMemory(spec.model, first, spec.layers, opts.depth, device, spec.trace)
        run.whole = lambda b: _time_whole_model(spec, batches[b][0], batches[b][1], device, opts)
    steps = Steps(progress, len(sizes) * (source.lm.n_layers + 2))
    return measure_model(source, run, _device_info(device, workspace), steps)


# ---------------------------------------------------------------------------- the profile


def _cost(r: LayerResult, out_total: int) -> LayerCost:
    t, w = r.times, r.weights
    return LayerCost(fwd_s=t.fwd.median, bwd_s=t.bwd.median,
                     bwd_input_s=t.bwd_input.median if t.bwd_input else None,
                     bwd_weight_s=t.bwd_weight.median if t.bwd_weight else None,
                     act_bytes=w.act_bytes, out_bytes=out_total, peak_bytes=w.peak_bytes,
                     wgrad_bytes=w.wgrad_bytes,
                     fwd_spread=round(t.fwd.spread, 4), bwd_spread=round(t.bwd.spread, 4))


def _out_bytes(m: Measurements, b: int, i: int) -> int:
    """Bytes of the tensors layer ``i`` makes for later layers (from the shapes the model runs with)."""
    return sum(n for key, n in m.bytes_of[b].items() if key[0] == i)


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
        by = {str(b): _cost(m.layers[b][i], _out_bytes(m, b, i)) for b in m.sizes}
        rep = m.same_as[i]
        layers.append(Layer(name=names[i], param_bytes=pbytes, by_mbs=by,
                            same_as=names[rep] if rep is not None else None,
                            optimizer_peak_bytes=m.optimizer_peak[i] if i < len(m.optimizer_peak) else {}))
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
            src, nb = names[t.producer], m.bytes_of[big].get(t.key, 0)
        for c in t.consumers:
            consumer_saved = (c < L and t.key in results[c].saved_inputs) or (c == L and loss_saves)
            edges.append(Edge(src=src, dst=names[c] if c < L else LOSS, bytes_per_sample=nb // big,
                              tensor=t.index, saved=bool(consumer_saved or t.key in saved_by_producer)))
    return edges


def _whole(m: Measurements) -> dict[str, WholeCost]:
    """The whole model's times (or the longest chain of layers that fits the device's) and the
    scale that makes the sum of those layers' times agree with them."""
    whole = {}
    for b in m.sizes:
        calibration, L = m.whole.get(b), m.lm.n_layers
        w = calibration.times if calibration is not None else None
        if calibration is None or w is None:
            continue
        a, c = calibration.chain or (0, L)
        lsum = sum(r.times.fwd.median + r.times.bwd.median for r in m.layers[b][a:c])
        if c == L:
            lsum += m.loss[b].times.fwd.median + m.loss[b].times.bwd.median
        measured = w.fwd.median + w.bwd.median
        scale = measured / lsum if lsum > 0 else 1.0
        chain = [m.lm.names[a], m.lm.names[c - 1]] if calibration.chain else None
        whole[str(b)] = WholeCost(fwd_s=w.fwd.median, bwd_s=w.bwd.median, optimizer_s=w.optimizer_s,
                                  layer_sum_s=lsum, scale=scale, launch_bound=scale < LAUNCH_BOUND_SCALE,
                                  calibrated_on=chain)
    return whole


def _measurement(opts: Options, cpu: bool) -> Measurement:
    if opts.estimate is not None:
        _, peaks = device_peaks(opts.estimate)
        return Measurement(timer=f"estimate: roofline at the peaks of the {peaks.source}", repeats=1, warmup=0,
                           dedupe=opts.dedupe)
    return Measurement(timer="perf_counter" if cpu else "cuda-events", repeats=opts.repeats, warmup=opts.warmup,
                       threads=torch.get_num_threads() if cpu else None, dedupe=opts.dedupe)


def _assemble(spec: ModelSpec, factory: str, args: dict, opts: Options, m: Measurements) -> Profile:
    """The profile from the measurements."""
    layers, tied = _layers(m)
    cpu = m.device.type == "cpu"
    assert m.batch is not None  # recorded at the largest size, which is always measured
    dtype = cast(Dtype, opts.dtype)  # one of DTYPES: _check_options refused any other
    return Profile(
        model=ModelRef(name=spec.name or "model", factory=factory, args=args, depth=opts.depth,
                       fingerprint=fingerprint(spec.model), tensor_parallel=spec.tp_plan is not None,
                       sequence_parallel=runs_sequence_parallel(spec.tp_plan)),
        device=m.device, dtype=dtype, layers=layers, edges=_edges(m),
        loss=LossCost(by_mbs={str(b): _cost(m.loss[b], 0) for b in m.sizes}),
        tied=tied, batch=m.batch, whole=_whole(m),
        measurement=_measurement(opts, cpu),
    )
