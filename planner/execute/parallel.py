"""Tensor parallelism and ZeRO stages 2 and 3 inside a pipeline stage, on torch's DTensor.

The workers form one DeviceMesh over (pp, dp, tp), global rank ``(pp_rank * dp + dp_rank) * tp +
tp_rank``: stages exchange tensors within a pp group (one per (dp, tp) coordinate), replicas
reduce gradients within a dp group, and a stage's tp ranks split its modules by the model's
``tp_plan`` (``torch.distributed.tensor.parallel.parallelize_module``; a stage cut from an exported
graph, which has no modules to split, places its parameters by the plan: ``graph_tp``). Inputs and outputs of a
stage stay plain tensors: replicated, or with sequence parallelism the local part of the
sequence, so the pipeline engine sends what it always sends. ZeRO 2 and 3 wrap each stage in
FSDP2's ``fully_shard`` over the dp group (the engine unshards a stage before its first action of
a step and reduce-scatters its gradients after its last backward).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle

from planner.errors import InputError
from planner.execute.graph_tp import is_exported_stage, tensor_parallel_graph, transposed
from planner.formats import Plan
from planner.model import plan_style

__all__ = ["check_tp", "full", "local", "make_mesh", "shard_stage", "tensor_parallel"]

SEQ = 1  # the sequence dimension of (batch, seq, hidden) activations


def make_mesh(plan: Plan, device: torch.device) -> DeviceMesh:
    par = plan.parallel
    return init_device_mesh(device.type, (par.pp, par.dp, par.tp), mesh_dim_names=("pp", "dp", "tp"))


def local(t: Any) -> Any:
    """This rank's part of a DTensor (a plain tensor as it is)."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: Any) -> Any:
    """The whole tensor of a DTensor, gathered from its ranks (a collective: every rank of its mesh
    calls it in the same order); a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def module_styles(module: nn.Module, tp_plan: dict[str, str]) -> dict[str, str]:
    """Each module path of ``module`` named by the plan (the path itself, or its last components)
    -> its style; where several keys match, the longest speaks."""
    styles = {path: plan_style(path, tp_plan) for path, _ in module.named_modules()}
    return {path: style for path, style in styles.items() if style is not None}


def _style(style: str, module: nn.Module, sp: bool) -> ParallelStyle | None:
    """torch's parallel style for one module (None: nothing to do without sequence parallelism)."""
    seq = Shard(SEQ)
    if style == "colwise":
        return ColwiseParallel()
    if style == "rowwise":
        if isinstance(module, nn.Embedding):
            return RowwiseParallel(input_layouts=Replicate())
        return RowwiseParallel(output_layouts=seq if sp else Replicate())
    if style == "colwise_gather":
        return ColwiseParallel(input_layouts=seq if sp else Replicate(), output_layouts=Replicate())
    if not sp:
        return None
    if style == "sequence":
        return SequenceParallel(sequence_dim=SEQ, use_local_output=True)
    if style == "gather_input":
        return PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),), use_local_output=True)
    return PrepareModuleOutput(output_layouts=(Replicate(),), desired_output_layouts=(seq,), use_local_output=True)


def _check_divisible(path: str, module: nn.Module, style: str, tp: int) -> None:
    """The dimension a style splits divides by tp (a head or feature cannot be split)."""
    dims = {"colwise": 0, "colwise_gather": 0, "rowwise": 0 if isinstance(module, nn.Embedding) else 1}
    weight = getattr(module, "weight", None)
    if style not in dims or not isinstance(weight, torch.Tensor):
        return
    dim = 1 - dims[style] if transposed(module) else dims[style]
    size = weight.shape[dim]
    if size % tp:
        raise InputError(f"tp_plan: {path} ({style}) splits {size} {'rows' if dim == 0 else 'columns'}, "
                         f"not a multiple of tp {tp}: solve with a tp that divides it")


