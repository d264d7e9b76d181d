"""What can be known of layers without running them for real: the bytes of every tensor
between layers, and which layers are identical (measured once, their costs shared).

Both come from a run on meta tensors (or on real ones: the same code reads shapes only).
"""

from __future__ import annotations

import hashlib

import torch
from torch import fx, nn

from planner.profile.measure import tensors
from planner.split import INPUT, LayeredModel

__all__ = ["flow_bytes", "layer_signature", "same_as"]

Key = tuple[int, int]


def _values_at(lm: LayeredModel, flow: list, k: int) -> list:
    """What crosses cut ``k`` in ``crossing(k)`` order: a layer's inputs, or the model's output."""
    return tensors(flow[k]) if k == lm.n_layers else list(flow[k])


def flow_bytes(lm: LayeredModel, flow: list) -> dict[Key, int]:
    """Bytes of every tensor between layers, by key. ``flow`` is what enters each layer, then the
    model's output (``LayeredModel.layer_inputs``), meta tensors or real."""
    out: dict[Key, int] = {}
    for k in range(lm.n_layers + 1):
        for t, v in zip(lm.crossing(k), _values_at(lm, flow, k), strict=False):
            if isinstance(v, torch.Tensor) and t.key not in out:
                out[t.key] = v.numel() * v.element_size()
    return out


def _tensor_sig(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"{tuple(v.shape)}:{v.dtype}:{v.requires_grad}"
    return type(v).__name__


def _module_sig(module: nn.Module) -> list[str]:
    """Submodule classes and training flags, parameter and buffer names, shapes and dtypes,
    relative to ``module``."""
    parts = [f"m {name} {type(m).__module__}.{type(m).__qualname__} {m.training}" for name, m in module.named_modules()]
    parts += [f"p {name} {tuple(p.shape)} {p.dtype} {p.requires_grad}" for name, p in module.named_parameters()]
    parts += [f"b {name} {tuple(b.shape)} {b.dtype}" for name, b in module.named_buffers()]
    return parts


def _relative(target: str, layer: str) -> str:
    return "@" + target[len(layer):] if target == layer or target.startswith(layer + ".") else target


def _graph_sig(stage: nn.Module, layer: str) -> list[str]:
    """The stage's operations (a traced stage: the layer's call and what joined it), with module
    paths made relative to the layer and arguments written by position."""
    graph = getattr(stage, "graph", None)
    if not isinstance(graph, fx.Graph):
        return []
    index = {n: k for k, n in enumerate(graph.nodes)}
    parts = []
    for n in graph.nodes:
        if n.op == "call_module":
            sub = stage.get_submodule(n.target)
            target = f"{_relative(n.target, layer)}={type(sub).__qualname__}"
        elif n.op == "get_attr":
            target = f"{_relative(n.target, layer)}={_tensor_sig(getattr(stage, n.target, None))}"
        elif n.op == "call_function":
            target = getattr(n.target, "__qualname__", repr(n.target))
        else:
            target = str(n.target) if n.op == "call_method" else ""
        args = fx.map_arg((n.args, n.kwargs), lambda x: f"%{index[x]}")
        parts.append(f"{n.op} {target} {args!r}")
    return parts


def layer_signature(lm: LayeredModel, i: int, layer: nn.Module, stage: nn.Module,
                    flows: list[list]) -> str:
    """sha256 of what decides a layer's costs: its module class, parameter and buffer shapes and
    dtypes, the stage's operations, and the shapes and dtypes of what enters and leaves it at
    every micro-batch size (``flows``, one ``layer_inputs`` result per size). Which inputs come
    from the batch and which outputs the layer makes are part of it, so that identical layers'
    inputs and outputs correspond by position."""
    parts = _module_sig(layer) + _graph_sig(stage, lm.paths[i])
    parts.append("in " + " ".join(str(t.producer == INPUT) for t in lm.crossing(i)))
    parts.append("out " + " ".join(str(t.producer == i) for t in lm.crossing(i + 1)))
    for flow in flows:
        parts.append("x " + " ".join(_tensor_sig(v) for v in _values_at(lm, flow, i)))
        parts.append("y " + " ".join(_tensor_sig(v) for v in _values_at(lm, flow, i + 1)))
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() + b"\n")
    return h.hexdigest()


def same_as(signatures: list[str]) -> list[int | None]:
    """For each layer, the first earlier layer with the same signature (None: the first of its kind)."""
    first: dict[str, int] = {}
    out: list[int | None] = []
    for i, sig in enumerate(signatures):
        out.append(first.get(sig))
        first.setdefault(sig, i)
    return out
