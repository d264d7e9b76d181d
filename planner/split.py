"""A torch model cut into named layers, and stage modules built from any run of those layers.

Shared by the profiler (which times one-layer stages) and the executor (which runs the plan's
stages), so the layers that are measured are exactly the layers that run.

Two ways to name layers:

* traced: ``torch.fx`` traces ``model.forward`` with the chosen modules as leaves; every other
  operation joins the first layer that uses its result. Any cut is then valid, skip connections
  included: a stage takes every tensor alive across its first cut and returns every tensor alive
  across its last, so tensors it does not use pass through it (the engine connects only adjacent
  stages).
* explicit: a list of module paths called one after the other, each on the previous output
  (DeepSpeed ``PipelineModule`` style), for models whose forward does not trace.

A stage's inputs and outputs are ordered by (producing layer, output index): stage k's outputs
are stage k+1's inputs.
"""

from __future__ import annotations

import hashlib
import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from planner.errors import InputError, ModelError, PlannerError
from planner.model import ModelSpec, build_spec, describe, user_code

INPUT = -1


@dataclass(frozen=True)
class FlowTensor:
    """A tensor flowing between layers: produced by ``producer`` (INPUT for a model input),
    consumed by ``consumers`` (``n_layers`` stands for the loss)."""

    producer: int
    index: int
    consumers: tuple[int, ...]

    @property
    def key(self) -> tuple[int, int]:
        return (self.producer, self.index)

    @property
    def last(self) -> int:
        return max(self.consumers)


def _is_sequence(m: nn.Module) -> bool:
    return isinstance(m, (nn.ModuleList, nn.Sequential))


def _holds_sequence(m: nn.Module) -> bool:
    return any(_is_sequence(c) or isinstance(c, nn.ModuleDict) for c in m.modules())


def choose_layers(model: nn.Module, depth: int | None = None) -> list[str]:
    """Module paths to treat as layers, in registration order.

    Default: the natural repeated blocks (the elements of a ModuleList / Sequential) and every
    module beside them that holds no such container. With ``depth``: the modules that many
    levels below the model (shallower leaves as they are).
    """
    if depth is not None:
        _check_depth(model, depth)
    out: list[str] = []

    def visit(prefix: str, m: nn.Module, level: int) -> None:
        for name, child in m.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if depth is not None:
                if level + 1 >= depth or not list(child.children()):
                    out.append(path)
                else:
                    visit(path, child, level + 1)
            elif _is_sequence(m) or not _holds_sequence(child):
                out.append(path)
            else:
                visit(path, child, level + 1)

    visit("", model, 0)
    modules = dict(model.named_modules())
    # Modules without state (activations, dropout, reshapes) join their neighbours: a layer of
    # its own would hold nothing to place, and such modules may be called more than once.
    stateful = [p for p in out if any(True for _ in modules[p].parameters()) or
                any(True for _ in modules[p].buffers())]
    if not stateful:
        raise ModelError("the model has no submodules with parameters to use as layers: describe layers explicitly")
    return stateful


def module_depth(model: nn.Module) -> int:
    """How many levels of submodules the model has (its children are level 1)."""
    return max((name.count(".") + 1 for name, _ in model.named_modules() if name), default=0)


def _check_depth(model: nn.Module, depth: int) -> None:
    deepest = module_depth(model)
    if deepest == 0:
        raise ModelError("the model has no submodules to use as layers: describe layers explicitly")
    if not 1 <= depth <= deepest:
        raise InputError(f"--depth {depth}: choose 1 (the model's children) to {deepest} (its deepest "
                         "modules), or leave it out for the natural blocks")


class _LeafTracer(fx.Tracer):
    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or (super().is_leaf_module(m, qualname) and
                                           not any(leaf.startswith(qualname + ".") for leaf in self.leaves))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose gradient is made contiguous: a stage's input gradient is sent to the
    previous stage, and p2p transfers need contiguous tensors (a gradient that comes out of a
    concatenation is a strided view)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def contiguous_grad(x):
    if isinstance(x, torch.Tensor) and x.requires_grad:
        return _ContiguousGrad.apply(x)
    return x


fx.wrap("contiguous_grad")


