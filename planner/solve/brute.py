"""Every partition, simulated: the reference the exact solver is tested against."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import combinations, product

import numpy as np

from planner.cost import CostTable, Segment
from planner.evaluate import Config, Evaluation
from planner.evaluate import evaluate as evaluate_plan
from planner.formats import Cluster
from planner.solve.bounds import FULL, StageBounds
from planner.solve.exact import Evaluator


def all_partitions(n: int, stages: int) -> Iterator[list[int]]:
    """Stage start positions of every split of n layers into ``stages`` non-empty runs."""
    for cuts in combinations(range(1, n), stages - 1):
        yield [0, *cuts]


def every_plan(table: CostTable, cluster: Cluster, config: Config) -> Iterator[Evaluation]:
    """The evaluation of every partition with every per-stage recomputation choice (none or full)."""
    for starts in all_partitions(table.n, config.n_stages):
        ends = starts[1:] + [table.n]
        for choice in product(("none", "full"), repeat=config.n_stages):
            segments = [Segment(i, j, c) for i, j, c in zip(starts, ends, choice, strict=True)]  # type: ignore[arg-type]
            yield evaluate_plan(table, cluster, config, segments, detail=False)


def brute_force(b: StageBounds, evaluate: Evaluator) -> tuple[float, list[Segment] | None]:
    """The fastest fitting partition, each stage without recomputation if it fits, else with
    full recomputation (the per-stage choice the DP makes)."""
    best, best_seg = np.inf, None
    for starts in all_partitions(b.n, b.S):
        ends = starts[1:] + [b.n]
        segs = []
        for s, (i, j) in enumerate(zip(starts, ends, strict=True)):
            g, c = b.eval(s, np.array([i]), np.array([j]))
            choice = int(c[0]) if np.isfinite(g[0]) else 0
            segs.append(Segment(i, j, "full" if choice == FULL else "none"))
        step, fits, _ = evaluate(segs)
        if fits and step < best:
            best, best_seg = step, segs
    return best, best_seg
