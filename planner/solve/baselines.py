"""The partitions users get from today's tools, priced under the same model as planner's.

* equal: Megatron-LM's default and DeepSpeed's ``uniform``: the repeated blocks split evenly,
  layers before the first block on the first stage and after the last block on the last.
* params: DeepSpeed's ``parameters`` method: contiguous stages balancing parameter counts.
* torchgpipe: ``balance_by_time``, which hands the measured layer times to
  ``blockpartition.solve``, the block-partition heuristic of Bárány and Grinberg ("Block
  partitions of sequences", arXiv:1308.2452): times scaled to [0, 1], an equal-count start, one
  layer at a time moved towards the lightest stage until the heaviest is within 1 of it. Not a
  min-max split: on costs that are mostly equal it keeps the equal split.

* Megatron-LM's usual configuration for the cluster, beside them: tensor parallelism over each
  node's devices, the pipeline over the nodes, equal layers, 1F1B (Narayanan et al., 2021,
  section 3.3: tensor parallelism within a node, pipeline parallelism across).

``min_max`` (the contiguous split with the lightest heaviest stage) is what DeepSpeed's
``parameters`` method computes on parameter counts; the search also uses it on layer times as
a first partition to beat. ``price`` runs each split as planner would (recomputing only where
needed) for the chosen configuration, as a ``Baseline``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from planner.cost import Segment, block_range
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
    out = []
    for label, starts in today(search, cfg):
        if starts is None:
            out.append(Baseline(label, None, None))
            continue
        out.append(Baseline(label, starts, _priced(search, cfg, starts)))
    usual = megatron_usual(search, cfg)
    if usual is not None:
        label, other = usual
        starts = equal_blocks([layer.name for layer in search.profile.layers], other.n_stages)
        if starts is not None:
            out.append(Baseline(label, starts, _priced(search, other, starts)))
    return out


def _priced(search: Search, cfg: Config, starts: Partition) -> Evaluation:
    """A split evaluated as planner would run it: recomputing only where needed."""
    t, b = search.table_for(cfg), search.bounds(cfg)
    cost = least_memory_cost(b) if search.settings.objective == "memory" else None
    _, stages = lb_partition(b, fixed=starts, cost=cost)
    if stages is None:
        segs = segments_from_bounds(starts, t.n)
    else:
        segs = [Segment(a, z, "full" if c == 1 else "none") for a, z, c in stages]
    return evaluate(t, search.cluster, cfg, segs, detail=False, ranks=search.ranks_for(cfg))


def megatron_usual(search: Search, cfg: Config) -> tuple[str, Config] | None:
    """Megatron-LM's usual choice for the cluster at cfg's micro-batch size and global batch:
    tp = the devices per node, pp = the nodes, dp = 1 (ZeRO none), 1F1B; None where it does not
    apply (more nodes than layers, a batch that does not split, a single-device node)."""
    cluster = search.cluster
    tp = math.gcd(*(len(node.devices) for node in cluster.nodes))
    pp = len(cluster.nodes)
    m, rem = divmod(cfg.global_batch, cfg.mbs)
    if rem or pp > len(search.profile.layers) or m < pp:
        return None
    usual = Config(pp=pp, dp=1, mbs=cfg.mbs, m=m, schedule="1f1b" if m > 1 else "naive",
                   training=cfg.training, tp=tp, sp=search.settings.sequence_parallel and tp > 1)
    if usual == cfg:
        return None
    return f"Megatron-LM's usual: tp {tp} x pp {pp}, equal layers", usual


def equal_blocks(names: Sequence[str], stages: int) -> Partition | None:
    """Repeated blocks evenly over the stages (earlier stages take the remainder)."""
    n = len(names)
    blocks = block_range(names)
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

    def block(k: int) -> float:
        return sum(x[(ends[k - 1] if k else 0): ends[k]])

    # each block's scaled weight; a move changes only the two blocks it is between, so only
    # those are summed again (with the same slices, so the sums are the ones a full pass gives)
    sums = [block(k) for k in range(stages)]
    order = range(stages)
    for _ in range(4 * n * n * stages + 16):  # the paper bounds the moves; this only guards
        heaviest_size, heaviest = max(zip(sums, order, strict=True))
        while True:
            lightest_size, lightest = min(zip(sums, order, strict=True))
            if heaviest_size <= lightest_size + 1:
                starts = [0, *ends[:-1]]
                return starts if all(b > a for a, b in zip(starts, ends, strict=True)) else None
            if heaviest < lightest:  # its left neighbour gives its last layer
                giver = lightest - 1
                ends[giver] -= 1
            else:  # its right neighbour gives its first layer
                giver = lightest + 1
                ends[lightest] += 1
            sums[giver], sums[lightest] = block(giver), block(lightest)
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
