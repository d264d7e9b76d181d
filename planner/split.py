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
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import fx, nn

from planner.errors import InputError, ModelError, PlannerError
from planner.model import ModelSpec, build_spec, describe, quiet, user_code
from planner.units import fmt_bytes

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

    names: list[str]  # a module path; path@k for the k-th call of a module called several times
    paths: list[str]  # each layer's module path
    tensors: list[FlowTensor]
    n_inputs: int
    mode: str
    # (tensor, layer): a layer that writes into a tensor it receives (ReLU(inplace=True), +=). A
    # stage starting before that layer copies the tensor as it enters: the engine hands a stage
    # its inputs as leaves that require grad, which autograd does not let be written in place.
    written: set[tuple[tuple[int, int], int]] = set()

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

    def writes_into(self, t: FlowTensor, a: int, b: int) -> bool:
        """Whether a layer of [a, b) writes in place into tensor ``t``."""
        return any(key == t.key and a <= layer < b for key, layer in self.written)

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
        self.paths = [str(n.target) for n in calls]
        self.names = call_names(self.paths)
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

    def stage_inputs(self, g: fx.Graph, a: int, b: int) -> dict[fx.Node, fx.Node]:
        """Placeholders in ``g`` for what enters stage [a, b), by the node computing each: made
        contiguous after a cut, and copied where a layer of the stage writes into it in place."""
        env: dict[fx.Node, fx.Node] = {}
        for t in self.crossing(a):
            src = self.node_of[t.key]
            value = g.placeholder(f"in_{src.name}")
            if a > 0:
                value = g.call_function(contiguous_grad, (value,))
            if self.writes_into(t, a, b):  # the first stage too: the caller's batch stays as it was
                value = g.call_method("clone", (value,))
            env[src] = value
        return env

    def stage(self, a: int, b: int) -> nn.Module:
        g = fx.Graph()
        env = self.stage_inputs(g, a, b)
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
                        env[x] = g.get_attr(str(x.target))
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
    def __init__(self, modules: list[nn.Module], last: bool, copy_inputs: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(modules)
        self.last = last
        self.copy_inputs = copy_inputs  # the first layer writes into its inputs

    def forward(self, *x):
        if self.copy_inputs:
            x = tuple(v.clone() if isinstance(v, torch.Tensor) else v for v in x)
        for layer in self.layers:
            x = layer(*x) if isinstance(x, tuple) else layer(x)
        if not self.last and not isinstance(x, tuple):
            x = (x,)
        return x


class SequentialModel(LayeredModel):
    """Explicit layers, each called on the previous one's output (tuples are unpacked)."""

    mode = "explicit"

    def __init__(self, model: nn.Module, layers: list[str], inputs: tuple):
        self.paths = list(layers)
        self.names = call_names(self.paths)
        self.modules_ = _modules(model, layers)
        _check_owned(model, layers, self.modules_)
        self.n_inputs = len(inputs)
        tensors = [FlowTensor(INPUT, k, (0,)) for k in range(self.n_inputs)]
        for i, count in enumerate(self._output_counts(inputs)):
            tensors += [FlowTensor(i, k, (i + 1,)) for k in range(count)]
        self.tensors = [t for t in tensors if t.producer < self.n_layers]

    def _output_counts(self, inputs: tuple) -> list[int]:
        """How many tensors each layer hands to the next, from one forward without gradients."""
        counts, x = [], inputs
        self.written = set()
        with torch.no_grad():
            for i, (name, module) in enumerate(zip(self.names, self.modules_, strict=True)):
                entering = [v for v in (x if isinstance(x, tuple) else (x,)) if isinstance(v, torch.Tensor)]
                before = [v._version for v in entering]
                with user_code(f"explicit layer {name}"):
                    x = module(*x) if isinstance(x, tuple) else module(x)
                if i > 0 and [v._version for v in entering] != before:
                    self.written.add(((i - 1, 0), i))
                counts.append(len(x) if isinstance(x, tuple) else 1)
        return counts

    def stage(self, a: int, b: int) -> nn.Module:
        return _Sequence(self.modules_[a:b], last=b >= self.n_layers,
                         copy_inputs=a > 0 and any(layer == a for _, layer in self.written))

    def layer_params(self, i: int) -> dict[str, nn.Parameter]:
        return {f"{self.paths[i]}.{k}": p for k, p in self.modules_[i].named_parameters()}


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


def _check_owned(model: nn.Module, layers: list[str], modules: list[nn.Module]) -> None:
    """Every parameter of the model belongs to a listed layer: one left out would be neither
    placed, counted nor trained."""
    owned = {id(p) for m in modules for p in m.parameters()}
    left = [(name, p) for name, p in model.named_parameters() if id(p) not in owned]
    if not left:
        return
    paths = list(dict.fromkeys(_owner(model, name, owned) for name, _ in left))
    nbytes = sum(p.numel() * p.element_size() for _, p in left)
    shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
    raise ModelError(f"the explicit layers leave out the parameters of {shown} ({fmt_bytes(nbytes)}): every "
                     f"parameter must belong to a listed module; add {'it' if len(paths) == 1 else 'them'} to "
                     "layers=[...], or a module that calls it")


def _owner(model: nn.Module, param: str, owned: set[int]) -> str:
    """The highest module holding parameter ``param`` none of whose parameters a layer owns (the
    parameter's own name for one the model itself holds)."""
    parts = param.split(".")
    for depth in range(1, len(parts)):
        path = ".".join(parts[:depth])
        if not any(id(p) in owned for p in model.get_submodule(path).parameters()):
            return path
    return param


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
    with quiet():  # torch.export prints the partial graph of a forward it refuses
        if trace != "fx":
            from planner.split_export import traced_or_exported

            return traced_or_exported(model, inputs, depth, trace)
        return traced_by_fx(model, inputs, depth)


def traced_by_fx(model: nn.Module, inputs: tuple, depth: int | None) -> TracedModel:
    """The model's layers by torch.fx, the parts of a module called several times merged into it,
    with the tensors its layers write into in place found by one run."""
    chosen = choose_layers(model, depth)
    traced = TracedModel(model, chosen)
    if depth is None:
        merged = merge_reused(model, chosen, traced.paths)
        if merged != chosen:
            traced = TracedModel(model, merged)
    values, traced.written = run_values(traced, inputs)
    traced.check_tensors(values)
    return traced


def run_values(traced: TracedModel, inputs: tuple) -> tuple[dict[tuple[int, int], object],
                                                            set[tuple[tuple[int, int], int]]]:
    """The value of every flowing tensor for one batch (one forward, no grad), and which layers
    write in place into a tensor another layer made (seen by its version counter, which views
    share)."""
    env: dict[fx.Node, Any] = {}
    interp = fx.Interpreter(traced.gm)
    placeholders = [n for n in traced.gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != len(placeholders):
        raise ModelError(f"the batch gives {len(inputs)} inputs; the model's forward takes {len(placeholders)}")
    flowing = {node: t for t, node in zip(traced.tensors, (traced.node_of[t.key] for t in traced.tensors),
                                          strict=True)}
    versions: dict[FlowTensor, int] = {}
    written: set[tuple[tuple[int, int], int]] = set()
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
                if n in traced.node_layer:  # attributes (get_attr) run in no layer
                    written |= _writes(traced.node_layer[n], versions, env, flowing)
            value = env.get(n)
            if n in flowing and isinstance(value, torch.Tensor):
                versions[flowing[n]] = value._version
    return {key: env[node] for key, node in traced.node_of.items()}, written


def _writes(layer: int, versions: dict[FlowTensor, int], env: dict[fx.Node, object],
            flowing: dict[fx.Node, FlowTensor]) -> set[tuple[tuple[int, int], int]]:
    """Tensors from other layers whose version moved while ``layer`` ran a node (and note the new
    versions)."""
    out = set()
    for node, t in flowing.items():
        if t in versions and t.producer <= layer <= t.last:
            now = cast(torch.Tensor, env[node])._version
            if now != versions[t]:
                versions[t] = now
                if layer != t.producer:
                    out.add((t.key, layer))
    return out


class TooManyParameters(PlannerError):
    """A model registered more parameters while being built than it was allowed."""

    def __init__(self, most: int):
        super().__init__(f"the model registered more than {most:,} parameters while being built")
        self.most = most


@contextmanager
def _parameters_at_most(most: int | None) -> Iterator[None]:
    """Stop a model's construction once the parameters it registers exceed ``most`` elements (a
    tied or replaced parameter counts each time): a model of 10**6 layers takes hours and GiBs to
    build even on the meta device."""
    if most is None:
        yield
        return
    seen = [0]

    def count(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        seen[0] += param.numel() if param is not None else 0
        if seen[0] > most:
            raise TooManyParameters(most)

    handle = nn.modules.module.register_module_parameter_registration_hook(count)
    try:
        yield
    finally:
        handle.remove()


def build_on_meta(factory: str, args: dict, most_parameters: int | None = None) -> ModelSpec:
    """Build a model on the meta device (shapes, no memory). A factory that computes with its
    weights while building cannot: it is built for real and moved there, tied weights kept tied.
    ``most_parameters``: stop with ``TooManyParameters`` past that many (see ``_parameters_at_most``)."""
    try:
        with torch.device("meta"), _parameters_at_most(most_parameters):
            return build_spec(factory, args)
    except TooManyParameters:
        raise
    except PlannerError:
        with _parameters_at_most(most_parameters):
            spec = build_spec(factory, args)
        keep_ties(spec.model, lambda m: m.to("meta"))
        return spec


def keep_ties(model: nn.Module, move: Callable[[nn.Module], object]) -> nn.Module:
    """``move(model)`` (a ``.to`` or ``.to_empty``) with shared parameters and buffers still
    shared. A move to or from the meta device changes the tensor type, and torch then makes a new
    tensor for each module that holds one: a tied embedding and head would come back as two."""
    places: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for module in model.modules():
        for kind in ("_parameters", "_buffers"):
            for key, t in getattr(module, kind).items():
                if t is not None:
                    places.setdefault(id(t), []).append((module, kind, key))
    move(model)
    for (first, kind, key), *others in places.values():
        value = getattr(first, kind)[key]
        for module, other_kind, other_key in others:
            getattr(module, other_kind)[other_key] = value
    return model


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
    """The calls of the chosen layers, in forward order (a module called n times: n calls)."""
    calls = [n for n in nodes if n.op == "call_module" and n.target in set(wanted)]
    if not calls:
        raise ModelError("none of the chosen layers is called in forward")
    return calls


def call_names(paths: list[str]) -> list[str]:
    """Layer names for a list of module calls: the path of a module called once, ``path@k`` for
    the k-th call (from 1) of a module called several times (its weights are then shared by
    those layers, and the profile records them as tied)."""
    total = Counter(paths)
    seen: Counter[str] = Counter()
    out = []
    for path in paths:
        seen[path] += 1
        out.append(path if total[path] == 1 else f"{path}@{seen[path]}")
    return out


def merge_reused(model: nn.Module, layers: list[str], calls: list[str]) -> list[str]:
    """The chosen layers with the parts of a module called several times as a whole: an ALBERT
    block called n times is one layer per call, not each of its submodules per call. A part is
    merged into its highest ancestor below the model (and below any container) whose chosen layers
    are all called as many times as it is."""
    count = Counter(calls)
    modules = dict(model.named_modules())
    out: list[str] = []
    for layer in layers:
        merged = layer
        parts = layer.split(".")
        for depth in range(len(parts) - 1, 0, -1):
            parent = ".".join(parts[:depth])
            inside = [x for x in layers if x.startswith(parent + ".")]
            if count[layer] < 2 or _is_sequence(modules[parent]) or isinstance(modules[parent], nn.ModuleDict) \
                    or any(count[x] != count[layer] for x in inside):
                break
            merged = parent
        if merged not in out:
            out.append(merged)
    return out


def _node_layers(nodes: list[fx.Node], calls: list[fx.Node], placeholders: list[fx.Node]) -> dict[fx.Node, int]:
    """The layer each graph node runs in: inputs are INPUT, a layer's call and the unpacking of its
    tuple output belong to it, and every other operation joins the earliest layer using its result.
    An operation whose result nothing uses (an in-place write kept for its effect, an assert) joins
    the earliest layer of the operations after it, so that it still runs before them."""
    last = len(calls) - 1
    layer: dict[fx.Node, int] = {n: INPUT for n in placeholders}
    layer.update({n: i for i, n in enumerate(calls)})
    # Unpacking a layer's tuple output belongs to that layer: tensors, not tuples, cross cuts.
    for n in nodes:
        if n.op == "call_function" and n.target is operator.getitem and n.args[0] in layer \
                and layer[n.args[0]] != INPUT:  # type: ignore[index]
            layer[n] = layer[n.args[0]]  # type: ignore[index]
    after = last  # the earliest layer of the operations after n
    for n in reversed(nodes):
        if n.op in ("output", "get_attr"):
            continue
        if n not in layer:
            users = [layer.get(u, last) if u.op != "output" else last for u in n.users]
            layer[n] = min(users) if users else after
        if layer[n] != INPUT:
            after = min(after, layer[n])
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
