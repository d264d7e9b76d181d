"""Where the configurations' first answers are computed: forked worker processes, which share
the search's cost tables by inheriting them, or this process alone."""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from planner.evaluate import Config
from planner.host import cores
from planner.signals import signals_as_errors
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


@contextmanager
def executor(search: Search, workers: int) -> Iterator[Inline | ProcessPoolExecutor]:
    """Forked worker processes, which share this search's tables, or this process alone. However
    the search ends (an error, Ctrl-C, SIGTERM, SIGHUP), no worker is left running: idle ones
    would otherwise wait on their queue for ever."""
    _ACTIVE[:] = [search]
    if workers <= 1:
        yield Inline()
        return
    with signals_as_errors():
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_worker_signals)
        try:
            yield pool
            pool.shutdown(wait=True)
        except BaseException:
            _stop(pool)
            raise


def _worker_signals() -> None:
    """In a worker: Ctrl-C reaches the whole process group, and the search stops the workers
    itself; SIGTERM ends a worker at once (the handler forked from the search would only fail the
    task and keep the worker alive)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)
    try:  # Linux: killed with the search, even by SIGKILL (PR_SET_PDEATHSIG = 1, linux/prctl.h)
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):  # another system: the handlers above still cover the rest
        pass


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel what is queued and kill the workers (a task under way may take seconds to finish)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # CPython's, since 3.2
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        p.kill()
    for p in processes:
        p.join(timeout=5)


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


