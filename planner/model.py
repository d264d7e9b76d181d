"""The model factory protocol, and loading a factory named on the command line.

A factory is a function that builds a model and says how to feed it::

    def build(n_layer: int = 12, d_model: int = 768) -> ModelSpec:
        model = GPT(n_layer, d_model)
        return ModelSpec(
            model=model,
            batch=lambda size, gen: ((tokens(size, gen),), targets(size, gen)),
            loss=lambda logits, target: F.cross_entropy(logits.flatten(0, 1), target.flatten()),
        )

``batch(size, generator)`` returns ``(inputs, target)``: a tuple of input tensors for
``model(*inputs)`` and the target given to ``loss(output, target)``; it must be deterministic for
a given generator. Set ``layers`` to a list of module paths to describe the model explicitly as a
sequence (each layer called on the previous layer's output, DeepSpeed ``PipelineModule`` style)
when its ``forward`` does not trace. A plain dict with the same keys works too.

``tp_plan`` says how tensor parallelism cuts the model (``planner execute`` with tp > 1): a module
path, or the end of one (``"attn.c_attn"`` names that module in every block), mapped to a style of
``TP_STYLES``. A model without one runs with tp 1.

This module does not import torch; the factory it loads does.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import io
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.errors import EXTRAS, InfeasibleError, MissingExtraError, ModelError, PlannerError
from planner.units import foreign_digits


@dataclass
class ModelSpec:
    model: Any  # torch.nn.Module
    batch: Callable[[int, Any], tuple[tuple, Any]]
    loss: Callable[[Any, Any], Any]
    layers: list[str] | None = None
    name: str | None = None
    # How layers are found when ``layers`` is None: "fx" (torch.fx), "export" (torch.export, for
    # a forward fx cannot trace: Hugging Face models), or "auto" (fx, else export).
    trace: str = "auto"
    # module path (or its last components) -> one of TP_STYLES; None: no tensor parallelism
    tp_plan: dict[str, str] | None = None


# How a module is cut by tensor parallelism (Megatron-LM: Shoeybi et al., 2019, section 3), in
# torch.distributed.tensor.parallel's terms. The sequence-parallel styles act only in plans with
# parallel.sequence_parallel (Korthikanti et al., 2022, section 4.2.2); the sequence is dimension 1.
TP_STYLES = {
    "colwise": "a Linear split by output features; its output stays split for a rowwise one",
    "rowwise": "a Linear split by input features (its output all-reduced), or an Embedding split by rows",
    "colwise_gather": "a Linear split by output features whose output is all-gathered (an output head)",
    "sequence": "a norm run on the local part of the sequence (sequence parallelism only)",
    "gather_input": "a module whose input is all-gathered along the sequence (sequence parallelism only)",
    "scatter_output": "a module whose output is split along the sequence (sequence parallelism only)",
}


def runs_sequence_parallel(tp_plan: dict[str, str] | None) -> bool:
    """A tp_plan runs sequence parallelism where it marks the norms that run on the local part of the
    sequence (a model cut through torch.export has none: ``planner.execute.graph_tp``)."""
    return tp_plan is not None and "sequence" in tp_plan.values()


def plan_style(path: str, tp_plan: dict[str, str]) -> str | None:
    """The style a tp_plan gives the module at ``path``: a key that is the path itself or its last
    components; where several match, the longest speaks (None: the plan does not name it)."""
    keys = [k for k in tp_plan if path == k or path.endswith("." + k)]
    return tp_plan[max(keys, key=len)] if keys else None


def check_tp_plan(ref: str, tp_plan: Any) -> None:
    """A tp_plan maps module paths to known styles."""
    if tp_plan is None:
        return
    if not isinstance(tp_plan, dict) or not all(isinstance(k, str) for k in tp_plan):
        raise ModelError(f"factory {ref}: tp_plan must map module paths to styles, got {type(tp_plan).__name__}")
    bad = {k: v for k, v in tp_plan.items() if v not in TP_STYLES}
    if bad:
        key = next(iter(bad))
        raise ModelError(f"factory {ref}: tp_plan[{key!r}] is {bad[key]!r}; styles are {', '.join(TP_STYLES)}")


def describe(e: BaseException) -> str:
    """What user code raised, in one line."""
    if isinstance(e, SystemExit):
        return f"SystemExit: it called sys.exit({e.code!r})"
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


@contextmanager
def user_code(what: str) -> Iterator[None]:
    """Run the factory's code: anything it raises, sys.exit included, becomes a ModelError that
    names ``what`` (only an interrupt, and planner's own errors, pass through as they are)."""
    try:
        yield
    except (KeyboardInterrupt, PlannerError):
        raise
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in EXTRAS:
            raise MissingExtraError(e.name or "torch", what) from None
        raise ModelError(f"{what} raised {describe(e)}") from None
    except BaseException as e:
        if _out_of_memory(e):
            raise InfeasibleError(f"{what} ran out of memory ({describe(e)}): lower --mbs, cut the model finer "
                                  "with --depth, or run where more memory is free") from None
        raise ModelError(f"{what} raised {describe(e)}") from None


@contextmanager
def quiet() -> Iterator[None]:
    """What libraries print while planner traces a model is dropped: torch.export prints the
    partial graph of a forward it refuses (hundreds of lines a try), transformers logs warnings on
    the way. planner says the outcome in one line; ``PLANNER_DEBUG=1`` lets the rest through."""
    if os.environ.get("PLANNER_DEBUG"):
        yield
        return
    before = logging.root.manager.disable
    logging.disable(logging.CRITICAL)  # every logger, whatever stream its handler holds
    try:
        with redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(before)


def _out_of_memory(e: BaseException) -> bool:
    """An allocation that failed: Python's MemoryError, torch's OutOfMemoryError (CUDA), or the
    CPU allocator's RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or \
        "can't allocate memory" in str(e)


def parse_args(pairs: list[str]) -> dict[str, Any]:
    """``["n_layer=24", "tied=false"]`` -> ``{"n_layer": 24, "tied": False}`` (JSON scalars, else str)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ModelError(f"--arg {pair!r}: write NAME=VALUE")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if not key.isidentifier():
            raise ModelError(f"--arg {pair!r}: {key!r} is not a valid argument name")
        low = raw.strip().lower()
        if low in ("true", "false"):
            out[key] = low == "true"
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
            if foreign_digits(raw) and _is_number(raw):  # float() reads '２', JSON and factories do not
                raise ModelError(f"--arg {pair!r}: write numbers with the digits 0-9") from None
        out[key] = value if isinstance(value, (int, float, str, bool)) or value is None else raw
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _import_file(path: Path):
    name = f"planner_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelError(f"{path}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.resolve().parent))
    try:
        with user_code(f"{path}: importing it"):
            spec.loader.exec_module(module)
    except ModelError:
        sys.modules.pop(name, None)
        raise
    finally:
        sys.path.pop(0)
    return module


