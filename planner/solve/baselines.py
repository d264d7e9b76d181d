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
a first partition to beat. ``price`` runs each split as planner would (recomputing only where
needed) for the chosen configuration, as a ``Baseline``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from planner.cost import Segment
from planner.evaluate import Config, Evaluation, evaluate, segments_from_bounds
from planner.solve.bounds import least_memory_cost
from planner.solve.exact import lb_partition

if TYPE_CHECKING:
    from planner.solve.search import Search

Partition = list[int]  # stage start positions, first is 0


class Baseline(NamedTuple):
    """One of today's splits, priced: None for both where it cannot split that many stages."""

    name: str
    starts: Partition | None
    evaluation: Evaluation | None


def today(search: Search, cfg: Config) -> list[tuple[str, Partition | None]]:
    """Today's splits for cfg's stage count: (label, stage starts)."""
    t = search.table_for(cfg)
    names = [layer.name for layer in search.profile.layers]
    S = cfg.n_stages
    return [
        ("equal layers (Megatron-LM, DeepSpeed uniform)", equal_blocks(names, S)),
        ("parameter-balanced (DeepSpeed parameters)", min_max(t.params + 1e-9, S)),
        ("torchgpipe balance_by_time (block partition of layer times)", block_partition(t.fwd + t.bwd, S)),
    ]


def price(search: Search, cfg: Config) -> list[Baseline]:
    """Today's splits as planner would run them: recomputing only where needed (or, for the
    memory objective, wherever it saves memory); one that does not fit is priced without
    recomputation, to show by how much."""
    t = search.table_for(cfg)
    b = search.bounds(cfg)
    cost = least_memory_cost(b) if search.settings.objective == "memory" else None
    out = []
    for label, starts in today(search, cfg):
        if starts is None:
            out.append(Baseline(label, None, None))
            continue
        _, stages = lb_partition(b, fixed=starts, cost=cost)
        if stages is None:
            segs = segments_from_bounds(starts, t.n)
        else:
            segs = [Segment(a, z, "full" if c == 1 else "none") for a, z, c in stages]
        out.append(Baseline(label, starts, evaluate(t, search.cluster, cfg, segs, detail=False)))
    return out


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


def block_partition(weights: Sequence[float] | np.ndarray, stages: int) -> Partition | None:
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
                return starts if all(b > a for a, b in zip(starts, ends, strict=True)) else None
            if heaviest < lightest:  # its left neighbour gives its last layer
                giver = lightest - 1
                ends[giver] -= 1
            else:  # its right neighbour gives its first layer
                giver = lightest + 1
                ends[lightest] += 1
            if giver == heaviest:
                break
    return None


def min_max(weights: Sequence[float] | np.ndarray, stages: int) -> Partition | None:
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
    starts: Partition = best
    while len(starts) < stages:  # split the stage with the most layers
        ends = [*starts[1:], n]
        k = max(range(len(starts)), key=lambda s: ends[s] - starts[s])
        starts = sorted([*starts, starts[k] + (ends[k] - starts[k]) // 2])
    return starts
