"""Layers of a model whose forward ``torch.fx`` cannot trace, found through ``torch.export``.

``torch.export`` (the route ``torch.distributed.pipelining.pipeline()`` takes) captures the whole
forward as one flat graph of ATen operations, each node tagged with the stack of modules that
ran it (``nn_module_stack``). The layers are the same modules ``choose_layers`` picks for a
traced model (the elements of every ``nn.ModuleList``: ``transformer.h.3``, ``model.layers.3``,
``encoder.layer.3``, ``decoder.block.3``, and the stateful modules beside them); a node run inside
one of them belongs to it, and every other node (masks, positions, reshapes between blocks)
joins the first layer that uses its result, as in a traced model. So masks, position tensors,
rotary tables and an encoder's output cross stages as tensors. A module called several times
(ALBERT's shared layer group) is one layer per call, ``path@1``, ``path@2``, ... as in a traced
model (``nn_module_stack`` tells the calls apart), each holding the module's own parameters, so
the calls' weights are tied.

The batch dimension is exported dynamic, so one graph serves every micro-batch size. A size read
from a tensor (``x.shape[0]``) is one graph value that many layers use; a layer that did not
compute it reads it again from a tensor it has, so that only tensors cross a cut.

Each stage is a ``GraphModule`` holding one ``GraphModule`` per layer at the layer's own module
path, with the model's parameters under the model's names, so the executor's activation
checkpointing wraps a layer by its path as it does in a traced model.
"""

from __future__ import annotations

import hashlib
import operator
import re
from collections.abc import Callable

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from planner.errors import ModelError, PlannerError
from planner.model import describe
from planner.split import INPUT, TracedModel, call_names, choose_layers

__all__ = ["ExportedModel", "ExportError", "export_graph", "traced_or_exported", "TRACE_ROUTES"]

TRACE_ROUTES = ("auto", "fx", "export")
EXPORT_HINT = ("try ModelSpec(trace='fx'), or describe its layers explicitly with ModelSpec(layers=[...])")


class ExportError(ModelError):
    """torch.export refused the forward; ``reason`` is what it said, in one line."""

    def __init__(self, reason: str):
        super().__init__(f"the model's forward does not export with torch.export ({reason}); {EXPORT_HINT}")
        self.reason = reason


def _example(inputs: tuple) -> tuple:
    """The batch with at least two samples: torch.export specialises a dimension of size 1."""
    return tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1 else x
                 for x in inputs)


def export_graph(model: nn.Module, inputs: tuple) -> tuple[fx.GraphModule, pytree.TreeSpec]:
    """The model's forward as one flat graph (parameters under their own names, shared with
    ``model``), the batch dimension dynamic, and the structure of its output."""
    example = _example(inputs)
    dims = tuple({0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None
                 for x in example)
    try:
        program = torch.export.export(model, example, dynamic_shapes=dims, strict=False)
    except (KeyboardInterrupt, PlannerError):
        raise
    except BaseException as e:
        raise ExportError(describe(e)) from None
    gm = program.module()
    for n in list(gm.graph.nodes):  # the input checks of the exported program, not the model's work
        if n.op == "call_module" and not n.users:
            gm.graph.erase_node(n)
    gm.recompile()
    return gm, program.call_spec.out_spec


def _stack(n: fx.Node) -> list[str]:
    return [path for path, _ in (n.meta.get("nn_module_stack") or {}).values()]


def _sym(n: fx.Node) -> bool:
    return isinstance(n.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool))


def _inputs(n: fx.Node) -> list[fx.Node]:
    return [x for x in n.all_input_nodes if x.op != "get_attr"]


