"""The outer search: every configuration (pp, dp, micro-batch size and count, schedule, virtual
stages), best first by an upper bound on its throughput, each solved exactly by the inner
partitioner, stopping when no remaining configuration can enter the top K."""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from math import comb
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

import numpy as np

from planner.cost import CostTable, Segment, bytes_per_param
from planner.errors import InfeasibleError, InputError, PlannerError, ScheduleError
from planner.evaluate import Config, Evaluation, RankDevice, evaluate, rank_devices, segments_from_bounds
from planner.formats import DTYPE_BYTES, Cluster, Profile, Training
from planner.graph import LayerGraph
from planner.schedules import SCHEDULES, build, canonical, check_combination
from planner.solve import baselines as bl
from planner.solve.bounds import Policy, StageBounds
from planner.solve.exact import InnerResult, first_solution, lb_partition, refine
from planner.solve.fluid import fluid_bound

VIRTUAL = (2, 4)  # chunks per rank tried for interleaved schedules
MAX_ACTIONS = 400_000  # configurations whose schedule is larger are not simulated (noted)
SIMULATED_ACTIONS = 5_000_000  # per configuration in branch and bound: the budget shrinks beyond it
PARALLEL_ACTIONS = 2_000_000  # scheduled actions over all configurations from which workers pay off
SMALL_CLUSTER = 64  # up to this many devices every pp is tried, above it the divisors
ILP_VARIABLES = 2000  # with --ilp: layers x stages up to which multi-chunk configurations get it
ILP_SECONDS = 5.0  # per configuration
ENUMERABLE = 100_000  # partitions: above this, multi-chunk configurations are not branched on


Recompute = Literal["none", "full", "auto", "selective"]
Objective = Literal["time", "memory"]
RECOMPUTE: tuple[Recompute, ...] = get_args(Recompute)
OBJECTIVES: tuple[Objective, ...] = get_args(Objective)


@dataclass(frozen=True)
class Settings:
    """What the search reads, and what a plan's provenance stores: checked when made, so a typo
    fails here and not as a silently different search."""

    global_batch: int | None = None
    pp: int | None = None
    dp: int | None = None
    mbs: int | None = None
    microbatches: int | None = None
    schedules: tuple[str, ...] | None = None  # None: every schedule the engine runs
    virtual_stages: int | None = None
    recompute: Recompute = "auto"  # none | full | auto (per stage) | selective (per layer, ILP)
    training: Training = Training()
    fix_cuts: tuple[int, ...] | None = None  # stage start positions after the first
    top: int = 5
    include_model_only: bool = False
    budget: int = 400  # simulations per configuration in branch and bound
    ilp: bool = False  # bound interleaved / V configurations with the ILP (slower, tighter)
    time_limit_s: float = 10.0
    jobs: int | None = None  # worker processes; None: one per core for large searches
    objective: Objective = "time"  # time: the fastest plan; memory: the least peak memory per device

    def __post_init__(self) -> None:
        if self.recompute not in RECOMPUTE:
            raise InputError(f"--recompute {self.recompute!r}: choose {', '.join(RECOMPUTE)}")
        if self.objective not in OBJECTIVES:
            raise InputError(f"--objective {self.objective!r}: choose {' or '.join(OBJECTIVES)}")
        if self.schedules is not None and not self.schedules:
            raise InputError("--schedule names no schedule: give one or more, comma separated (gpipe,1f1b,...)")
        for name in self.schedules or ():
            if SCHEDULES[canonical(name)].placement == "v" and self.virtual_stages not in (None, 2):
                raise InputError(f"--schedule {name} runs exactly 2 stages per device (V placement): "
                                 f"--virtual-stages {self.virtual_stages} does not apply (drop it, or give 2)")


@dataclass
class Candidate:
    config: Config
    inner: InnerResult

    @property
    def evaluation(self) -> Evaluation:
        return self.inner.payload  # type: ignore[return-value]

    @property
    def throughput(self) -> float:
        return self.config.global_batch / self.inner.step_time_s if self.inner.segments else 0.0


