"""Bounds on a whole configuration from totals alone, before any partition: whether it can fit
at all, and a step time no partition of it beats (what orders and prunes the configurations)."""

from __future__ import annotations

import numpy as np

from planner.cost import CostTable, DataParallel
from planner.evaluate import Config, RankDevice
from planner.formats import Cluster
from planner.schedules import SCHEDULES


def may_fit(table: CostTable, ranks: list[RankDevice], cfg: Config) -> bool:
    """A necessary condition: some rank holds at least 1/pp of the weights, gradients and
    optimizer state (of its tensor-parallel shard, less what ZeRO shards over dp), and some rank
    holds the largest layer's."""
    per_byte = DataParallel(cfg.dp, cfg.zero).state_factor(cfg.training, table.profile.dtype)
    cap = max(r.capacity_bytes for r in ranks)
    return table.PARAMS[-1] * per_byte / cfg.pp <= cap and float(table.params.max()) * per_byte <= cap


def quick_bound(table: CostTable, ranks: list[RankDevice], cluster: Cluster, cfg: Config) -> float:
    """A step time no partition of cfg beats, from totals alone: all work spread evenly
    over the ranks; for one-stage-per-rank schedules with whole backwards, also the least
    max_s(prefix_s + m * work_s) over any split, W / (1 - (1 - 1/m)^pp) (stages equalised)."""
    t = table
    vmax = max(r.speed for r in ranks)
    work = float(t.F[-1] + t.BMIN[-1]) / vmax
    if cfg.schedule.startswith("pipedream"):
        return cfg.m * work / cfg.pp
    # the stage holding the heaviest layer runs it m times
    heaviest = float((t.fwd + np.minimum(t.bwd, t.bwd_input + t.bwd_weight)).max()) / vmax
    # one micro-batch crosses every layer forward and back (weight gradients may come later)
    chain = float(t.F[-1] + np.minimum(t.bwd, t.bwd_input).sum()) / vmax
    bound = max(cfg.m * work / cfg.pp, chain, cfg.m * heaviest, busiest_rank(t, ranks, cluster, cfg))
    if cfg.v == 1 and not SCHEDULES[cfg.schedule].split_backward:
        bound = max(bound, work / (1 - (1 - 1 / cfg.m) ** cfg.pp))
    return float(bound)


def busiest_rank(t: CostTable, ranks: list[RankDevice], cluster: Cluster, cfg: Config) -> float:
    """Every rank computes, then all-reduces its gradients and steps its optimizer after its
    last backward (the simulator's step rule), so the step is at least the average over ranks
    of compute + per-action overheads + all-reduce + optimizer. Summed over ranks, the
    all-reduce covers every distinct parameter at least once."""
    vmax = max(r.speed for r in ranks)
    unique = t.PARAMS[-1] - t.tied_dedup(0, t.n)
    dps = [r.data_parallel(cluster, cfg.zero) for r in ranks]
    coeffs = [dp.step_coeffs() for dp in dps]
    per_byte, fixed = min(a for a, _ in coeffs), min(c for _, c in coeffs)
    allreduce = per_byte * unique + fixed if unique > 0 else 0.0
    # ZeRO 2 and 3: every micro-batch's reduce-scatter (and gathers) of the weights, latency aside
    allreduce += cfg.m * min(dp.per_microbatch_per_byte() for dp in dps) * unique
    optimizer = t.optimizer_per_byte * unique * dps[0].optimizer_share() / vmax
    overheads = 2 * cfg.m * cfg.v * min(r.overhead_s for r in ranks)  # an F and a backward each
    return float((cfg.m * (t.F[-1] + t.BMIN[-1]) / vmax + allreduce + optimizer) / cfg.pp + overheads)