class LayeredModel:
    """Layers of a model and the tensors between them; ``stage(a, b)`` builds layers [a, b)."""

    names: list[str]
    tensors: list[FlowTensor]
    n_inputs: int
    mode: str

    @property
    def n_layers(self) -> int:
        return len(self.names)

    def crossing(self, k: int) -> list[FlowTensor]:
        """Tensors alive across cut k, in stage input/output order. Cut 0: the model inputs."""
        if k == 0:
            return [t for t in self.tensors if t.producer == INPUT]
        return [t for t in self.tensors if t.producer < k <= t.last]

    def stage(self, a: int, b: int) -> nn.Module:
        raise NotImplementedError

    def for_engine(self, last_stage: nn.Module, loss):
        """The last stage and the loss as the pipeline engine takes them: a stage returns tensors
        only (a model returning a structure is rebuilt for its loss, see ``ExportedModel``)."""
        return last_stage, loss

    def layer_params(self, i: int) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    def layer_inputs(self, inputs: tuple, one_layer_stages: list[nn.Module] | None = None,
                     where: str = "") -> list:
        """What enters each layer, then the model's output: one forward through the one-layer
        stages (built here unless given), without gradients. A layer that raises is named, with
        ``where`` (``at micro-batch 2``)."""
        stages = one_layer_stages or [self.stage(k, k + 1) for k in range(self.n_layers)]
        out, x = [], inputs
        with torch.no_grad():
            for name, module in zip(self.names, stages, strict=True):
                out.append(x)
                with user_code(f"layer {name}{' ' + where if where else ''}: its forward"):
                    x = module(*x)
        return out + [x]


# ----------------------------------------------------------------------------------- traced


class TracedModel(LayeredModel):
    mode = "traced"

    def __init__(self, model: nn.Module, layers: list[str]):
        modules = dict(model.named_modules())
        missing = [n for n in layers if n not in modules]
        if missing:
            raise ModelError(f"no module named {missing[0]!r} in the model")
        try:
            graph = _LeafTracer(set(layers)).trace(model)
        except (KeyboardInterrupt, PlannerError):
            raise
        except BaseException as e:
            raise ModelError(f"the model's forward does not trace with torch.fx ({describe(e)}); describe "
                             "its layers explicitly with ModelSpec(layers=[...])") from None
        self.gm = fx.GraphModule(model, graph)
        self._assign(layers)

    def _assign(self, wanted: list[str]) -> None:
        nodes = list(self.gm.graph.nodes)
        calls = _layer_calls(nodes, wanted)
        self.names = [str(n.target) for n in calls]
        placeholders = [n for n in nodes if n.op == "placeholder"]
        self.n_inputs = len(placeholders)
        self.node_layer = layer = _node_layers(nodes, calls, placeholders)
        self.output_node = next(n for n in nodes if n.op == "output")
        produced = _flow_tensors(nodes, layer, len(self.names))
        self.node_of = {t.key: n for n, t in produced.items()}
        self.tensors = sorted(produced.values(), key=lambda t: t.key)

    def check_tensors(self, values: dict[tuple[int, int], object]) -> None:
        """Refuse cuts that would have to carry something other than a tensor."""
        for key, value in values.items():
            if not isinstance(value, torch.Tensor):
                node = self.node_of[key]
                src = "the input" if key[0] == INPUT else f"layer {self.names[key[0]]}"
                raise ModelError(f"{node.name} ({type(value).__name__}) computed in {src} is used by a "
                                 "later layer; only tensors can pass between stages: compute it inside "
                                 "the layer that uses it, or describe layers explicitly")

    def stage(self, a: int, b: int) -> nn.Module:
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for t in self.crossing(a):
            src = self.node_of[t.key]
            placeholder = g.placeholder(f"in_{src.name}")
            env[src] = g.call_function(contiguous_grad, (placeholder,)) if a > 0 else placeholder
        for n in self.gm.graph.nodes:
            if n.op in ("placeholder", "output"):
                continue
            if n.op == "get_attr":
                continue  # copied on first use below
            if a <= self.node_layer[n] < b:
                def arg(x: fx.Node) -> fx.Node:
                    if x not in env:
                        if x.op != "get_attr":
                            raise ModelError(f"stage [{a}, {b}) needs {x.name}, which does not cross its cut")
                        env[x] = g.get_attr(x.target)
                    return env[x]
                env[n] = g.node_copy(n, arg)
        if b >= self.n_layers:
            result = fx.map_arg(self.output_node.args[0], lambda x: env[x])
            g.output(result)
        else:  # p2p sends need contiguous tensors; contiguous() is free when they already are
            g.output(tuple(g.call_method("contiguous", (env[self.node_of[t.key]],)) for t in self.crossing(b)))
        g.lint()
        return fx.GraphModule(self.gm, g, class_name=f"Stage_{a}_{b}")

    def layer_params(self, i: int) -> dict[str, nn.Parameter]:
        module = self.stage(i, i + 1)
        return dict(module.named_parameters())


