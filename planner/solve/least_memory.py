"""``--objective memory``: the plan needing the least memory on its fullest device, the fastest
among those.

Per configuration, the DP finds the least largest stage memory (each stage within its own
device), then the fastest partition whose stages all stay within it (branch and bound as for
time); configurations are compared by their simulated peak. Exact for one stage per rank, where
a stage's memory is its device's; with several stages per rank the stages are balanced, not the
ranks, and where that split does not fit the fastest plan stands in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from planner.cost import Segment
from planner.errors import InfeasibleError, InputError
from planner.evaluate import Config, Evaluation, evaluate
from planner.solve.bounds import least_memory_cost
from planner.solve.exact import InnerResult, first_solution, lb_partition, refine
from planner.solve.result import Candidate, SolveResult

if TYPE_CHECKING:
    from planner.solve.search import Search


@dataclass
class _Tally:
    results: dict[Config, Candidate] = field(default_factory=dict)
    solved: int = 0
    late: int = 0  # not tried: the time limit had passed
    big: int = 0  # not tried: too large to simulate
    loose: int = 0  # least memory found but not proven least


def least_memory(search: Search, configs: list[Config], fitting: list[Config], start: float) -> SolveResult:
    """The least-memory plan over ``fitting`` (``configs``: every allowed configuration)."""
    s = search.settings
    deadline = start + s.time_limit_s
    tally = _Tally()
    for k, cfg in enumerate(fitting):
        if search.progress:
            search.progress(cfg.describe(), k, len(fitting))
        if search.too_big(cfg):
            tally.big += 1
            continue
        if time.perf_counter() > deadline:
            tally.late += 1
            continue
        inner = least_memory_of(search, cfg, deadline)
        tally.solved += 1
        tally.loose += cfg.n_stages > cfg.pp or (inner is not None and not inner.proven)
        if inner is not None:
            tally.results[cfg] = Candidate(cfg, inner)
    search.auto(tally.results, deadline)
    if search.progress:
        search.progress("done", len(fitting), len(fitting))
    if not tally.results:
        raise _nothing(search, configs, tally)
    ordered = sorted(tally.results.values(), key=search.rank_key)
    return SolveResult(best=ordered[0], ranked=ordered[: s.top], baselines=search.baselines(ordered[0].config),
                       proven=not (tally.loose or tally.late or tally.big), configs_total=len(configs),
                       configs_solved=tally.solved, elapsed_s=time.perf_counter() - start, notes=_notes(tally))


def _nothing(search: Search, configs: list[Config], tally: _Tally) -> Exception:
    """The error for a search that found no plan: time, size, or memory."""
    from planner.solve.search import too_many_actions

    if tally.late:
        return InfeasibleError(f"no plan found within the time limit ({tally.late} configuration(s) not "
                               "tried); raise --time-limit")
    small = [c for c in configs if not search.too_big(c)]
    if not small:
        return InputError(too_many_actions(configs[0]))
    deadline = time.perf_counter() + search.settings.time_limit_s
    return InfeasibleError(search.explain_infeasible(small, deadline=deadline))


def _notes(tally: _Tally) -> list[str]:
    from planner.solve.search import MAX_ACTIONS

    notes = []
    if tally.loose:
        notes.append(f"not proven least: {tally.loose} configuration(s), most with several stages per rank "
                     "(interleaved, V), have a least memory found but not proven (pin --schedule and "
                     "--virtual-stages 1 for a proven answer among one-stage-per-rank plans)")
    if tally.late:
        notes.append(f"{tally.late} configuration(s) not tried (time limit)")
    if tally.big:
        notes.append(f"{tally.big} configuration(s) with over {MAX_ACTIONS:,} scheduled actions were not simulated")
    return notes


def least_memory_of(search: Search, cfg: Config, deadline: float) -> InnerResult | None:
    """One configuration's least-memory plan, the fastest among those; None where none fits."""
    b = search.bounds(cfg)
    fits_own = least_memory_cost(b, within_capacity=True)
    least, stages = lb_partition(b, cost=fits_own, fixed=search.fixed(cfg))
    if stages is None:
        return None if b.one_chunk else fastest(search, cfg, deadline)
    # now the fastest partition with every stage within that memory (and its own device)
    b.cap = [min(least * (1 + 1e-6), cap) for cap in b.cap]
    table, ranks = search.table_for(cfg), search.ranks_for(cfg)

    def run(segments: list[Segment]) -> tuple[float, bool, Evaluation]:
        ev = evaluate(table, search.cluster, cfg, segments, detail=False, ranks=ranks)
        within = not b.one_chunk or max(ev.peak_memory_bytes) <= least * (1 + 1e-6)
        return ev.step_time_s, ev.fits and within, ev
    inner = first_solution(b, run, fixed=search.fixed(cfg), floor=search.quick_bound(cfg))
    if inner.segments is None:
        # several stages per rank: balanced stages need not fit their ranks together
        return None if b.one_chunk else fastest(search, cfg, deadline)
    return refine(b, run, inner, budget=search.budget(cfg), deadline=deadline)


def fastest(search: Search, cfg: Config, deadline: float) -> InnerResult | None:
    """The time objective's search for one configuration (its best plan, or None)."""
    inner = search.first(cfg, 0.0)
    if not inner.proven:
        inner = refine(search.bounds(cfg), search.evaluator(cfg), inner, budget=search.budget(cfg),
                       deadline=deadline)
    return inner if inner.segments is not None else None
