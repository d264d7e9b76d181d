"""Bounds on a whole configuration from totals alone, before any partition: whether it can fit
at all, and a step time no partition of it beats (what orders and prunes the configurations).

The totals depend on the micro-batch size, tp, pp, dp and ZeRO stage only, not on the schedule
or micro-batch count, so ``Totals`` is computed once for all the configurations sharing them
(a search prices thousands of configurations; this is where most of the pricing time went)."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Totals:
    """What the quick bound reads of one (micro-batch size, tp, pp, dp, ZeRO stage)."""

    work_s: float  # forward and cheapest backward of every layer on the fastest rank
    vmax: float  # the fastest rank's speed
    heaviest_s: float  # the heaviest layer's forward and backward on the fastest rank
    chain_s: float  # every layer's forward and input gradient, on the fastest rank
    allreduce_s: float  # every distinct parameter's collective after the last backward, once
    per_microbatch: float  # seconds per parameter byte of ZeRO 2 and 3's per-micro-batch collectives
    unique_bytes: float  # distinct parameter bytes (tied weights once)
    optimizer_s: float  # the optimizer step over every distinct parameter, on the fastest rank
    overhead_s: float  # the least per-action overhead of any rank


def totals(t: CostTable, ranks: list[RankDevice], cluster: Cluster, zero: int) -> Totals:
    vmax = max(r.speed for r in ranks)
    # compute at the fastest rank's speed, the tensor-parallel collectives inside at the link's
    # (CostTable.times): per layer, one in the forward and one in either backward
    comm = t.tp_comm
    unique = t.PARAMS[-1] - t.tied_dedup(0, t.n)
    dps = [r.data_parallel(cluster, zero) for r in ranks]
    coeffs = [dp.step_coeffs() for dp in dps]
    per_byte, fixed = min(a for a, _ in coeffs), min(c for _, c in coeffs)
    return Totals(
        work_s=float(t.prefix_at("F", vmax)[-1] + t.prefix_at("BMIN", vmax)[-1]), vmax=vmax,
        heaviest_s=float(((t.fwd + np.minimum(t.bwd, t.bwd_input + t.bwd_weight) - 2 * comm) / vmax + 2 * comm).max()),
        chain_s=float(((t.fwd + np.minimum(t.bwd, t.bwd_input) - 2 * comm) / vmax + 2 * comm).sum()),
        allreduce_s=per_byte * unique + fixed if unique > 0 else 0.0,
        per_microbatch=min(dp.per_microbatch_per_byte() for dp in dps), unique_bytes=unique,
        optimizer_s=t.optimizer_per_byte * unique * dps[0].optimizer_share() / vmax,
        overhead_s=min(r.overhead_s for r in ranks))


def quick_bound(tot: Totals, cfg: Config) -> float:
    """A step time no partition of cfg beats, from totals alone: all work spread evenly
    over the ranks; for one-stage-per-rank schedules with whole backwards, also the least
    max_s(prefix_s + m * work_s) over any split, W / (1 - (1 - 1/m)^pp) (stages equalised)."""
    work = tot.work_s
    if cfg.schedule.startswith("pipedream"):
        return cfg.m * work / cfg.pp
    # the stage holding the heaviest layer runs it m times; one micro-batch crosses every layer
    # forward and back (weight gradients may come later)
    bound = max(cfg.m * work / cfg.pp, tot.chain_s, cfg.m * tot.heaviest_s, busiest_rank(tot, cfg))
    if cfg.v == 1 and not SCHEDULES[cfg.schedule].split_backward:
        bound = max(bound, work / (1 - (1 - 1 / cfg.m) ** cfg.pp))
    return float(bound)


def busiest_rank(tot: Totals, cfg: Config) -> float:
    """Every rank computes, then all-reduces its gradients and steps its optimizer after its
    last backward (the simulator's step rule), so the step is at least the average over ranks
    of compute + per-action overheads + all-reduce + optimizer. Summed over ranks, the
    all-reduce covers every distinct parameter at least once."""
    # ZeRO 2 and 3: every micro-batch's reduce-scatter (and gathers) of the weights, latency aside
    allreduce = tot.allreduce_s + cfg.m * tot.per_microbatch * tot.unique_bytes
    overheads = 2 * cfg.m * cfg.v * tot.overhead_s  # an F and a backward each
    return float((cfg.m * tot.work_s + allreduce + tot.optimizer_s) / cfg.pp + overheads)