# --------------------------------------------------------------------------------- explicit


class _Sequence(nn.Module):
    def __init__(self, modules: list[nn.Module], last: bool):
        super().__init__()
        self.layers = nn.ModuleList(modules)
        self.last = last

    def forward(self, *x):
        for layer in self.layers:
            x = layer(*x) if isinstance(x, tuple) else layer(x)
        if not self.last and not isinstance(x, tuple):
            x = (x,)
        return x


class SequentialModel(LayeredModel):
    """Explicit layers, each called on the previous one's output (tuples are unpacked)."""

    mode = "explicit"

    def __init__(self, model: nn.Module, layers: list[str], inputs: tuple):
        self.names = list(layers)
        self.modules_ = _modules(model, layers)
        self.n_inputs = len(inputs)
        tensors = [FlowTensor(INPUT, k, (0,)) for k in range(self.n_inputs)]
        for i, count in enumerate(self._output_counts(inputs)):
            tensors += [FlowTensor(i, k, (i + 1,)) for k in range(count)]
        self.tensors = [t for t in tensors if t.producer < self.n_layers]

    def _output_counts(self, inputs: tuple) -> list[int]:
        """How many tensors each layer hands to the next, from one forward without gradients."""
        counts, x = [], inputs
        with torch.no_grad():
            for name, module in zip(self.names, self.modules_, strict=True):
                with user_code(f"explicit layer {name}"):
                    x = module(*x) if isinstance(x, tuple) else module(x)
                counts.append(len(x) if isinstance(x, tuple) else 1)
        return counts

    def stage(self, a: int, b: int) -> nn.Module:
        return _Sequence(self.modules_[a:b], last=b >= self.n_layers)

    def layer_params(self, i: int) -> dict[str, nn.Parameter]:
        return {f"{self.names[i]}.{k}": p for k, p in self.modules_[i].named_parameters()}


def run_whole(model: nn.Module, layers: list[str] | None, inputs: tuple):
    """The whole model's output: its forward, or its explicit layers one after the other."""
    if layers is None:
        return model(*inputs)
    return _Sequence(_modules(model, layers), last=True)(*inputs)


