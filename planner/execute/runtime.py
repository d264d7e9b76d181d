"""Drive PyTorch's pipeline engine with planner's own action lists.

``_PipelineScheduleRuntime`` is private API of ``torch.distributed.pipelining``: it takes a
compute-only action list per rank and inserts the sends and receives itself. planner loads the
same lists the simulator timed, so what runs is what was predicted. Tested against the torch
range in pyproject.toml.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, Node
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import _Action, _ComputationType, _PipelineScheduleRuntime

from planner.schedules import Kind, Schedule

_KIND = {
    Kind.FORWARD: _ComputationType.FORWARD,
    Kind.FULL_BACKWARD: _ComputationType.FULL_BACKWARD,
    Kind.BACKWARD_INPUT: _ComputationType.BACKWARD_INPUT,
    Kind.BACKWARD_WEIGHT: _ComputationType.BACKWARD_WEIGHT,
}


def engine_actions(schedule: Schedule, single: bool = False) -> dict[int, list[_Action | None]]:
    """The engine's per-rank action lists. ``single``: every stage on rank 0, in the order the
    simulator executes the plan's actions (a valid order of the whole pipeline)."""
    if single:
        return {0: [_Action(a.stage, _KIND[a.kind], a.mb) for a in schedule.global_order()]}
    return {r: [_Action(a.stage, _KIND[a.kind], a.mb) for a in actions]
            for r, actions in enumerate(schedule.ranks)}


def _zero_integer_placeholders() -> None:
    """The engine infers a stage's shapes by running it on tensors made from metadata, left
    uninitialised; integer inputs passed along (token ids for a later embedding) would then
    index out of range. Make such placeholders zeros. Private API: skipped where it differs."""
    try:
        from torch.distributed.pipelining._utils import _TensorMeta
    except ImportError:
        return
    original = getattr(_TensorMeta, "to_tensor", None)
    if original is None or getattr(original, "_planner", False):
        return

    def to_tensor(self, device):
        t = original(self, device)
        if not t.is_floating_point() and not t.is_complex():
            t.zero_()
        return t

    to_tensor._planner = True  # type: ignore[attr-defined]
    setattr(_TensorMeta, "to_tensor", to_tensor)  # noqa: B010 (a method replaced on purpose)


_zero_integer_placeholders()


# ------------------------------------------------------------------ split backward (I, then W)
#
# The zero-bubble split (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", section 2): I computes
# the stage inputs' gradients and keeps, for W, the gradient arriving at every graph node where a
# weight's path joins the input path; W continues from those nodes to the weights. planner runs
# its own split rather than the engine's default one, which fails on stages that are not a plain
# chain: it detaches every output in place after I (an output that is a view, such as a tensor
# passed through the stage untouched, cannot be; one that a later layer of the stage saved for
# backward is then lost to W), and it runs W once per group of weights, each run
# freeing the graph the next one still needs whenever a weight's path joins the input path deep
# inside the stage (layers fed by a model input that needs no gradient, as a decoder fed by
# target tokens). Here weights are grouped so that no node seeds two groups, and every W pass but
# the last keeps the graph; it is freed when the last pass has run.


def _node(t: torch.Tensor) -> Node:
    """The autograd node that receives ``t``'s gradient (a leaf's gradient accumulator), for a
    tensor that requires gradients."""
    if t.grad_fn is not None:
        return t.grad_fn
    view = t.view_as(t).grad_fn  # a leaf's accumulator is made on first use
    if view is None:
        raise RuntimeError("the split backward ran under torch.no_grad()")
    accumulator = view.next_functions[0][0]
    if accumulator is None:
        raise RuntimeError("a tensor that requires gradients has no gradient accumulator")
    return accumulator


def _consumers(roots: list[Node]) -> dict[Node, list[Node]]:
    """node -> the nodes whose backward feeds it, over the graph below ``roots``."""
    out: dict[Node, list[Node]] = {r: [] for r in roots}
    stack = list(roots)
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            if nxt not in out:
                out[nxt] = []
                stack.append(nxt)
            out[nxt].append(node)
    return out


