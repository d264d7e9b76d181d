"""A profile estimated, not measured: each layer's FLOPs and bytes counted on the meta device and
priced at a device's datasheet peaks (``planner.clusters.Peaks``).

A layer's time is the roofline bound, the larger of its FLOPs over the peak rate and its bytes
over the memory bandwidth (Williams, Waterman and Patterson, "Roofline: an insightful visual
performance model", CACM 52(4), 2009). Real kernels reach a fraction of either peak, so the
times are optimistic; they rank layers and size stages where no device is at hand, and a
profile measured on the device replaces them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from planner.clusters import Peaks
from planner.formats import DeviceInfo
from planner.model import user_code
from planner.profile.collect import Measurements, Run, Steps, batch_info, crossing_keys, layer_module, rekey
from planner.profile.layer import LayerResult, Times, Weights
from planner.profile.measure import Stat, tensors
from planner.profile.meta import to_meta, value_bytes
from planner.profile.source import OnMeta
from planner.profile.structure import flow_bytes, layer_signature, same_as
from planner.split import LayeredModel

__all__ = ["estimate_model", "Counted", "roofline_s"]

Key = tuple[int, int]


@dataclass(frozen=True)
class Counted:
    """One pass of a layer, counted: floating-point operations and bytes read or written."""

    flops: float
    bytes: int


def roofline_s(c: Counted, peaks: Peaks, dtype: str) -> float:
    return max(c.flops / peaks.flops_per_s[dtype], c.bytes / peaks.bandwidth_bytes_per_s)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # meta storages have no address; their objects differ


def _saved(run_forward, fixed: set[int]) -> tuple[object, dict[int, int]]:
    found: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if _storage(t) not in fixed:
            found[_storage(t)] = t.untyped_storage().nbytes() or t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run_forward()
    return out, found


def count_layer(name: str, module: nn.Module, inputs: tuple, loss=None, target=None
                ) -> tuple[Counted, Counted, dict[int, int], set[int], object]:
    """Forward and backward of ``module`` (or ``loss``) on meta ``inputs``, counted; what the
    forward saves (storage -> bytes), the storages of the inputs and outputs, and the output."""
    xs = tuple(x.detach().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x
               for x in inputs)
    params = [p for p in module.parameters()] if loss is None else []
    fixed = {_storage(p) for p in params} | {_storage(b) for b in module.buffers()}
    with user_code(f"{name}: its forward on the meta device"), FlopCounterMode(display=False) as fwd:
        out, saved = _saved(lambda: module(*xs) if loss is None else loss(xs[0], target), fixed)
    outs = [t for t in tensors(out) if t.requires_grad]
    with user_code(f"{name}: its backward on the meta device"), FlopCounterMode(display=False) as bwd:
        if outs:
            torch.autograd.backward(outs, [torch.zeros_like(o) for o in outs])
    for p in params:
        p.grad = None
    pbytes = sum(p.numel() * p.element_size() for p in params)
    io = value_bytes(xs) + value_bytes(tuple(outs))
    ends = {_storage(t) for t in [*tensors(xs), *outs]}
    made = sum(n for s, n in saved.items() if s not in ends)  # saved beyond the inputs and outputs
    # forward: read the weights and inputs, write the outputs and what it saves besides; backward:
    # read the weights, the saved tensors and the output gradients, write the weight and input
    # gradients
    return (Counted(fwd.get_total_flops(), pbytes + io + made), Counted(bwd.get_total_flops(), 2 * pbytes + io + made),
            saved, ends, out)


def _result(fwd: Counted, bwd: Counted, saved: dict[int, int], in_storage: dict[int, Key], out,
            out_keys: list[Key], i: int, peaks: Peaks, dtype: str) -> LayerResult:
    out_storage = {_storage(t): k for k, t in zip(out_keys, tensors(out), strict=False) if k[0] == i}
    act = sum(n for s, n in saved.items() if s not in in_storage and s not in out_storage)
    weights = Weights(act_bytes=act, peak_bytes=0, wgrad_bytes=0,
                      saved_inputs={in_storage[s] for s in saved if s in in_storage},
                      saved_outputs={out_storage[s] for s in saved if s in out_storage},
                      out_bytes={})
    times = Times(fwd=Stat(roofline_s(fwd, peaks, dtype), 0.0), bwd=Stat(roofline_s(bwd, peaks, dtype), 0.0),
                  bwd_input=None, bwd_weight=None)
    return LayerResult(times, weights)


def _estimate_layer(lm: LayeredModel, stage: nn.Module, flow: list, i: int, b: int, peaks: Peaks,
                    dtype: str) -> LayerResult:
    fwd, bwd, saved, _, out = count_layer(f"layer {lm.names[i]} at micro-batch {b}", stage, tuple(flow[i]))
    xs = tuple(flow[i])  # the leaves count_layer detaches from these share their storages
    in_storage = {_storage(x): k for k, x in zip(crossing_keys(lm, i), xs, strict=False) if isinstance(x, torch.Tensor)}
    return _result(fwd, bwd, saved, in_storage, out, crossing_keys(lm, i + 1), i, peaks, dtype)


def estimate_model(source: OnMeta, run: Run, peaks: Peaks, dtype: str, device_info: DeviceInfo,
                   steps: Steps) -> Measurements:
    """Every layer and the loss, counted and priced at ``peaks``, at every size; no calibration."""
    lm, sizes = source.lm, sorted(run.batches)
    flows = {b: source.flow(run.batches[b][0], f"at micro-batch {b}") for b in sizes}
    signatures = [layer_signature(lm, i, layer_module(lm, i), source.stages[i], [flows[b] for b in sizes])
                  for i in range(lm.n_layers)]
    reps: list[int | None] = same_as(signatures) if run.dedupe else [None] * lm.n_layers
    m = Measurements(device=device_info, lm=lm, stages=source.stages, sizes=sizes, same_as=reps,
                     bytes_of={b: flow_bytes(lm, flows[b]) for b in sizes})
    batch_info(m, run)
    for b in sizes:
        m.layers[b] = []
        for i in range(lm.n_layers):
            steps.start(f"mbs {b}: layer {i + 1}/{lm.n_layers} {lm.names[i]}")
            rep = reps[i]
            m.layers[b].append(rekey(m.layers[b][rep], lm, rep, i) if rep is not None else
                               _estimate_layer(lm, source.stages[i], flows[b], i, b, peaks, dtype))
            steps.finish()
        steps.start(f"mbs {b}: loss")
        final = flows[b][-1]
        fwd, bwd, saved, _, _ = count_layer(f"the loss at micro-batch {b}", nn.Module(), (final,),
                                            loss=run.spec.loss, target=to_meta(run.batches[b][1]))
        ins = {_storage(t): k for k, t in zip(crossing_keys(lm, lm.n_layers)[:1], tensors(final), strict=False)}
        m.loss[b] = _result(fwd, bwd, saved, ins, None, [], lm.n_layers, peaks, dtype)
        steps.finish()
    return m

