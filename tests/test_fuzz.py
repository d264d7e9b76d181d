"""Structured fuzz of the committed plans and profiles, through the command line.

Each example takes a file from plans/ or profiles/, applies one structured mutation (a key
deleted, a wrong type, a number no file may hold, a layer removed or moved, a device shared by
two ranks, the text cut short or made invalid UTF-8, ...) and runs, in-process, every command
that reads it: simulate, check and export (each format) for a plan; solve and check --profile
for a profile; solve for a cluster file (the committed plans' clusters); check --resolve, which
searches again with the solver settings a plan keeps. Whatever the mutant, no command raises
(under ``planner`` that is an internal error, exit 70), nothing prints a traceback, and a
refusal is one line with exit 2. A mutant
that breaks a rule of its format by construction must be refused with exit 2; one that may
still be valid (a number changed within its bounds, a cut moved by one layer) is only run.

Which mutants break a rule is decided here, not by the loader: by the shipped JSON Schema
(required keys, types, bounds, unknown keys; ``conforms`` below is a small validator of the
parts of JSON Schema the schemas use) and by the rules the formats state (every layer in one
stage and in order, one device per replica and rank, finite numbers of sane size, ...).

The default profile draws the same examples on every run; ``HYPOTHESIS_PROFILE=explore`` draws
more, new ones (see tests/conftest.py). ``benchmarks/fuzz.py`` runs many more and prints a table.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from planner.cli import app
from planner.errors import InputError
from planner.export import FORMATS
from planner.formats import KINDS, MAX_ACTIONS, MAX_DEPTH, MAX_INT, MAX_NUMBER, json_schema, load
from planner.schedules import SCHEDULES

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

# ------------------------------------------------------------------------------------ mutants


class Raw(str):
    """JSON text put into a tree as it is (NaN, 10**400, 40 levels of brackets)."""


@dataclass(frozen=True, repr=False)
class Base:
    name: str  # the committed file, and how it was prepared
    kind: str  # "plan" or "profile"
    tree: Any

    def __repr__(self) -> str:
        return f"Base({self.name})"


class Mutant:
    """A mutated file's bytes, what was done to it, and whether that breaks a rule by
    construction (then every command must refuse it, exit 2). Shown by its description only."""

    def __init__(self, base: str, what: str, text: bytes, invalid: bool = False):
        self.base, self.what, self.text, self.invalid = base, what, text, invalid

    def __repr__(self) -> str:
        return f"Mutant({self.base}: {self.what}; {'invalid' if self.invalid else 'may be valid'})"


def encode(tree: Any) -> bytes:
    """The tree as JSON text (indented as planner writes), each ``Raw`` spliced in verbatim."""
    raws: list[str] = []

    def swap(node: Any) -> Any:
        if isinstance(node, Raw):
            raws.append(str(node))
            return f"\x00raw{len(raws) - 1}\x00"
        if isinstance(node, dict):
            return {k: swap(v) for k, v in node.items()}
        if isinstance(node, list):
            return [swap(v) for v in node]
        return node

    text = json.dumps(swap(tree), indent=1)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x00raw{i}\x00"), raw, 1)
    return (text + "\n").encode()


def paths(tree: Any) -> list[tuple]:
    """Every node's path below the root, parents before children."""
    out: list[tuple] = []
    stack: list[tuple[Any, tuple]] = [(tree, ())]
    while stack:
        node, where = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            out.append((*where, k))
            stack.append((v, (*where, k)))
    return sorted(out, key=lambda p: (len(p), str(p)))


