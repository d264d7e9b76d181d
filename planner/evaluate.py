"""Price one configuration: a partition of the layers under a schedule on a cluster.

Pipeline rank r with data-parallel replica d and tensor-parallel shard k runs on cluster device
``(r * dp + d) * tp + k``: a replica's tp devices sit next to each other (inside a node, where the
tensor-parallel all-reduces go), then the replicas of a stage, so gradient all-reduce stays inside
a node where it can and the pipeline's smaller point-to-point transfers cross nodes (Megatron-LM's
rank order: tensor, then data, then pipeline parallel; Narayanan et al., 2021, section 3.3).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from planner.cost import CostTable, DataParallel, Segment, ring_allreduce_coeffs, ring_allreduce_time
from planner.errors import InputError
from planner.formats import Cluster, Link, StageCost, Training
from planner.schedules import Schedule, build, weight_versions
from planner.simulate import CutLink, SimResult, peak_memory, simulate, step_time


@dataclass(frozen=True)
class Config:
    pp: int
    dp: int
    mbs: int
    m: int
    schedule: str
    v: int = 1
    training: Training = Training()
    order: tuple[str, ...] | None = None  # zb-auto: its per-rank actions (schedules.from_order)
    tp: int = 1  # tensor-parallel degree: devices per replica of a stage
    zero: int = 0  # ZeRO stage over dp (0: replicated; 1, 2, 3: optimizer state, gradients, weights sharded)
    sp: bool = False  # sequence parallelism (tp > 1)

    @property
    def n_stages(self) -> int:
        return self.pp * self.v

    @property
    def global_batch(self) -> int:
        return self.mbs * self.m * self.dp

    @property
    def devices(self) -> int:
        return self.pp * self.dp * self.tp

    def describe(self) -> str:
        v = f" v={self.v}" if self.v > 1 else ""
        tp = f" tp={self.tp}" + (" sp" if self.sp else "") if self.tp > 1 else ""
        zero = f" zero={self.zero}" if self.zero else ""
        return f"pp={self.pp} dp={self.dp}{tp}{zero} mbs={self.mbs} m={self.m} {self.schedule}{v}"


@dataclass(frozen=True)
class RankDevice:
    devices: list[int]  # per replica, the first of its tp devices
    capacity_bytes: int  # usable memory: the smallest device's, less the reserve
    speed: float  # the slowest device's
    overhead_s: float = 0.0  # the engine's bookkeeping per action there

    def allreduce_coeffs(self, cluster: Cluster) -> tuple[float, float]:
        """Its gradients' ring all-reduce over the replicas (each tensor-parallel shard with its
        counterparts): (seconds per byte, fixed seconds)."""
        return ring_allreduce_coeffs(len(self.devices), cluster.link(self.devices[0], self.devices[-1]))

    def data_parallel(self, cluster: Cluster, zero: int = 0) -> DataParallel:
        return DataParallel(len(self.devices), zero, *self.allreduce_coeffs(cluster))


def rank_devices(cluster: Cluster, pp: int, dp: int, tp: int = 1) -> list[RankDevice]:
    devs = cluster.devices
    if pp * dp * tp > len(devs):
        raise InputError(f"pp {pp} x dp {dp}" + (f" x tp {tp}" if tp > 1 else "")
                         + f" = {pp * dp * tp} devices, the cluster has {len(devs)}")
    out = []
    for r in range(pp):
        ids = [(r * dp + d) * tp for d in range(dp)]
        every = [i + k for i in ids for k in range(tp)]
        out.append(RankDevice(ids, cluster.usable_bytes(every),
                              min(devs[i].speed for i in every), max(devs[i].action_overhead_s for i in every)))
    return out


def tp_link(cluster: Cluster, tp: int, n_devices: int) -> Link:
    """The link a tensor-parallel group of the first ``n_devices`` devices all-reduces over: the
    node's, unless some group of tp consecutive devices crosses nodes."""
    if tp <= 1 or all(cluster.node(g) == cluster.node(g + tp - 1) for g in range(0, n_devices, tp)):
        return cluster.intra_node
    return cluster.inter_node or cluster.intra_node


