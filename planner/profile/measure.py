"""Measuring one module's forward, backward and memory: timers, saved-tensor accounting and a
live-tensor tracker for devices without allocator statistics."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def tensors(value) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def storage_key(t: torch.Tensor) -> int:
    inner = _storage_tensors([t])  # a DTensor's storage is its local shard's
    return inner[0].untyped_storage().data_ptr() if inner else 0


def nbytes(t: torch.Tensor) -> int:
    """Bytes of the storage behind ``t``: a DTensor's are its local shard's (the wrapper's own
    ``untyped_storage()`` reports the whole tensor's size, which no device holds)."""
    return sum(x.untyped_storage().nbytes() for x in _storage_tensors([t]))


# ------------------------------------------------------------------------------------ timing

R = TypeVar("R")


class Timer:
    """Seconds spent in a region, and what it returned: CUDA events on a GPU (after
    synchronising), a monotonic clock on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], R]) -> tuple[float, R]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            result = fn()
            end.record()
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end) / 1e3, result
        t0 = time.perf_counter()
        result = fn()
        return time.perf_counter() - t0, result


@dataclass(frozen=True)
class Stat:
    median: float
    spread: float  # (p90 - p10) / median


def stat(samples: list[float]) -> Stat:
    s = sorted(samples)
    med = statistics.median(s)
    if len(s) < 3 or med <= 0:
        return Stat(med, 0.0)
    lo, hi = s[int(0.1 * (len(s) - 1))], s[int(round(0.9 * (len(s) - 1)))]
    return Stat(med, (hi - lo) / med)


# ---------------------------------------------------------------------------- saved tensors


def saved_storages(run: Callable[[], object], ignore: set[int]) -> tuple[object, dict[int, int]]:
    """Run a forward and return its result and the storages it saved for backward (key -> bytes),
    ignoring ``ignore`` (parameters and buffers, which live anyway)."""
    found: dict[int, int] = {}

    def pack(t: torch.Tensor):
        key = storage_key(t)
        if key not in ignore and nbytes(t):
            found[key] = nbytes(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = run()
    return result, found


# --------------------------------------------------------------------------- live tensors


def _storage_tensors(found: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors that own storage: a wrapper subclass (a DTensor) has none of its own, its inner
    tensors (a DTensor's local shard) do; the mode sees the wrapper, not the ops on its insides."""
    out = []
    for t in found:
        flatten = getattr(type(t), "__tensor_flatten__", None)
        if flatten is None:
            out.append(t)
        else:
            names, _ = flatten(t)
            out.extend(_storage_tensors([x for x in (getattr(t, n) for n in names) if isinstance(x, torch.Tensor)]))
    return out


class LiveTensors(TorchDispatchMode):
    """Counts the bytes of tensor storages created inside the region that are still alive, and
    their peak. Works on any device; on CUDA the allocator's own statistics are used instead.

    A storage is known by its identity, not its address, and its size is read again at every
    operation: FSDP frees and re-allocates its gathered weights in place
    (``UntypedStorage.resize_`` in ``_fsdp_param.free_storage`` / ``alloc_storage``, not a
    dispatched operation), so one storage shrinks to nothing and grows again at a new address.
    Counted by address at first sight, each re-allocation was counted once more and none freed."""

    def __init__(self, ignore: Iterable[int] = ()):
        super().__init__()
        self.ignore = set(ignore)  # addresses of storages made before the region
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}  # storage identity -> (ref, bytes counted)
        self.total = 0
        self.peak = 0
        self.counting = True

    def sweep(self) -> None:
        for key, (ref, n) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.total -= n
                continue
            now = torch.UntypedStorage._new_with_weak_ptr(ref.cdata).nbytes()  # resized in place?
            if now != n:
                self.live[key] = (ref, now)
                self.total += now - n

    @contextmanager
    def uncounted(self) -> Iterator[None]:
        """A region whose tensors are not counted (a check that is not part of what is measured);
        what it creates and keeps stays uncounted."""
        self.counting = False
        try:
            yield
        finally:
            self.counting = True

    def adopt(self, found: list[torch.Tensor]) -> None:
        """Count these tensors from now on, wherever they were made (kept from an uncounted region)."""
        self.sweep()
        self._add(found)

    def _add(self, found: list[torch.Tensor]) -> None:
        for t in _storage_tensors(found):
            s = t.untyped_storage()
            key = s._cdata
            if key not in self.live and s.data_ptr() and s.data_ptr() not in self.ignore and s.nbytes():
                self.live[key] = (StorageWeakRef(s), s.nbytes())
                self.total += s.nbytes()
        self.peak = max(self.peak, self.total)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.counting:
            return out
        self.sweep()
        self._add(tensors(out))
        return out


class MemoryProbe:
    """Peak and final bytes allocated inside a region, above what existed before it."""

    def __init__(self, device: torch.device, ignore: Iterable[int] = ()):
        self.device = device
        self.ignore = ignore
        self.peak = 0
        self.final = 0

    def __enter__(self) -> MemoryProbe:
        self._base = 0
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._mode = LiveTensors(self.ignore)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            self.final = torch.cuda.memory_allocated(self.device) - self._base
        else:
            self._mode.__exit__(*exc)
            self._mode.sweep()
            self.peak, self.final = self._mode.peak, self._mode.total