def _reach(starts: Iterable[Node], consumers: dict[Node, list[Node]], stop: set[Node]) -> tuple[set[Node], set[Node]]:
    """Nodes reached from ``starts`` towards the outputs, not passing ``stop``; and the ``stop``
    nodes met on the way."""
    seen: set[Node] = set()
    met: set[Node] = set()
    stack = [n for n in starts if n in consumers]
    seen.update(stack)
    while stack:
        for c in consumers[stack.pop()]:
            if c in stop:
                met.add(c)
            elif c not in seen:
                seen.add(c)
                stack.append(c)
    return seen, met


@dataclass(eq=False)  # removed from lists by identity: equality would compare weight tensors
class _Group:
    """Weights whose paths meet the rest of the graph at the same nodes: the join nodes on the
    input path, and the outputs reached without passing an input's path (with their gradients)."""

    weights: list[nn.Parameter]
    seeds: set[Node]
    joins: list[Node] = field(default_factory=list)
    roots: list[tuple[GradientEdge, torch.Tensor]] = field(default_factory=list)


@dataclass
class WeightWork:
    """What I leaves for W: the weight groups, and the gradient each join node received in I."""

    groups: list[_Group]
    grads: dict[Node, tuple] = field(default_factory=dict)


def _weight_groups(params: list[nn.Parameter], consumers: dict[Node, list[Node]], on_input_path: set[Node],
                   roots: dict[Node, tuple[GradientEdge, torch.Tensor]]) -> list[_Group]:
    """Weights grouped so that no two groups share a seed node (a weight whose path meets two
    groups' seeds merges them): each W pass then computes its weights' gradients exactly once."""
    groups: list[_Group] = []
    for p in params:
        seen, met = _reach([_node(p)], consumers, on_input_path)
        seeds = met | (seen & roots.keys())
        if not seeds:
            continue  # not used by this stage's outputs: no gradient
        overlapping = [g for g in groups if g.seeds & seeds]
        merged = _Group([p], seeds)
        for g in overlapping:
            merged.weights = g.weights + merged.weights
            merged.seeds |= g.seeds
            groups.remove(g)
        groups.append(merged)
    for g in groups:
        g.joins = [n for n in g.seeds if n in on_input_path]
        g.roots = [roots[n] for n in g.seeds if n in roots]
    return groups


def backward_input(outputs, output_grads, inputs: list, weights: Iterable[nn.Parameter]) -> tuple[tuple, WeightWork]:
    """I: the gradients of ``inputs`` (None for those that take none), and the work W needs."""
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs,)
    pairs = [(o, torch.ones_like(o) if output_grads is None else output_grads[i])
             for i, o in enumerate(outputs) if o.requires_grad]
    pairs = [(o, g) for o, g in pairs if g is not None]  # no gradient came back: it is zero
    out_nodes = [_node(o) for o, _ in pairs]
    consumers = _consumers(out_nodes)
    wanted = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    on_input_path, _ = _reach([_node(x) for x in wanted], consumers, set())
    roots = {n: (GradientEdge(n, o.output_nr), g) for n, (o, g) in zip(out_nodes, pairs, strict=True)
             if n not in on_input_path}
    work = WeightWork(_weight_groups([p for p in weights if p.requires_grad], consumers, on_input_path, roots))

    def keeper(node: Node):
        def hook(grad_outputs):
            work.grads[node] = grad_outputs
        return hook

    handles = [n.register_prehook(keeper(n)) for g in work.groups for n in g.joins]
    try:
        grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], retain_graph=True,
                                    allow_unused=True) if pairs and wanted else [None] * len(wanted)
    finally:
        for h in handles:
            h.remove()
    by_id = {id(x): g for x, g in zip(wanted, grads, strict=True)}
    if output_grads is None:  # the loss: its part of the graph (the logits' softmax) is I's alone
        for o, _ in pairs:
            if not o._is_view():
                o.detach_()
    # Other outputs stay attached: one may be a view, or be saved by a later layer of the stage (a
    # skip connection sent on and used here); W frees the graph when it runs.
    return tuple(by_id.get(id(x)) if isinstance(x, torch.Tensor) else None for x in inputs), work


