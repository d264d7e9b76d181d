"""The exact inner partitioner: a dynamic program over contiguous cuts, then branch and bound
with the simulator.

1. The DP finds the partition whose largest per-stage lower bound ``g_s`` (``bounds.py``) is
   smallest, every stage fitting its rank's memory: ``best[s][j] = min_i max(best[s-1][i],
   g_s(i, j))`` over the layers' topological order, vectorised over segments.
2. That partition is simulated. No partition can beat the DP's value, so when the simulation
   meets it the partition is optimal. Otherwise every partition whose bound is below the best
   simulated time is enumerated (depth first, cheapest stages first, pruned by what the rest of
   the layers can still achieve) and simulated; the best one wins. An exhausted budget is
   reported as a gap, never hidden.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from planner.cost import Segment
from planner.solve.bounds import FULL, StageBounds, StageCostFn

EPS = 1e-12
Evaluator = Callable[[list[Segment]], tuple[float, bool, object]]


@dataclass
class InnerResult:
    lower_bound_s: float  # no partition of this configuration beats it
    segments: list[Segment] | None  # best found, None if nothing fits
    step_time_s: float  # simulated, inf if nothing fits
    proven: bool
    evaluations: int = 0
    payload: object = field(default=None, repr=False)  # the Evaluation of the best partition

    def __post_init__(self) -> None:  # plain Python numbers, whatever numpy handed over
        self.lower_bound_s = float(self.lower_bound_s)
        self.step_time_s = float(self.step_time_s)
        self.proven = bool(self.proven)


def _segments(stages: list[tuple[int, int, int]]) -> list[Segment]:
    return [Segment(i, j, "full" if c == FULL else "none") for i, j, c in stages]


def lb_partition(b: StageBounds, ub: float = np.inf, fixed: list[int] | None = None,
                 cost: StageCostFn | None = None) -> tuple[float, list[tuple[int, int, int]] | None]:
    """Minimise the largest stage cost (by default the bound ``g_s``; ``cost(s, i, j) -> (value,
    choice)`` for another one, e.g. memory). ``fixed`` pins the stage starts."""
    if cost is None:
        def cost(s: int, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return b.eval(s, i, j, ub)
    n, S = b.n, b.S
    if fixed is not None:
        starts = list(fixed) + [n]
        worst, stages = 0.0, []
        for s in range(S):
            g, c = cost(s, np.array([starts[s]]), np.array([starts[s + 1]]))
            if not np.isfinite(g[0]):
                return np.inf, None
            worst = max(worst, float(g[0]))
            stages.append((starts[s], starts[s + 1], int(c[0])))
        return worst, stages
    if S > n:
        return np.inf, None
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    args: list[np.ndarray] = []
    choices: list[np.ndarray] = []
    cols = np.arange(n + 1)
    for s in range(S):
        i, j = _segments_of(b, s, best < ub, ub)
        longest = int((j - i).max()) if len(i) else 1
        # band[d - 1, j]: the best max(bound so far, this stage) ending at j with length d
        band = np.full((longest, n + 1), np.inf)
        picks = np.full((longest, n + 1), -1, dtype=np.int8)
        if len(i):
            g, c = cost(s, i, j)
            band[j - i - 1, j] = np.maximum(best[i], g)
            picks[j - i - 1, j] = c
        d = band.argmin(axis=0)
        best = band[d, cols]
        args.append(cols - d - 1)
        choices.append(picks[d, cols])
    if not np.isfinite(best[n]):
        return np.inf, None
    stages, stop = [], n
    for s in reversed(range(S)):
        start = int(args[s][stop])
        stages.append((start, stop, int(choices[s][stop])))
        stop = start
    return float(best[n]), stages[::-1]


def _segments_of(b: StageBounds, s: int, start_ok: np.ndarray, ub: float) -> tuple[np.ndarray, np.ndarray]:
    """Every (start, end) stage s may take: it starts where the earlier stages can end
    (``start_ok``), leaves a layer for each later stage, and its own work stays below ``ub``."""
    n, S = b.n, b.S
    starts = np.flatnonzero(start_ok[: n - (S - 1 - s)])
    starts = starts[starts >= s]
    if not len(starts):
        return starts, starts
    hi_j = n - (S - 1 - s)
    longest = _longest(b, s, min(ub, b.stage_work_cap))
    d = np.arange(1, longest + 1)
    i = np.repeat(starts, len(d))
    j = i + np.tile(d, len(starts))
    keep = j <= hi_j
    return i[keep], j[keep]


def _longest(b: StageBounds, s: int, ub: float) -> int:
    """The longest segment whose work alone can stay below ``ub`` (all of them if ub is inf)."""
    n = b.n
    if not np.isfinite(ub):
        return n
    # on stage s's rank: compute at its speed, tensor-parallel collectives at the link's
    fb = b.t.prefix_at("F", b.speed[s]) + b.t.prefix_at("BMIN", b.speed[s])
    lo, hi = 1, n
    while lo < hi:  # the lightest window of length d gets heavier as d grows
        mid = (lo + hi + 1) // 2
        work = (fb[mid:] - fb[:-mid]) * b.m
        if work.min() <= ub:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _reachable(b: StageBounds, tau: float) -> list[np.ndarray]:
    """reach[s][i]: layers [i, n) split into stages s..S-1, each bound below tau and fitting."""
    n, S = b.n, b.S
    reach = [np.zeros(n + 1, dtype=bool) for _ in range(S + 1)]
    reach[S][n] = True
    for s in reversed(range(S)):
        i, j = _segments_of(b, s, np.ones(n + 1, dtype=bool), tau)
        ok = reach[s + 1][j]
        i, j = i[ok], j[ok]
        if len(i):
            g, _ = b.eval(s, i, j)
            reach[s][i[g < tau]] = True
    return reach


def first_solution(b: StageBounds, evaluate: Evaluator, *, ub: float = np.inf,
                   fixed: list[int] | None = None, floor: float = 0.0,
                   warm: Sequence[list[int] | None] | None = None, relaxed: bool = True) -> InnerResult:
    """The DP's partition, simulated; proven optimal when the simulation meets the bound.
    ``floor``: another valid lower bound on the step time, kept if higher. ``warm``: stage
    starts of partitions to try as well (today's splits): the result is never worse than any of
    them that fits. ``relaxed``: ``b``'s bounds are a relaxation (share 1), so where no
    partition's bound is below a finite ``ub`` nothing is simulated and the result has no
    partition; otherwise (no ub yet, or a restriction) today's splits are simulated first and the
    best of them narrows the DP."""
    prune = relaxed and np.isfinite(ub)
    if prune:
        lb, stages = lb_partition(b, ub, fixed)
        if stages is None:
            return InnerResult(max(ub, floor), None, np.inf, proven=True)
    incumbent, count = _today(b, evaluate, warm if fixed is None else None)
    if not prune:
        lb, stages = lb_partition(b, min(ub, incumbent[0]), fixed)
    if stages is None:  # nothing below ub or today's splits under these bounds
        best = min(ub, incumbent[0])
        lb = max(best, floor) if np.isfinite(best) else lb
        return InnerResult(lb, incumbent[1], incumbent[0], proven=True, evaluations=count, payload=incumbent[2])
    lb = max(lb, floor)
    if not meets(incumbent[0], lb):  # the DP's partition may still beat today's splits
        step, fits, payload = evaluate(_segments(stages))
        count += 1
        if fits and step < incumbent[0]:
            incumbent = (step, _segments(stages), payload)
    return InnerResult(lb, incumbent[1], incumbent[0], proven=fixed is not None or meets(incumbent[0], lb),
                       evaluations=count, payload=incumbent[2])


def meets(step: float, bound: float) -> bool:
    """A simulated step time at its lower bound (to rounding): proven optimal."""
    return step <= bound * (1 + 1e-9) + EPS


def _today(b: StageBounds, evaluate: Evaluator,
           warm: Sequence[list[int] | None] | None) -> tuple[tuple[float, list[Segment] | None, object], int]:
    """The fastest of the given stage starts that fits, simulated, as (step, segments, payload)
    ((inf, None, None) if none), and the simulations run."""
    incumbent: tuple[float, list[Segment] | None, object] = (np.inf, None, None)
    count = 0
    for starts in warm or []:
        if starts is None or len(starts) != b.S:
            continue
        _, found = lb_partition(b, fixed=starts)
        if found is not None:
            step, fits, payload = evaluate(_segments(found))
            count += 1
            if fits and step < incumbent[0]:
                incumbent = (step, _segments(found), payload)
    return incumbent, count


class _RankRoom:
    """With several stages per rank: the work assigned to each rank so far and the head and tail
    of its first stage, to prune partitions whose ranks cannot all finish below tau."""

    def __init__(self, b: StageBounds) -> None:
        self.b = b
        pp, place = b.schedule.pp, b.schedule.stage_rank
        self.first_stage = {r: min(b.schedule.stages_of(r)) for r in range(pp)}
        self.rank_speed = {r: b.speed[self.first_stage[r]] for r in range(pp)}
        self.later_ranks = [sorted(set(place[s + 1:])) for s in range(b.S)]
        self.busy = [0.0] * pp  # seconds of work assigned to each rank so far
        self.edge = [0.0] * pp  # head + tail of each rank's first stage
        # the compute of the layers from each position on, at speed 1: a rank of speed v runs
        # it in 1/v of that or more (its tensor-parallel collectives, not sped up, only add)
        self.compute = b.t.F + b.t.BMIN - 2 * b.t.TPC

    def assign(self, s: int, i: int, j: int, c: int) -> float:
        """Give stage s layers [i, j) with choice c; the seconds of work added to its rank."""
        r = self.b.schedule.stage_rank[s]
        added = float(self.b.work(s, i, j, c))
        if s == self.first_stage[r]:
            self.edge[r] = float(self.b.head(s, i) + self.b.tail(s, i))
        self.busy[r] += added
        return added

    def unassign(self, s: int, added: float) -> None:
        r = self.b.schedule.stage_rank[s]
        self.busy[r] -= added
        if s == self.first_stage[r]:
            self.edge[r] = 0.0

    def prunes(self, s: int, j: int, tau: float) -> bool:
        """A rank's assigned work alone already reaches tau, or the layers left do not fit in
        what the ranks still to come can absorb below tau."""
        b, r = self.b, self.b.schedule.stage_rank[s]
        if self.edge[r] + self.busy[r] >= tau:
            return True
        left = (self.compute[-1] - self.compute[j]) * b.m
        room = sum((tau - self.edge[q] - self.busy[q]) * self.rank_speed[q] for q in self.later_ranks[s])
        return bool(left > room * (1 + 1e-9))


class _BranchAndBound:
    """Depth-first search over stage ends, cheapest bound first, from the best partition found
    so far; ``tau`` (the time to beat) falls as better partitions are simulated."""

    def __init__(self, b: StageBounds, evaluate: Evaluator, found: InnerResult, tau: float, *,
                 budget: int, nodes: int, deadline: float | None) -> None:
        self.b, self.evaluate = b, evaluate
        self.budget, self.nodes, self.deadline = budget, nodes, deadline
        self.tau = tau
        self.best_step = found.step_time_s
        self.best: tuple[list[Segment] | None, object] = (found.segments, found.payload)
        self.count, self.visited = found.evaluations, 0
        self.proven = True
        self.path: list[tuple[int, int, int]] = []
        self.reach = _reachable(b, tau)
        self.room = _RankRoom(b) if b.S > b.schedule.pp else None
        self.cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def options(self, s: int, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stage s's possible ends from layer i (the rest still splittable below tau), with
        their bounds and choices, by bound."""
        key = (s, i)
        if key not in self.cache:
            b = self.b
            j = np.arange(i + 1, b.n - (b.S - 1 - s) + 1)
            j = j[self.reach[s + 1][j]]
            g, c = b.eval(s, np.full(len(j), i), j)
            order = np.argsort(g, kind="stable")
            self.cache[key] = (j[order], g[order], c[order])
        return self.cache[key]

    def _exhausted(self) -> bool:
        return (self.visited > self.nodes or self.count >= self.budget
                or (self.deadline is not None and time.perf_counter() > self.deadline))

    def _simulate_path(self) -> None:
        segs = _segments(self.path)
        step, fits, payload = self.evaluate(segs)
        self.count += 1
        if fits and step < self.best_step:
            self.best_step, self.best = step, (segs, payload)
            self.tau = min(self.tau, self.best_step)

    def dfs(self, s: int, i: int) -> None:
        if not self.proven:
            return
        self.visited += 1
        if self._exhausted():
            self.proven = False
            return
        if s == self.b.S:
            self._simulate_path()
            return
        js, gs, cs = self.options(s, i)
        for jk, gk, ck in zip(js.tolist(), gs.tolist(), cs.tolist(), strict=True):
            if gk >= self.tau * (1 - 1e-12) or not self.proven:
                break
            self._branch(s, i, jk, ck)

    def _branch(self, s: int, i: int, j: int, c: int) -> None:
        """Stage s takes layers [i, j) with choice c, unless its rank's room prunes it."""
        added = self.room.assign(s, i, j, c) if self.room is not None else 0.0
        pruned = self.room is not None and s < self.b.S - 1 and self.room.prunes(s, j, self.tau)
        if not pruned:
            self.path.append((i, j, c))
            self.dfs(s + 1, j)
            self.path.pop()
        if self.room is not None:
            self.room.unassign(s, added)


def refine(b: StageBounds, evaluate: Evaluator, found: InnerResult, *, ub: float = np.inf,
           budget: int = 400, nodes: int = 20000, deadline: float | None = None) -> InnerResult:
    """Branch and bound over every partition whose bound is below the best simulated time (or
    ``ub``), cheapest stages first. Stops, unproven, after ``budget`` simulations, ``nodes``
    search nodes or at ``deadline``."""
    if found.proven:
        return found
    tau = min(found.step_time_s, ub)
    if not np.isfinite(tau):
        tau = np.inf
    search = _BranchAndBound(b, evaluate, found, tau, budget=budget, nodes=nodes, deadline=deadline)
    search.dfs(0, 0)
    segments, payload = search.best
    lb = found.lower_bound_s
    if search.proven and segments is not None:
        lb = max(lb, min(search.best_step, ub))  # nothing below the best (or ub) remains
    return InnerResult(lb, segments, search.best_step, proven=search.proven, evaluations=search.count,
                       payload=payload)


def solve_inner(b: StageBounds, evaluate: Evaluator, *, ub: float = np.inf,
                fixed: list[int] | None = None, budget: int = 400, nodes: int = 20000,
                deadline: float | None = None) -> InnerResult:
    """Best partition by simulated step time: the DP's, then branch and bound if needed.
    ``evaluate(segments) -> (step, fits, payload)``. ``ub``: a step time achieved elsewhere;
    partitions whose bound reaches it are not considered."""
    found = first_solution(b, evaluate, ub=ub, fixed=fixed)
    if found.segments is None and not np.isfinite(found.lower_bound_s):
        return found
    return refine(b, evaluate, found, ub=ub, budget=budget, nodes=nodes, deadline=deadline)
