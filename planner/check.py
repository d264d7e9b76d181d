"""``planner check``: is a committed plan still valid, still fitting, still the best?

Nothing heavy runs unless asked: the plan is re-simulated from the costs it carries; its model
fingerprint is compared with a profile's (``--profile``) or with the model rebuilt on the meta
device (``--rebuild``, needs torch); ``--resolve`` searches again and fails when a plan better
by more than the tolerance now exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from planner.errors import CheckFailed, InputError, PlannerError
from planner.evaluate import profile_fingerprint, replay_plan
from planner.formats import Plan, Profile, load_plan


@dataclass
class Outcome:
    path: str
    code: int  # 0 ok, 1 stale / over memory / beaten, 2 bad input
    lines: list[str] = field(default_factory=list)


def check_memory(plan: Plan) -> list[str]:
    """Ranks whose predicted peak exceeds their devices' usable memory, with their stages."""
    from planner.report import fmt_bytes

    sim = replay_plan(plan)
    problems = []
    for r, need in enumerate(sim.peak_memory_bytes):
        stages = [st for st in plan.stages if st.rank == r]
        cap = plan.cluster.usable_bytes(stages[0].devices)
        if need > cap:
            names = ", ".join(f"stage {st.index} ({st.layers[0]}..{st.layers[-1]})" for st in stages)
            problems.append(f"{names} needs {fmt_bytes(need)}, its device has {fmt_bytes(cap)} usable: "
                            "re-solve, add --recompute, or use more devices")
    return problems


def check_fingerprint(plan: Plan, fingerprint: str, source: str) -> list[str]:
    if plan.model.fingerprint != fingerprint:
        return [f"the plan is stale: the model changed since it was made ({source} has structure "
                f"{fingerprint[:19]}..., the plan {plan.model.fingerprint[:19]}...); profile and solve again"]
    return []


def rebuilt_fingerprint(plan: Plan) -> str:
    """Build the plan's model on the meta device (no memory, no weights) and fingerprint it."""
    try:
        from planner.split import build_on_meta, fingerprint
    except ImportError:
        raise InputError("--rebuild builds the model and needs torch: install it, or compare with "
                         "--profile instead") from None
    return fingerprint(build_on_meta(plan.model.factory, dict(plan.model.args)).model)


def check_better(plan: Plan, profile: Profile, tolerance: float) -> list[str]:
    """Search again with the plan's own settings; fail if the new best is faster by more than
    the tolerance."""
    from planner.formats import Training
    from planner.solve import Settings, solve

    saved = dict(plan.provenance.solver.get("settings", {})) if isinstance(plan.provenance.solver, dict) else {}
    keep = {k: v for k, v in saved.items() if k in Settings.__dataclass_fields__ and k != "training"}
    for key in ("schedules", "fix_cuts"):
        if keep.get(key) is not None:
            keep[key] = tuple(keep[key])
    keep["global_batch"] = keep.get("global_batch") or plan.microbatch.global_batch
    settings = Settings(**keep, training=Training(**plan.training.model_dump()))
    result = solve(profile, plan.cluster, settings)
    if settings.objective == "memory":
        least, now = max(result.best.evaluation.peak_memory_bytes), plan.predicted.peak_memory_bytes
        if least < now * (1 - tolerance):
            from planner.report import fmt_bytes

            return [f"a plan needing less memory exists: {result.best.config.describe()} peaks at "
                    f"{fmt_bytes(least)} per device against this plan's {fmt_bytes(now)} (re-solve to update it)"]
        return []
    new = result.best.throughput
    old = plan.predicted.throughput_samples_per_s
    if new > old * (1 + tolerance):
        cfg = result.best.config
        return [f"a better plan exists: {cfg.describe()} at {new:.1f} samples/s, "
                f"{new / old - 1:.1%} faster than this plan's {old:.1f} (re-solve to update it)"]
    return []


def check_one(path: Path, *, profile: Profile | None, profile_path: str | None, rebuild: bool,
              resolve: bool, tolerance: float) -> Outcome:
    out = Outcome(str(path), 0)
    try:
        plan = load_plan(path)
        if rebuild:
            from planner.model import with_factory_found

            plan = with_factory_found(plan, path)  # found next to the plan file, from any folder
        problems = check_memory(plan)
        if profile is not None:
            problems += check_fingerprint(plan, profile.model.fingerprint, profile_path or "the profile")
            if not problems and plan.provenance.profile_fingerprint != profile_fingerprint(profile):
                out.lines.append("the profile's measurements differ from those the plan was solved on")
        if rebuild:
            problems += check_fingerprint(plan, rebuilt_fingerprint(plan), "the model built now")
        if resolve:
            if profile is None:
                raise InputError("--resolve needs --profile")
            if not problems:
                problems += check_better(plan, profile, tolerance)
    except PlannerError as e:
        out.code = e.exit_code if isinstance(e, InputError) else 1
        out.lines.append(str(e))
        return out
    if problems:
        out.code = 1
        out.lines += problems
    return out


def summary(plan_path: str) -> str:
    plan = load_plan(plan_path)
    from planner.report import fmt_bytes, fmt_time

    return (f"pp={plan.parallel.pp} dp={plan.parallel.dp} {plan.schedule.name}, step "
            f"{fmt_time(plan.predicted.step_time_s)}, peak {fmt_bytes(plan.predicted.peak_memory_bytes)}")


__all__ = ["Outcome", "check_one", "summary", "CheckFailed"]