def _group_backward(group: _Group, kept: dict[Node, tuple], last: bool) -> None:
    """One W pass: the group's weights from its seeds, its join nodes pinned to what they received
    in I (gradients reaching one again through another are not added twice). The graph is kept for
    the passes after it, whose paths may run through the same nodes."""
    edges, seeds = [], []
    for node in group.joins:
        for i, g in enumerate(kept.get(node, ())):
            if g is not None:
                edges.append(GradientEdge(node, i))
                seeds.append(g)
    for edge, g in group.roots:
        edges.append(edge)
        seeds.append(g)
    if not edges:
        return
    handles = [n.register_prehook(lambda _, pinned=kept[n]: pinned) for n in group.joins if n in kept]
    try:
        found = torch.autograd.grad(edges, [GradientEdge(_node(p), 0) for p in group.weights], seeds,
                                    retain_graph=not last, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    for p, g in zip(group.weights, found, strict=True):
        if g is not None:
            p.grad = g if p.grad is None else p.grad.add_(g)


def backward_weight(work: WeightWork) -> None:
    """W: the weights' gradients, accumulated into their ``.grad``, one pass per weight group (a
    pass over every group at once would redo input-path work lying between them)."""
    try:
        for k, group in enumerate(work.groups):
            _group_backward(group, work.grads, last=k == len(work.groups) - 1)
    finally:
        work.groups.clear()  # W consumes the work: the graph and the kept gradients go now
        work.grads.clear()


def recomputes(module: nn.Module) -> bool:
    """Whether the stage recomputes layers in its backward. torch's checkpoint recomputes a layer
    in every backward pass that reaches it: split into I and one W pass per weight group, the
    layer would be recomputed in I and again in each W pass, and what I recomputed but did not
    consume would stay alive until W. Such a stage's backward runs whole in I instead and its W
    does nothing (``CostTable.stage_cost`` prices it so)."""
    from planner.execute.stages import Checkpointed

    return any(isinstance(m, Checkpointed) for m in module.modules())


class _Stage(PipelineStage):
    """A pipeline stage whose split backward is planner's (above); full backwards are the engine's."""

    def backward_maybe_with_nosync(self, backward_type, bwd_kwargs: dict, last_backward: bool = False):
        if backward_type == "input" and recomputes(self.submod):  # the whole backward, as 1F1B runs it
            whole = dict(bwd_kwargs)
            if whole["output_grads"] is None:  # the loss, which the engine wrapped in a tuple for I
                whole["stage_output"] = whole["stage_output"][0]
            grads, _ = super().backward_maybe_with_nosync("full", whole, last_backward)
            return grads, WeightWork([])
        if backward_type == "input":
            return backward_input(bwd_kwargs["stage_output"], bwd_kwargs["output_grads"],
                                  bwd_kwargs["input_values"], self.submod.parameters())
        if backward_type == "weight":
            backward_weight(bwd_kwargs["param_groups"])
            return (), None
        return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)


def make_runtime(modules: dict[int, nn.Module], n_stages: int, device: torch.device,
                 actions: dict[int, list[_Action | None]], m: int, loss: Callable,
                 group=None) -> _PipelineScheduleRuntime:
    """A runtime for this rank's stages (``modules``: stage index -> module)."""
    stages = [_Stage(mod, s, n_stages, device, group=group) for s, mod in sorted(modules.items())]

    def scaled(output, target):  # the mean over micro-batches, applied once per micro-batch: tied
        return loss(output, target) / m  # weights shared by two local stages are not rescaled twice

    runtime = _PipelineScheduleRuntime(stages, m, loss_fn=scaled, scale_grads=False)
    runtime.pipeline_order = actions
    runtime._prepare_schedule_with_comms(actions)
    return runtime
