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
from planner.evaluate import Config, Evaluation, evaluate, tp_link
from planner.formats import Plan, Profile, load_plan
from planner.plan import check_fingerprint, profile_fingerprint, rebuilt_fingerprint, replay_plan
from planner.report import schedule_text
from planner.units import fmt_bytes, fmt_time


@dataclass
class Outcome:
    path: str
    code: int  # 0 ok, 1 stale / over memory / beaten, 2 bad input
    lines: list[str] = field(default_factory=list)


def check_memory(plan: Plan) -> list[str]:
    """Ranks whose predicted peak exceeds their devices' usable memory, with their stages."""
    sim = replay_plan(plan)
    problems = []
    for r, need in enumerate(sim.peak_memory_bytes):
        stages = [st for st in plan.stages if st.rank == r]
        cap = plan.cluster.usable_bytes([d + k for d in stages[0].devices for k in range(plan.parallel.tp)])
        if need > cap:
            names = ", ".join(f"stage {st.index} ({st.layers[0]}..{st.layers[-1]})" for st in stages)
            problems.append(f"{names} needs {fmt_bytes(need)}, its device has {fmt_bytes(cap)} usable: "
                            "re-solve, add --recompute, or use more devices")
    return problems


def price_on(plan: Plan, profile: Profile) -> Evaluation:
    """The plan's own configuration and partition, priced on ``profile``'s measurements (on the
    plan's cluster), as the solver prices every candidate."""
    from planner.cost import CostTable, Segment
    from planner.graph import LayerGraph

    cfg = Config(pp=plan.parallel.pp, dp=plan.parallel.dp, mbs=plan.microbatch.size, m=plan.microbatch.count,
                 schedule=plan.schedule.name, v=plan.schedule.virtual_stages, training=plan.training,
                 order=tuple(plan.schedule.order) if plan.schedule.order is not None else None,
                 tp=plan.parallel.tp, zero=plan.parallel.zero, sp=plan.parallel.sequence_parallel)
    if str(cfg.mbs) not in profile.layers[0].by_mbs:
        raise InputError(f"the plan runs micro-batches of {cfg.mbs}, the profile has none measured "
                         f"(it has {', '.join(profile.layers[0].by_mbs)}): profile that size")
    index = {layer.name: i for i, layer in enumerate(profile.layers)}
    names = [layer.name for layer in profile.layers]
    segments = []
    for st in plan.stages:
        missing = [n for n in st.layers + st.recompute_layers if n not in index]
        if missing:
            raise InputError(f"stage {st.index}'s layer {missing[0]} is not in the profile")
        start = index[st.layers[0]]
        if names[start:start + len(st.layers)] != st.layers:
            raise InputError(f"stage {st.index}'s layers are not consecutive in the profile")
        segments.append(Segment(start, start + len(st.layers), st.recompute,
                                tuple(index[n] for n in st.recompute_layers)))
    link = tp_link(plan.cluster, cfg.tp, cfg.devices)
    table = CostTable(profile, cfg.mbs, LayerGraph(profile), tp=cfg.tp, tp_link=link, sequence_parallel=cfg.sp)
    return evaluate(table, plan.cluster, cfg, segments, detail=False)


def _saved_settings(plan: Plan):
    """The solver settings the plan was made with, as the search reads them."""
    from planner.formats import Training
    from planner.solve import Settings

    return Settings.from_record(plan.provenance.solver.settings, Training(**plan.training.model_dump()),
                                plan.microbatch.global_batch)


@dataclass
class Comparison:
    """This plan and the best one found, both priced on the same profile."""

    source: str  # the profile both are priced on, as the user named it
    mine: Evaluation
    best: Evaluation
    objective: str

    @property
    def same(self) -> bool:
        return self.best.config == self.mine.config and self.best.segments == self.mine.segments

    def gain(self) -> float:
        """How much better the best is than this plan: faster, or lighter on the fullest device."""
        if self.objective == "memory":
            least, now = max(self.best.peak_memory_bytes), max(self.mine.peak_memory_bytes)
            return now / least - 1 if least > 0 else 0.0
        return self.best.throughput / self.mine.throughput - 1 if self.mine.throughput > 0 else float("inf")

    def describe(self, ev: Evaluation) -> str:
        if self.objective == "memory":
            return f"peaks at {fmt_bytes(max(ev.peak_memory_bytes))} per device"
        return f"runs {ev.throughput:.1f} samples/s"