@dataclass(frozen=True)
class Evaluation:
    config: Config
    segments: list[Segment]
    costs: list[StageCost]
    cuts: list[CutLink]
    step_time_s: float
    peak_memory_bytes: list[int]  # per rank
    ranks: list[RankDevice]
    sim: SimResult | None = None  # the whole timeline, when asked for

    @property
    def schedule(self) -> Schedule:
        """The configuration's action lists (built once per configuration and cached)."""
        c = self.config
        return build(c.schedule, c.pp, c.m, c.v, c.order)

    @property
    def fits(self) -> bool:
        return all(p <= r.capacity_bytes for p, r in zip(self.peak_memory_bytes, self.ranks, strict=True))

    @property
    def overflow(self) -> list[tuple[int, int]]:
        """(rank, bytes over capacity) for every rank that does not fit."""
        return [(r, p - d.capacity_bytes) for r, (p, d) in
                enumerate(zip(self.peak_memory_bytes, self.ranks, strict=True)) if p > d.capacity_bytes]

    def detailed(self, timeline: bool = True) -> Evaluation:
        """The same evaluation with its simulation (and its timeline, unless told not to)."""
        sim = self.simulation(timeline)
        return self if sim is self.sim else replace(self, sim=sim)

    def simulation(self, timeline: bool = True) -> SimResult:
        """The whole simulation: the one attached, when it has what is asked, else run now."""
        if self.sim is not None and (self.sim.events or not timeline):
            return self.sim
        return simulate(self.schedule, self.costs, self.cuts, timeline=timeline)

    @property
    def throughput(self) -> float:
        return self.config.global_batch / self.step_time_s if self.step_time_s > 0 else 0.0


def cut_link(cluster: Cluster, src: int, dst: int, nbytes: float, same_rank: bool) -> CutLink:
    """The transfer between consecutive stages: free on one rank, else bytes / bandwidth
    + latency on the link between their devices."""
    if same_rank:
        return CutLink()
    link = cluster.link(src, dst)
    return CutLink(busy_s=nbytes / link.bandwidth_bytes_per_s, latency_s=link.latency_s, cpu_s=link.cpu_s)


def evaluate(table: CostTable, cluster: Cluster, config: Config, segments: list[Segment], *,
             detail: bool = True, ranks: list[RankDevice] | None = None) -> Evaluation:
    """Cost, simulate and check memory of one partition under one configuration. Without
    ``detail`` only the step time and peak memory are computed (what the solver ranks by).
    ``ranks``: ``rank_devices(cluster, config.pp, config.dp, config.tp)``, when the caller has it;
    ``table`` is at the configuration's tp."""
    if len(segments) != config.n_stages:
        raise InputError(f"{len(segments)} stages given, the configuration needs {config.n_stages}")
    schedule = build(config.schedule, config.pp, config.m, config.v, config.order)
    ranks = ranks or rank_devices(cluster, config.pp, config.dp, config.tp)
    if table.tp != config.tp:
        raise InputError(f"the cost table is at tp {table.tp}, the configuration at tp {config.tp}")
    place = schedule.stage_rank
    bounds = [s.start for s in segments]
    tied_extra = [0.0] * len(segments)
    for stages, nbytes in table.tied_split(bounds):
        # each copy of a tied weight is summed with the others after backward (Megatron-LM's
        # embedding group): a ring over the stages' ranks
        a, b = ranks[place[stages[0]]].devices[0], ranks[place[stages[-1]]].devices[0]
        t = ring_allreduce_time(nbytes, len(stages), cluster.link(a, b))
        for s in stages:
            tied_extra[s] += t
    costs = []
    for s, seg in enumerate(segments):
        rank = ranks[place[s]]
        cost = table.stage_cost(
            seg, config.m, config.training, speed=rank.speed,
            allreduce_s=tied_extra[s], data_parallel=rank.data_parallel(cluster, config.zero),
            weight_versions=weight_versions(config.schedule, config.pp, place[s]),
            split_backward=schedule.split_backward)
        costs.append(cost.model_copy(update={"overhead_s": rank.overhead_s}) if rank.overhead_s else cost)
    cuts = [cut_link(cluster, ranks[place[s]].devices[0], ranks[place[s + 1]].devices[0],
                     table.cut[segments[s].stop], same_rank=place[s] == place[s + 1])
            for s in range(len(segments) - 1)]
    if detail:
        sim = simulate(schedule, costs, cuts)
        return Evaluation(config, segments, costs, cuts, sim.step_time_s,
                          sim.peak_memory_bytes, ranks, sim)
    return Evaluation(config, segments, costs, cuts, step_time(schedule, costs, cuts),
                      peak_memory(schedule, costs), ranks)


def segments_from_bounds(bounds: list[int], n_layers: int, recompute: str = "none") -> list[Segment]:
    """Stage segments from their start positions (bounds[0] == 0)."""
    ends = list(bounds[1:]) + [n_layers]
    return [Segment(a, b, recompute) for a, b in zip(bounds, ends, strict=True)]  # type: ignore[arg-type]
