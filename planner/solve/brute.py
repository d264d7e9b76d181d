"""Every partition, simulated: the reference the exact solver is tested against."""

from __future__ import annotations

from itertools import combinations

import numpy as np

from planner.cost import Segment
from planner.solve.bounds import FULL, StageBounds
from planner.solve.exact import Evaluator


def all_partitions(n: int, stages: int):
    """Stage start positions of every split of n layers into ``stages`` non-empty runs."""
    for cuts in combinations(range(1, n), stages - 1):
        yield [0, *cuts]


def brute_force(b: StageBounds, evaluate: Evaluator) -> tuple[float, list[Segment] | None]:
    """The fastest fitting partition, each stage without recomputation if it fits, else with
    full recomputation (the per-stage choice the DP makes)."""
    best, best_seg = np.inf, None
    for starts in all_partitions(b.n, b.S):
        ends = starts[1:] + [b.n]
        segs = []
        for s, (i, j) in enumerate(zip(starts, ends)):
            g, c = b.eval(s, np.array([i]), np.array([j]))
            choice = int(c[0]) if np.isfinite(g[0]) else 0
            segs.append(Segment(i, j, "full" if choice == FULL else "none"))
        step, fits, _ = evaluate(segs)
        if fits and step < best:
            best, best_seg = step, segs
    return best, best_seg