def get(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def replaced(tree: Any, path: tuple, value: Any) -> Any:
    out = copy.deepcopy(tree)
    get(out, path[:-1])[path[-1]] = value
    return out


def deleted(tree: Any, path: tuple) -> Any:
    out = copy.deepcopy(tree)
    del get(out, path[:-1])[path[-1]]
    return out


def _committed(kind: str) -> list[Base]:
    folder = ROOT / ("plans" if kind == "plan" else "profiles")
    return [Base(p.name, kind, json.loads(p.read_text())) for p in sorted(folder.glob("*.json"))]


def _with_layers(base: Base) -> Base:
    """A committed plan with the model's layer list, as solve writes it now (the committed plans
    predate it): then a layer missing from every stage is a rule broken, not an unknown."""
    tree = copy.deepcopy(base.tree)
    tree["layers"] = [n for stage in tree["stages"] for n in stage["layers"]]
    return Base(base.name + "+layers", base.kind, tree)


def _clusters(plans: list[Base]) -> list[Base]:
    """The clusters the committed plans were solved for, as cluster files."""
    found = {b.tree["cluster"]["name"]: b.tree["cluster"] for b in plans}
    return [Base(f"{name} (cluster of a plan)", "cluster", tree) for name, tree in sorted(found.items())]


PLANS = _committed("plan")
PLAN_BASES = PLANS + [_with_layers(b) for b in PLANS]
PROFILES = _committed("profile")
CLUSTERS = _clusters(PLANS)
BASES = {b.name: b for b in PLAN_BASES + PROFILES + CLUSTERS}

# ----------------------------------------------------------------------- the schema as oracle

_TYPES: dict[str, Callable[[Any], bool]] = {
    "integer": lambda v: type(v) is int, "number": lambda v: type(v) in (int, float),
    "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None, "array": lambda v: isinstance(v, list), "object": lambda v: isinstance(v, dict)}


@cache
def schema(kind: str) -> dict:
    return json_schema(kind)


def conforms(value: Any, sub: dict, root: dict) -> bool:
    """Whether ``value`` meets the JSON Schema ``sub`` (the keywords planner's schemas use). The
    loader is strict where JSON Schema is lenient (1.0 is no integer here, as in the loader)."""
    if "$ref" in sub:
        return conforms(value, root["$defs"][sub["$ref"].rsplit("/", 1)[-1]], root)
    if "anyOf" in sub:
        return any(conforms(value, s, root) for s in sub["anyOf"])
    if "type" in sub and not _TYPES[sub["type"]](value):
        return False
    if ("const" in sub and value != sub["const"]) or ("enum" in sub and value not in sub["enum"]):
        return False
    if _TYPES["number"](value) and not _within(value, sub):
        return False
    if isinstance(value, list):
        return len(value) >= sub.get("minItems", 0) and all(conforms(v, sub.get("items", {}), root) for v in value)
    if isinstance(value, dict):
        return _object_conforms(value, sub, root)
    return True


def _within(x: float, sub: dict) -> bool:
    return (x >= sub.get("minimum", x) and x <= sub.get("maximum", x)
            and ("exclusiveMinimum" not in sub or x > sub["exclusiveMinimum"]))


def _object_conforms(value: dict, sub: dict, root: dict) -> bool:
    if any(key not in value for key in sub.get("required", ())):
        return False
    props, extra = sub.get("properties", {}), sub.get("additionalProperties", True)
    for key, v in value.items():
        if key in props:
            ok = conforms(v, props[key], root)
        else:
            ok = extra is not False and (extra is True or conforms(v, extra, root))
        if not ok:
            return False
    return True


def breaks_schema(kind: str, tree: Any) -> bool:
    return not conforms(tree, schema(kind), schema(kind))


def beyond_bounds(value: Any) -> bool:
    """A number no planner file may hold, wherever it is (formats.check_numbers' rule)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) > (MAX_INT if isinstance(value, int) else MAX_NUMBER)


def schema_mutant(base: Base, what: str, tree: Any) -> Mutant:
    """A mutant that is invalid when the schema (or the bound on every number) says so."""
    numbers_out = any(beyond_bounds(get(tree, p)) for p in paths(tree))
    return Mutant(base.name, what, encode(tree), breaks_schema(base.kind, tree) or numbers_out)


# ----------------------------------------------------------------------- generic mutations


def _path(draw, base: Base, keep: Callable[[Any], bool] = lambda v: True) -> tuple | None:
    """A node's path: first a field (``stages.*.cost.fwd_s``), then one place it occurs, so that
    every field is drawn as often as any other however many times it repeats."""
    fields: dict[tuple, list[tuple]] = {}
    for p in _paths(base.name):
        if keep(get(base.tree, p)):
            fields.setdefault(_field(p), []).append(p)
    if not fields:
        return None
    return draw(st.sampled_from(fields[draw(st.sampled_from(sorted(fields, key=str)))]))


def _field(path: tuple) -> tuple:
    """The path with list indices and micro-batch sizes as '*'."""
    return tuple("*" if isinstance(k, int) or k.isdigit() else k for k in path)


@cache
def _paths(name: str) -> list[tuple]:
    return paths(BASES[name].tree)


def _fmt(path: tuple) -> str:
    return ".".join(map(str, path))


def delete_key(draw, base: Base) -> Mutant:
    path = _path(draw, base)  # a key of an object, or an element of a list
    return schema_mutant(base, f"delete {_fmt(path)}", deleted(base.tree, path))


WRONG = ["1", "", True, False, None, [], {}, [1], {"a": 1}, 1, 1.5, "x" * 300]


def wrong_type(draw, base: Base) -> Mutant:
    path = _path(draw, base)
    value = draw(st.sampled_from(WRONG))
    return schema_mutant(base, f"{_fmt(path)} = {value!r}", replaced(base.tree, path, value))


# Always refused: not finite, or beyond any bound a file may hold (raw JSON text).
BAD_NUMBERS = ["NaN", "Infinity", "-Infinity", str(2**63), str(-(2**63)), "1" + "0" * 400, "1e308",
               "-1e308", "1e400", "9" * 5000]
EDGE_NUMBERS = [-1, 0, 1, -0.0, 0.5, 1.5, 1e-300, 5e-324, 2**31, 10**6, 2**50 + 1, 2**62, 2**62 + 1, 1e30, 1e31]


def bad_number(draw, base: Base) -> Mutant:
    path = _path(draw, base)
    raw = draw(st.sampled_from(BAD_NUMBERS))
    return Mutant(base.name, f"{_fmt(path)} = {raw[:20]}", encode(replaced(base.tree, path, Raw(raw))), True)


def edge_number(draw, base: Base) -> Mutant:
    path = _path(draw, base, lambda v: not isinstance(v, bool) and isinstance(v, (int, float)))
    value = draw(st.sampled_from(EDGE_NUMBERS))
    return schema_mutant(base, f"{_fmt(path)} = {value!r}", replaced(base.tree, path, value))


def scaled_number(draw, base: Base) -> Mutant:
    """A measured number made larger or smaller: usually still a valid file."""
    path = _path(draw, base, lambda v: type(v) in (int, float))
    factor = draw(st.sampled_from([0, 0.5, 1.5, 10, 1000, 10**6]))
    old = get(base.tree, path)
    value = type(old)(old * factor)
    return schema_mutant(base, f"{_fmt(path)} x {factor}", replaced(base.tree, path, value))


def set_everywhere(draw, base: Base) -> Mutant:
    """Every occurrence of one numeric field (all layers' fwd_s, all stages' act_bytes) set to
    one value: extreme but often valid inputs for the solver and the simulator."""
    path = _path(draw, base, lambda v: type(v) in (int, float))
    value = draw(st.sampled_from([0, 1, 10**6, 2**40, 2**50]))
    tree = copy.deepcopy(base.tree)
    for p in _paths(base.name):
        if _field(p) == _field(path) and type(get(tree, p)) in (int, float):
            get(tree, p[:-1])[p[-1]] = type(get(tree, p))(value)
    return schema_mutant(base, f"every {_fmt(_field(path))} = {value}", tree)


def extra_key(draw, base: Base) -> Mutant:
    path = _path(draw, base, lambda v: isinstance(v, dict))
    key = draw(st.sampled_from(["unknown_field", "fwd_S", "", "kind"]))
    tree = copy.deepcopy(base.tree)
    node = get(tree, path) if path else tree
    node[key] = 1
    return schema_mutant(base, f"{_fmt(path or ())}.{key} = 1", tree)


def empty_list(draw, base: Base) -> Mutant:
    path = _path(draw, base, lambda v: isinstance(v, list) and v)
    tree = replaced(base.tree, path, [])
    invalid = breaks_schema(base.kind, tree) or (base.kind == "plan" and path == ("layers",))
    return Mutant(base.name, f"{_fmt(path)} = []", encode(tree), invalid)


def deep_nesting(draw, base: Base) -> Mutant:
    """A value wrapped in brackets: a little (the schema decides) or past the formats' depth."""
    path = _path(draw, base)
    levels = draw(st.sampled_from([1, 3, MAX_DEPTH, MAX_DEPTH + 1, 1000, 100_000]))
    if len(path) + levels <= MAX_DEPTH:
        value = get(base.tree, path)
        for _ in range(levels):
            value = [value]
        return schema_mutant(base, f"{_fmt(path)} in {levels} lists", replaced(base.tree, path, value))
    inner = encode(get(base.tree, path)).decode().strip()
    tree = replaced(base.tree, path, Raw("[" * levels + inner + "]" * levels))
    return Mutant(base.name, f"{_fmt(path)} in {levels} lists", encode(tree), True)


def truncated(draw, base: Base) -> Mutant:
    text = encode(base.tree)
    end = draw(st.integers(0, len(text) - 1))
    return Mutant(base.name, f"cut at byte {end}", text[:end], end < len(text.rstrip()))


def non_utf8(draw, base: Base) -> Mutant:
    text = encode(base.tree)
    at = draw(st.integers(0, len(text)))
    junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\x80", b"\xfe\xff", b"\xed\xa0\x80"]))
    return Mutant(base.name, f"{junk!r} at byte {at}", text[:at] + junk + text[at:], True)


GENERIC = [delete_key, wrong_type, bad_number, edge_number, scaled_number, set_everywhere, extra_key,
           empty_list, deep_nesting, truncated, non_utf8]

# -------------------------------------------------------------------------- plan mutations


def _ordered(tree: dict) -> bool:
    return tree.get("layers") is not None


def layer_edit(draw, base: Base) -> Mutant:
    """Remove, duplicate, swap or move a layer of a stage."""
    tree = copy.deepcopy(base.tree)
    stages = tree["stages"]
    s = draw(st.integers(0, len(stages) - 1))
    mine = stages[s]["layers"]
    k = draw(st.integers(0, len(mine) - 1))
    op = draw(st.sampled_from(["remove", "duplicate here", "duplicate elsewhere", "swap within",
                               "swap across", "move to next"]))
    others = [t for t in range(len(stages)) if t != s]
    if op == "remove":
        name = mine.pop(k)
        invalid = _ordered(tree) or not mine or name in stages[s]["recompute_layers"]
    elif op == "duplicate here" or (op == "duplicate elsewhere" and not others):
        mine.insert(k, mine[k])
        invalid = True
    elif op == "duplicate elsewhere":
        stages[draw(st.sampled_from(others))]["layers"].append(mine[k])
        invalid = True
    elif op == "swap within" and len(mine) > 1:
        j = draw(st.integers(0, len(mine) - 1).filter(lambda j: j != k))
        mine[j], mine[k] = mine[k], mine[j]
        invalid = _ordered(tree)
    elif op == "swap across" and others:
        theirs = stages[draw(st.sampled_from(others))]["layers"]
        j = draw(st.integers(0, len(theirs) - 1))
        mine[k], theirs[j] = theirs[j], mine[k]
        invalid = _ordered(tree)
    elif op == "move to next" and s + 1 < len(stages) and len(mine) > 1:
        stages[s + 1]["layers"].insert(0, mine.pop())  # the cut moves by one layer: still a plan
        invalid = False
    else:
        return schema_mutant(base, f"stages.{s}: nothing to {op}", tree)
    return Mutant(base.name, f"stages.{s}.layers: {op} {k}", encode(tree), invalid)


def reorder_stages(draw, base: Base) -> Mutant:
    tree = copy.deepcopy(base.tree)
    old = tree["stages"]
    if len(old) < 2:
        return layer_edit(draw, base)
    order = draw(st.permutations(range(len(old))).filter(lambda p: list(p) != sorted(p)))
    renumber = draw(st.booleans())
    tree["stages"] = [old[i] for i in order]
    moved_rank = any(old[i]["rank"] != old[k]["rank"] for k, i in enumerate(order))
    if renumber:
        for k, stage in enumerate(tree["stages"]):
            stage["index"] = k
    invalid = not renumber or _ordered(tree) or moved_rank
    return Mutant(base.name, f"stages in order {order}{' renumbered' if renumber else ''}", encode(tree), invalid)


def share_device(draw, base: Base) -> Mutant:
    """A replica's device given to another replica or rank, or beyond the cluster: always refused."""
    tree = copy.deepcopy(base.tree)
    stages = tree["stages"]
    s = draw(st.integers(0, len(stages) - 1))
    devices = stages[s]["devices"]
    j = draw(st.integers(0, len(devices) - 1))
    other_ranks = [d for t in stages if t["rank"] != stages[s]["rank"] for d in t["devices"]]
    choices = ["beyond"] + (["same stage"] if len(devices) > 1 else []) + (["other rank"] if other_ranks else [])
    how = draw(st.sampled_from(choices))
    n = sum(len(node["devices"]) for node in tree["cluster"]["nodes"])
    if how == "same stage":
        devices[j] = devices[draw(st.integers(0, len(devices) - 1).filter(lambda i: i != j))]
    elif how == "other rank":
        devices[j] = draw(st.sampled_from(other_ranks))
    else:
        devices[j] = n + draw(st.integers(0, 3))
    return Mutant(base.name, f"stages.{s}.devices.{j} = {devices[j]} ({how})", encode(tree), True)


def cluster_devices(draw, base: Base) -> Mutant:
    """A device entry duplicated (a larger cluster: valid) or the last one removed."""
    tree = copy.deepcopy(base.tree)
    nodes = tree["cluster"]["nodes"]
    node = nodes[draw(st.integers(0, len(nodes) - 1))]["devices"]
    if draw(st.booleans()):
        node.append(copy.deepcopy(node[-1]))
        return schema_mutant(base, "cluster device duplicated", tree)
    nodes[-1]["devices"].pop()
    n = sum(len(x["devices"]) for x in nodes)
    used = max(d for stage in tree["stages"] for d in stage["devices"])
    invalid = used >= n or breaks_schema("plan", tree)
    return Mutant(base.name, "last cluster device removed", encode(tree), invalid)


UNKNOWN_SCHEDULES = ["zigzag", "", " 1f1b", "1F1B", "interleaved", "GPipe", "gpipe\x00", "ｇｐｉｐｅ", "1f1b" * 500]


def schedule_name(draw, base: Base) -> Mutant:
    if draw(st.booleans()):  # another schedule the formats know: valid or not, by pp, m and v
        name = draw(st.sampled_from(sorted(SCHEDULES)))
        return schema_mutant(base, f"schedule.name = {name!r}", replaced(base.tree, ("schedule", "name"), name))
    name = draw(st.sampled_from(UNKNOWN_SCHEDULES) | st.text(max_size=12).filter(lambda x: x not in SCHEDULES))
    tree = replaced(base.tree, ("schedule", "name"), name)
    return Mutant(base.name, f"schedule.name = {name[:20]!r}", encode(tree), True)


def virtual_stages(draw, base: Base) -> Mutant:
    v = base.tree["schedule"]["virtual_stages"]
    new = draw(st.sampled_from([0, -1, 1, 2, 3, 4, 8, 2**31, 10**6]).filter(lambda x: x != v))
    tree = replaced(base.tree, ("schedule", "virtual_stages"), new)
    return Mutant(base.name, f"virtual_stages = {new} (stages: {len(tree['stages'])})", encode(tree), True)


def parallel_degree(draw, base: Base) -> Mutant:
    key = draw(st.sampled_from(["pp", "dp"]))
    old = base.tree["parallel"][key]
    new = draw(st.sampled_from([0, 1, 2, 3, 4, 8, 16, 10**6]).filter(lambda x: x != old))
    return Mutant(base.name, f"parallel.{key} = {new}", encode(replaced(base.tree, ("parallel", key), new)), True)


def microbatches(draw, base: Base) -> Mutant:
    """The micro-batch count or size changed, the global batch kept or made to match: refused
    when the totals disagree or the schedule outgrows what solve simulates."""
    tree = copy.deepcopy(base.tree)
    mb, dp, n = tree["microbatch"], tree["parallel"]["dp"], len(tree["stages"])
    cap = MAX_ACTIONS // (3 * n)  # micro-batches solve still simulates (F, I and W per stage)
    key = draw(st.sampled_from(["count", "size", "global_batch"]))
    new = draw(st.sampled_from([1, 2, 3, 4, 7, 1000, cap - 1, cap, cap + 1, 10**6, 10**9, 2**40]))
    old = mb[key]
    mb[key] = new
    match = key != "global_batch" and draw(st.booleans())
    if match:
        mb["global_batch"] = mb["size"] * mb["count"] * dp
    invalid = (mb["global_batch"] != mb["size"] * mb["count"] * dp or n * mb["count"] * 3 > MAX_ACTIONS
               or beyond_bounds(mb["global_batch"]))
    return Mutant(base.name, f"microbatch.{key} {old} -> {new}{', global batch matched' if match else ''}",
                  encode(tree), invalid)


def recompute_edit(draw, base: Base) -> Mutant:
    """A stage's recomputation: another mode, a chosen list for a mode without one, a layer it lacks."""
    tree = copy.deepcopy(base.tree)
    s = draw(st.integers(0, len(tree["stages"]) - 1))
    stage = tree["stages"][s]
    how = draw(st.sampled_from(["mode", "list without selective", "selective list", "layer it lacks"]))
    if how == "mode":
        stage["recompute"] = draw(st.sampled_from(["none", "full", "selective", "Full", "partial"]))
        return schema_mutant(base, f"stages.{s}.recompute = {stage['recompute']!r}", tree)
    if how == "selective list":
        stage["recompute"] = "selective"
        stage["recompute_layers"] = draw(st.lists(st.sampled_from(stage["layers"]), unique=True))
        return schema_mutant(base, f"stages.{s}: selective {stage['recompute_layers']}", tree)
    stage["recompute_layers"] = [stage["layers"][0]] if how == "list without selective" else ["no.such.layer"]
    if how == "list without selective":
        stage["recompute"] = draw(st.sampled_from(["none", "full"]))
    return Mutant(base.name, f"stages.{s}: {how}", encode(tree), True)


# The solver settings a plan keeps (provenance.solver.settings), which check --resolve searches
# with again: for each, values that break its type or range (refused) and values that do not.
_WHOLE = ([None, 1, 3], [0, -1, "2", 2.0, True, 2**62 + 1])
SETTING_VALUES: dict[str, tuple[list, list]] = {
    **{key: _WHOLE for key in ("global_batch", "pp", "dp", "mbs", "microbatches", "virtual_stages")},
    "schedules": ([None, ["gpipe"], ["1f1b", "zb-h1"]], [[], 5, "1f1b", [1], [None]]),
    "recompute": (["none", "full", "auto", "selective"], ["maybe", None, 1, "Full"]),
    "fix_cuts": ([None, [1], [7], [3, 9]], [[0], [15], [100], [9, 3], [4, 4], ["1"], 5, [True]]),
    "top": ([1, 5], [0, -1, None, "5", 5.0]),
    "budget": ([1, 400], [0, None, "x"]),
    "include_model_only": ([True, False], [1, "true", None]),
    "ilp": ([False], [0, "no", None]),
    "time_limit_s": ([0.5, 1, 3.0], [0, -1.0, 1e7, "1", None, True]),
    "objective": (["time", "memory"], ["speed", None, 0]),
    "tp": ([None, 1, 2], [0, -1, "2", 2.0, True]),
    "zero": ([None, 0, 1, 3], [4, -1, "1", 1.0, True, False]),
    "sequence_parallel": ([True, False], [1, "yes", None]),
}


def saved_setting(draw, base: Base) -> Mutant:
    """One saved solver setting changed (the plan's 15 layers bound fix_cuts to 1..14), or the
    settings object replaced."""
    key = draw(st.sampled_from(sorted(SETTING_VALUES) + ["(the settings)"]))
    where = ("provenance", "solver", "settings")
    if key == "(the settings)":
        value = draw(st.sampled_from([5, [], None, "x", {}]))
        return Mutant(base.name, f"settings = {value!r}", encode(replaced(base.tree, where, value)),
                      value not in ({}, None))  # absent settings (null) search with the defaults
    valid, invalid = SETTING_VALUES[key]
    value = draw(st.sampled_from(valid + invalid))
    return Mutant(base.name, f"settings.{key} = {value!r}", encode(replaced(base.tree, (*where, key), value)),
                  value in invalid and not any(value == v and type(value) is type(v) for v in valid))


PLAN_ONLY = [recompute_edit, layer_edit, reorder_stages, share_device, cluster_devices, schedule_name, virtual_stages,
             parallel_degree, microbatches]

# ----------------------------------------------------------------------- profile mutations


def _edge_between(tree: dict, a: str, b: str) -> bool:
    return any(e["src"] == a and e["dst"] == b for e in tree["edges"])


def profile_layer(draw, base: Base) -> Mutant:
    """A layer duplicated (a name twice), removed, or swapped with the next one."""
    tree = copy.deepcopy(base.tree)
    layers = tree["layers"]
    k = draw(st.integers(0, len(layers) - 1))
    name = layers[k]["name"]
    op = draw(st.sampled_from(["duplicate", "remove", "swap with next"]))
    if op == "duplicate":
        layers.insert(k, copy.deepcopy(layers[k]))
        invalid = True
    elif op == "remove":
        layers.pop(k)
        named = (any(name in (e["src"], e["dst"]) for e in tree["edges"])
                 or any(name in g["layers"] for g in tree["tied"]))
        invalid = named or not layers
    elif k + 1 < len(layers):
        layers[k], layers[k + 1] = layers[k + 1], layers[k]
        invalid = _edge_between(tree, name, layers[k]["name"])  # now an edge backwards
    else:
        return schema_mutant(base, f"layers.{k}: the last one, nothing to swap", tree)
    return Mutant(base.name, f"layers.{k} ({name}): {op}", encode(tree), invalid)


BAD_MBS_KEYS = ["0", "01", "-1", "1.5", "x", "", "1000000", " 1", "１", "1e3"]


def _rename_mbs(tree: dict, old: str, new: str, where: list[dict]) -> None:
    for holder in where:
        if old in holder:
            holder[new] = holder.pop(old)


def mbs_keys(draw, base: Base) -> Mutant:
    """Micro-batch sizes: one dropped from one layer, or renamed in one layer or in all."""
    tree = copy.deepcopy(base.tree)
    layers = tree["layers"]
    sizes = list(layers[0]["by_mbs"])
    old = draw(st.sampled_from(sizes))
    how = draw(st.sampled_from(["drop in one", "rename in one", "rename bad", "rename good"]))
    k = draw(st.integers(0, len(layers) - 1))
    if how == "drop in one":
        del layers[k]["by_mbs"][old]
        return Mutant(base.name, f"layers.{k}.by_mbs.{old} deleted", encode(tree), len(layers) > 1 or len(sizes) == 1)
    if how == "rename good":
        new = draw(st.sampled_from(["3", "5", "64", "999999"]).filter(lambda x: x not in sizes))
        loss = [tree["loss"]["by_mbs"]] if tree["loss"] else []
        everywhere = [layer["by_mbs"] for layer in layers] + [tree["whole"]] + loss
        _rename_mbs(tree, old, new, everywhere)
        return schema_mutant(base, f"micro-batch size {old} renamed {new}", tree)
    new = draw(st.sampled_from(BAD_MBS_KEYS) if how == "rename bad" else st.sampled_from(["3", "7"]))
    targets = [layers[k]["by_mbs"]] if how == "rename in one" else [layer["by_mbs"] for layer in layers]
    _rename_mbs(tree, old, new, targets)
    invalid = how == "rename bad" or len(layers) > 1
    return Mutant(base.name, f"by_mbs {old!r} -> {new!r} ({how}, layer {k})", encode(tree), invalid)


def edge_edit(draw, base: Base) -> Mutant:
    """An edge to or from a layer the profile lacks, turned backwards, or onto itself."""
    tree = copy.deepcopy(base.tree)
    if not tree["edges"]:
        return profile_layer(draw, base)
    k = draw(st.integers(0, len(tree["edges"]) - 1))
    edge = tree["edges"][k]
    inner = edge["src"] != "@input" and edge["dst"] != "@loss"
    how = draw(st.sampled_from(["unknown dst", "unknown src", "reversed", "self", "tied unknown"]))
    if how == "unknown dst":
        edge["dst"] = "no.such.layer"
    elif how == "unknown src":
        edge["src"] = "no.such.layer"
    elif how == "reversed" and inner:
        edge["src"], edge["dst"] = edge["dst"], edge["src"]
    elif how == "self" and inner:
        edge["dst"] = edge["src"]
    else:
        tree["tied"].append({"layers": [tree["layers"][0]["name"], "no.such.layer"], "param_bytes": 0})
    return Mutant(base.name, f"edges.{k}: {how}", encode(tree), True)


def tied_edit(draw, base: Base) -> Mutant:
    """A tied group: a member twice, more shared bytes than a member has, or a new group."""
    tree = copy.deepcopy(base.tree)
    layers = tree["layers"]
    if not tree["tied"] or draw(st.booleans()):
        a, b = draw(st.lists(st.integers(0, len(layers) - 1), min_size=2, max_size=2, unique=True))
        most = min(layers[a]["param_bytes"], layers[b]["param_bytes"])
        nbytes = draw(st.sampled_from([0, most, most + 1]))
        tree["tied"].append({"layers": [layers[a]["name"], layers[b]["name"]], "param_bytes": nbytes})
        held = {n: sum(g["param_bytes"] for g in tree["tied"] if n in g["layers"])
                for g in tree["tied"] for n in g["layers"]}
        invalid = any(held[x["name"]] > x["param_bytes"] for x in layers if x["name"] in held)
        return Mutant(base.name, f"tied {layers[a]['name']} and {layers[b]['name']}, {nbytes} bytes",
                      encode(tree), invalid)
    group = tree["tied"][draw(st.integers(0, len(tree["tied"]) - 1))]
    if draw(st.booleans()):
        group["layers"].append(group["layers"][0])
        return Mutant(base.name, f"tied group names {group['layers'][0]} twice", encode(tree), True)
    group["param_bytes"] = min(x["param_bytes"] for x in layers if x["name"] in group["layers"]) + 1
    return Mutant(base.name, f"tied group shares {group['param_bytes']} bytes, more than a member has",
                  encode(tree), True)


def rename_layer(draw, base: Base) -> Mutant:
    """A layer renamed everywhere it is named: to a new name (valid), to another layer's name or
    to a reserved pseudo-layer name (refused)."""
    tree = copy.deepcopy(base.tree)
    names = [x["name"] for x in tree["layers"]]
    old = draw(st.sampled_from(names))
    new = draw(st.sampled_from(["renamed.layer", "", "@input", "@loss", "with space"]) | st.sampled_from(names))
    if new == old:
        new += ".x"
    swap = {old: new}
    for layer in tree["layers"]:
        layer["name"] = swap.get(layer["name"], layer["name"])
    for e in tree["edges"]:
        e["src"], e["dst"] = swap.get(e["src"], e["src"]), swap.get(e["dst"], e["dst"])
    for group in tree["tied"]:
        group["layers"] = [swap.get(n, n) for n in group["layers"]]
    return Mutant(base.name, f"layer {old!r} renamed {new!r}", encode(tree), new in names or new in ("@input", "@loss"))


def duplicate_edge(draw, base: Base) -> Mutant:
    tree = copy.deepcopy(base.tree)
    if not tree["edges"]:
        return profile_layer(draw, base)
    k = draw(st.integers(0, len(tree["edges"]) - 1))
    tree["edges"].insert(k, copy.deepcopy(tree["edges"][k]))
    return Mutant(base.name, f"edges.{k} twice", encode(tree), True)


PROFILE_ONLY = [profile_layer, mbs_keys, edge_edit, tied_edit, rename_layer, duplicate_edge]


def node_edit(draw, base: Base) -> Mutant:
    """A node grown past what one node holds, or split in two with or without a link between."""
    tree = copy.deepcopy(base.tree)
    nodes = tree["nodes"]
    k = draw(st.integers(0, len(nodes) - 1))
    devices = nodes[k]["devices"]
    how = draw(st.sampled_from(["grown to 72", "grown to 73", "split"]))
    if how != "split":
        nodes[k]["devices"] = [copy.deepcopy(devices[0]) for _ in range(int(how[-2:]))]
        return Mutant(base.name, f"nodes.{k} {how} devices", encode(tree), how == "grown to 73")
    if len(devices) < 2:
        return node_edit(draw, base)
    nodes.insert(k + 1, {"name": "split", "devices": devices[len(devices) // 2:]})
    del devices[len(devices) // 2:]
    linked = draw(st.booleans())
    if linked and tree["inter_node"] is None:
        tree["inter_node"] = copy.deepcopy(tree["intra_node"])
    if not linked:
        tree["inter_node"] = None
    return Mutant(base.name, f"nodes.{k} split{' with' if linked else ' without'} a link", encode(tree), not linked)


@st.composite
def mutants(draw, bases: list[Base], mutations: list) -> Mutant:
    base = draw(st.sampled_from(bases))
    return draw(st.sampled_from(mutations))(draw, base)


def plan_mutants() -> st.SearchStrategy[Mutant]:
    return mutants(PLAN_BASES, GENERIC + PLAN_ONLY)


def settings_mutants() -> st.SearchStrategy[Mutant]:
    """The plan check --resolve searches again quickly (gpt on two CPUs), its saved settings
    mutated, or any of its fields."""
    bases = [BASES["gpt.cpu2-pp2.json"]]
    return mutants(bases, [saved_setting] * 4 + [delete_key, wrong_type, extra_key])


def cluster_mutants() -> st.SearchStrategy[Mutant]:
    return mutants(CLUSTERS, GENERIC + [node_edit] * 2)


def profile_mutants() -> st.SearchStrategy[Mutant]:
    return mutants(PROFILES, GENERIC + PROFILE_ONLY)


# ------------------------------------------------------------------------------- running


@dataclass
class Run:
    args: list[str]
    code: int
    seconds: float
    problem: str | None  # None: the command behaved (whatever its exit code)


def plan_of(profile: str) -> str:
    """A committed plan of the profile's model (so check --profile passes on the profile as it
    is), else any committed plan."""
    fingerprint = BASES[profile].tree["model"]["fingerprint"]
    same = [p for p in PLANS if p.tree["model"]["fingerprint"] == fingerprint]
    return str(ROOT / "plans" / (same or PLANS)[0].name)


PROFILE_OF_CPU2 = str(ROOT / "profiles" / "gpt.cpu.json")  # the profile plans/gpt.cpu2-pp2.json was solved on


def commands(mutant: Mutant, kind: str, path: str) -> list[list[str]]:
    if kind == "plan":
        return [["simulate", path], ["simulate", path, "--json"], ["check", path],
                *(["export", path, "--format", f] for f in FORMATS)]
    if kind == "cluster":
        return [["solve", PROFILE_OF_CPU2, "--cluster", path, "--global-batch", "8", "--time-limit", "1",
                 "--jobs", "1", "--json"]]
    if kind == "saved settings":  # and search again with them
        return commands(mutant, "plan", path) + [["check", path, "--profile", PROFILE_OF_CPU2, "--resolve"]]
    return [["solve", path, "--cluster", "cpu2", "--global-batch", "8", "--time-limit", "1", "--jobs", "1",
             "--json"], ["check", plan_of(mutant.base), "--profile", path]]


def judge(result, mutant: Mutant, command: str) -> str | None:
    """What is wrong with how a command met the mutant, or None."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return "internal error:\n" + "".join(traceback.format_exception(result.exception))
    if "Traceback" in result.output:
        return "a traceback in the output"
    if result.exit_code not in (0, 1, 2, 3):
        return f"exit code {result.exit_code}"
    if mutant.invalid and result.exit_code != 2:
        return f"an invalid mutant was not refused (exit {result.exit_code})"
    if result.exit_code == 2:
        return _one_error_line(result, command)
    return None


def _one_error_line(result, command: str) -> str | None:
    """One line: ``error: ...`` on stderr, or for a plan ``check`` refuses, ``bad  PLAN: ...``."""
    lines = result.output.strip().splitlines()
    if len(lines) != 1:
        return f"exit 2 without one line of output: {result.output!r}"
    if lines[0].startswith("error: ") and lines[0] + "\n" == result.stderr:
        return None
    if command == "check" and lines[0].startswith("bad ") and not result.stderr:
        return None
    return f"exit 2 with an unexpected line: stdout {result.stdout!r}, stderr {result.stderr!r}"


def run_mutant(mutant: Mutant, kind: str, more: Callable[[str, str], list[list[str]]] | None = None) -> list[Run]:
    """Every command on the mutant; ``more(path, folder)`` adds commands (benchmarks/fuzz.py)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mutant.json"
        path.write_bytes(mutant.text)
        runs = []
        for args in commands(mutant, kind, str(path)) + (more(str(path), tmp) if more else []):
            start = time.perf_counter()
            result = runner.invoke(app, args)
            seconds = time.perf_counter() - start
            runs.append(Run(args, result.exit_code, seconds, judge(result, mutant, args[0])))
        return runs


def assert_behaves(mutant: Mutant, kind: str) -> None:
    for run in run_mutant(mutant, kind):
        assert run.problem is None, f"{mutant!r}, planner {' '.join(run.args[:1])}: {run.problem}"


# --------------------------------------------------------------------------------- tests

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def case(base: str, what: str, tree: Any, invalid: bool) -> Mutant:
    """A mutant written out by hand, for @example."""
    b = BASES[base]
    return Mutant(b.name, what, encode(tree(copy.deepcopy(b.tree))), invalid)


def saved_setting_case(key: str, value: Any) -> Mutant:
    where = ("provenance", "solver", "settings", key)
    return case("gpt.cpu2-pp2.json", f"settings.{key} = {value!r}", lambda t: replaced(t, where, value), True)


def _in_stage0(key: str, value: Any) -> Callable[[Any], Any]:
    def edit(tree: Any) -> Any:
        tree["stages"][0][key] = value
        return tree
    return edit


def _tied(param_bytes: int | None = None, repeat: bool = False) -> Callable[[Any], Any]:
    def edit(tree: Any) -> Any:
        group = tree["tied"][0]
        group["param_bytes"] = group["param_bytes"] if param_bytes is None else param_bytes
        group["layers"] += group["layers"][:1] if repeat else []
        return tree
    return edit


def _last_layer_named(name: str) -> Callable[[Any], Any]:
    def edit(tree: Any) -> Any:
        old = tree["layers"][-1]["name"]
        tree["layers"][-1]["name"] = name
        tree["edges"] = [e for e in tree["edges"] if old not in (e["src"], e["dst"])]
        tree["tied"] = [g for g in tree["tied"] if old not in g["layers"]]
        return tree
    return edit


@FUZZ
@given(mutant=plan_mutants())
# check wrapped a long refusal over two lines at the console's width
@example(mutant=case("cnn.h200x8.json", "provenance.solver.settings.budget = Infinity",
                     lambda t: replaced(t, ("provenance", "solver", "settings", "budget"), Raw("Infinity")), True))
# a recomputation list beside a mode that ignores it was accepted
@example(mutant=case("gpt.cpu2-pp2.json", "stages.0: recompute none with a list",
                     _in_stage0("recompute_layers", ["transformer.emb"]), True))
def test_plan_mutants_are_run_or_refused_in_one_line(mutant):
    assert_behaves(mutant, "plan")


@settings(FUZZ, max_examples=max(10, settings().max_examples // 2))  # solve: a tenth of a second each
@given(mutant=profile_mutants())
# tied bytes beyond a member's own: a negative stage memory, and solve failed writing its plan
@example(mutant=case("gpt-tied-50k.h200.json", "tied.0.param_bytes = 2**31", _tied(2**31), True))
@example(mutant=case("gpt-tied-50k.h200.json", "tied.0 names a layer twice", _tied(2**36, repeat=True), True))
# accepted: an edge given twice (its bytes sent twice), a layer named like the loss
@example(mutant=case("gpt.cpu.json", "edges.1 twice",
                     lambda t: t.update(edges=t["edges"][:2] + t["edges"][1:]) or t, True))
@example(mutant=case("gpt.cpu.json", "last layer named @loss", _last_layer_named("@loss"), True))
def test_profile_mutants_are_solved_or_refused_in_one_line(mutant):
    assert_behaves(mutant, "profile")


@settings(FUZZ, max_examples=max(10, settings().max_examples // 4))
@given(mutant=settings_mutants())
# check --resolve passed saved settings to the search unchecked: a number for the schedules,
# text for top or budget, a cut beyond the layers, an unknown recompute mode were internal errors
@example(mutant=saved_setting_case("schedules", 5))
@example(mutant=saved_setting_case("top", "x"))
@example(mutant=saved_setting_case("fix_cuts", [100]))
@example(mutant=saved_setting_case("recompute", "maybe"))
def test_saved_settings_are_checked_before_a_search_again(mutant):
    assert_behaves(mutant, "saved settings")


@settings(FUZZ, max_examples=max(10, settings().max_examples // 4))
@given(mutant=cluster_mutants())
def test_cluster_file_mutants_are_solved_for_or_refused_in_one_line(mutant):
    assert_behaves(mutant, "cluster")


# ------------------------------------------------------------------------- loading alone

# Any JSON value, NaN, infinities and integers past 64 bits among them.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**80, max_value=2**80) | st.floats() | st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
    max_leaves=20)


@st.composite
def loaded_texts(draw) -> bytes:
    """A committed plan, profile or cluster with one node replaced by any JSON value, as text,
    sometimes cut short; or any bytes at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    base = draw(st.sampled_from(PLANS + PROFILES + CLUSTERS))
    text = encode(replaced(base.tree, draw(st.sampled_from(_paths(base.name))), draw(JSON_VALUES)))
    return text[:draw(st.integers(0, len(text)))] if draw(st.integers(0, 9)) == 0 else text


@settings(FUZZ, max_examples=max(50, settings().max_examples * 2))  # milliseconds each
@given(text=loaded_texts())
@example(text=b'{"kind": "plan", "parallel": {"pp": 2, "dp": 1, "zero": true}}')  # was ZeRO stage 1
@example(text=b"1" * 400)  # said "found _Refused"
@example(text=b'{"kind": "plan", "baselines": {"\\n": Infinity}}')  # the key's line break broke the message
def test_loading_anything_gives_a_model_or_one_input_error(text):
    """The loaders alone, on every format: a model or an InputError of one line naming the file,
    never another exception."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "file.json"
        path.write_bytes(text)
        for model in KINDS.values():
            try:
                load(path, model)
            except InputError as err:
                assert str(err).startswith(f"{path}: ") and "\n" not in str(err), str(err)


# ------------------------------------------------------------------- the fuzz's own oracle


def test_committed_files_conform_and_run():
    for base in PLAN_BASES + PROFILES + CLUSTERS:
        assert not breaks_schema(base.kind, base.tree), base.name
        for run in run_mutant(Mutant(base.name, "unchanged", encode(base.tree)), base.kind):
            assert run.problem is None and run.code in (0, 3), (base.name, run)


def test_schema_oracle_by_hand():
    plan = BASES["gpt.cpu2-pp2.json"].tree
    assert breaks_schema("plan", deleted(plan, ("stages", 0, "cost")))  # required
    assert not breaks_schema("plan", deleted(plan, ("stages", 0, "recompute")))  # has a default
    assert breaks_schema("plan", replaced(plan, ("stages", 0, "rank"), 0.0))  # an integer is written 0
    assert not breaks_schema("plan", replaced(plan, ("stages", 0, "cost", "fwd_s"), 1))  # a number may be 1
    assert breaks_schema("plan", replaced(plan, ("stages", 0, "devices"), [-1]))  # minimum 0
    assert breaks_schema("plan", replaced(plan, ("parallel", "unknown"), 1))  # extra="forbid"
    assert not breaks_schema("plan", replaced(plan, ("provenance", "solver", "unknown"), [1]))  # free-form
    assert breaks_schema("plan", replaced(plan, ("model", "args", "n"), [1]))  # scalars only
    assert not breaks_schema("plan", replaced(plan, ("model", "depth"), None))  # int | None


def test_encode_splices_raw_text():
    assert encode({"a": [Raw("NaN"), 1]}) == b'{\n "a": [\n  NaN,\n  1\n ]\n}\n'
