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
from dataclasses import dataclass

import torch
from torch import nn

from planner.errors import InputError, ModelError
from planner.formats import (
    INPUT, LOSS, BatchInfo, DeviceInfo, Edge, Layer, LayerCost, LossCost, Measurement, ModelRef,
    Profile, TiedGroup, WholeCost,
)
from planner.model import ModelSpec
from planner.profile.measure import (
    MemoryProbe, Stat, Timer, nbytes, saved_storages, stat, storage_key, tensors,
)
from planner.split import INPUT as SPLIT_INPUT
from planner.split import fingerprint, layered, run_whole

__all__ = ["profile_model", "resolve_device", "Options"]

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
    try:
        inputs, target = spec.batch(size, gen)
    except Exception as e:
        raise ModelError(f"the factory's batch({size}, generator) raised {type(e).__name__}: {e}") from None
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


# ----------------------------------------------------------------------------- one layer


@dataclass
class LayerResult:
    fwd: Stat
    bwd: Stat
    bwd_input: Stat | None
    bwd_weight: Stat | None
    act_bytes: int
    peak_bytes: int
    wgrad_bytes: int
    saved_inputs: set[tuple[int, int]]
    saved_outputs: set[tuple[int, int]]
    out_bytes: dict[tuple[int, int], int]


def _leaves(inputs: tuple) -> tuple:
    return tuple(t.detach().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t
                 for t in inputs)


