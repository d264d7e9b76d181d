"""Tensor parallelism of a stage cut from an exported graph (``ModelSpec(trace="export")``: the
Hugging Face models), whose layers are graphs of ATen operations with no ``nn.Linear`` for
``parallelize_module`` to act on.

The model's ``tp_plan`` names modules as for a traced model; here it places their parameters as
DTensors over the tp mesh (Megatron-LM: Shoeybi et al., 2019, section 3): a colwise module's
output features are split (``nn.Linear`` weight and bias ``Shard(0)``; transformers' ``Conv1D``,
whose weight is (in, out), ``Shard(1)``), a rowwise module's input features (``Shard(1)``,
``Conv1D`` ``Shard(0)``, the bias replicated), a rowwise embedding's rows; everything else is
replicated. The exported operations then run on DTensors, whose sharding propagation keeps a
head's columns together through the graph's views (their shapes are global). The graph is
rewritten where propagation alone would not give Megatron's collectives:

- a colwise module's input is marked so that its gradient is all-reduced once, where the
  gradients of all the modules reading it have been summed (Megatron's ``f``);
- a rowwise module's output, and a colwise_gather's, is made whole there (all-reduced, gathered)
  with its gradient passed through as it is (Megatron's ``g``);
- attention (``scaled_dot_product_attention``) runs on each rank's own heads;
- a colwise output split into equal pieces (GPT-2's fused q|k|v) is split on each rank: its
  parameters are laid out so that a rank holds its share of every piece (``TP_ORDER`` records the
  order, and gradients are compared with the reference in the model's own order);
- tensors the graph makes itself (positions, masks) are replicated DTensors, and the export's
  metadata checks, which DTensor does not run, are dropped.

A stage takes and returns plain tensors, replicated, as the pipeline engine sends them.
"""

from __future__ import annotations

import operator
import re
from typing import Any

import torch
from torch import fx, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from torch.utils import _pytree as pytree

from planner.errors import InputError
from planner.model import plan_style

__all__ = ["TP_ORDER", "is_exported_stage", "model_order", "tensor_parallel_graph", "transposed"]

TP_ORDER = "_planner_tp_order"  # attribute of a parameter laid out piecewise: its global order along its dim
STYLES = ("colwise", "rowwise", "colwise_gather")
_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_CHECKS = (torch.ops.aten._assert_tensor_metadata.default,)
_SPLITS = (torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default, torch.ops.aten.chunk.default)
_VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)


def is_exported_stage(module: nn.Module) -> bool:
    """A stage built from an exported graph: its layers are graph modules of ATen operations
    (``torch.ops.aten...``), where a traced stage's graph calls modules and torch functions."""
    return any(isinstance(m, fx.GraphModule) and any(isinstance(n.target, torch._ops.OpOverload) for n in m.graph.nodes)
               for m in module.modules())


# ----------------------------------------------------------------------------- autograd pieces


class _GradAllReduced(torch.autograd.Function):
    """Identity forward; the gradient made whole (all-reduced) backward: Megatron's ``f``."""

    @staticmethod
    def forward(ctx, t):
        return t

    @staticmethod
    def backward(ctx, grad):
        return grad.redistribute(grad.device_mesh, [Replicate()])


class _Whole(torch.autograd.Function):
    """The tensor made whole forward (a partial sum all-reduced, a split gathered); backward the
    gradient as it is, or this rank's part of it for a split input: Megatron's ``g``."""

    @staticmethod
    def forward(ctx, t):
        ctx.placements = t.placements
        return t.redistribute(t.device_mesh, [Replicate()])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.redistribute(grad.device_mesh, [Replicate()])
        if all(p.is_shard() for p in ctx.placements):
            return grad.redistribute(grad.device_mesh, ctx.placements)
        return grad


def grad_all_reduced(t):
    return _GradAllReduced.apply(t) if isinstance(t, DTensor) else t


def whole(t):
    if not isinstance(t, DTensor) or all(p.is_replicate() for p in t.placements):
        return t
    return _Whole.apply(t)


def replicated_like(t, like):
    """A tensor the graph made (a position, a mask) as a replicated DTensor on ``like``'s mesh."""
    if isinstance(t, torch.Tensor) and not isinstance(t, DTensor) and isinstance(like, DTensor):
        return DTensor.from_local(t, like.device_mesh, [Replicate()] * like.device_mesh.ndim, run_check=False)
    return t