class ExportedModel(TracedModel):
    """A model cut into layers from its exported graph (see the module's docstring)."""

    mode = "exported"

    def __init__(self, model: nn.Module, inputs: tuple, layers: list[str]):
        from planner.split_repeat import export_deep

        exported: tuple[fx.GraphModule, pytree.TreeSpec] = export_deep(model, inputs) or export_graph(model, inputs)
        self.gm, self.out_spec = exported
        nodes = list(self.gm.graph.nodes)
        self.paths, owned = _owned_layers(nodes, layers)
        self.names = call_names(self.paths)
        self.node_layer = _layers_of(nodes, owned, len(self.names))
        _check_order(nodes, self.node_layer, self.names)
        _in_layer_order(self.gm.graph, self.node_layer)
        _localise_sizes(self.gm.graph, self.node_layer, self.names)
        self._index()
        self._modules: dict[int, fx.GraphModule] = {}

    def _index(self) -> None:
        from planner.split import _flow_tensors

        nodes = list(self.gm.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        self.n_inputs = len(placeholders)
        self.output_node = next(n for n in nodes if n.op == "output")
        produced = _flow_tensors(nodes, self.node_layer, len(self.names))
        self.node_of = {t.key: n for n, t in produced.items()}
        self.tensors = sorted(produced.values(), key=lambda t: t.key)
        self.io = [_layer_io(nodes, self.node_layer, k) for k in range(len(self.names))]

    def layer_module(self, k: int) -> fx.GraphModule:
        """Layer ``k`` alone: its inputs (``io[k][0]``) in, its outputs (``io[k][1]``) out."""
        if k not in self._modules:
            self._modules[k] = _layer_graph(self.gm, self.paths[k], self.node_layer, k, *self.io[k])
        return self._modules[k]

    def stage(self, a: int, b: int) -> nn.Module:
        g = fx.Graph()
        env = self.stage_inputs(g, a, b)
        root: dict[str, nn.Module] = {}
        for k in range(a, b):
            ins, outs = self.io[k]
            missing = [x.name for x in ins if x not in env]
            if missing:
                raise ModelError(f"stage [{a}, {b}) needs {missing[0]}, which does not cross its cut")
            call = g.call_module(self.paths[k], (*self._place(root, k), *(env[x] for x in ins)))
            for j, o in enumerate(outs):
                env[o] = g.call_function(operator.getitem, (call, j))
        if b >= self.n_layers:
            flat = [env[x] for x in pytree.tree_leaves(self.output_node.args[0])]
            g.output(g.call_function(_rebuild(self.out_spec), tuple(flat)) if self.out_spec.num_leaves != 1 or
                     not self.out_spec.is_leaf() else flat[0])
        else:  # p2p sends need contiguous tensors; contiguous() is free when they already are
            g.output(tuple(g.call_method("contiguous", (env[self.node_of[t.key]],)) for t in self.crossing(b)))
        g.lint()
        return fx.GraphModule(root, g, class_name=f"Stage_{a}_{b}")

    def _place(self, root: dict[str, nn.Module], k: int) -> tuple[str, ...]:
        """Layer ``k``'s module put among a stage's modules ``root`` at its module path, and what its
        call takes before its inputs. The calls of a module called several times share one module
        there (``_Calls``), as in a traced stage: recomputing it recomputes each of its calls."""
        if self.names[k] == self.paths[k]:
            root[self.paths[k]] = self.layer_module(k)
            return ()
        calls = root.setdefault(self.paths[k], _Calls())
        assert isinstance(calls, _Calls)
        call = self.names[k].rpartition("@")[2]
        calls.calls[call] = self.layer_module(k)
        return (call,)

    def for_engine(self, last_stage: nn.Module, loss):
        if self.out_spec.is_leaf():
            return last_stage, loss
        rebuild = _rebuild(self.out_spec)

        def model_loss(out, target):  # the loss of the model's own output structure
            return loss(rebuild(*(out if isinstance(out, tuple) else (out,))), target)
        return _Leaves(last_stage), model_loss


class _Calls(nn.Module):
    """The layers of one module called several times (``path@1``, ``path@2``, ...) in a stage, at the
    module's path; ``forward(call, *inputs)`` runs call ``call``. The calls' layers hold the same
    parameters, the module's."""

    def __init__(self):
        super().__init__()
        self.calls = nn.ModuleDict()

    def forward(self, call: str, *args):
        return self.calls[call](*args)


class _Leaves(nn.Module):
    """The last stage returning the tensors of the model's output structure (the pipeline engine
    passes tensors only)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        leaves = pytree.tree_leaves(self.inner(*args))
        return leaves[0] if len(leaves) == 1 else tuple(leaves)


def _rebuild(spec: pytree.TreeSpec) -> Callable:
    """The model's own output structure (a ``ModelOutput``, a tuple) from its flat tensors."""
    def model_output(*flat):
        return pytree.tree_unflatten(list(flat), spec)
    return model_output


# ------------------------------------------------------------------------- layer assignment


def _call_of(n: fx.Node, chosen: set[str]) -> tuple[str, str] | None:
    """The outermost chosen module on the node's module stack, and which call of it ran the node:
    torch.export keys a module's n-th call (from 0) ``...@n`` in ``nn_module_stack``."""
    for key, (path, _) in (n.meta.get("nn_module_stack") or {}).items():
        if path in chosen:
            return path, key
    return None


def _owned_layers(nodes: list[fx.Node], wanted: list[str]) -> tuple[list[str], dict[fx.Node, int]]:
    """The module path of each call of a chosen layer in the graph, in the order the calls first
    run (a module called n times: n calls), and the call each node runs (a node belongs to the
    outermost chosen module on its module stack)."""
    chosen = set(wanted)
    owned: dict[fx.Node, int] = {}
    order: dict[tuple[str, str], int] = {}
    for n in nodes:
        if n.op not in ("call_function", "call_method"):
            continue
        call = _call_of(n, chosen)
        if call is not None:
            owned[n] = order.setdefault(call, len(order))
    if not order:
        raise ModelError("none of the chosen layers runs in the exported forward: describe layers explicitly")
    return [path for path, _ in order], owned


def _layers_of(nodes: list[fx.Node], owned: dict[fx.Node, int], n_layers: int) -> dict[fx.Node, int]:
    """The layer each node runs in: its module call's, else the earliest layer using its result; a
    node whose result nobody uses (a check) runs where its inputs are."""
    layer: dict[fx.Node, int] = {n: INPUT for n in nodes if n.op == "placeholder"}
    layer.update(owned)
    last = n_layers - 1
    live = {n for n in nodes if n.users or n.op == "output" or n in layer}
    for n in reversed(nodes):
        users = [last if u.op == "output" else layer[u] for u in n.users if u in live and u in layer]
        if n in layer or n.op in ("output", "get_attr") or not users:
            continue
        layer[n] = min(users)
    for n in nodes:  # unused results and the unpacking of a tuple stay with what they read (a layer,
        # not the batch: GPT-2's classifier finds the last token from the input ids alone)
        if n.op in ("call_function", "call_method") and n not in layer:
            layer[n] = max([0, *(layer[x] for x in _inputs(n))])
        if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node):
            layer[n] = layer[n.args[0]]
    return layer


