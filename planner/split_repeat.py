"""Exporting a deep model through a shallow twin: its repeated blocks exported three at a time.

``torch.export`` costs about as much per operation as the operation's symbolic shapes take to
reason about, so an 80-block model takes minutes. The blocks of an ``nn.ModuleList`` of one class
and one set of parameter shapes usually compute the same thing. The model is exported with each
such list cut to its first three blocks; where the third block's operations equal the second's
(same operations, same parameters relative to the block, inputs from the block before it in the
same places, every other input the same value), blocks four onwards are that third block again
under their own names, each fed by the one before, and what read the third block's outputs reads
the last block's. Where they differ (a block that depends on its index: alternating attention
kinds, say), or a list is read in another way, ``export_deep`` returns None and the whole model is
exported as it is.
"""

from __future__ import annotations

from torch import fx, nn
from torch.utils import _pytree as pytree

from planner.split_export import ExportError, export_graph

__all__ = ["export_deep", "KEEP"]

KEEP = 3  # blocks kept of each list: the first may differ (T5's position bias); the second and third must not


def _repeated_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Lists longer than KEEP whose blocks after the first are of one class and one set of shapes."""
    out = []
    for path, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) <= KEEP or not path:
            continue
        shapes = [(type(b), [(n, tuple(p.shape)) for n, p in b.named_parameters()]) for b in list(m)[1:]]
        if all(s == shapes[0] for s in shapes):
            out.append((path, m))
    return out


def export_deep(model: nn.Module, inputs: tuple) -> tuple[fx.GraphModule, pytree.TreeSpec] | None:
    """The exported graph of ``model`` with its repeated blocks copied (see the module's
    docstring), and its output structure; None where that does not apply."""
    lists = _repeated_lists(model)
    if not lists:
        return None
    parents = [(model.get_submodule(path.rpartition(".")[0]), path.rpartition(".")[2], ml) for path, ml in lists]
    try:
        for parent, leaf, ml in parents:
            setattr(parent, leaf, nn.ModuleList(list(ml)[:KEEP]))
        gm, spec = export_graph(model, inputs)
    except ExportError:
        return None
    finally:
        for parent, leaf, ml in parents:
            setattr(parent, leaf, ml)
    for path, ml in lists:
        if not _stitch(gm, path, ml):
            return None
    gm.graph.lint()
    gm.recompile()
    return gm, spec


def _block(n: fx.Node, path: str) -> int | None:
    """Which of the kept blocks of list ``path`` runs node ``n``."""
    for p, _ in (n.meta.get("nn_module_stack") or {}).values():
        if p.startswith(path + ".") and p[len(path) + 1:].split(".")[0].isdigit():
            return int(p[len(path) + 1:].split(".")[0])
    return None


def _signature(nodes: list[fx.Node], before: list[fx.Node], prefix: str) -> list[str] | None:
    """The block's operations with inputs written by position: its own nodes, the block before's
    (``before``), parameters relative to the block, anything else by name."""
    mine = {n: i for i, n in enumerate(nodes)}
    prev = {n: i for i, n in enumerate(before)}

    def ref(x: fx.Node) -> str:
        if x in mine:
            return f"%{mine[x]}"
        if x in prev:
            return f"prev{prev[x]}"
        if x.op == "get_attr":
            target = str(x.target)
            return "@" + target[len(prefix):] if target.startswith(prefix) else target
        return f"ext:{x.name}"

    out = []
    for n in nodes:
        if n.op not in ("call_function", "call_method"):
            return None
        args = fx.map_arg((n.args, n.kwargs), ref)
        out.append(f"{n.op} {getattr(n.target, '__name__', n.target)} {args!r}")
    return out


def _register(gm: fx.GraphModule, target: str, block: nn.Module, name: str) -> None:
    """The model's own parameter or buffer ``name`` of ``block`` at ``target`` in ``gm``."""
    *parents, leaf = target.split(".")
    owner: nn.Module = gm
    for part in parents:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    params = dict(block.named_parameters())
    if name in params:
        owner.register_parameter(leaf, params[name])
    else:
        owner.register_buffer(leaf, dict(block.named_buffers())[name])


def _stitch(gm: fx.GraphModule, path: str, blocks: nn.ModuleList) -> bool:
    """Blocks KEEP onwards of list ``path``, copied from block KEEP - 1 (see the module's docstring)."""
    graph = gm.graph
    groups: dict[int, list[fx.Node]] = {i: [] for i in range(KEEP)}
    for n in graph.nodes:
        b = _block(n, path)
        if b is not None and n.op in ("call_function", "call_method"):
            groups[b].append(n)
    a, z = groups[KEEP - 2], groups[KEEP - 1]
    if not a or not z or _signature(a, groups[KEEP - 3], f"{path}.{KEEP - 2}.") != \
            _signature(z, a, f"{path}.{KEEP - 1}."):
        return False
    template = set(z)
    inside = template | set(a)
    if any(u not in inside for n in a for u in n.users):  # only the next block reads a block
        return False
    readers = [(u, n) for n in z for u in n.users if u not in template]
    prefix = f"{path}.{KEEP - 1}."
    prev, anchor = z, z[-1].next  # copies go before the node after the last kept block, in order
    with graph.inserting_before(anchor):
        for k in range(KEEP, len(blocks)):
            prev = _copy_block(gm, z, a, prev, prefix, f"{path}.{k}.", blocks[k])
    for user, n in readers:
        user.replace_input_with(n, prev[z.index(n)])
    return True


def _copy_block(gm: fx.GraphModule, z: list[fx.Node], a: list[fx.Node], prev: list[fx.Node], prefix: str,
                to: str, block: nn.Module) -> list[fx.Node]:
    """Block ``z`` again as the block at ``to``, its parameters ``block``'s, fed by ``prev`` (the
    block before it) where ``z`` is fed by ``a``."""
    done: dict[fx.Node, fx.Node] = {}
    attrs: dict[str, fx.Node] = {}
    position = {n: i for i, n in enumerate(a)}
    used = {str(x.target)[len(prefix):] for n in z for x in n.all_input_nodes
            if x.op == "get_attr" and str(x.target).startswith(prefix)}
    for name in block.state_dict(keep_vars=True):  # in the block's own order, as the exported blocks
        if name in used:
            _register(gm, to + name, block, name)

    def arg(x: fx.Node) -> fx.Node:
        if x in done:
            return done[x]
        if x in position:
            return prev[position[x]]
        target = str(x.target)
        if x.op == "get_attr" and target.startswith(prefix):
            name = target[len(prefix):]
            if name not in attrs:
                attrs[name] = gm.graph.get_attr(to + name)
                attrs[name].meta = dict(x.meta)
            return attrs[name]
        return x

    old, new = prefix[:-1], to[:-1]
    for n in z:
        copy = gm.graph.node_copy(n, arg)
        copy.meta["nn_module_stack"] = {key: (p.replace(old, new, 1) if p == old or p.startswith(prefix) else p, t)
                                        for key, (p, t) in (n.meta.get("nn_module_stack") or {}).items()}
        done[n] = copy
    return [done[n] for n in z]
