"""Turn a search result into the plan file: the chosen configuration, its baselines, and how it
was found."""

from __future__ import annotations

from planner.formats import BaselineResult, Cluster, Plan, Profile, SolverRecord
from planner.plan import profile_fingerprint, to_plan
from planner.solve.result import SolveResult
from planner.solve.settings import Settings


def baseline_results(result: SolveResult, n_layers: int) -> list[BaselineResult]:
    out = []
    for b in result.baselines:
        if b.starts is None or b.evaluation is None:
            continue
        ev = b.evaluation
        sizes = [z - a for a, z in zip(b.starts, [*b.starts[1:], n_layers], strict=True)]
        out.append(BaselineResult(name=b.name, layers_per_stage=sizes,
                                  step_time_s=ev.step_time_s if ev.fits else None,
                                  peak_memory_bytes=max(ev.peak_memory_bytes), fits=ev.fits))
    return out


def make_plan(profile: Profile, cluster: Cluster, result: SolveResult, settings: Settings) -> Plan:
    best = result.best
    solver = SolverRecord(settings=settings.record(), proven_optimal=result.proven,
                          lower_bound_s=best.inner.lower_bound_s, configurations=result.configs_total,
                          configurations_solved=result.configs_solved, notes=result.notes,
                          # the split is the user's: proven only given it
                          proven_for_fixed_cuts=result.proven_for_fixed_cuts)
    return to_plan(profile, cluster, best.evaluation,
                   baselines=baseline_results(result, len(profile.layers)), solver=solver)


__all__ = ["baseline_results", "make_plan", "profile_fingerprint"]
