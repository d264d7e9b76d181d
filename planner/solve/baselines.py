"""The partitions users get from today's tools, priced under the same model as planner's.

* equal: Megatron-LM's default and DeepSpeed's ``uniform``: the repeated blocks split evenly,
  layers before the first block on the first stage and after the last block on the last.
* params: DeepSpeed's ``parameters`` method: contiguous stages balancing parameter counts.
* time: torchgpipe's ``balance_by_time``: contiguous stages balancing measured layer time,
  ignoring memory, transfers and the schedule.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

Partition = list[int]  # stage start positions, first is 0


def equal_blocks(names: Sequence[str], stages: int) -> Partition | None:
    """Repeated blocks evenly over the stages (earlier stages take the remainder)."""
    n = len(names)
    blocks = _repeated_blocks(names)
    if blocks is None:
        lo, hi = 0, n
    else:
        lo, hi = blocks
    count = hi - lo
    if count < stages:
        lo, hi, count = 0, n, n
        if n < stages:
            return None
    per, extra = divmod(count, stages)
    starts, pos = [0], lo
    for s in range(stages - 1):
        pos += per + (1 if s < extra else 0)
        starts.append(pos)
    return starts


def _repeated_blocks(names: Sequence[str]) -> tuple[int, int] | None:
    """The longest run of names that differ only by a trailing index ('h.0', 'h.1', ...)."""
    best, run_start, prev = None, 0, None
    for k, name in enumerate(list(names) + [""]):
        m = re.fullmatch(r"(.*?)(\d+)", name)
        key = m.group(1) if m else None
        if key is None or key != prev:
            if prev is not None and (best is None or k - run_start > best[1] - best[0]):
                best = (run_start, k)
            run_start, prev = k, key
    if best is None or best[1] - best[0] < 2:
        return None
    return best


def min_max(weights: Sequence[float], stages: int) -> Partition | None:
    """Contiguous partition minimising the heaviest stage: bisection on the bottleneck with a
    greedy feasibility test (exact for non-negative weights), then stages split until there are
    ``stages`` of them (splitting never makes a stage heavier)."""
    w = np.asarray(weights, dtype=float)
    n = len(w)
    if n < stages:
        return None

    def greedy(limit: float) -> Partition | None:
        starts, total = [0], 0.0
        for k in range(n):
            if total + w[k] > limit and k > starts[-1]:
                starts.append(k)
                total = 0.0
            total += w[k]
        return starts if len(starts) <= stages and total <= limit else None

    lo, hi = float(w.max()), float(w.sum()) * (1 + 1e-9)
    best = greedy(hi)
    for _ in range(100):
        if hi - lo <= 1e-12 * max(hi, 1e-30):
            break
        mid = (lo + hi) / 2
        got = greedy(mid)
        if got is not None:
            best, hi = got, mid
        else:
            lo = mid
    assert best is not None
    while len(best) < stages:  # split the stage with the most layers
        ends = best[1:] + [n]
        k = max(range(len(best)), key=lambda s: ends[s] - best[s])
        best = sorted(best + [best[k] + (ends[k] - best[k]) // 2])
    return best
