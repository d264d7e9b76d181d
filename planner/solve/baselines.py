"""The partitions users get from today's tools, priced under the same model as planner's.

* equal: Megatron-LM's default and DeepSpeed's ``uniform``: the repeated blocks split evenly,
  layers before the first block on the first stage and after the last block on the last.
* params: DeepSpeed's ``parameters`` method: contiguous stages balancing parameter counts.
* torchgpipe: ``balance_by_time``, which hands the measured layer times to
  ``blockpartition.solve``, the block-partition heuristic of Bárány and Grinberg ("Block
  partitions of sequences", arXiv:1308.2452): times scaled to [0, 1], an equal-count start, one
  layer at a time moved towards the lightest stage until the heaviest is within 1 of it. Not a
  min-max split: on costs that are mostly equal it keeps the equal split.

``min_max`` (the contiguous split with the lightest heaviest stage) is what DeepSpeed's
``parameters`` method computes on parameter counts; the search also uses it on layer times as
a first partition to beat.
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


def block_partition(weights: Sequence[float], stages: int) -> Partition | None:
    """torchgpipe's ``blockpartition.solve`` (Bárány and Grinberg's algorithm): ``None`` where it
    would leave a stage empty or there are fewer layers than stages.

    With blocks B_k of the scaled weights, M the heaviest block (last one on ties) and m the
    lightest (first one on ties): while M > m + 1, the block next to the lightest on the side of
    the heaviest gives it its nearest layer; M is looked up again only once the heaviest block
    itself has given a layer."""
    n = len(weights)
    if n < stages or stages < 1:
        return None
    w = [float(x) for x in weights]
    low, span = min(w), max(w) - min(w)
    x = [(v - low) / span if span else 0.0 for v in w]
    ends = [(k + 1) * (n // stages) for k in range(stages - 1)] + [n]

    def sizes() -> list[tuple[float, int]]:
        return [(sum(x[(ends[k - 1] if k else 0): ends[k]]), k) for k in range(stages)]

    for _ in range(4 * n * n * stages + 16):  # the paper bounds the moves; this only guards
        heaviest_size, heaviest = max(sizes())
        while True:
            lightest_size, lightest = min(sizes())
            if heaviest_size <= lightest_size + 1:
                starts = [0, *ends[:-1]]
                return starts if all(b > a for a, b in zip(starts, ends)) else None
            if heaviest < lightest:  # its left neighbour gives its last layer
                giver = lightest - 1
                ends[giver] -= 1
            else:  # its right neighbour gives its first layer
                giver = lightest + 1
                ends[lightest] += 1
            if giver == heaviest:
                break
    return None


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