def attention_by_head(q, k, v, *args, **kwargs):
    """``scaled_dot_product_attention`` on this rank's heads (dimension 1 of (mb, heads, seq,
    head_dim)); a mask broadcast over the heads is whole on every rank."""
    if not isinstance(q, DTensor):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, *args, **kwargs)
    mesh, heads = q.device_mesh, [Shard(1)]
    q, k, v = (t.redistribute(mesh, heads).to_local() for t in (q, k, v))
    args = tuple(a.redistribute(mesh, [Replicate()]).to_local() if isinstance(a, DTensor) else a for a in args)
    mask = kwargs.get("attn_mask")
    if isinstance(mask, DTensor):
        kwargs = {**kwargs, "attn_mask": mask.redistribute(mesh, [Replicate()]).to_local()}
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, *args, **kwargs)
    return DTensor.from_local(out, mesh, heads, run_check=False)


def split_pieces(t, size, dim=0):
    """A colwise output laid out piecewise (each rank holds its share of every piece) split into
    its pieces on each rank, each piece split over the ranks as the output was."""
    if not isinstance(t, DTensor):
        return torch.split(t, size, dim)
    dim = dim % t.ndim
    n = t.shape[dim] // size
    parts = t.to_local().chunk(n, dim)
    return tuple(DTensor.from_local(p, t.device_mesh, t.placements, run_check=False) for p in parts)


# ----------------------------------------------------------------------------- placements