def _check_order(nodes: list[fx.Node], layer: dict[fx.Node, int], names: list[str]) -> None:
    """Every layer reads only the model inputs and earlier layers: a layer that runs in pieces
    around another (a module called twice) cannot be a pipeline stage."""
    for n in nodes:
        if n.op not in ("call_function", "call_method"):
            continue
        later = [x for x in _inputs(n) if layer[x] > layer[n]]
        if later:
            raise ModelError(f"layer {names[layer[n]]} uses {later[0].name}, computed later by layer "
                             f"{names[layer[later[0]]]} (a module that runs in pieces around another?): "
                             "describe layers explicitly with ModelSpec(layers=[...])")


def _in_layer_order(graph: fx.Graph, layer: dict[fx.Node, int]) -> None:
    """The graph's operations moved into layer order, each layer's in its own order: what the
    stages run. A node a layer shares with the whole model (a mask made early in the forward, used
    first by a later layer) then comes after everything the layer receives."""
    nodes = [n for n in graph.nodes if n.op in ("call_function", "call_method")]
    end = next(n for n in graph.nodes if n.op == "output")
    for n in sorted(nodes, key=lambda n: layer[n]):  # stable: the order within a layer is kept
        end.prepend(n)


def _same_size(dim, value) -> bool:
    return isinstance(dim, torch.SymInt) and dim.node.expr == value.node.expr


def _size_source(graph: fx.Graph, layer: dict[fx.Node, int], k: int, before: fx.Node,
                 value) -> tuple[fx.Node, int] | None:
    """A tensor layer ``k`` has (one it receives, or its own computed before ``before``) with a
    dimension of the symbolic size ``value``, and that dimension. The graph is in layer order, so
    every tensor it receives comes before its first node."""
    receives = {x for n in graph.nodes if layer.get(n) == k for x in _inputs(n) if layer[x] != k}
    for n in graph.nodes:
        if n is before:
            break
        if layer.get(n) != k and n not in receives:
            continue
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            for d, dim in enumerate(val.shape):
                if _same_size(dim, value):
                    return n, d
    return None


