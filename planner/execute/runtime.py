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


def engine_actions(schedule: Schedule, single: bool = False) -> dict[int, list[_Action]]:
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
    _TensorMeta.to_tensor = to_tensor


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
# target tokens). Here W is one autograd call over every kept node, so each node runs once.


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


@dataclass
class WeightWork:
    """What I leaves for W: the nodes where weight paths join the input path, with the gradient
    each received, and the outputs reached from weights without passing an input's path."""

    grads: dict[Node, tuple] = field(default_factory=dict)
    roots: list[tuple[GradientEdge, torch.Tensor]] = field(default_factory=list)
    weights: list[nn.Parameter] = field(default_factory=list)


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
    params = [p for p in weights if p.requires_grad]
    _, joins = _reach([_node(p) for p in params], consumers, on_input_path)
    work = WeightWork(weights=params)
    work.roots = [(GradientEdge(n, o.output_nr), g) for n, (o, g) in zip(out_nodes, pairs, strict=True)
                  if n not in on_input_path]

    def keeper(node: Node):
        def hook(grad_outputs):
            work.grads[node] = grad_outputs
        return hook

    handles = [n.register_prehook(keeper(n)) for n in joins]
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


def backward_weight(work: WeightWork) -> None:
    """W: the weights' gradients, accumulated into their ``.grad``. Every join node's gradient is pinned
    to what it received in I, so gradients reaching it again through other joins are not added twice."""
    edges, seeds = [], []
    for node, grads in work.grads.items():
        for i, g in enumerate(grads):
            if g is not None:
                edges.append(GradientEdge(node, i))
                seeds.append(g)
    for edge, g in work.roots:
        edges.append(edge)
        seeds.append(g)
    if not edges or not work.weights:
        return
    handles = [n.register_prehook(lambda _, kept=kept: kept) for n, kept in work.grads.items()]
    try:  # accumulates into each weight's .grad in place, as a plain backward does
        torch.autograd.backward(edges, seeds, inputs=work.weights)
    finally:
        for h in handles:
            h.remove()
        work.grads.clear()  # W consumes the work: the graph and the kept gradients go now
        work.roots.clear()


class _Stage(PipelineStage):
    """A pipeline stage whose split backward is planner's (above); full backwards are the engine's."""

    def backward_maybe_with_nosync(self, backward_type, bwd_kwargs: dict, last_backward: bool = False):
        if backward_type == "input":
            return backward_input(bwd_kwargs["stage_output"], bwd_kwargs["output_grads"],
                                  bwd_kwargs["input_values"], self.submod.parameters())
        if backward_type == "weight":
            backward_weight(bwd_kwargs["param_groups"])
            return (), None
        return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)


def make_runtime(modules: dict[int, nn.Module], n_stages: int, device: torch.device,
                 actions: dict[int, list[_Action]], m: int, loss: Callable, group=None) -> _PipelineScheduleRuntime:
    """A runtime for this rank's stages (``modules``: stage index -> module)."""
    stages = [_Stage(mod, s, n_stages, device, group=group) for s, mod in sorted(modules.items())]

    def scaled(output, target):  # the mean over micro-batches, applied once per micro-batch: tied
        return loss(output, target) / m  # weights shared by two local stages are not rescaled twice

    runtime = _PipelineScheduleRuntime(stages, m, loss_fn=scaled, scale_grads=False)
    runtime.pipeline_order = actions
    runtime._prepare_schedule_with_comms(actions)
    return runtime
