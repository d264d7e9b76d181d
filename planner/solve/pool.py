"""Where the configurations' first answers are computed: forked worker processes, which share
the search's cost tables by inheriting them, or this process alone."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

from planner.evaluate import Config
from planner.solve.exact import InnerResult

if TYPE_CHECKING:
    from planner.solve.search import Search

PARALLEL_ACTIONS = 2_000_000  # scheduled actions over all configurations from which workers pay off

_ACTIVE: list[Search] = []  # the search being run: forked workers find it here


def first_task(cfg: Config, kth: float) -> InnerResult:
    """A worker's job: one configuration's first answer, from the search it was forked with."""
    return _ACTIVE[-1].first(cfg, kth)


def jobs(search: Search, configs: list[Config]) -> int:
    """Worker processes: --jobs, else one per core for a large search, else none."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    if search.settings.jobs:
        return search.settings.jobs
    return cores() if sum(search.actions(c) for c in configs) >= PARALLEL_ACTIONS else 1


def executor(search: Search, workers: int) -> Inline | ProcessPoolExecutor:
    """Forked worker processes, which share this search's tables, or this process alone."""
    _ACTIVE[:] = [search]
    if workers <= 1:
        return Inline()
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"))


class Inline:
    """The executor interface, running each task at once in this process."""

    def __enter__(self) -> Inline:  # noqa: PYI034 (final in use)
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, fn: Any, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 (re-raised by result(), as a pool would)
            future.set_exception(e)
        return future


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