def _localise_sizes(graph: fx.Graph, layer: dict[fx.Node, int], names: list[str]) -> None:
    """A symbolic size used by layers other than the one computing it is computed again in each of
    them (``_local_size``): only tensors cross a cut."""
    for s in [n for n in graph.nodes if _sym(n)]:
        for k in sorted({layer[u] for u in s.users if u.op != "output"} - {layer[s]}):
            order = {n: i for i, n in enumerate(graph.nodes)}
            users = [u for u in s.users if u.op != "output" and layer[u] == k]
            first = min(users, key=order.__getitem__)
            size = _local_size(graph, layer, k, first, s)
            if size is None:
                raise ModelError(f"layer {names[k]} uses the size {s.name} ({s.meta['val']}) computed in layer "
                                 f"{names[layer[s]]} and has no tensor to read it from; only "
                                 "tensors can pass between stages: describe layers explicitly")
            for u in users:
                u.replace_input_with(s, size)


def _local_size(graph: fx.Graph, layer: dict[fx.Node, int], k: int, before: fx.Node, s: fx.Node) -> fx.Node | None:
    """Symbolic size ``s`` computed in layer ``k`` before node ``before``: read from a dimension of
    a tensor the layer has, else (an expression of sizes, ``64 * batch``) computed again from its
    sizes, each found so in turn; None where some size is in no tensor the layer has."""
    if layer.get(s) == k:
        return s
    found = _size_source(graph, layer, k, before, s.meta["val"])
    if found is not None:
        with graph.inserting_before(before):
            size = graph.call_function(torch.ops.aten.sym_size.int, found)
    else:
        if s.op != "call_function" or not s.all_input_nodes or not all(_sym(x) for x in s.all_input_nodes):
            return None
        local = {x: _local_size(graph, layer, k, before, x) for x in s.all_input_nodes}
        if any(v is None for v in local.values()):
            return None
        with graph.inserting_before(before):
            size = graph.node_copy(s, lambda x: local[x])
    size.meta["val"] = s.meta["val"]
    layer[size] = k
    return size


def _layer_io(nodes: list[fx.Node], layer: dict[fx.Node, int], k: int) -> tuple[list[fx.Node], list[fx.Node]]:
    """What layer ``k`` receives from other layers or the batch, and what it gives them or the
    model's output, in graph order."""
    mine = [n for n in nodes if layer.get(n) == k and n.op not in ("placeholder", "get_attr")]
    ins: dict[fx.Node, None] = {}
    for n in mine:
        for x in _inputs(n):
            if layer[x] != k:
                ins.setdefault(x)
    outs = [n for n in mine if any(u.op == "output" or layer.get(u, k) != k for u in n.users)]
    return list(ins), outs


# ---------------------------------------------------------------------------- layer modules


def _relative(target: str, name: str) -> str:
    return target[len(name) + 1:] if target.startswith(name + ".") else target


def _holder(gm: fx.GraphModule, targets: dict[str, str]) -> nn.Module:
    """A module holding the exported graph's parameters, buffers and constants at ``targets``
    (graph target -> path here), the same tensors as the model's."""
    root = nn.Module()
    buffers = {name for name, _ in gm.named_buffers()}
    params = {name for name, _ in gm.named_parameters()}
    for target, path in targets.items():
        *parents, leaf = path.split(".")
        owner = root
        for part in parents:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        value = gm.get_parameter(target) if target in params else \
            gm.get_buffer(target) if target in buffers else _attr(gm, target)
        if target in buffers:
            owner.register_buffer(leaf, value)
        else:
            setattr(owner, leaf, value)
    return root


def _attr(gm: nn.Module, target: str):
    *parents, leaf = target.split(".")
    owner = gm.get_submodule(".".join(parents)) if parents else gm
    return getattr(owner, leaf)