def _heads(attn: nn.Module) -> int | None:
    """An attention's number of (query) heads, under the names planner's and Hugging Face's
    attentions give it; None where it has none."""
    for owner in (attn, getattr(attn, "config", None)):
        for name in ("n_head", "num_heads", "num_attention_heads"):
            heads = getattr(owner, name, None)
            if isinstance(heads, int) and heads > 0:
                return heads
    return None


def check_tp(model: nn.Module, tp_plan: dict[str, str], tp: int) -> None:
    """Before any worker starts (``model`` may be on the meta device): every dimension the plan
    splits divides by tp, and a colwise module of an attention (a parent with an integer
    ``head_dim``, as Hugging Face's and planner's attentions have) splits whole heads. A module
    whose outputs are a whole multiple of the attention's heads (``n_head``, ``num_heads`` or
    ``config.num_attention_heads``) fuses several projections of them (GPT-2's and planner's
    ``c_attn``: q, k and v), and each rank holds its share of every one: tp divides the heads."""
    for path, style in module_styles(model, tp_plan).items():
        module = model.get_submodule(path)
        _check_divisible(path, module, style, tp)
        parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
        head_dim, weight = getattr(parent, "head_dim", None), getattr(module, "weight", None)
        if style != "colwise" or not isinstance(head_dim, int) or not isinstance(weight, torch.Tensor):
            continue
        features = weight.shape[1 if transposed(module) else 0]
        units, heads = features // head_dim, _heads(parent)
        fused = units // heads if heads is not None and units > heads and units % heads == 0 else 1
        if fused > 1 and heads is not None and heads % tp:
            raise InputError(f"tp {tp} splits {path} inside a head: its {features} outputs are {fused} "
                             f"projections (fused, as q, k and v) of the attention's {heads} "
                             f"head{'s' if heads > 1 else ''} of head_dim {head_dim}, and {heads} is not a "
                             f"multiple of tp {tp}: solve with a tp that divides the model's heads (and "
                             "key-value heads)")
        if units % tp:
            raise InputError(f"tp {tp} splits {path} inside a head: its {features} outputs are "
                             f"{units} heads' worth of head_dim {head_dim}, not a multiple of tp "
                             f"{tp}: solve with a tp that divides the model's heads (and key-value heads)")


def tensor_parallel(module: nn.Module, tp_plan: dict[str, str] | None, mesh: DeviceMesh, sp: bool,
                    model: nn.Module | None = None) -> int:
    """Split ``module`` (one stage of ``model``) over the tp mesh by the model's plan; how many modules
    (a stage cut from an exported graph: parameters, ``planner.execute.graph_tp``) were split."""
    if tp_plan is None:
        raise InputError("the model has no tp_plan (ModelSpec.tp_plan): it runs with tp 1; give the factory "
                         "one, or solve with --tp 1")
    if is_exported_stage(module):
        return tensor_parallel_graph(module, module if model is None else model, tp_plan, mesh, sp)
    tp = mesh.size()
    styles: dict[str, ParallelStyle] = {}
    for path, style in module_styles(module, tp_plan).items():
        sub = module.get_submodule(path)
        _check_divisible(path, sub, style, tp)
        made = _style(style, sub, sp)
        if made is not None:
            styles[path] = made
    if sp and not any(s == "sequence" for s in tp_plan.values()):
        raise InputError("the plan has sequence parallelism, and the model's tp_plan marks no norm 'sequence': "
                         "solve with --no-sequence-parallel, or add the norms to the tp_plan")
    if styles:
        parallelize_module(module, mesh, styles)
    return len(styles)


def shard_stage(module: nn.Module, mesh: DeviceMesh, zero: int) -> nn.Module:
    """ZeRO 2 or 3 over the dp mesh by FSDP2: parameters, gradients and optimizer state sharded at
    rest; stage 3 also frees the gathered weights after each forward (``reshard_after_forward``)."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(module, mesh=mesh, reshard_after_forward=zero >= 3)
    return module