@dataclass
class SolveResult:
    best: Candidate
    ranked: list[Candidate]
    baselines: list[tuple[str, list[int] | None, Evaluation | None]]
    proven: bool
    configs_total: int
    configs_solved: int
    elapsed_s: float
    notes: list[str] = field(default_factory=list)
    # with --fix-cuts: whether the micro-batching, schedule and recomputation are proven best for
    # the user's split (``proven`` is then False: the split itself was not searched); else None
    proven_for_fixed_cuts: bool | None = None


# -------------------------------------------------------------------------- configurations


def _schedules(settings: Settings) -> list[str]:
    if settings.schedules:
        return [canonical(s) for s in settings.schedules]
    return [name for name, info in SCHEDULES.items() if info.executable or settings.include_model_only]


def _virtuals(name: str, pp: int, n_layers: int, settings: Settings) -> list[int]:
    info = SCHEDULES[name]
    if info.placement == "v":  # two stages per rank, or none where another count is pinned
        return [2] if settings.virtual_stages in (None, 2) else []
    if settings.virtual_stages is not None:
        return [settings.virtual_stages]
    if name == "interleaved-1f1b":
        return [v for v in VIRTUAL if pp * v <= n_layers]
    if name == "zb-h1":
        return [1] + [v for v in VIRTUAL if pp * v <= n_layers]
    return [1]