def _layer_graph(gm: fx.GraphModule, name: str, layer: dict[fx.Node, int], k: int,
                 ins: list[fx.Node], outs: list[fx.Node]) -> fx.GraphModule:
    """Layer ``k``'s nodes as a module of their own; its class's qualified name holds a digest of its
    operations (module paths relative to the layer), so identical layers have one class name."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {x: g.placeholder(f"in_{x.name}") for x in ins}
    targets: dict[str, str] = {}

    def arg(x: fx.Node) -> fx.Node:
        if x not in env:
            assert x.op == "get_attr", x
            targets[str(x.target)] = _relative(str(x.target), name)
            env[x] = g.get_attr(targets[str(x.target)])
        return env[x]

    mine = [n for n in gm.graph.nodes if layer.get(n) == k and n.op not in ("placeholder", "get_attr", "output")]
    device = _device_node(g, mine, [env[x] for x in ins if isinstance(x.meta.get("val"), torch.Tensor)], arg)
    for n in mine:
        env[n] = g.node_copy(n, arg)
        if device is not None:
            env[n].args, env[n].kwargs = _on(env[n].args, device), _on(env[n].kwargs, device)
    g.output(tuple(env[o] for o in outs))
    module = fx.GraphModule(_holder(gm, targets), g)
    # GraphModule gives each instance a class of its own, found again (on a copy) by the last part
    # of its qualified name: the digest goes before it
    type(module).__qualname__ = f"Layer_{_digest(g)}.{type(module).__qualname__.split('.')[-1]}"
    return module


def device_of(t: torch.Tensor) -> torch.device:
    return t.device


def _device_node(g: fx.Graph, mine: list[fx.Node], ins: list[fx.Node], arg: Callable) -> fx.Node | None:
    """The device the layer runs on, read from a tensor it has (``ins``: its tensor inputs, else
    one of its parameters), where its operations name one:
    the export ran on the build's device (meta, or the CPU), the layer runs wherever it is put."""
    found: list[bool] = []
    for n in mine:
        fx.node.map_aggregate((n.args, n.kwargs), lambda v: found.append(isinstance(v, torch.device)))
    if not any(found):
        return None
    attrs = [x for n in mine for x in n.all_input_nodes if x.op == "get_attr"]
    tensors = ins or [arg(x) for x in attrs[:1]]
    if not tensors:
        return None
    return g.call_function(device_of, (tensors[0],))


def _on(value, device: fx.Node):
    return fx.node.map_aggregate(value, lambda v: device if isinstance(v, torch.device) else v)


def _digest(g: fx.Graph) -> str:
    index = {n: i for i, n in enumerate(g.nodes)}
    h = hashlib.sha256()
    for n in g.nodes:
        target = "" if n.op == "placeholder" else n.target if n.op in ("get_attr", "call_method") else \
            getattr(n.target, "__name__", repr(n.target))
        args = fx.map_arg((n.args, n.kwargs), lambda x: f"%{index[x]}")
        h.update(f"{n.op} {target} {args!r}\n".encode())
    return h.hexdigest()[:12]


# ------------------------------------------------------------------------------- the route


def traced_or_exported(model: nn.Module, inputs: tuple, depth: int | None, trace: str) -> TracedModel:
    """Layers by torch.fx (``trace="fx"``), by torch.export (``"export"``), or by torch.fx where the
    forward traces and torch.export where it does not (``"auto"``)."""
    from planner.split import run_values, traced_by_fx

    if trace not in TRACE_ROUTES:
        raise ModelError(f"ModelSpec(trace={trace!r}): choose one of {', '.join(TRACE_ROUTES)}")
    layers = choose_layers(model, depth)
    lm: TracedModel
    if trace == "export":
        lm = ExportedModel(model, inputs, layers)
    else:
        try:
            return traced_by_fx(model, inputs, depth)
        except ModelError as fx_error:
            fx_reason = re.search(r"does not trace with torch\.fx \((.*)\); describe", str(fx_error))
            if trace == "fx" or fx_reason is None:
                raise
            try:
                lm = ExportedModel(model, inputs, layers)
            except ExportError as e:
                raise ModelError(f"the model's forward does not trace with torch.fx ({fx_reason.group(1)}) and "
                                 f"does not export with torch.export ({e.reason}): describe its layers "
                                 "explicitly with ModelSpec(layers=[...])") from None
    values, lm.written = run_values(lm, inputs)
    lm.check_tensors(values)
    return lm
