"""The outer search: every configuration (pp, dp, micro-batch size and count, schedule, virtual
stages), best first by an upper bound on its throughput, each solved exactly by the inner
partitioner, stopping when no remaining configuration can enter the top K.

``Search`` holds what one search shares (cost tables, rank devices, the recomputation policy)
and solves one configuration at a time; the walk over configurations is ``time_search`` (or
``least_memory`` for ``--objective memory``), the bounds that order it ``quick``, the worker
processes ``pool``, today's splits ``baselines`` and the failure messages ``infeasible``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from math import comb

import numpy as np

from planner.autosched import NAME as AUTO
from planner.autosched import SEEDS, any_order_bound, build_auto, rows
from planner.cost import CostTable, Segment, tp_costs_note
from planner.errors import InfeasibleError, InputError
from planner.evaluate import Config, Evaluation, RankDevice, evaluate, rank_devices, tp_link
from planner.formats import Cluster, Profile
from planner.graph import LayerGraph
from planner.host import check_per_core
from planner.schedules import SCHEDULES, build
from planner.solve import baselines as bl
from planner.solve import quick
from planner.solve.bounds import Policy, StageBounds
from planner.solve.exact import InnerResult, first_solution, meets
from planner.solve.fluid import Program
from planner.solve.pool import PARALLEL_ACTIONS
from planner.solve.result import Candidate, SolveResult
from planner.solve.settings import (
    SMALL_CLUSTER,
    VIRTUAL,
    Settings,
    configurations,
    requested,
    search_space,
)
from planner.solve.time_search import Progress, branch_and_bound, first_answers

MAX_ACTIONS = 400_000  # configurations whose schedule is larger are not simulated (noted)
SIMULATED_ACTIONS = 5_000_000  # per configuration in branch and bound: the budget shrinks beyond it
ILP_VARIABLES = 2000  # with --ilp: layers x stages up to which multi-chunk configurations get it
ILP_SECONDS = 5.0  # per configuration
ENUMERABLE = 100_000  # partitions: above this, multi-chunk configurations are not branched on
AUTO_NOTE = ("zb-auto's order is built on the partitions found for zb-h1, zb-h2 and 1f1b, not searched "
             "with the cuts: not proven optimal")
AUTO_POLICIES = 48  # list-scheduler runs per configuration for zb-auto (the published orders beside them)
AUTO_ILP_ACTIONS = 240  # with --ilp: schedules up to this many actions get zb-auto's ILP
AUTO_ACTIONS = 60_000  # actions list-scheduled and simulated per configuration for zb-auto, at most

__all__ = ["MAX_ACTIONS", "PARALLEL_ACTIONS", "SMALL_CLUSTER", "VIRTUAL", "Candidate", "Search", "Settings",
           "SolveResult", "configurations", "solve"]

Evaluator = Callable[[list[Segment]], tuple[float, bool, object]]


class Search:
    """One search's shared state, and the exact answer for one configuration at a time."""

    def __init__(self, profile: Profile, cluster: Cluster, settings: Settings,
                 progress: Callable[[str, int, int], None] | None = None):
        self.profile = profile
        self.cluster = cluster
        self.settings = settings
        self.progress = progress
        self.graph = LayerGraph(profile)
        self.tables: dict[tuple[int, int, bool], CostTable] = {}
        self._ranks: dict[tuple[int, int, int], list[RankDevice]] = {}
        self._totals: dict[tuple[int, int, bool, int, int, int], quick.Totals] = {}
        self._quick: dict[Config, float] = {}
        self._balanced: dict[tuple[int, int, bool, int], list[int] | None] = {}
        self.policy = Policy("auto" if settings.recompute in ("auto", "selective") else settings.recompute)
        self.skipped_auto: list[Config] = []  # too large for zb-auto's list scheduler
        self._auto_found: dict[tuple[Config, tuple[Segment, ...]], Candidate] = {}  # auto_candidate's, by seed

    # ------------------------------------------------------------------ shared per search

    def table(self, mbs: int, tp: int = 1, sp: bool = False) -> CostTable:
        """The cost table at a micro-batch size and tensor-parallel degree (its devices' link from
        the cluster: planner.evaluate.tp_link)."""
        key = (mbs, tp, sp and tp > 1)
        if key not in self.tables:
            link = tp_link(self.cluster, tp, len(self.cluster.devices) // tp * tp)
            self.tables[key] = CostTable(self.profile, mbs, self.graph, tp=tp, tp_link=link, sequence_parallel=sp)
        return self.tables[key]

    def table_for(self, cfg: Config) -> CostTable:
        return self.table(cfg.mbs, cfg.tp, cfg.sp)

    def ranks(self, pp: int, dp: int, tp: int = 1) -> list[RankDevice]:
        key = (pp, dp, tp)
        if key not in self._ranks:
            self._ranks[key] = rank_devices(self.cluster, pp, dp, tp)
        return self._ranks[key]

    def ranks_for(self, cfg: Config) -> list[RankDevice]:
        return self.ranks(cfg.pp, cfg.dp, cfg.tp)

    def bounds(self, cfg: Config, share: float = 1.0, stage_work_cap: float = np.inf) -> StageBounds:
        schedule = build(cfg.schedule, cfg.pp, cfg.m, cfg.v, cfg.order)
        return StageBounds(self.table_for(cfg), self.cluster, cfg, schedule,
                           self.ranks_for(cfg), self.policy, share, stage_work_cap)

    def evaluator(self, cfg: Config) -> Evaluator:
        table = self.table_for(cfg)
        ranks = self.ranks_for(cfg)

        def run(segments: list[Segment]) -> tuple[float, bool, Evaluation]:
            ev = evaluate(table, self.cluster, cfg, segments, detail=False, ranks=ranks)
            return ev.step_time_s, ev.fits, ev
        return run

    def may_fit(self, cfg: Config) -> bool:
        return quick.may_fit(self.table_for(cfg), self.ranks_for(cfg), cfg)

    def quick_bound(self, cfg: Config) -> float:
        if cfg not in self._quick:
            key = (cfg.mbs, cfg.tp, cfg.sp, cfg.pp, cfg.dp, cfg.zero)
            if key not in self._totals:
                self._totals[key] = quick.totals(self.table_for(cfg), self.ranks_for(cfg), self.cluster, cfg.zero)
            self._quick[cfg] = quick.quick_bound(self._totals[key], cfg)
        return self._quick[cfg]

    def time_balanced(self, cfg: Config) -> list[int] | None:
        """The contiguous split with the lightest heaviest stage by layer times (the same for
        every configuration with cfg's table and stage count)."""
        key = (cfg.mbs, cfg.tp, cfg.sp, cfg.n_stages)
        if key not in self._balanced:
            t = self.table_for(cfg)
            self._balanced[key] = bl.min_max(t.fwd + t.bwd, cfg.n_stages)
        return self._balanced[key]

    def fixed(self, cfg: Config) -> list[int] | None:
        """The user's stage starts (--fix-cuts) where they fit cfg's stage count."""
        cuts = self.settings.fix_cuts
        if cuts is None or len(cuts) != cfg.n_stages - 1:
            return None
        return [0, *cuts]

    # ------------------------------------------------------------------ the whole search

    def run(self) -> SolveResult:
        start = time.perf_counter()
        s = self.settings
        from planner.solve.infeasible import whole_cluster

        problem = whole_cluster(self.profile, self.cluster, s.training)
        if problem:
            raise InfeasibleError(problem)
        configs = search_space(self.profile, self.cluster, s)
        fitting = [c for c in configs if self.may_fit(c)]
        if not fitting:
            raise InfeasibleError(self.explain_infeasible(configs))
        if s.objective == "memory":
            from planner.solve.least_memory import least_memory

            return least_memory(self, configs, fitting, start)
        upper = {c: c.global_batch / max(self.quick_bound(c), 1e-30) for c in fitting}
        ranked = sorted(fitting, key=lambda c: -upper[c])
        deadline = start + s.time_limit_s
        found = first_answers(self, ranked, upper, deadline)
        branch_and_bound(self, found, deadline)
        if s.recompute == "selective":
            self.selective(found.results, deadline)
        self.auto(found.results, deadline)
        if self.progress:
            self.progress("done", len(ranked), len(ranked))
        if not found.results:
            self._no_plan(configs, found)
        ordered = sorted(found.results.values(), key=self.rank_key)
        base = self.baselines(ordered[0].config)
        if s.fix_cuts is None:  # never report worse than today's splits
            ordered[0] = _at_least_today(ordered[0], base)
        best = ordered[0]
        big = max((upper[c] for c in found.too_big), default=0.0)
        open_bounds = [u for u in found.unresolved if u > best.throughput]
        auto = best.config.schedule == AUTO
        notes = _notes(found, best, big, open_bounds) + ([AUTO_NOTE] if auto else [])
        if self.skipped_auto:
            notes.append(f"zb-auto was not list-scheduled for {len(self.skipped_auto)} configuration(s) of over "
                          f"{AUTO_ACTIONS // (len(SEEDS) + 1):,} actions (e.g. {self.skipped_auto[0].describe()}): "
                          "they keep the published order")
        return SolveResult(best=best, ranked=ordered[: s.top], baselines=base,
                           proven=not open_bounds and big <= best.throughput and not auto,
                           configs_total=len(configs), configs_solved=found.solved,
                           elapsed_s=time.perf_counter() - start, notes=notes)

    def _no_plan(self, configs: list[Config], found: Progress) -> None:
        """Raise what stopped every configuration: size, time, loose bounds, or memory."""
        small = [c for c in configs if not self.too_big(c)]
        if not small:
            raise InputError(too_many_actions(found.too_big[0]))
        if found.late:
            raise InfeasibleError(f"no plan found within the time limit ({len(found.unresolved)} configuration(s) "
                                  "left undecided); raise --time-limit")
        later = time.perf_counter() + self.settings.time_limit_s
        if found.unresolved:
            from planner.solve.infeasible import explain_undecided

            raise InfeasibleError(explain_undecided(self, small, found.undecided, deadline=later))
        raise InfeasibleError(self.explain_infeasible(small, deadline=later))

    # ------------------------------------------------------------------ one configuration

    def first(self, cfg: Config, kth: float) -> InnerResult:
        """One configuration's first answer: the DP's partition, simulated (proven optimal when
        the simulation meets the bound), never worse than the time-balanced split."""
        warm = [p for p in [self.time_balanced(cfg)] if p is not None]
        floor = self.quick_bound(cfg)
        b = self.bounds(cfg)
        if cfg.n_stages == cfg.pp:
            return first_solution(b, self.evaluator(cfg), ub=self.step_ub(cfg, kth), fixed=self.fixed(cfg),
                                  floor=floor, warm=warm)
        # several stages per rank: the rank's memory and pipeline fill, as a program
        program = Program(b)
        ub = self.step_ub(cfg, kth)
        floor = program.bound(floor, reach=-math.inf if self.large_multi(cfg) else ub)
        if floor >= ub:
            return InnerResult(floor, None, np.inf, proven=True)  # cannot beat the best so far
        if not self.large_multi(cfg):
            inner = first_solution(b, self.evaluator(cfg), ub=ub, fixed=self.fixed(cfg), floor=floor, warm=warm)
            if not inner.proven and inner.segments is not None:  # could the program prove it?
                reach = min(inner.step_time_s / (1 + 1e-9), ub)  # to prove it, or to rule it out
                inner.lower_bound_s = program.bound(inner.lower_bound_s, reach=reach)
                inner.proven = meets(inner.step_time_s, inner.lower_bound_s)
            return inner
        # A large instance: the per-stage bound is weaker than the floor, so the DP only looks for
        # a good partition, each stage within its share of the rank's memory, over stages no
        # heavier than twice an even share.
        t, slowest = self.table_for(cfg), min(r.speed for r in self.ranks_for(cfg))
        even = cfg.m * float(t.F[-1] + t.BMIN[-1]) / cfg.n_stages / slowest
        finder = self.bounds(cfg, share=1 / cfg.v, stage_work_cap=2 * even)
        inner = first_solution(finder, self.evaluator(cfg), ub=min(ub, 2 * floor), fixed=self.fixed(cfg),
                               floor=floor, warm=warm, relaxed=False)
        inner.lower_bound_s = floor if inner.segments is not None or ub > 2 * floor else inner.lower_bound_s
        inner.proven = inner.proven and inner.step_time_s <= floor * (1 + 1e-9)
        return inner

    def by_ilp(self, cfg: Config, inner: InnerResult, kth: float, deadline: float) -> InnerResult:
        """With --ilp, where the program is small enough: the ILP's rank-level bound and plan."""
        from planner.solve.ilp import solve_ilp

        left = deadline - time.perf_counter()
        if not self.settings.ilp or len(self.profile.layers) * cfg.n_stages > ILP_VARIABLES or left < 1:
            return inner
        b = self.bounds(cfg)
        mode = "auto" if self.policy.name == "auto" else self.policy.name
        found, first = solve_ilp(b, self.evaluator(cfg), mode, time_limit=min(ILP_SECONDS, left), rounds=20,
                                 stop_at=self.step_ub(cfg, kth))
        lower = max(inner.lower_bound_s, first.bound, found.lower_bound_s)
        if found.segments is not None and found.step_time_s < inner.step_time_s:
            return InnerResult(lower, found.segments, found.step_time_s, found.proven, found.evaluations, found.payload)
        return InnerResult(lower, inner.segments, inner.step_time_s, found.proven or inner.proven,
                           inner.evaluations + found.evaluations, inner.payload)

    def selective(self, results: dict[Config, Candidate], deadline: float) -> None:
        """Per-layer recomputation with the cuts, by the ILP, for the best configurations."""
        from planner.solve.ilp import solve_ilp

        best = sorted(results.values(), key=self.rank_key)[: self.settings.top]
        for k, cand in enumerate(best):
            if self.progress:  # an ILP each, seconds apiece
                self.progress(f"selective recompute: {cand.config.describe()}", k, len(best))
            left = deadline - time.perf_counter()
            if left < 1:
                break
            cfg = cand.config
            found, _ = solve_ilp(self.bounds(cfg), self.evaluator(cfg), "selective",
                                 time_limit=min(ILP_SECONDS, left), rounds=10)
            if found.segments is not None and found.step_time_s < cand.inner.step_time_s:
                results[cfg] = Candidate(cfg, found)

    def auto(self, results: dict[Config, Candidate], deadline: float) -> None:
        """zb-auto, where asked for: for the best configurations found under the orders it
        starts from, the order built for their partition's stage costs, links and devices'
        memory, kept where it is faster. Where zb-auto alone was asked for, only its plans stay."""
        names = requested(self.settings)
        if AUTO not in names:
            return
        best = sorted(results.values(), key=self.rank_key)
        seeds = [c for c in best if c.config.schedule in SEEDS and c.config.v == 1]
        for k, cand in enumerate(seeds[: self.settings.top]):
            if k and time.perf_counter() > deadline:  # the best one always gets its zb-auto
                break
            if self.progress:
                self.progress(f"zb-auto: {cand.config.describe()}", k, min(len(seeds), self.settings.top))
            found = self.auto_candidate(cand, names, deadline, results)
            if found is None:
                continue
            bare = replace(found.config, order=None)
            same = [c for c in results if c.schedule == AUTO and replace(c, order=None) == bare]
            if all(self.rank_key(found) < self.rank_key(results[c]) for c in same):
                for c in same:  # one zb-auto order per configuration: the best by the objective
                    del results[c]
                results[found.config] = found
        for cfg in [c for c in results if c.schedule not in names]:
            del results[cfg]

    def seed_auto(self, results: dict[Config, Candidate], deadline: float) -> None:
        """zb-auto, where asked for, on the best plan so far under a published order it starts
        from, added to ``results``: usually the fastest plan, so the time the rest of the search
        must beat (``auto`` keeps it, or a better order of the same configuration)."""
        names = requested(self.settings)
        seeds = [c for c in results.values() if c.config.schedule in SEEDS and c.config.v == 1]
        if AUTO not in names or not seeds:
            return
        found = self.auto_candidate(min(seeds, key=self.rank_key), names, deadline, results)
        if found is not None:
            results[found.config] = found

    def auto_candidate(self, cand: Candidate, names: list[str], deadline: float,
                       results: dict[Config, Candidate] | None = None) -> Candidate | None:
        """zb-auto on a candidate's own partition (with --ilp, on small schedules, reordered by
        the ILP within its time limit); None where it adds nothing: no faster than the
        candidate, or one of the asked-for published orders itself, or (given the ``results``
        so far) outside the top K whatever order it finds. Built once per partition."""
        key = (cand.config, tuple(cand.evaluation.segments))
        if key not in self._auto_found:
            found = self._auto_candidate(cand, names, deadline, results)
            if found is None:
                return None
            self._auto_found[key] = found
        return self._auto_found[key]

    def _auto_candidate(self, cand: Candidate, names: list[str], deadline: float,
                        results: dict[Config, Candidate] | None) -> Candidate | None:
        ev = cand.evaluation
        runs = min(AUTO_POLICIES, AUTO_ACTIONS // self.actions(ev.config) - len(SEEDS))
        if runs < 1:  # too large to list-schedule in the time one configuration gets
            self.skipped_auto.append(ev.config)
            if ev.config.schedule in names:
                return None
            order = rows(ev.schedule.ranks)  # the published order it starts from, as it is
        elif self.auto_cannot_help(ev, names, results or {}):
            return None
        else:
            # by time, whatever fits the devices; by memory, no more than the order it starts from
            budget = ev.peak_memory_bytes if self.settings.objective == "memory" else \
                [r.capacity_bytes for r in ev.ranks]
            built = build_auto(ev.costs, ev.cuts, ev.config.m, budget, max_candidates=runs)
            left = deadline - time.perf_counter()
            if built is not None and self.settings.ilp and self.actions(ev.config) <= AUTO_ILP_ACTIONS and left >= 1:
                from planner.autosched_ilp import refine_by_ilp

                built = refine_by_ilp(built, ev.costs, ev.cuts, budget, min(ILP_SECONDS, left))
            if built is None or built.source in names:
                return None
            if ev.config.schedule in names and built.step_time_s >= ev.step_time_s * (1 - 1e-12):
                return None
            order = rows(built.schedule.ranks)
        cfg = replace(ev.config, schedule=AUTO, order=order)
        priced = evaluate(self.table_for(cfg), self.cluster, cfg, ev.segments, detail=False,
                          ranks=self.ranks_for(cfg))
        # the order is searched on the partition found for its seed: its bound is the configuration's
        inner = InnerResult(self.quick_bound(cfg), ev.segments, priced.step_time_s, proven=False,
                            evaluations=1 + max(runs, 0), payload=priced)
        return Candidate(cfg, inner)

    def auto_cannot_help(self, ev: Evaluation, names: list[str], results: dict[Config, Candidate]) -> bool:
        """Whether no zb-auto order on ``ev``'s partition could change the answer, by a bound on
        every order (``any_order_bound``), so the list scheduler need not run. Either

        * ``ev``'s own published order is asked for and no order beats it by the margin
          ``auto_candidate`` requires (1 - 1e-12): it would return None; or
        * by time, ``top`` plans that stay in the results (asked-for published orders, which
          ``auto`` never removes) are faster than any order could be, compared as ``rank_key``
          rounds them: whatever zb-auto found would rank below them, out of the top K and not
          the best (replacing another zb-auto entry of the same configuration only where it is
          faster still, so that one was outside the top K as well)."""
        bound = any_order_bound(ev.costs, ev.cuts, ev.config.m)
        if ev.config.schedule in names and bound >= ev.step_time_s * (1 - 1e-12):
            return True
        if self.settings.objective != "time" or bound <= 0:
            return False
        fastest = round(ev.config.global_batch / bound, 9)
        ahead = sum(1 for c in results.values() if c.config.schedule in names and c.config.schedule != AUTO
                    and round(c.throughput, 9) > fastest)
        return ahead >= self.settings.top

    def rank_key(self, c: Candidate) -> tuple[float | int, ...]:
        """Fastest first; among equals the one needing less memory, then the simpler schedule
        (with --objective memory: least memory first, then fastest)."""
        ev = c.evaluation
        speed, memory = -round(c.throughput, 9), max(ev.peak_memory_bytes)
        first = (memory, speed) if self.settings.objective == "memory" else (speed, memory)
        cfg = c.config
        return (*first, list(SCHEDULES).index(cfg.schedule), cfg.v, cfg.pp, -cfg.dp, cfg.mbs, cfg.m, cfg.tp, cfg.zero)

    def large_multi(self, cfg: Config) -> bool:
        """Several stages per rank, and too many partitions to branch on."""
        return cfg.n_stages > cfg.pp and comb(len(self.profile.layers) - 1, cfg.n_stages - 1) > ENUMERABLE

    def budget(self, cfg: Config) -> int:
        """Simulations for one configuration's branch and bound: ``--budget``, fewer for large
        schedules, so that each configuration gets about the same time."""
        return max(20, min(self.settings.budget, SIMULATED_ACTIONS // self.actions(cfg)))

    @staticmethod
    def actions(cfg: Config) -> int:
        return cfg.pp * cfg.m * cfg.v * 3

    @classmethod
    def too_big(cls, cfg: Config) -> bool:
        return cls.actions(cfg) > MAX_ACTIONS

    @staticmethod
    def step_ub(cfg: Config, kth: float) -> float:
        return cfg.global_batch / kth if kth > 0 else np.inf

    # ------------------------------------------------------------------ around the answer

    def baselines(self, cfg: Config) -> list[bl.Baseline]:
        return bl.price(self, cfg)

    def explain_infeasible(self, configs: list[Config], deadline: float = float("inf")) -> str:
        """The least memory any configuration needs, where it overflows, and the ways out."""
        from planner.solve.infeasible import explain

        return explain(self, configs, deadline)


def _at_least_today(best: Candidate, base: list[bl.Baseline]) -> Candidate:
    """The best plan, or one of today's splits of its configuration where that runs faster."""
    for b in base:
        ev = b.evaluation
        if ev is not None and ev.config == best.config and ev.fits \
                and ev.step_time_s < best.inner.step_time_s * (1 - 1e-12):
            best = Candidate(best.config, InnerResult(best.inner.lower_bound_s, ev.segments, ev.step_time_s,
                                                      best.inner.proven, best.inner.evaluations, ev))
    return best


def _notes(found: Progress, best: Candidate, big: float, open_bounds: list[float]) -> list[str]:
    notes = []
    if found.too_big:
        notes.append(f"{len(found.too_big)} configuration(s) with over {MAX_ACTIONS:,} scheduled actions were not "
                     f"simulated (e.g. {found.too_big[0].describe()})" + (
                         f"; their bounds allow up to {big / best.throughput - 1:.1%} more throughput"
                         if big > best.throughput else ""))
    if open_bounds:
        notes.append(f"not proven optimal: the bounds of {len(open_bounds)} configuration(s) still allow "
                     f"up to {max(open_bounds) / best.throughput - 1:.1%} more throughput (raise "
                     "--time-limit, or add --ilp for tighter bounds on interleaved and V schedules)")
    return notes


def too_many_actions(cfg: Config) -> str:
    return (f"every configuration schedules more than {MAX_ACTIONS:,} actions (e.g. {cfg.describe()}), more "
            "than planner simulates: lower --global-batch or profile larger micro-batches")


def _not_executed(profile: Profile, settings: Settings, best: Config) -> list[str]:
    """Notes on the parallelism of the plan that planner execute does not run (the same rules as
    its refusal), and on tp held at 1 for a model without a tp_plan."""
    notes = []
    no_plan = profile.model.tensor_parallel is False
    if no_plan and not settings.tp:
        notes.append("tp 1 only: the model gives no tp_plan (ModelSpec.tp_plan), which planner execute needs to "
                     "split it; pin --tp to plan tensor parallelism for an export")
    if best.tp > 1 and no_plan:
        notes.append(f"tp {best.tp}: planned, not executed: the model gives no tp_plan (export this plan, or "
                     "give the factory one)")
    if best.tp > 1 and settings.sequence_parallel and profile.model.sequence_parallel is False and not no_plan:
        notes.append("sequence parallelism off: the model's tp_plan runs none (it marks no norm 'sequence')")
    if best.tp > 1 and profile.model.tensor_parallel is None:
        notes.append(f"tp {best.tp}: the profile does not record whether the model gives a tp_plan, or whether it "
                     "runs sequence parallelism (profiled before planner recorded them): planner execute may "
                     "refuse this plan; profile the model again to know")
    if best.zero >= 2 and best.dp > 1 and SCHEDULES[best.schedule].split_backward:
        notes.append(f"ZeRO stage {best.zero} with {best.schedule}: planned, not executed: FSDP runs with "
                     "schedules whose backward is one action (--schedule 1f1b, gpipe, interleaved-1f1b)")
    return notes


def solve(profile: Profile, cluster: Cluster, settings: Settings,
          progress: Callable[[str, int, int], None] | None = None) -> SolveResult:
    check_per_core(settings.jobs, "--jobs", "worker processes")  # this machine's, so not in Settings
    result = Search(profile, cluster, settings, progress).run()
    if settings.fix_cuts is not None:
        pinned = ("the partition is yours (--fix-cuts), priced as given, not searched: nothing is claimed "
                  "about other splits (drop --fix-cuts to search them)")
        result = replace(result, proven=False, proven_for_fixed_cuts=result.proven, notes=[pinned, *result.notes])
    name, best = result.best.config.schedule, result.best.config
    result.notes.extend(_not_executed(profile, settings, best))
    if best.zero >= 1 and best.dp == 1:  # cost.DataParallel and execute shard only over dp > 1
        result.notes.append(f"ZeRO stage {best.zero} over one replica (dp=1) shards nothing: the plan keeps "
                            "--zero as given, priced and run as stage 0 (pin --dp above 1 to share state)")
    tp_note = tp_costs_note(profile, best.tp, best.sp, best.mbs)
    if tp_note is not None:
        result.notes.append(tp_note)
    if not SCHEDULES[name].executable:
        result.notes.append(f"{name} is modelled only: PyTorch's pipeline engine cannot run it, so "
                            "planner execute refuses this plan")
    return result
