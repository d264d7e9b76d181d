"""Profiles built from given numbers rather than measured: for tests, benchmarks and what-ifs
(e.g. the published per-layer costs of a model you cannot profile here)."""

from __future__ import annotations

from collections.abc import Sequence

from planner.formats import (
    INPUT,
    LOSS,
    BatchInfo,
    DeviceInfo,
    Dtype,
    Edge,
    Layer,
    LayerCost,
    ModelRef,
    Profile,
    TiedGroup,
)


def chain_profile(
    fwd_s: Sequence[float],
    bwd_s: Sequence[float] | None = None,
    *,
    act_bytes: Sequence[int] | int = 0,
    param_bytes: Sequence[int] | int = 0,
    out_bytes_per_sample: Sequence[int] | int = 1024,
    mbs: Sequence[int] = (1,),
    skips: Sequence[tuple[int, int, int]] = (),
    tied: Sequence[tuple[Sequence[int], int]] = (),
    bwd_input_fraction: float = 0.5,
    split_cost: float = 1.0,
    name: str = "synthetic",
    names: Sequence[str] | None = None,
    dtype: Dtype = "float32",
    device_memory_bytes: int = 80 * 1024**3,
) -> Profile:
    """A sequential model of ``len(fwd_s)`` layers; costs at micro-batch size 1 scale linearly
    with the size. ``skips`` adds (src, dst, bytes_per_sample) tensors between layers; the split
    backward costs ``split_cost`` times the whole one."""
    n = len(fwd_s)
    bwd_s = list(bwd_s) if bwd_s is not None else [2 * f for f in fwd_s]
    names = list(names) if names is not None else [f"layers.{i}" for i in range(n)]

    def per(value, i):
        return value[i] if isinstance(value, Sequence) else value

    layers = []
    for i in range(n):
        by = {}
        for b in mbs:
            bw = bwd_s[i] * b
            by[str(b)] = LayerCost(fwd_s=fwd_s[i] * b, bwd_s=bw, bwd_input_s=bw * bwd_input_fraction * split_cost,
                                   bwd_weight_s=bw * (1 - bwd_input_fraction) * split_cost,
                                   act_bytes=per(act_bytes, i) * b,
                                   out_bytes=per(out_bytes_per_sample, i) * b)
        layers.append(Layer(name=names[i], param_bytes=per(param_bytes, i), by_mbs=by))
    edges = [Edge(src=INPUT, dst=names[0], bytes_per_sample=8)]
    edges += [Edge(src=names[i], dst=names[i + 1], bytes_per_sample=per(out_bytes_per_sample, i))
              for i in range(n - 1)]
    edges.append(Edge(src=names[n - 1], dst=LOSS, bytes_per_sample=per(out_bytes_per_sample, n - 1)))
    for k, (a, b, nbytes) in enumerate(skips):
        edges.append(Edge(src=names[a], dst=names[b], bytes_per_sample=nbytes, tensor=1 + k))
    return Profile(
        model=ModelRef(name=name, factory="planner.synthetic:chain_profile", args={"n_layers": n},
                       fingerprint=f"synthetic-{n}"),
        device=DeviceInfo(type="cuda", name="synthetic", memory_bytes=device_memory_bytes),
        dtype=dtype, layers=layers, edges=edges,
        tied=[TiedGroup(layers=[names[i] for i in members], param_bytes=nbytes) for members, nbytes in tied],
        batch=BatchInfo(input_bytes_per_sample=8, target_bytes_per_sample=8),
    )
