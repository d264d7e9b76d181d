"""Build a plan's stage modules from the user's model: the same layers the profile measured
(``planner.split``), with the plan's recomputation, and the checks that the model is the one the
plan was made for."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from planner.errors import CheckFailed, InputError, ModelError
from planner.formats import Plan
from planner.model import ModelSpec, build_spec
from planner.split import LayeredModel, build_on_meta, contiguous_grad, keep_ties, layered


class Checkpointed(nn.Module):
    """Keep only the inputs of the wrapped layer; recompute its forward inside backward
    (activation checkpointing, Chen et al. 2016)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return checkpoint(self.inner, *args, use_reentrant=False)


@dataclass
class Built:
    lm: LayeredModel
    modules: list[nn.Module]  # one per plan stage
    bounds: list[tuple[int, int]]
    loss: Callable  # the loss as the engine calls it on the last stage's output


def build_model(plan: Plan, *, device: torch.device, dtype: torch.dtype) -> ModelSpec:
    """The plan's model, in training mode, on ``device`` (on meta: shapes only). Whether it is
    still the plan's model is checked once, before execution starts (``execute``)."""
    args = dict(plan.model.args)
    spec = build_on_meta(plan.model.factory, args) if device.type == "meta" else build_spec(plan.model.factory, args)
    keep_ties(spec.model, lambda m: m.to(device=device, dtype=dtype))
    spec.model.train()
    return spec


def stage_bounds(plan: Plan, names: list[str]) -> list[tuple[int, int]]:
    """Each plan stage's [start, stop) in the model's layer order; refuses plans whose layers
    are not the model's, in order."""
    index = {n: i for i, n in enumerate(names)}
    out = []
    expect = 0
    for st in plan.stages:
        missing = [n for n in st.layers if n not in index]
        if missing:
            raise CheckFailed(f"stage {st.index} names layer {missing[0]!r}, which the model does not have "
                              "(the model changed since the plan was made, or --depth differs)")
        idx = [index[n] for n in st.layers]
        if idx != list(range(expect, expect + len(idx))):
            raise InputError(f"stage {st.index}'s layers are not the next run of the model's layers")
        out.append((idx[0], idx[-1] + 1))
        expect = idx[-1] + 1
    if expect != len(names):
        raise CheckFailed(f"the plan covers {expect} of the model's {len(names)} layers")
    return out


def apply_recompute(module: nn.Module, layer_paths: list[str]) -> None:
    """Wrap the named layer modules inside a stage module in ``Checkpointed``."""
    for path in layer_paths:
        parent_path, _, leaf = path.rpartition(".")
        try:
            parent = module.get_submodule(parent_path) if parent_path else module
            inner = getattr(parent, leaf)
        except AttributeError:
            continue  # not a module of this stage (e.g. a functional layer)
        if isinstance(inner, nn.Module) and not isinstance(inner, Checkpointed):
            setattr(parent, leaf, Checkpointed(inner))


def build_stages(plan: Plan, spec: ModelSpec, example_inputs: tuple, stages: list[int] | None = None) -> Built:
    """Stage modules for the plan's stages (all, or those listed), sharing the model's parameters."""
    lm = layered(spec.model, example_inputs, spec.layers, plan.model.depth, spec.trace)
    bounds = stage_bounds(plan, lm.names)
    wanted = range(len(plan.stages)) if stages is None else stages
    modules: list[nn.Module] = []
    loss = spec.loss
    for s in wanted:
        a, b = bounds[s]
        module = lm.stage(a, b)
        st = plan.stages[s]
        chosen = st.layers if st.recompute == "full" else st.recompute_layers if st.recompute == "selective" else []
        apply_recompute(module, _local_paths(lm, st.layers, chosen))
        guard_cuts(module, s, first=a == 0, last=b >= lm.n_layers)
        if s == len(plan.stages) - 1:
            module, loss = lm.for_engine(module, spec.loss)
        modules.append(module)
    return Built(lm, modules, bounds, loss)


def guard_cuts(module: nn.Module, stage: int, first: bool, last: bool) -> None:
    """What crosses a cut is made the same in every mode: a stage's outputs contiguous (p2p sends
    refuse strided tensors, such as the ``tgt[:, :-1]`` a batch passes on) and its inputs'
    gradients too; and every micro-batch's outputs must be tensors of the dtype and shape of the
    first one's, since a receiving rank allocates its buffers once. Single mode, where adjacent
    stages hand tensors over directly, then fails where distributed mode would."""
    seen: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def inputs(_: nn.Module, args: tuple) -> tuple:
        return tuple(contiguous_grad(x) for x in args)

    def outputs(_: nn.Module, args: tuple, output):
        outs = output if isinstance(output, tuple) else (output,)
        for k, o in enumerate(outs):
            if not isinstance(o, torch.Tensor):
                raise ModelError(f"stage {stage}'s output {k} is a {type(o).__name__}: only tensors can pass "
                                 "between stages")
        meta = [(o.dtype, tuple(o.shape)) for o in outs]
        if not seen:
            seen.extend(meta)
        elif meta != seen:
            raise ModelError(f"stage {stage} sends {_meta(meta)} for one micro-batch and {_meta(seen)} for "
                             "another: a tensor crossing a cut must keep its dtype and shape")
        made = tuple(o.contiguous() for o in outs)
        return made if isinstance(output, tuple) else made[0]

    if not first:
        module.register_forward_pre_hook(inputs)
    if not last:
        module.register_forward_hook(outputs)


def _meta(meta: list[tuple[torch.dtype, tuple[int, ...]]]) -> str:
    return ", ".join(f"{str(d).removeprefix('torch.')} {list(shape)}" for d, shape in meta)


def _local_paths(lm: LayeredModel, stage_layers: list[str], chosen: list[str]) -> list[str]:
    """Module paths of chosen layers inside a stage module: traced and exported stages keep the
    model's paths (a module called several times is one module there: recomputing one of its
    calls recomputes every call in the stage); explicit sequences hold their layers as
    layers.<position>."""
    if lm.mode != "explicit":
        path = dict(zip(lm.names, lm.paths, strict=True))
        return list(dict.fromkeys(path[n] for n in chosen))
    return [f"layers.{stage_layers.index(n)}" for n in chosen]


def canonical_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every name a parameter goes by (tied weights have several) -> the parameter."""
    return dict(model.named_parameters(remove_duplicate=False))


def tied_groups(plan: Plan, lm: LayeredModel, model: nn.Module) -> list[tuple[list[int], list[str]]]:
    """Parameters used by layers on different stages: (stages, parameter names)."""
    stage_of = {}
    for st in plan.stages:
        for name in st.layers:
            stage_of[name] = st.index
    owners: dict[int, set[int]] = {}
    names: dict[int, str] = {}
    by_id = {id(p): n for n, p in model.named_parameters()}
    for i, name in enumerate(lm.names):
        for p in lm.layer_params(i).values():
            owners.setdefault(id(p), set()).add(stage_of[name])
            names[id(p)] = by_id.get(id(p), "")
    groups: dict[tuple[int, ...], list[str]] = {}
    for pid, stages in owners.items():
        if len(stages) > 1:
            groups.setdefault(tuple(sorted(stages)), []).append(names[pid])
    return [(list(k), v) for k, v in groups.items()]
