"""What this machine offers the command line: the CPU cores this process may run on, and the
bound that puts on the flags that ask for threads or processes (no torch, no rich)."""

from __future__ import annotations

import os

from planner.errors import InputError


def cores() -> int:
    """CPU cores this process may run on (its affinity, which a container or ``taskset`` narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_per_core(value: int | None, flag: str, what: str) -> None:
    """``value`` (None: the default) asks for at least 1 and at most one ``what`` per core: more
    only share the cores (and 100,000 threads made torch fail or crash, processes exhaust the
    system's limit), so a larger number is a typo."""
    if value is None:
        return
    if value < 1:
        raise InputError(f"{flag} {value}: give at least 1")
    n = cores()
    if value > n:
        raise InputError(f"{flag} {value}: this machine lets planner use {n} CPU core{'s' * (n > 1)}; "
                         f"give at most {n} {what}")


__all__ = ["check_per_core", "cores"]