ROOT_ENV = "PLANNER_MODEL_ROOT"  # a folder to find relative factory files in, before any other


def _is_file_ref(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def find_factory_file(where: str, near: str | Path | None = None) -> Path:
    """The file of a factory named by a path. A relative path is looked for under
    $PLANNER_MODEL_ROOT, then in the current folder, then (``near``: the plan or profile that names
    it) in that file's folder and each folder above it, so that ``models/gpt.py`` named by
    ``plans/gpt.json`` is found from anywhere."""
    path = Path(where)
    if path.is_absolute():
        if path.is_file():
            return path
        raise ModelError(f"{path}: no such file")
    bases = [Path(os.environ[ROOT_ENV])] if os.environ.get(ROOT_ENV) else []
    bases.append(Path.cwd())
    if near is not None:
        bases += list(Path(near).resolve().parents)
    for base in bases:
        if (base / path).is_file():
            return (base / path).resolve()
    searched = ", ".join(dict.fromkeys(str(b) for b in bases[:3])) + (", ..." if len(bases) > 3 else "")
    hint = ("" if near is None else f"; run planner from the folder the profile was made in, or set {ROOT_ENV} "
            "to it")
    raise ModelError(f"{where}: no such file (looked in {searched}){hint}")


def resolve_factory(ref: str, near: str | Path | None = None) -> str:
    """``ref`` with its file made absolute (see ``find_factory_file``); a module reference as it is."""
    if ":" not in ref:
        return ref
    where, fn_name = ref.rsplit(":", 1)
    if not _is_file_ref(where):
        return ref
    return f"{find_factory_file(where, near)}:{fn_name}"


def model_file(ref: str) -> str | None:
    """The source file a model reference names, where there is one (an output must not overwrite it)."""
    where = ref.rsplit(":", 1)[0]
    if ":" not in ref or not where:
        return None
    if _is_file_ref(where):
        try:
            return str(find_factory_file(where))
        except ModelError:
            return None
    try:  # imports the packages above a dotted name, as loading the factory does next
        spec = importlib.util.find_spec(where)
    except Exception:  # noqa: BLE001 (loading the factory reports it)
        return None
    return spec.origin if spec is not None and spec.has_location else None


def with_factory_found(plan: Any, plan_path: str | Path) -> Any:
    """The plan (a ``formats.Plan``), its factory resolved next to the plan file (in memory only)."""
    factory = resolve_factory(plan.model.factory, near=plan_path)
    return plan.model_copy(update={"model": plan.model.model_copy(update={"factory": factory})})


def load_factory(ref: str) -> Callable[..., Any]:
    """'path/to/file.py:fn' or 'package.module:fn' -> the function."""
    if ":" not in ref:
        raise ModelError(f"model {ref!r}: write path/to/file.py:factory or package.module:factory")
    where, fn_name = ref.rsplit(":", 1)
    if _is_file_ref(where):
        path = find_factory_file(where)
        module = _import_file(path)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ModelError(f"cannot import module {where!r}: {e}") from None
        except (KeyboardInterrupt, PlannerError):
            raise
        except BaseException as e:
            raise ModelError(f"importing {where!r} raised {describe(e)}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise ModelError(f"{where} has no function {fn_name!r}"
                         + (f" (it has: {', '.join(found)})" if found else ""))
    return fn


_SIMPLE = {"int": int, "float": float, "bool": bool, "str": str, int: int, float: float, bool: bool, str: str}


def check_args(ref: str, fn: Callable[..., Any], args: dict[str, Any]) -> None:
    """Names the factory takes, and values of the simple types its annotations ask for."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    open_ended = any(p.kind == p.VAR_KEYWORD for p in params.values())
    for name, value in args.items():
        if name not in params:
            if open_ended:
                continue
            raise ModelError(f"factory {ref} has no argument {name!r} (it takes: {', '.join(params) or 'none'})")
        want = _SIMPLE.get(params[name].annotation)
        if want is None or isinstance(value, want) and not (want is int and isinstance(value, bool)):
            continue
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        raise ModelError(f"--arg {name}={value!r}: factory {ref} expects {want.__name__} for {name}")


def build_spec(ref: str, args: dict[str, Any]) -> ModelSpec:
    """Call the factory and check what it returns."""
    fn = load_factory(ref)
    check_args(ref, fn, args)
    with user_code(f"factory {ref}"):
        try:
            result = fn(**args)
        except TypeError as e:
            raise ModelError(f"factory {ref} does not accept these arguments: "
                             f"{describe(e).split(': ', 1)[-1]}") from None
    if isinstance(result, dict):
        unknown = set(result) - {"model", "batch", "loss", "layers", "name", "trace", "tp_plan"}
        if unknown:
            raise ModelError(f"factory {ref} returned unknown keys {sorted(unknown)}")
        try:
            result = ModelSpec(**result)
        except TypeError as e:
            raise ModelError(f"factory {ref} returned an incomplete spec: {e}") from None
    if not isinstance(result, ModelSpec):
        raise ModelError(f"factory {ref} returned {type(result).__name__}; expected a ModelSpec "
                         "(model, batch, loss) or a dict with those keys")
    for field in ("batch", "loss"):
        if not callable(getattr(result, field)):
            raise ModelError(f"factory {ref}: '{field}' is not callable")
    check_tp_plan(ref, result.tp_plan)
    if result.name is None:
        result.name = Path(ref.split(":")[0]).stem if ".py" in ref else ref.split(":")[0].rsplit(".", 1)[-1]
    return result