def compare_best(plan: Plan, profile: Profile, source: str) -> Comparison:
    """Search again with the plan's own settings on ``profile``, and price the plan there too."""
    from planner.solve import solve

    settings = _saved_settings(plan)
    result = solve(profile, plan.cluster, settings)
    return Comparison(source, price_on(plan, profile), result.best.evaluation, settings.objective)


def check_better(plan: Plan, profile: Profile, tolerance: float,
                 source: str = "the profile") -> tuple[list[str], list[str]]:
    """(problems, notes): fail if this plan does not fit on ``profile``'s measurements, or if the
    best plan found there beats it, priced there too, by more than the tolerance."""
    c = compare_best(plan, profile, source)
    stored = (f"this plan's stored prediction ({plan.predicted.throughput_samples_per_s:.1f} samples/s, "
              f"peak {fmt_bytes(plan.predicted.peak_memory_bytes)}) is priced on the profile it was solved on")
    if not c.mine.fits:
        r, over = c.mine.overflow[0]
        return [f"on {source}'s measurements this plan does not fit: rank {r} needs {fmt_bytes(over)} more "
                f"than its device has; the best plan there, {c.best.config.describe()}, {c.describe(c.best)} "
                "(re-solve to update it)"], [stored]
    if c.gain() > tolerance:
        what = "needing less memory" if c.objective == "memory" else "better"
        how = "less memory" if c.objective == "memory" else "faster"
        return [f"a {what} plan exists: on {source}, {c.best.config.describe()} {c.describe(c.best)}, "
                f"{c.gain():.1%} {how} than this plan, which {c.describe(c.mine)} there "
                "(re-solve to update it)"], [stored]
    best = "this plan's own configuration and split" if c.same else \
        f"{c.best.config.describe()}, {c.describe(c.best)}, within the tolerance"
    return [], [f"on {source}, this plan {c.describe(c.mine)}; the best found: {best}"]


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
                out.lines.append("the profile's measured costs differ from those the plan was solved on"
                                 + ("" if resolve else ": --resolve prices the plan on them"))
        if rebuild:
            problems += check_fingerprint(plan, rebuilt_fingerprint(plan), "the model built now")
            if not problems:
                out.lines += _execute_refuses(plan)
        if resolve:
            if profile is None:
                raise InputError("--resolve needs --profile")
            if not problems:
                found, notes = check_better(plan, profile, tolerance, profile_path or "the profile")
                problems += found
                out.lines += notes
    except PlannerError as e:
        out.code = e.exit_code if isinstance(e, InputError) else 1
        out.lines.append(str(e))
        return out
    if problems:  # the failure leads, the notes follow
        out.code = 1
        out.lines = problems + out.lines
    return out


def _execute_refuses(plan: Plan) -> list[str]:
    """What planner execute would refuse in the plan's tensor parallelism, checked against the model
    built now (on the meta device): a note, since a plan may be meant for an export only."""
    if plan.parallel.tp <= 1:
        return []
    from planner.execute import refuse_without_tp_plan

    try:
        refuse_without_tp_plan(plan)
    except InputError as e:
        return [f"planner execute would refuse it: {e}"]
    return []


def summary(plan_path: str) -> str:
    plan = load_plan(plan_path)
    par = plan.parallel
    extra = (f" tp={par.tp}" + (" sp" if par.sequence_parallel else "") if par.tp > 1 else "") \
        + (f" zero={par.zero}" if par.zero else "")
    return (f"pp={par.pp} dp={par.dp}{extra} {schedule_text(plan)}, step "
            f"{fmt_time(plan.predicted.step_time_s)}, peak {fmt_bytes(plan.predicted.peak_memory_bytes)}")


__all__ = ["Outcome", "check_one", "summary", "CheckFailed"]