def configurations(profile: Profile, cluster: Cluster, settings: Settings) -> Iterator[Config]:
    n_dev = len(cluster.devices)
    n_layers = len(profile.layers)
    sizes = [settings.mbs] if settings.mbs else profile.mbs_sizes
    if settings.mbs and settings.mbs not in profile.mbs_sizes:
        raise InputError(f"--mbs {settings.mbs} was not profiled (profiled: "
                         f"{', '.join(map(str, profile.mbs_sizes))}); profile it with --mbs")
    if settings.pp and settings.pp * (settings.dp or 1) > n_dev:
        raise InputError(f"--pp {settings.pp}" + (f" x --dp {settings.dp}" if settings.dp else "")
                         + f" needs {settings.pp * (settings.dp or 1)} devices; the cluster has {n_dev}")
    if settings.pp:
        pps = [settings.pp]
    elif n_dev <= SMALL_CLUSTER:
        pps = list(range(1, min(n_layers, n_dev) + 1))
    else:  # large clusters: pipeline degrees that use every device
        pps = [p for p in range(1, min(n_layers, n_dev) + 1) if n_dev % p == 0]
    names = _schedules(settings)
    for pp in pps:
        if pp * (settings.virtual_stages or 1) > n_layers:
            continue
        if settings.dp:
            dps = [settings.dp]
        elif n_dev <= SMALL_CLUSTER:  # using fewer devices can pay off when all-reduce is costly
            dps = sorted({n_dev // pp, max(n_dev // pp // 2, 1)}, reverse=True)
        else:
            dps = [n_dev // pp]
        for dp in dps:
            if dp < 1 or pp * dp > n_dev:
                continue
            for mbs in sizes:
                if settings.global_batch:
                    per_replica, rem = divmod(settings.global_batch, dp)
                    if rem or per_replica % mbs:
                        continue
                    m = per_replica // mbs
                    if settings.microbatches and settings.microbatches != m:
                        continue
                else:
                    m = settings.microbatches or 4 * pp
                for name in names:
                    if (m == 1) != (name == "naive") and not settings.schedules:
                        continue  # with one micro-batch every schedule is the naive one
                    if pp == 1 and name != "1f1b" and m > 1 and not settings.schedules:
                        continue  # one rank runs every schedule alike: keep one
                    for v in _virtuals(name, pp, n_layers, settings):
                        try:
                            check_combination(name, pp, m, v)
                        except ScheduleError:
                            continue
                        yield Config(pp=pp, dp=dp, mbs=mbs, m=m, schedule=name, v=v,
                                     training=settings.training)


# ----------------------------------------------------------------------------------- search


class Search:
    def __init__(self, profile: Profile, cluster: Cluster, settings: Settings,
                 progress: Callable[[str, int, int], None] | None = None):
        self.profile = profile
        self.cluster = cluster
        self.settings = settings
        self.progress = progress
        self.graph = LayerGraph(profile)
        self.tables: dict[int, CostTable] = {}
        self._ranks: dict[tuple[int, int], list[RankDevice]] = {}
        self.policy = Policy("auto" if settings.recompute in ("auto", "selective") else settings.recompute)

    def table(self, mbs: int) -> CostTable:
        if mbs not in self.tables:
            self.tables[mbs] = CostTable(self.profile, mbs, self.graph)
        return self.tables[mbs]

    def bounds(self, cfg: Config, share: float = 1.0) -> StageBounds:
        schedule = build(cfg.schedule, cfg.pp, cfg.m, cfg.v)
        return StageBounds(self.table(cfg.mbs), self.cluster, cfg, schedule,
                           self.ranks(cfg.pp, cfg.dp), self.policy, share)

    def _evaluator(self, cfg: Config):
        table = self.table(cfg.mbs)
        ranks = self.ranks(cfg.pp, cfg.dp)

        def run(segments: list[Segment]):
            ev = evaluate(table, self.cluster, cfg, segments, detail=False, ranks=ranks)
            return ev.step_time_s, ev.fits, ev
        return run

    def ranks(self, pp: int, dp: int) -> list[RankDevice]:
        key = (pp, dp)
        if key not in self._ranks:
            self._ranks[key] = rank_devices(self.cluster, pp, dp)
        return self._ranks[key]

    def may_fit(self, cfg: Config) -> bool:
        """A necessary condition: some rank holds at least 1/pp of the weights, gradients and
        optimizer state, and some rank holds the largest layer's."""
        t = self.table(cfg.mbs)
        per_byte = bytes_per_param(cfg.training, self.profile.dtype) / DTYPE_BYTES[self.profile.dtype]
        cap = max(r.capacity_bytes for r in self.ranks(cfg.pp, cfg.dp))
        return t.PARAMS[-1] * per_byte / cfg.pp <= cap and float(t.params.max()) * per_byte <= cap

    def quick_bound(self, cfg: Config) -> float:
        """A step time no partition of cfg beats, from totals alone: all work spread evenly
        over the ranks; for one-stage-per-rank schedules with whole backwards, also the least
        max_s(prefix_s + m * work_s) over any split, W / (1 - (1 - 1/m)^pp) (stages equalised)."""
        t = self.table(cfg.mbs)
        vmax = max(r.speed for r in self.ranks(cfg.pp, cfg.dp))
        work = (t.F[-1] + t.BMIN[-1]) / vmax
        if cfg.schedule.startswith("pipedream"):
            return cfg.m * work / cfg.pp
        # the stage holding the heaviest layer runs it m times
        heaviest = float((t.fwd + np.minimum(t.bwd, t.bwd_input + t.bwd_weight)).max()) / vmax
        # one micro-batch crosses every layer forward and back (weight gradients may come later)
        chain = float(t.F[-1] + np.minimum(t.bwd, t.bwd_input).sum()) / vmax
        bound = max(cfg.m * work / cfg.pp, chain, cfg.m * heaviest, self._busiest_rank(cfg))
        if cfg.v == 1 and not SCHEDULES[cfg.schedule].split_backward:
            bound = max(bound, work / (1 - (1 - 1 / cfg.m) ** cfg.pp))
        return bound

    def _busiest_rank(self, cfg: Config) -> float:
        """Every rank computes, then all-reduces its gradients and steps its optimizer after its
        last backward (the simulator's step rule), so the step is at least the average over ranks
        of compute + per-action overheads + all-reduce + optimizer. Summed over ranks, the
        all-reduce covers every distinct parameter at least once."""
        t = self.table(cfg.mbs)
        ranks = self.ranks(cfg.pp, cfg.dp)
        vmax = max(r.speed for r in ranks)
        unique = t.PARAMS[-1] - t.tied_dedup(0, t.n)
        coeffs = [r.allreduce_coeffs(self.cluster) for r in ranks]
        per_byte, fixed = min(a for a, _ in coeffs), min(c for _, c in coeffs)
        allreduce = per_byte * unique + fixed if unique > 0 else 0.0
        optimizer = t.optimizer_s * unique / (t.PARAMS[-1] or 1.0) / vmax
        overheads = 2 * cfg.m * cfg.v * min(r.overhead_s for r in ranks)  # an F and a backward each
        return (cfg.m * (t.F[-1] + t.BMIN[-1]) / vmax + allreduce + optimizer) / cfg.pp + overheads

    def _fixed(self, cfg: Config) -> list[int] | None:
        cuts = self.settings.fix_cuts
        if cuts is None or len(cuts) != cfg.n_stages - 1:
            return None
        return [0, *cuts]

    def run(self) -> SolveResult:
        start = time.perf_counter()
        s = self.settings
        configs = list(configurations(self.profile, self.cluster, s))
        if s.fix_cuts is not None:
            configs = [c for c in configs if c.n_stages == len(s.fix_cuts) + 1]
            if not configs:
                raise InputError(f"--fix-cuts gives {len(s.fix_cuts) + 1} stages; no configuration "
                                 "matches (pin --pp and --virtual-stages to agree)")
        if not configs:
            raise InputError("no configuration to search: check --pp, --dp, --mbs, --microbatches, "
                             "--global-batch and --schedule against the profile and cluster")
        fitting = [c for c in configs if self.may_fit(c)]
        if not fitting:
            raise InfeasibleError(self.explain_infeasible(configs))
        if s.objective == "memory":
            return self._least_memory(configs, fitting, start)
        upper = {c: c.global_batch / max(self.quick_bound(c), 1e-30) for c in fitting}
        ranked = sorted(fitting, key=lambda c: -upper[c])
        deadline = start + s.time_limit_s
        results: dict[Config, Candidate] = {}
        open_: list[tuple[Config, InnerResult]] = []  # solved but not yet proven
        unresolved: list[float] = []  # throughput upper bounds of configurations left undecided
        undecided: list[Config] = []  # left undecided by the bounds, not by time
        late = False  # the time limit cut the search short
        too_big: list[Config] = []
        solved = 0
        # Phase 1: every configuration that could enter the top K gets the DP and one simulation,
        # in worker processes when the search is large.
        todo = list(ranked)
        workers = self._jobs(fitting)
        with self._executor(workers) as pool:
            running: dict[Future, Config] = {}
            while todo or running:
                # one at a time until a first result sets the throughput to beat
                while todo and len(running) < (workers if results else 1):
                    cfg = todo[0]
                    kth = self._kth_throughput(results.values())
                    if upper[cfg] <= kth:
                        todo = []  # sorted by this bound: nothing later can enter the top K
                        break
                    if time.perf_counter() > deadline:
                        unresolved += [upper[c] for c in todo]
                        late = True
                        todo = []
                        break
                    todo.pop(0)
                    if self.progress:
                        self.progress(cfg.describe(), len(ranked) - len(todo) - 1, len(ranked))
                    if self._too_big(cfg):
                        too_big.append(cfg)
                        continue
                    running[pool.submit(_first_task, cfg, kth)] = cfg
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    cfg = running.pop(future)
                    try:
                        inner = future.result()
                    except BrokenProcessPool:
                        raise PlannerError("a search worker process died (out of memory?); "
                                           "run with --jobs 1") from None
                    solved += 1
                    if inner.segments is not None:
                        results[cfg] = Candidate(cfg, inner)
                    if not inner.proven:
                        open_.append((cfg, inner))
        # Phase 2: branch and bound where a configuration's bound says it could still do better,
        # most promising first. Bounds are tight for one stage per rank and loose for several, so
        # those get a smaller search each.
        open_.sort(key=lambda item: item[1].step_time_s / item[0].global_batch)
        for cfg, inner in open_:
            kth = self._kth_throughput(results.values())
            if cfg.global_batch / max(inner.lower_bound_s, 1e-30) <= kth:
                continue
            if time.perf_counter() > deadline:
                unresolved.append(cfg.global_batch / max(inner.lower_bound_s, 1e-30))
                late = True
                continue
            if self._large_multi(cfg):
                # Several stages per rank on a large instance: the DP's per-stage bounds are too
                # loose for branch and bound, so the ILP's rank-level bound decides, where the
                # program is small enough; otherwise the configuration stays open.
                done = self._by_ilp(cfg, inner, kth, deadline)
            else:
                done = refine(self.bounds(cfg), self._evaluator(cfg), inner, ub=self._step_ub(cfg, kth),
                              budget=self._budget(cfg), deadline=deadline)
            if done.segments is not None:
                results[cfg] = Candidate(cfg, done)
            if not done.proven:
                unresolved.append(cfg.global_batch / max(done.lower_bound_s, 1e-30))
                late = late or time.perf_counter() > deadline
                undecided.append(cfg)
        if s.recompute == "selective":
            self._selective(results, deadline)
        if self.progress:
            self.progress("done", len(ranked), len(ranked))
        if not results:
            small = [c for c in configs if not self._too_big(c)]
            if not small:
                raise InputError(_too_many_actions(too_big[0]))
            if late:
                raise InfeasibleError(f"no plan found within the time limit ({len(unresolved)} configuration(s) "
                                      "left undecided); raise --time-limit")
            if unresolved:
                from planner.solve.infeasible import explain_undecided

                raise InfeasibleError(explain_undecided(self, small, undecided,
                                                        deadline=time.perf_counter() + s.time_limit_s))
            raise InfeasibleError(self.explain_infeasible(small, deadline=time.perf_counter() + s.time_limit_s))
        ordered = sorted(results.values(), key=self._rank_key)
        best = ordered[0]
        base = self.baselines(best.config)
        for _, _, ev in base if s.fix_cuts is None else ():  # never report worse than today's splits
            if ev is not None and ev.fits and ev.step_time_s < best.inner.step_time_s * (1 - 1e-12):
                best = Candidate(best.config, InnerResult(best.inner.lower_bound_s, ev.segments, ev.step_time_s,
                                                          best.inner.proven, best.inner.evaluations, ev))
                ordered[0] = best
        notes = []
        big = max((upper[c] for c in too_big), default=0.0)
        if too_big:
            notes.append(f"{len(too_big)} configuration(s) with over {MAX_ACTIONS:,} scheduled actions were not "
                         f"simulated (e.g. {too_big[0].describe()})" + (
                             f"; their bounds allow up to {big / best.throughput - 1:.1%} more throughput"
                             if big > best.throughput else ""))
        open_bounds = [u for u in unresolved if u > best.throughput]
        if open_bounds:
            notes.append(f"not proven optimal: the bounds of {len(open_bounds)} configuration(s) still allow "
                         f"up to {max(open_bounds) / best.throughput - 1:.1%} more throughput (raise "
                         "--time-limit, or add --ilp for tighter bounds on interleaved and V schedules)")
        return SolveResult(best=best, ranked=ordered[: s.top], baselines=base,
                           proven=not open_bounds and big <= best.throughput, configs_total=len(configs),
                           configs_solved=solved, elapsed_s=time.perf_counter() - start, notes=notes)

    def first(self, cfg: Config, kth: float) -> InnerResult:
        """One configuration's first answer: the DP's partition, simulated (proven optimal when
        the simulation meets the bound), never worse than the time-balanced split."""
        t = self.table(cfg.mbs)
        warm = [bl.min_max(t.fwd + t.bwd, cfg.n_stages)]
        floor = self.quick_bound(cfg)
        b = self.bounds(cfg)
        if cfg.n_stages > cfg.pp:  # several stages per rank: the rank's memory, as a program
            floor = max(floor, fluid_bound(b))
            if floor >= self._step_ub(cfg, kth):
                return InnerResult(floor, None, np.inf, proven=True)  # cannot beat the best so far
        if self._large_multi(cfg):
            # Several stages per rank on a large instance: the per-stage bound is weaker than
            # the floor, so the DP only looks for a good partition, each stage within its
            # share of the rank's memory, over stages no heavier than twice an even share.
            finder = self.bounds(cfg, share=1 / cfg.v)
            inner = first_solution(finder, self._evaluator(cfg), ub=min(self._step_ub(cfg, kth), 2 * floor),
                                   fixed=self._fixed(cfg), floor=floor, warm=warm)
            inner.lower_bound_s = floor if inner.segments is not None or self._step_ub(cfg, kth) > 2 * floor \
                else inner.lower_bound_s
            inner.proven = inner.proven and inner.step_time_s <= floor * (1 + 1e-9)
            return inner
        return first_solution(b, self._evaluator(cfg), ub=self._step_ub(cfg, kth),
                              fixed=self._fixed(cfg), floor=floor, warm=warm)

    # ------------------------------------------------------------------ --objective memory

    def _least_memory(self, configs: list[Config], fitting: list[Config], start: float) -> SolveResult:
        """The plan needing the least memory on its fullest device, the fastest among those: per
        configuration, the DP finds the least largest stage memory (each stage within its own
        device), then the fastest partition whose stages all stay within it (branch and bound as
        for time); configurations are compared by their simulated peak. Exact for one stage per
        rank, where a stage's memory is its device's; with several stages per rank the stages are
        balanced, not the ranks, and where that split does not fit the fastest plan stands in."""
        s = self.settings
        deadline = start + s.time_limit_s
        results: dict[Config, Candidate] = {}
        solved, late, big, loose = 0, 0, 0, 0  # loose: least memory found but not proven least
        for k, cfg in enumerate(fitting):
            if self.progress:
                self.progress(cfg.describe(), k, len(fitting))
            if self._too_big(cfg):
                big += 1
                continue
            if time.perf_counter() > deadline:
                late += 1
                continue
            inner = self._least_memory_of(cfg, deadline)
            solved += 1
            loose += cfg.n_stages > cfg.pp or (inner is not None and not inner.proven)
            if inner is not None:
                results[cfg] = Candidate(cfg, inner)
        if self.progress:
            self.progress("done", len(fitting), len(fitting))
        if not results:
            if late:
                raise InfeasibleError(f"no plan found within the time limit ({late} configuration(s) not "
                                      "tried); raise --time-limit")
            small = [c for c in configs if not self._too_big(c)]
            if not small:
                raise InputError(_too_many_actions(configs[0]))
            raise InfeasibleError(self.explain_infeasible(small, deadline=time.perf_counter() + s.time_limit_s))
        ordered = sorted(results.values(), key=self._rank_key)
        notes = []
        if loose:
            notes.append(f"not proven least: {loose} configuration(s), most with several stages per rank "
                         "(interleaved, V), have a least memory found but not proven (pin --schedule and "
                         "--virtual-stages 1 for a proven answer among one-stage-per-rank plans)")
        if late:
            notes.append(f"{late} configuration(s) not tried (time limit)")
        if big:
            notes.append(f"{big} configuration(s) with over {MAX_ACTIONS:,} scheduled actions were not simulated")
        return SolveResult(best=ordered[0], ranked=ordered[: s.top], baselines=self.baselines(ordered[0].config),
                           proven=not (loose or late or big), configs_total=len(configs), configs_solved=solved,
                           elapsed_s=time.perf_counter() - start, notes=notes)

    def _least_memory_of(self, cfg: Config, deadline: float) -> InnerResult | None:
        b = self.bounds(cfg)
        fits_own = _least_memory_cost(b, within_capacity=True)
        least, stages = lb_partition(b, cost=fits_own, fixed=self._fixed(cfg))
        if stages is None:
            return None if b.one_chunk else self._fastest(cfg, deadline)
        # now the fastest partition with every stage within that memory (and its own device)
        b.cap = [min(least * (1 + 1e-6), cap) for cap in b.cap]
        table, ranks = self.table(cfg.mbs), self.ranks(cfg.pp, cfg.dp)

        def run(segments: list[Segment]):
            ev = evaluate(table, self.cluster, cfg, segments, detail=False, ranks=ranks)
            within = not b.one_chunk or max(ev.peak_memory_bytes) <= least * (1 + 1e-6)
            return ev.step_time_s, ev.fits and within, ev
        inner = first_solution(b, run, fixed=self._fixed(cfg), floor=self.quick_bound(cfg))
        if inner.segments is None:
            # several stages per rank: balanced stages need not fit their ranks together
            return None if b.one_chunk else self._fastest(cfg, deadline)
        return refine(b, run, inner, budget=self._budget(cfg), deadline=deadline)

    def _fastest(self, cfg: Config, deadline: float) -> InnerResult | None:
        """The time objective's search for one configuration (its best plan, or None)."""
        inner = self.first(cfg, 0.0)
        if not inner.proven:
            inner = refine(self.bounds(cfg), self._evaluator(cfg), inner, budget=self._budget(cfg),
                           deadline=deadline)
        return inner if inner.segments is not None else None

    def _jobs(self, configs: list[Config]) -> int:
        """Worker processes: --jobs, else one per core for a large search, else none."""
        if "fork" not in multiprocessing.get_all_start_methods():
            return 1
        if self.settings.jobs:
            return self.settings.jobs
        return _cores() if sum(self._actions(c) for c in configs) >= PARALLEL_ACTIONS else 1

    def _executor(self, jobs: int):
        """Forked worker processes, which share this search's tables, or this process alone."""
        _ACTIVE[:] = [self]
        if jobs <= 1:
            return _Inline()
        return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork"))

    def _by_ilp(self, cfg: Config, inner: InnerResult, kth: float, deadline: float) -> InnerResult:
        from planner.solve.ilp import solve_ilp

        left = deadline - time.perf_counter()
        if not self.settings.ilp or len(self.profile.layers) * cfg.n_stages > ILP_VARIABLES or left < 1:
            return inner
        b = self.bounds(cfg)
        mode = "auto" if self.policy.name == "auto" else self.policy.name
        found, first = solve_ilp(b, self._evaluator(cfg), mode, time_limit=min(ILP_SECONDS, left), rounds=20,
                                 stop_at=self._step_ub(cfg, kth))
        lower = max(inner.lower_bound_s, first.bound, found.lower_bound_s)
        if found.segments is not None and found.step_time_s < inner.step_time_s:
            return InnerResult(lower, found.segments, found.step_time_s, found.proven, found.evaluations, found.payload)
        return InnerResult(lower, inner.segments, inner.step_time_s, found.proven or inner.proven,
                           inner.evaluations + found.evaluations, inner.payload)

    def _selective(self, results: dict[Config, Candidate], deadline: float) -> None:
        """Per-layer recomputation with the cuts, by the ILP, for the best configurations."""
        from planner.solve.ilp import solve_ilp

        best = sorted(results.values(), key=self._rank_key)[: self.settings.top]
        for k, cand in enumerate(best):
            if self.progress:  # an ILP each, seconds apiece
                self.progress(f"selective recompute: {cand.config.describe()}", k, len(best))
            left = deadline - time.perf_counter()
            if left < 1:
                break
            cfg = cand.config
            found, _ = solve_ilp(self.bounds(cfg), self._evaluator(cfg), "selective",
                                 time_limit=min(ILP_SECONDS, left), rounds=10)
            if found.segments is not None and found.step_time_s < cand.inner.step_time_s:
                results[cfg] = Candidate(cfg, found)

    def _rank_key(self, c: Candidate):
        """Fastest first; among equals the one needing less memory, then the simpler schedule
        (with --objective memory: least memory first, then fastest)."""
        ev = c.evaluation
        speed, memory = -round(c.throughput, 9), max(ev.peak_memory_bytes)
        first = (memory, speed) if self.settings.objective == "memory" else (speed, memory)
        cfg = c.config
        return (*first, list(SCHEDULES).index(cfg.schedule), cfg.v, cfg.pp, -cfg.dp, cfg.mbs, cfg.m)

    def _large_multi(self, cfg: Config) -> bool:
        """Several stages per rank, and too many partitions to branch on."""
        return cfg.n_stages > cfg.pp and comb(len(self.profile.layers) - 1, cfg.n_stages - 1) > ENUMERABLE

    def _budget(self, cfg: Config) -> int:
        """Simulations for one configuration's branch and bound: ``--budget``, fewer for large
        schedules, so that each configuration gets about the same time."""
        return max(20, min(self.settings.budget, SIMULATED_ACTIONS // self._actions(cfg)))

    @staticmethod
    def _actions(cfg: Config) -> int:
        return cfg.pp * cfg.m * cfg.v * 3

    @classmethod
    def _too_big(cls, cfg: Config) -> bool:
        return cls._actions(cfg) > MAX_ACTIONS

    @staticmethod
    def _step_ub(cfg: Config, kth: float) -> float:
        return cfg.global_batch / kth if kth > 0 else np.inf

    def _kth_throughput(self, results) -> float:
        """The throughput to beat: the best so far. (The top-K table lists the best
        configurations evaluated, not a proven top K.)"""
        return max((c.throughput for c in results), default=0.0)

    # ------------------------------------------------------------------------- baselines

    def _today(self, cfg: Config) -> list[tuple[str, list[int] | None]]:
        """Today's splits for cfg's stage count: (label, stage starts)."""
        t = self.table(cfg.mbs)
        names = [layer.name for layer in self.profile.layers]
        S = cfg.n_stages
        return [
            ("equal layers (Megatron-LM, DeepSpeed uniform)", bl.equal_blocks(names, S)),
            ("parameter-balanced (DeepSpeed parameters)", bl.min_max(t.params + 1e-9, S)),
            ("torchgpipe balance_by_time (block partition of layer times)", bl.block_partition(t.fwd + t.bwd, S)),
        ]

    def baselines(self, cfg: Config) -> list[tuple[str, list[int] | None, Evaluation | None]]:
        t = self.table(cfg.mbs)
        b = self.bounds(cfg)
        out = []
        for label, starts in self._today(cfg):
            if starts is None:
                out.append((label, None, None))
                continue
            # as planner would run that split: recomputing only where needed (or, for the memory
            # objective, wherever it saves memory)
            cost = _least_memory_cost(b) if self.settings.objective == "memory" else None
            _, stages = lb_partition(b, fixed=starts, cost=cost)
            if stages is None:  # does not fit: price it without recomputation to show by how much
                segs = segments_from_bounds(starts, t.n)
            else:
                segs = [Segment(a, z, "full" if c == 1 else "none") for a, z, c in stages]
            out.append((label, starts, evaluate(t, self.cluster, cfg, segs, detail=False)))
        return out

    # ------------------------------------------------------------------------ infeasible

    def explain_infeasible(self, configs: list[Config], deadline: float = float("inf")) -> str:
        """The least memory any configuration needs, where it overflows, and the ways out."""
        from planner.solve.infeasible import explain

        return explain(self, configs, deadline)


def _too_many_actions(cfg: Config) -> str:
    return (f"every configuration schedules more than {MAX_ACTIONS:,} actions (e.g. {cfg.describe()}), more "
            "than planner simulates: lower --global-batch or profile larger micro-batches")


def _least_memory_cost(b: StageBounds, within_capacity: bool = False):
    """A stage cost for ``lb_partition``: ``b.least_memory``, inf where it exceeds the stage's
    device with ``within_capacity``."""
    def memory(s: int, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        least, choice = b.least_memory(s, i, j)
        return (np.where(least <= b.cap[s], least, np.inf) if within_capacity else least), choice
    return memory


_ACTIVE: list[Search] = []  # the search being run: forked workers find it here


def _first_task(cfg: Config, kth: float) -> InnerResult:
    return _ACTIVE[-1].first(cfg, kth)


class _Inline:
    """The executor interface, running each task at once in this process."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # re-raised by result(), as a pool would
            future.set_exception(e)
        return future


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def solve(profile: Profile, cluster: Cluster, settings: Settings,
          progress: Callable[[str, int, int], None] | None = None) -> SolveResult:
    result = Search(profile, cluster, settings, progress).run()
    if settings.fix_cuts is not None:
        pinned = ("the partition is yours (--fix-cuts), priced as given, not searched: nothing is claimed "
                  "about other splits (drop --fix-cuts to search them)")
        result = replace(result, proven=False, proven_for_fixed_cuts=result.proven, notes=[pinned, *result.notes])
    name = result.best.config.schedule
    if not SCHEDULES[name].executable:
        result.notes.append(f"{name} is modelled only: PyTorch's pipeline engine cannot run it, so "
                            "planner execute refuses this plan")
    return result