def _modules(model: nn.Module, layers: list[str]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise ModelError(f"explicit layer {missing[0]!r} is not a module of the model")
    return [modules[n] for n in layers]


def layered(model: nn.Module, inputs: tuple, layers: list[str] | None = None,
            depth: int | None = None, trace: str = "auto") -> LayeredModel:
    """Cut ``model`` into layers: explicit when ``layers`` is given, else traced by torch.fx, or
    (``trace="export"``, or ``"auto"``: where fx cannot trace it) from its torch.export graph
    (``planner.split_export``)."""
    if layers is not None:
        if not layers:
            raise ModelError("ModelSpec(layers=[]) names no layers: list module paths, or leave layers "
                             "out to trace the model")
        return SequentialModel(model, layers, inputs)
    if trace != "fx":
        from planner.split_export import traced_or_exported

        return traced_or_exported(model, inputs, depth, trace)
    traced = TracedModel(model, choose_layers(model, depth))
    traced.check_tensors(run_values(traced, inputs))
    return traced


def run_values(traced: TracedModel, inputs: tuple) -> dict[tuple[int, int], object]:
    """The value of every flowing tensor for one batch (one forward, no grad)."""
    env: dict[fx.Node, object] = {}
    interp = fx.Interpreter(traced.gm)
    placeholders = [n for n in traced.gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != len(placeholders):
        raise ModelError(f"the batch gives {len(inputs)} inputs; the model's forward takes {len(placeholders)}")
    with torch.no_grad():
        it = iter(inputs)
        for n in traced.gm.graph.nodes:
            if n.op == "placeholder":
                env[n] = next(it)
            elif n.op != "output":
                args = fx.map_arg(n.args, env.__getitem__)
                kwargs = fx.map_arg(n.kwargs, env.__getitem__)
                with user_code(f"layer {traced.names[traced.node_layer[n]]}: its forward ({n.name})"
                               if traced.node_layer.get(n, INPUT) != INPUT else f"the forward ({n.name})"):
                    env[n] = getattr(interp, n.op)(n.target, args, kwargs)
    return {key: env[node] for key, node in traced.node_of.items()}


def build_on_meta(factory: str, args: dict) -> ModelSpec:
    """Build a model on the meta device (shapes, no memory). A factory that computes with its
    weights while building cannot: it is built for real and moved there."""
    try:
        with torch.device("meta"):
            return build_spec(factory, args)
    except PlannerError:
        spec = build_spec(factory, args)
        spec.model.to("meta")
        return spec


def fingerprint(model: nn.Module) -> str:
    """sha256 of module paths and types and parameter names and shapes: same structure, same
    fingerprint, whatever the weights or dtype."""
    h = hashlib.sha256()
    for name, m in model.named_modules():
        h.update(f"{name}:{type(m).__name__};".encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)};".encode())
    return "sha256:" + h.hexdigest()


def _layer_calls(nodes: list[fx.Node], wanted: list[str]) -> list[fx.Node]:
    """The call of each chosen layer, in forward order; each must be called exactly once."""
    calls = [n for n in nodes if n.op == "call_module" and n.target in set(wanted)]
    seen: set[str] = set()
    for n in calls:
        if n.target in seen:
            raise ModelError(f"module {n.target!r} is called more than once in forward; "
                             "planner needs each layer called once (describe layers explicitly)")
        seen.add(str(n.target))
    if not calls:
        raise ModelError("none of the chosen layers is called in forward")
    return calls


def _node_layers(nodes: list[fx.Node], calls: list[fx.Node], placeholders: list[fx.Node]) -> dict[fx.Node, int]:
    """The layer each graph node runs in: inputs are INPUT, a layer's call and the unpacking of its
    tuple output belong to it, and every other operation joins the earliest layer using its result."""
    last = len(calls) - 1
    layer: dict[fx.Node, int] = {n: INPUT for n in placeholders}
    layer.update({n: i for i, n in enumerate(calls)})
    # Unpacking a layer's tuple output belongs to that layer: tensors, not tuples, cross cuts.
    for n in nodes:
        if n.op == "call_function" and n.target is operator.getitem and n.args[0] in layer \
                and layer[n.args[0]] != INPUT:  # type: ignore[index]
            layer[n] = layer[n.args[0]]  # type: ignore[index]
    for n in reversed(nodes):
        if n in layer or n.op in ("output", "get_attr"):
            continue
        users = [layer.get(u, last) if u.op != "output" else last for u in n.users]
        layer[n] = min(users) if users else last
    return layer


def _flow_tensors(nodes: list[fx.Node], layer: dict[fx.Node, int], n_layers: int) -> dict[fx.Node, FlowTensor]:
    """Every value that leaves the layer computing it (the output counts as layer n_layers)."""
    produced: dict[fx.Node, FlowTensor] = {}
    counters: dict[int, int] = {}
    for n in nodes:
        if n.op in ("output", "get_attr"):
            continue
        consumers = {n_layers if u.op == "output" else layer[u] for u in n.users
                     if u.op == "output" or (u.op != "get_attr" and layer[u] != layer[n])}
        if n.op == "placeholder" or consumers:
            k = counters.get(layer[n], 0)
            counters[layer[n]] = k + 1
            produced[n] = FlowTensor(layer[n], k, tuple(sorted(consumers)) or (0,))
    return produced