def transposed(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a Linear whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D"


def _placement(style: str, module: nn.Module, name: str) -> Placement:
    """Where a parameter of a module of this style is split (see the module's docstring)."""
    if isinstance(module, nn.Embedding):
        return Shard(0) if style == "rowwise" else Shard(1)
    if style == "rowwise":
        return Replicate() if name == "bias" else Shard(0 if transposed(module) else 1)
    return Shard(0) if name == "bias" else Shard(1 if transposed(module) else 0)


def _local_part(p: torch.Tensor, place: Placement, mesh: DeviceMesh, pieces: int, path: str) -> torch.Tensor:
    """This rank's part of ``p``: whole (replicated), or its share of each of ``pieces`` equal
    pieces along the split dimension (one piece: a plain shard)."""
    if not isinstance(place, Shard):
        return p.detach()
    tp, rank = mesh.size(), mesh.get_local_rank()
    size = p.shape[place.dim]
    if size % (tp * pieces):
        raise InputError(f"tp_plan: {path} splits {size} features{f' in {pieces} pieces' if pieces > 1 else ''}, "
                         f"not a multiple of tp {tp}: solve with a tp that divides it")
    parts = [piece.chunk(tp, place.dim)[rank] for piece in p.detach().chunk(pieces, place.dim)]
    return torch.cat(parts, place.dim).contiguous()


def _order(size: int, pieces: int, tp: int) -> torch.Tensor:
    """The model's positions of a piecewise layout's elements along its dim: rank 0's share of
    every piece, then rank 1's, ..."""
    index = torch.arange(size).view(pieces, tp, size // (pieces * tp))
    return index.transpose(0, 1).reshape(-1)


def model_order(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A whole tensor of parameter ``p`` (its gradient, gathered) in the model's own order."""
    order = getattr(p, TP_ORDER, None)
    if order is None:
        return t
    dim, index = order
    out = torch.empty_like(t)
    out.index_copy_(dim, index.to(t.device), t)
    return out


# ----------------------------------------------------------------------------- the graph


def model_path(path: str) -> str:
    """A stage's path as the model's: without the ``inner`` of planner's wrappers (the last stage's
    output, a recomputed layer), as ``stage_parameters`` names parameters."""
    return re.sub(r"(^|\.)inner\.", r"\1", path)


def _style_of(path: str, tp_plan: dict[str, str]) -> str | None:
    style = plan_style(path, tp_plan)
    if style is None:
        return None
    if style not in STYLES:
        raise InputError(f"tp_plan: {path} is {style!r}, which a model cut from its exported graph does not run "
                         f"(it runs {', '.join(STYLES)}); solve with --no-sequence-parallel")
    return style


def _activation(u: fx.Node) -> fx.Node | None:
    """The activation a matrix product of a weight reads: linear(x, w), addmm(bias, x, w), mm(x, w)."""
    at = 1 if u.target is torch.ops.aten.addmm.default else 0
    x = u.args[at] if len(u.args) > at else None
    return x if isinstance(x, fx.Node) and x.op != "get_attr" else None


def _split_after(u: fx.Node) -> tuple[fx.Node, int] | None:
    """The split of ``u``'s output (through views) into equal pieces along its last dim, and how many."""
    n = u
    while len(n.users) == 1 and next(iter(n.users)).target in _VIEWS:
        n = next(iter(n.users))
    splits = [s for s in n.users if s.target in _SPLITS]
    if len(splits) != 1 or len(n.users) != 1:
        return None
    s = splits[0]
    val = n.meta.get("val")
    args: list[Any] = [*s.args, s.kwargs.get("dim", 0)][:3]
    if not isinstance(val, torch.Tensor) or len(args) < 3 or args[2] % val.ndim != val.ndim - 1:
        return None
    size = int(val.shape[-1])
    if s.target is torch.ops.aten.chunk.default:
        pieces = int(args[1])
    elif s.target is torch.ops.aten.split.Tensor:
        pieces = size // int(args[1]) if size % int(args[1]) == 0 else 0
    else:
        sizes = [int(x) for x in args[1]]
        pieces = len(sizes) if len(set(sizes)) == 1 else 0
    return (s, pieces) if pieces > 1 else None


def _check_heads(out: fx.Node, path: str, tp: int) -> None:
    """A colwise output viewed as (..., heads, head_dim) splits whole heads: tp divides the heads."""
    for v in out.users:
        val, src = v.meta.get("val"), out.meta.get("val")
        if v.target not in _VIEWS or not isinstance(val, torch.Tensor) or not isinstance(src, torch.Tensor):
            continue
        if val.ndim == src.ndim + 1 and isinstance(val.shape[-2], int) and val.shape[-2] % tp:
            raise InputError(f"tp {tp} does not divide the {val.shape[-2]} attention heads of {path}: solve with "
                             "a tp that divides the model's heads (and key-value heads)")


def _after(g: fx.Graph, n: fx.Node, fn: Any, *extra: Any) -> fx.Node:
    """``fn(n, *extra)`` put after ``n``, in its place for every user of ``n``."""
    with g.inserting_after(n):
        new = g.call_function(fn, (n, *extra))

    def others(user: fx.Node) -> bool:
        return user is not new
    n.replace_all_uses_with(new, delete_user_cb=others)
    return new


class _Layer:
    """One layer's graph rewritten for tensor parallelism (see the module's docstring)."""

    def __init__(self, prefix: str, gm: fx.GraphModule, tp_plan: dict[str, str], tp: int):
        self.prefix, self.gm, self.g, self.tp = prefix, gm, gm.graph, tp
        self.styles: dict[str, str] = {}  # parameter's path (the model's) -> style
        self.pieces: dict[str, int] = {}  # parameter's path (the model's) -> pieces of a piecewise layout
        self.gates: dict[fx.Node, fx.Node] = {}
        for n in list(self.g.nodes):
            if n.op == "call_function" and n.target in _CHECKS and not n.users:
                self.g.erase_node(n)
            elif n.op == "call_function" and n.target is _SDPA:
                n.target = attention_by_head
            elif n.op == "get_attr":
                self._weight(n, tp_plan)
        self._replicate_made()
        self.g.lint()
        gm.recompile()

    def _weight(self, n: fx.Node, tp_plan: dict[str, str]) -> None:
        path = f"{self.prefix}.{n.target}" if self.prefix else str(n.target)
        module_path, _, leaf = model_path(path).rpartition(".")
        style = _style_of(module_path, tp_plan)
        if style is None:
            return
        self.styles[model_path(path)] = style
        if leaf != "weight":
            return
        for u in list(n.users):
            if style in ("colwise", "colwise_gather"):
                self._gate(u)
            if style in ("rowwise", "colwise_gather"):
                _after(self.g, u, whole)
            if style == "colwise":
                self._colwise_out(u, module_path)

    def _gate(self, u: fx.Node) -> None:
        """The activation of a colwise product read through one gradient all-reduce per activation."""
        x = _activation(u)
        if x is None or u.target is torch.ops.aten.embedding.default:
            return
        if x not in self.gates:
            with self.g.inserting_after(x):
                self.gates[x] = self.g.call_function(grad_all_reduced, (x,))
        u.replace_input_with(x, self.gates[x])

    def _colwise_out(self, u: fx.Node, module_path: str) -> None:
        split = _split_after(u)
        if split is None:
            outs = [u, *(v for v in u.users if v.target in _VIEWS)]
        else:
            s, pieces = split
            size = int(s.args[0].meta["val"].shape[-1]) // pieces  # type: ignore[union-attr]
            s.target, s.args, s.kwargs = split_pieces, (s.args[0], size, -1), {}
            for name in ("weight", "bias"):
                self.pieces[f"{module_path}.{name}"] = pieces
            outs = [g for g in s.users if g.target is operator.getitem]
        for out in outs:
            _check_heads(out, module_path, self.tp)

    def _replicate_made(self) -> None:
        """Tensors made from no tensor (positions, masks) replicated on the mesh of one the layer has."""
        nodes = list(self.g.nodes)
        like = next((n for n in nodes if n.op in ("placeholder", "get_attr")
                     and isinstance(n.meta.get("val", torch.empty(0)), torch.Tensor)), None)
        if like is None:
            return
        for n in nodes:
            if n.op != "call_function" or n.target in (replicated_like, whole, grad_all_reduced):
                continue
            if isinstance(n.meta.get("val"), torch.Tensor) and not any(
                    isinstance(x.meta.get("val"), torch.Tensor) or x.op == "get_attr" for x in n.all_input_nodes):
                _after(self.g, n, replicated_like, like)


# ----------------------------------------------------------------------------- parameters


def _distribute(stage: nn.Module, model: nn.Module, layers: list[_Layer], mesh: DeviceMesh) -> dict[int, nn.Parameter]:
    """Every parameter of the stage replaced by a DTensor placed by its style, every buffer and
    constant by a replicated one; the model's own modules get the same parameters (tied weights
    stay one), so parameters keep the model's names. The new parameters by the old ones' ids."""
    styles = {k: v for layer in layers for k, v in layer.styles.items()}
    pieces = {k: v for layer in layers for k, v in layer.pieces.items()}
    owner = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    done: dict[int, nn.Parameter] = {}
    placed: dict[int, tuple[Placement, str]] = {}
    for prefix, mod in stage.named_modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            path = f"{prefix}.{name}" if prefix else name
            module_path = model_path(path).rpartition(".")[0]
            style = styles.get(model_path(path))
            place = _placement(style, owner.get(id(p)) or _by_path(model, module_path), name) if style else Replicate()
            if id(p) in placed and placed[id(p)][0] != place:
                raise InputError(f"tp_plan: {path} is one weight with {placed[id(p)][1]}, split otherwise there: "
                                 "give tied modules styles that split it alike")
            placed.setdefault(id(p), (place, path))
            if id(p) not in done:
                done[id(p)] = _dtensor_parameter(p, place, mesh, pieces.get(model_path(path), 1), module_path)
            mod._parameters[name] = done[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is not None and not isinstance(b, DTensor):
                mod._buffers[name] = DTensor.from_local(b, mesh, [Replicate()], run_check=False)
        for name, v in list(vars(mod).items()):
            if isinstance(v, torch.Tensor) and not isinstance(v, (nn.Parameter, DTensor)):
                setattr(mod, name, DTensor.from_local(v, mesh, [Replicate()], run_check=False))
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and id(p) in done:
                mod._parameters[name] = done[id(p)]
    return done


def _placed_as(p: DTensor) -> Any:
    """A hook placing each gradient of ``p`` as ``p`` before it is accumulated: an embedding's
    gradient comes back whole on every rank (DTensor's embedding backward), and only the rank's
    rows are kept."""
    mesh, placements = p.device_mesh, p.placements

    def hook(grad):
        if isinstance(grad, DTensor) and grad.placements != placements:
            return grad.redistribute(mesh, placements)
        return grad
    return hook


def _by_path(model: nn.Module, path: str) -> nn.Module:
    """The model's module at its path, for a stage whose parameters are copies (``planner profile
    --tp`` makes each layer real apart)."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return nn.Module()


def _dtensor_parameter(p: nn.Parameter, place: Placement, mesh: DeviceMesh, pieces: int, path: str) -> nn.Parameter:
    local = _local_part(p, place, mesh, pieces, path)
    out = nn.Parameter(DTensor.from_local(local, mesh, [place], run_check=False), requires_grad=p.requires_grad)
    if out.requires_grad:
        out.register_hook(_placed_as(out))  # type: ignore[arg-type]
    if pieces > 1 and isinstance(place, Shard):
        setattr(out, TP_ORDER, (place.dim, _order(p.shape[place.dim], pieces, mesh.size())))
    return out


def _plain_boundary(stage: nn.Module, mesh: DeviceMesh) -> None:
    """The stage takes plain tensors (replicated on every tp rank) and returns them."""
    def inputs(_: nn.Module, args: tuple) -> tuple:
        return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                     if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in args)

    def outputs(_: nn.Module, args: tuple, out: Any) -> Any:
        return pytree.tree_map(lambda t: whole(t).to_local() if isinstance(t, DTensor) else t, out)
    stage.register_forward_pre_hook(inputs)
    stage.register_forward_hook(outputs)


def tensor_parallel_graph(stage: nn.Module, model: nn.Module, tp_plan: dict[str, str], mesh: DeviceMesh,
                          sp: bool) -> int:
    """Split an exported stage over the tp mesh by the model's plan; how many parameters were split."""
    if sp:
        raise InputError("the plan has sequence parallelism, which a model cut from its exported graph does not "
                         "run: plan and measure it with --no-sequence-parallel")
    layers = [_Layer(prefix, gm, tp_plan, mesh.size()) for prefix, gm in stage.named_modules()
              if isinstance(gm, fx.GraphModule)]
    done = _distribute(stage, model, layers, mesh)
    _plain_boundary(stage, mesh)
    return sum(1 for p in done.values() if isinstance(p, DTensor) and not all(x.is_replicate() for x in p.placements))
