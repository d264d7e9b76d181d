"""``--objective time`` in two phases. First every configuration that could enter the top K gets
the DP's partition and one simulation (in worker processes when the search is large), best
first by its quick bound, stopping where the bound cannot beat the best so far. Then branch and
bound where a configuration's bound says it could still do better, most promising first."""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from planner.errors import PlannerError
from planner.evaluate import Config
from planner.solve.exact import InnerResult, refine
from planner.solve.pool import executor, first_task, jobs
from planner.solve.result import Candidate

if TYPE_CHECKING:
    from planner.solve.search import Search

LARGE_ACTIONS = 50_000  # scheduled actions from which a configuration waits for the others of its kind


@dataclass
class Progress:
    """What the two phases found and left open."""

    results: dict[Config, Candidate] = field(default_factory=dict)
    open_: list[tuple[Config, InnerResult]] = field(default_factory=list)  # solved but not yet proven
    unresolved: list[float] = field(default_factory=list)  # throughput bounds of those left undecided
    undecided: list[Config] = field(default_factory=list)  # left undecided by the bounds, not by time
    too_big: list[Config] = field(default_factory=list)
    solved: int = 0
    started: int = 0  # configurations taken up in phase 1 (solved, or too large to simulate)
    late: bool = False  # the time limit cut the search short

    def kth(self) -> float:
        """The throughput to beat: the best so far. (The top-K table lists the best
        configurations evaluated, not a proven top K.)"""
        return max((c.throughput for c in self.results.values()), default=0.0)


def first_answers(search: Search, ranked: list[Config], upper: dict[Config, float], deadline: float) -> Progress:
    """Phase 1: the DP's partition, simulated, for every configuration whose bound ``upper``
    (throughput, ``ranked`` by it) can still beat the best so far. Configurations with one stage
    per rank go first: their bounds are tight, so the best of them is a time to beat that the
    looser bounds of several stages per rank (the fluid program's) can then be held against,
    before their costlier partitioning runs; zb-auto's order for the best of them first, where it
    is asked for (``Search.seed_auto``). Within each, schedules of over ``LARGE_ACTIONS``
    actions come last: the costliest to simulate, they then meet a better time to beat, which
    their DP's bound alone often rules out."""
    found = Progress()
    workers = jobs(search, ranked)
    with executor(search, workers) as pool:
        for several in (False, True):
            if several:
                search.seed_auto(found.results, deadline)
            for large in (False, True):
                todo = [c for c in ranked
                        if (c.n_stages > c.pp) == several and (search.actions(c) > LARGE_ACTIONS) == large]
                _walk(search, pool, todo, found, upper, deadline, workers, len(ranked))
    return found


def _walk(search: Search, pool: Any, todo: list[Config], found: Progress, upper: dict[Config, float],
          deadline: float, workers: int, total: int) -> None:
    """First answers for ``todo`` (sorted by ``upper``), as many running at once as there are
    workers once a first result sets the throughput to beat."""
    running: dict[Future[Any], Config] = {}
    while todo or running:
        _submit(search, pool, todo, running, found, upper, deadline, workers if found.results else 1, total)
        if not running:
            break
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in done:
            _collect(running.pop(future), future, found)


def _submit(search: Search, pool: Any, todo: list[Config], running: dict[Future[Any], Config], found: Progress,
            upper: dict[Config, float], deadline: float, limit: int, total: int) -> None:
    """Hand the next configurations to the pool, up to ``limit`` running; ``todo`` is emptied
    where nothing later can enter the top K, or where time is up."""
    while todo and len(running) < limit:
        cfg = todo[0]
        kth = found.kth()
        if upper[cfg] <= kth:
            todo.clear()  # sorted by this bound: nothing later can enter the top K
            return
        if time.perf_counter() > deadline:
            found.unresolved += [upper[c] for c in todo]
            found.late = True
            todo.clear()
            return
        todo.pop(0)
        found.started += 1
        if search.progress:
            search.progress(cfg.describe(), found.started - 1, total)
        if search.too_big(cfg):
            found.too_big.append(cfg)
            continue
        running[pool.submit(first_task, cfg, kth)] = cfg


def _collect(cfg: Config, future: Future[Any], found: Progress) -> None:
    try:
        inner = future.result()
    except BrokenProcessPool:
        raise PlannerError("a search worker process died (out of memory?); run with --jobs 1") from None
    found.solved += 1
    if inner.segments is not None:
        found.results[cfg] = Candidate(cfg, inner)
    if not inner.proven:
        found.open_.append((cfg, inner))


def branch_and_bound(search: Search, found: Progress, deadline: float) -> None:
    """Phase 2: branch and bound on the configurations left open whose bound can still beat the
    best so far. Bounds are tight for one stage per rank and loose for several, so those get a
    smaller search each."""
    found.open_.sort(key=lambda item: item[1].step_time_s / item[0].global_batch)
    for cfg, inner in found.open_:
        kth = found.kth()
        bound = cfg.global_batch / max(inner.lower_bound_s, 1e-30)
        if bound <= kth:
            continue
        if time.perf_counter() > deadline:
            found.unresolved.append(bound)
            found.late = True
            continue
        if search.large_multi(cfg):
            # Several stages per rank on a large instance: the DP's per-stage bounds are too
            # loose for branch and bound, so the ILP's rank-level bound decides, where the
            # program is small enough; otherwise the configuration stays open.
            done = search.by_ilp(cfg, inner, kth, deadline)
        else:
            done = refine(search.bounds(cfg), search.evaluator(cfg), inner, ub=search.step_ub(cfg, kth),
                          budget=search.budget(cfg), deadline=deadline)
        if done.segments is not None:
            found.results[cfg] = Candidate(cfg, done)
        if not done.proven:
            found.unresolved.append(cfg.global_batch / max(done.lower_bound_s, 1e-30))
            found.late = found.late or time.perf_counter() > deadline
            found.undecided.append(cfg)