def _grads_for(outs: list[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(o.shape, generator=gen, dtype=torch.float32).to(o.device, o.dtype) for o in outs]


def _differentiable(value) -> list[torch.Tensor]:
    return [t for t in tensors(value) if t.requires_grad]


def measure_module(module: nn.Module, inputs: tuple, in_keys: list[tuple[int, int]],
                   out_keys: list[tuple[int, int]], produced_by: int, device: torch.device,
                   opts: Options, loss: Callable | None = None, target=None) -> LayerResult:
    """Time and weigh one stage module on ``inputs``. With ``loss``, the module is the loss
    function itself, called as loss(input, target)."""
    timer = Timer(device)
    params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
    fixed = set() if module is None else \
        {storage_key(p) for p in module.parameters()} | {storage_key(b) for b in module.buffers()}
    gen = torch.Generator().manual_seed(opts.seed + 17)

    def forward(xs):
        return loss(xs[0], target) if loss is not None else module(*xs)

    def out_grads(outs):  # the loss's own gradient is 1
        return _grads_for(outs, gen) if loss is None else [torch.ones_like(o) for o in outs]

    def fresh():
        xs = _leaves(inputs)
        out = forward(xs)
        outs = _differentiable(out)
        return xs, out, outs, out_grads(outs)

    def clear():
        for p in params:
            p.grad = None

    fwd_samples, bwd_samples, bi_samples, bw_samples = [], [], [], []
    split_ok = True
    for rep in range(opts.warmup + opts.repeats):
        xs = _leaves(inputs)
        t_f, out = timer(lambda: forward(xs))
        outs = _differentiable(out)
        grads = out_grads(outs)
        clear()
        t_b = timer(lambda: torch.autograd.backward(outs, grads))[0] if outs else 0.0
        if rep >= opts.warmup:
            fwd_samples.append(t_f)
            bwd_samples.append(t_b)
        if split_ok and outs:
            xs2, _, outs2, grads2 = fresh()
            clear()
            try:
                t_i, t_w = _split_backward(timer, outs2, grads2, xs2, params)
            except Exception:
                split_ok = False
            else:
                if rep >= opts.warmup:
                    bi_samples.append(t_i)
                    bw_samples.append(t_w)
    clear()

    # memory: one forward with saved-tensor accounting, one backward, each probed
    xs = _leaves(inputs)
    in_storage = {}
    for key, x in zip(in_keys, xs):
        if isinstance(x, torch.Tensor):
            in_storage[storage_key(x)] = key
    ignore = fixed | set(in_storage)
    with MemoryProbe(device, ignore) as fwd_probe:
        out, saved = saved_storages(lambda: forward(xs), fixed)
    out_list = tensors(out)
    out_storage = {}
    out_bytes = {}
    for key, t in zip(out_keys, out_list if loss is None else []):
        if key[0] == produced_by:
            out_storage[storage_key(t)] = key
            out_bytes[key] = t.numel() * t.element_size()
    saved_inputs = {in_storage[k] for k in saved if k in in_storage}
    saved_outputs = {out_storage[k] for k in saved if k in out_storage}
    internal = sum(n for k, n in saved.items() if k not in in_storage and k not in out_storage)
    outs = _differentiable(out)
    grads = out_grads(outs)
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    clear()
    bwd_peak = 0
    if outs:
        with MemoryProbe(device, ignore | {storage_key(g) for g in grads}) as bwd_probe:
            torch.autograd.backward(outs, grads)
        param_grads = sum(nbytes(p.grad) for p in params if p.grad is not None)
        bwd_peak = bwd_probe.peak - param_grads + grad_bytes
    clear()
    wgrad = _wgrad_bytes(forward, inputs, params, device, ignore, gen) if split_ok and params and loss is None else 0
    clear()
    peak = max(fwd_probe.peak - fwd_probe.final, bwd_peak, 0)
    return LayerResult(
        fwd=stat(fwd_samples), bwd=stat(bwd_samples),
        bwd_input=stat(bi_samples) if split_ok and bi_samples else None,
        bwd_weight=stat(bw_samples) if split_ok and bw_samples else None,
        act_bytes=internal, peak_bytes=peak, wgrad_bytes=wgrad, saved_inputs=saved_inputs,
        saved_outputs=saved_outputs,
        out_bytes=out_bytes)


def _wgrad_bytes(forward, inputs, params, device, ignore, gen) -> int:
    """Bytes the input-gradient pass leaves for the weight-gradient pass (the intermediate
    gradients it keeps), beyond the input gradients it returns."""
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    xs = _leaves(inputs)
    outs = _differentiable(forward(xs))
    float_inputs = [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad]
    if not outs or not float_inputs:
        return 0
    grads = _grads_for(outs, gen)
    with MemoryProbe(device, ignore | {storage_key(g) for g in grads}) as probe:
        dinputs, groups = stage_backward_input(outs, grads, float_inputs, iter(params))
    returned = sum(nbytes(d) for d in dinputs if isinstance(d, torch.Tensor))
    stage_backward_weight(iter(params), groups)
    return max(int(probe.final - returned), 0)


def _split_backward(timer: Timer, outs, grads, xs, params) -> tuple[float, float]:
    """Input-gradient then weight-gradient time, with the functions the engine's zero-bubble
    schedules call (torch.distributed.pipelining._backward)."""
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    float_inputs = [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad]
    if not params:
        t_i, _ = timer(lambda: torch.autograd.backward(outs, grads))
        return t_i, 0.0
    if not float_inputs:
        t_w, _ = timer(lambda: torch.autograd.backward(outs, grads))
        return 0.0, t_w
    t_i, (_, groups) = timer(lambda: stage_backward_input(outs, grads, float_inputs, iter(params)))
    t_w, _ = timer(lambda: stage_backward_weight(iter(params), groups))
    return t_i, t_w


# ------------------------------------------------------------------------------- the model


def _param_bytes(module: nn.Module) -> tuple[int, dict[int, int]]:
    seen = {}
    for p in module.parameters():
        seen[id(p)] = p.numel() * p.element_size()
    return sum(seen.values()), seen


def _time_whole(spec: ModelSpec, inputs, target, device, opts: Options) -> tuple[Stat, Stat, float]:
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
    return stat(fwd), stat(bwd), t_opt


def profile_model(spec: ModelSpec, factory: str, args: dict, opts: Options,
                  progress: Callable[[str, int, int], None] | None = None) -> Profile:
    """Measure ``spec`` into a profile. ``progress(label, done, total)`` is called per layer."""
    device = resolve_device(opts.device)
    if opts.dtype not in DTYPES:
        raise InputError(f"--dtype {opts.dtype!r}: choose float32, bfloat16 or float16")
    if not opts.mbs or any(b < 1 for b in opts.mbs):
        raise InputError("--mbs needs positive micro-batch sizes")
    dtype = DTYPES[opts.dtype]
    model = spec.model
    if not isinstance(model, nn.Module):
        raise ModelError(f"the factory's model is a {type(model).__name__}, not a torch.nn.Module")
    threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        workspace = _workspace(device, dtype)
        model.to(device=device, dtype=dtype)
        with _Restore(model):
            model.train()
            return _profile(spec, factory, args, opts, device, dtype, workspace, progress)
    finally:
        torch.set_num_threads(threads)


def _profile(spec, factory, args, opts, device, dtype, workspace, progress) -> Profile:
    sizes = sorted(set(opts.mbs))
    first_inputs, _ = make_batch(spec, sizes[0], opts.seed, device, dtype)
    lm = layered(spec.model, first_inputs, spec.layers, opts.depth)
    L = lm.n_layers
    stages = [lm.stage(i, i + 1) for i in range(L)]
    in_keys = [[t.key for t in lm.crossing(i)] for i in range(L)]
    out_keys = [[t.key for t in lm.crossing(i + 1)] for i in range(L)]

    per_mbs: dict[int, list[LayerResult]] = {}
    loss_results: dict[int, LayerResult] = {}
    wholes: dict[int, tuple[Stat, Stat, float]] = {}
    batch_info, input_bytes = None, []
    total = len(sizes) * (L + 2)
    done = 0
    for b in sizes:
        inputs, target = make_batch(spec, b, opts.seed, device, dtype)
        if batch_info is None or b == sizes[-1]:
            batch_info = BatchInfo(
                input_bytes_per_sample=sum(t.numel() * t.element_size() for t in tensors(inputs)) // b,
                target_bytes_per_sample=sum(t.numel() * t.element_size() for t in tensors(target)) // b)
            input_bytes = [x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0 for x in inputs]
        *layer_inputs, final = lm.layer_inputs(inputs, stages)
        results = []
        for i in range(L):
            if progress:
                progress(f"mbs {b}: {lm.names[i]}", done, total)
            results.append(measure_module(stages[i], layer_inputs[i], in_keys[i], out_keys[i], i,
                                          device, opts))
            done += 1
        per_mbs[b] = results
        if progress:
            progress(f"mbs {b}: loss", done, total)
        loss_results[b] = measure_module(None, (final,), out_keys[L - 1][:1], [], L, device, opts,
                                         loss=spec.loss, target=target)
        done += 1
        if progress:
            progress(f"mbs {b}: whole model", done, total)
        wholes[b] = _time_whole(spec, inputs, target, device, opts)
        done += 1
    if progress:
        progress("done", total, total)
    return _assemble(spec, factory, args, opts, _device_info(device, workspace), lm, stages, sizes, per_mbs,
                     loss_results, wholes, batch_info, input_bytes)


def _assemble(spec, factory, args, opts, device_info, lm, stages, sizes, per_mbs, loss_results, wholes,
              batch_info, input_bytes) -> Profile:
    """The profile from the measurements; ``input_bytes``: each model input at the largest size."""
    L = lm.n_layers
    names = lm.names

    def cost(r: LayerResult, out_total: int) -> LayerCost:
        return LayerCost(fwd_s=r.fwd.median, bwd_s=r.bwd.median,
                         bwd_input_s=r.bwd_input.median if r.bwd_input else None,
                         bwd_weight_s=r.bwd_weight.median if r.bwd_weight else None,
                         act_bytes=r.act_bytes, out_bytes=out_total, peak_bytes=r.peak_bytes,
                         wgrad_bytes=r.wgrad_bytes,
                         fwd_spread=round(r.fwd.spread, 4), bwd_spread=round(r.bwd.spread, 4))

    layers = []
    owners: dict[int, list[int]] = {}
    sizes_of: dict[int, int] = {}
    for i in range(L):
        pbytes, ids = _param_bytes(stages[i])
        for pid, n in ids.items():
            owners.setdefault(pid, []).append(i)
            sizes_of[pid] = n
        by = {str(b): cost(per_mbs[b][i], sum(per_mbs[b][i].out_bytes.values())) for b in sizes}
        layers.append(Layer(name=names[i], param_bytes=pbytes, by_mbs=by))

    tied_groups: dict[tuple[int, ...], int] = {}
    for pid, where in owners.items():
        if len(where) > 1:
            tied_groups[tuple(where)] = tied_groups.get(tuple(where), 0) + sizes_of[pid]
    tied = [TiedGroup(layers=[names[i] for i in where], param_bytes=n) for where, n in tied_groups.items()]

    big = sizes[-1]
    results = per_mbs[big]
    saved_by_producer = {k for r in results for k in r.saved_outputs}
    edges = []
    for t in lm.tensors:
        if t.producer == SPLIT_INPUT:
            src, nb = INPUT, input_bytes[t.index]
        else:
            src, nb = names[t.producer], results[t.producer].out_bytes.get(t.key, 0)
        for c in t.consumers:
            consumer_saved = (c < L and t.key in results[c].saved_inputs) or \
                             (c == L and loss_results[big].saved_inputs)
            edges.append(Edge(src=src, dst=names[c] if c < L else LOSS, bytes_per_sample=nb // big,
                              tensor=t.index, saved=bool(consumer_saved or t.key in saved_by_producer)))

    whole = {}
    for b in sizes:
        f, bw, opt_s = wholes[b]
        lsum = sum(r.fwd.median + r.bwd.median for r in per_mbs[b])
        lsum += loss_results[b].fwd.median + loss_results[b].bwd.median
        measured = f.median + bw.median
        scale = measured / lsum if lsum > 0 else 1.0
        whole[str(b)] = WholeCost(fwd_s=f.median, bwd_s=bw.median, optimizer_s=opt_s, layer_sum_s=lsum,
                                  scale=scale, launch_bound=scale < LAUNCH_BOUND_SCALE)
    loss = LossCost(by_mbs={str(b): cost(loss_results[b], 0) for b in sizes})
    return Profile(
        model=ModelRef(name=spec.name or "model", factory=factory, args=args, depth=opts.depth,
                       fingerprint=fingerprint(spec.model)),
        device=device_info, dtype=opts.dtype, layers=layers, edges=edges, loss=loss,
        tied=tied, batch=batch_info, whole=whole,
        measurement=Measurement(timer="cuda-events" if device_info.type == "cuda" else "perf_counter",
                                repeats=opts.repeats, warmup=opts.warmup,
                                threads=torch.get_num_threads() if device_info.type == "cpu" else None),
    )
