"""Models built without memory, and one layer at a time made real on the device.

The factory runs under ``torch.device("meta")``: every parameter and buffer it creates has a
shape and a dtype but no storage, so a model of any size is built in seconds, and its layers,
shapes, tied weights and edge bytes are found by running it on meta tensors. A layer is then
measured on a copy of it made real on the device (``materialise``), on inputs of the shapes and
dtypes the meta run gave (``real_inputs``), and freed before the next.
"""

from __future__ import annotations

import copy
import os
import re
import resource
from pathlib import Path

import torch
from torch import nn

from planner.errors import ModelError
from planner.model import ModelSpec, build_spec, user_code

__all__ = ["build_meta_spec", "is_meta", "to_meta", "materialise", "real_like", "available_bytes",
           "value_bytes", "param_bytes"]

INIT_STD = 0.02  # GPT-2's initialisation scale, for parameters of modules without reset_parameters
NO_META = "--no-meta"


def build_meta_spec(factory: str, args: dict) -> ModelSpec:
    """Call the factory under ``torch.device("meta")``: a model with shapes and no memory. A
    factory that computes with the values it builds (``.item()``, a check forward) fails there:
    it is refused with the way out, building it in memory."""
    try:
        with torch.device("meta"):
            return build_spec(factory, args)
    except ModelError as e:
        if not re.search(r"\bmeta\b", str(e)):
            raise  # the factory's own complaint (a bad argument, say): as it is
        raise ModelError(f"factory {factory} cannot be built on the meta device ({str(e).split(' raised ', 1)[-1]}): "
                         f"pass {NO_META} to build it in memory") from None


def is_meta(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` has no storage."""
    return any(t.is_meta for t in [*module.parameters(), *module.buffers()])


def to_meta(value):
    """Tensors in ``value`` as meta tensors of the same shape and dtype."""
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if isinstance(value, (tuple, list)):
        return type(value)(to_meta(v) for v in value)
    return value


def value_bytes(value) -> int:
    """Bytes of the tensors in ``value`` (meta ones included: numel times element size)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(value_bytes(v) for v in value)
    return 0


def param_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters, each shared one counted once."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


# ----------------------------------------------------------------------------- materialise


def _real(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if t.is_floating_point():
        t = t.to(dtype=dtype)  # on meta: free
    return torch.empty_like(t, device=device) if t.is_meta else t.to(device)


def materialise(module: nn.Module, device: torch.device, dtype: torch.dtype, name: str) -> nn.Module:
    """A copy of ``module`` on ``device`` in ``dtype``: tensors that were meta get storage and a
    fresh initialisation (``reset_parameters`` where a module has it, else a normal init of
    parameters and zeros for buffers; boolean buffers, masks, all True), the others are copied.
    Shared parameters stay shared in the copy. ``module`` itself is not changed."""
    twin = copy.deepcopy(module)  # meta tensors copy without memory
    made: dict[int, torch.Tensor] = {}
    fresh = []
    for sub in twin.modules():
        had_meta = False
        for kind in ("_parameters", "_buffers"):
            store: dict[str, torch.Tensor | None] = getattr(sub, kind)
            for key, t in store.items():
                if t is None:
                    continue
                had_meta |= t.is_meta
                if id(t) not in made:
                    real = _real(t.detach(), device, dtype)
                    made[id(t)] = nn.Parameter(real, t.requires_grad) if isinstance(t, nn.Parameter) else real
                store[key] = made[id(t)]
        if had_meta:
            fresh.append(sub)
    with torch.no_grad():
        for sub in fresh:
            _initialise(sub, name)
        _make_finite(twin)
    return twin


def _initialise(sub: nn.Module, name: str) -> None:
    reset = getattr(sub, "reset_parameters", None)
    for b in sub.buffers(recurse=False):
        b.fill_(True) if b.dtype == torch.bool else b.zero_()
    if callable(reset):
        with user_code(f"layer {name}: {type(sub).__name__}.reset_parameters()"):
            reset()
        return
    for p in sub.parameters(recurse=False):
        p.normal_(0.0, INIT_STD) if p.is_floating_point() else p.zero_()


def _make_finite(module: nn.Module) -> None:
    """Parameters a ``reset_parameters`` left uninitialised may hold anything: a normal init."""
    for p in module.parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            p.normal_(0.0, INIT_STD)


def real_like(value, device: torch.device, gen: torch.Generator):
    """A real tensor of ``value``'s shape and dtype on ``device``: normal floats, True booleans
    (masks that hide nothing), zero integers (an index valid for any table)."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_floating_point():
        return torch.randn(value.shape, generator=gen, dtype=torch.float32).to(device, value.dtype)
    if value.dtype == torch.bool:
        return torch.ones(value.shape, dtype=torch.bool, device=device)
    return torch.zeros(value.shape, dtype=value.dtype, device=device)


# -------------------------------------------------------------------------------- memory


def available_bytes(device: torch.device) -> int:
    """Bytes a new allocation can take now: the GPU's free memory; on a CPU the least of the
    kernel's MemAvailable, the room left under a cgroup limit and under an address-space limit."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    limits = [_meminfo_available(), _cgroup_room(), _rlimit_room()]
    known = [n for n in limits if n is not None]
    return max(min(known), 0) if known else 0


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_room() -> int | None:
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        cap, used = _read_int(limit), _read_int(usage)
        if cap is not None and used is not None and cap < 2**60:
            return cap - used
    return None


def _rlimit_room() -> int | None:
    """Room under ``ulimit -v``: the limit less this process's virtual size."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return soft - pages * os.sysconf("SC_PAGE_SIZE")

