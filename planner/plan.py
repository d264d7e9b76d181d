"""From an evaluated configuration to the plan file, and back: the plan written out, replayed
through the simulator from the costs it carries, and the fingerprints that tie it to its model
and its profile. Torch-free: only rebuilding the model (``rebuilt_fingerprint``) needs torch,
imported when it is called."""

from __future__ import annotations

import hashlib
from itertools import pairwise

from planner import __version__
from planner.errors import CheckFailed, InputError, MissingExtraError
from planner.evaluate import Evaluation, cut_link
from planner.formats import (
    DTYPE_BYTES,
    BaselineResult,
    Cluster,
    Microbatch,
    Parallel,
    Plan,
    Prediction,
    Profile,
    Provenance,
    ScheduleSpec,
    SolverRecord,
    Stage,
    StageCost,
    StagePrediction,
)
from planner.schedules import Schedule, build
from planner.simulate import CutLink, SimResult, simulate


def to_plan(profile: Profile, cluster: Cluster, ev: Evaluation, *,
            baselines: list[BaselineResult] | None = None, solver: SolverRecord | None = None) -> Plan:
    """The plan file for an evaluated configuration."""
    sim = ev.simulation()
    cfg = ev.config
    names = [layer.name for layer in profile.layers]
    stages = []
    for s, (seg, cost) in enumerate(zip(ev.segments, ev.costs, strict=True)):
        r = ev.schedule.stage_rank[s]
        stages.append(Stage(
            index=s, layers=names[seg.start:seg.stop], rank=r, devices=ev.ranks[r].devices,
            recompute=seg.recompute, recompute_layers=[names[i] for i in seg.recompute_layers],
            cost=cost,
            predicted=StagePrediction(compute_s=sim.stage_compute_s[s], peak_memory_bytes=sim.peak_memory_bytes[r])))
    return Plan(
        model=profile.model, cluster=cluster,
        parallel=Parallel(pp=cfg.pp, dp=cfg.dp, tp=cfg.tp, zero=cfg.zero, sequence_parallel=cfg.sp),  # type: ignore[arg-type]
        microbatch=Microbatch(size=cfg.mbs, count=cfg.m, global_batch=cfg.global_batch),
        schedule=ScheduleSpec(name=cfg.schedule, virtual_stages=cfg.v,
                              order=list(cfg.order) if cfg.order is not None else None),
        training=cfg.training, dtype=profile.dtype, layers=names, stages=stages,
        predicted=Prediction(step_time_s=ev.step_time_s, throughput_samples_per_s=ev.throughput,
                             bubble_fraction=sim.bubble_fraction,
                             peak_memory_bytes=max(sim.peak_memory_bytes)),
        baselines=baselines or [],
        provenance=Provenance(profile_fingerprint=profile_fingerprint(profile),
                              planner_version=__version__, solver=solver or SolverRecord(),
                              costs_estimated=profile.measurement.estimated if profile.measurement else None),
    )


def profile_fingerprint(profile: Profile) -> str:
    """The model's structure fingerprint plus a hash of the measured numbers. Fields left at their
    defaults are not hashed, so a field added to the format later does not change the digest of a
    profile that does not use it."""
    dumped = profile.model_dump_json(exclude={"measurement"}, exclude_defaults=True)
    digest = hashlib.sha256(dumped.encode()).hexdigest()
    return f"{profile.model.fingerprint}+{digest[:16]}"


def check_fingerprint(plan: Plan, fingerprint: str, source: str) -> list[str]:
    """The stale-plan problem, if ``fingerprint`` (the model's structure, as ``source`` has it)
    is not the one the plan was made for."""
    if plan.model.fingerprint != fingerprint:
        return [(f"the plan is stale: the model changed since it was made ({source} has structure "
                 f"{fingerprint[:19]}..., the plan {plan.model.fingerprint[:19]}...); profile and solve again")]
    return []


REBUILD_SLACK = 8  # a factory may build a part twice, tie or replace weights: each registration counts


def rebuilt_fingerprint(plan: Plan) -> str:
    """Build the plan's model on the meta device (no memory, no weights) and fingerprint it. The
    build stops once it registers ``REBUILD_SLACK`` times the parameters the plan's stages hold:
    such a model is not the plan's (arguments edited to 10**6 layers took hours to build)."""
    try:
        from planner.split import TooManyParameters, build_on_meta, fingerprint
    except ImportError as e:
        raise MissingExtraError(e.name or "torch", "building the plan's model") from None
    held = sum(st.cost.param_bytes for st in plan.stages) * plan.parallel.tp // DTYPE_BYTES[plan.dtype]
    try:
        spec = build_on_meta(plan.model.factory, dict(plan.model.args), REBUILD_SLACK * held + 2**20)
    except TooManyParameters as e:
        raise CheckFailed(f"the plan is stale: {plan.model.factory} with the plan's arguments "
                          f"({_args(plan.model.args)}) builds a model of more than {e.most:,} parameters, and the "
                          f"plan's stages hold {held:,}; profile and solve again") from None
    return fingerprint(spec.model)


def _args(args: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items()) or "none"


def plan_cuts(plan: Plan) -> list[CutLink]:
    """Transfer costs between a plan's consecutive stages, from the plan's own cluster."""
    return [cut_link(plan.cluster, a.devices[0], b.devices[0], a.cost.send_bytes, same_rank=a.rank == b.rank)
            for a, b in pairwise(plan.stages)]


def plan_schedule(plan: Plan) -> Schedule:
    """The plan's action lists: built from its schedule's name, or for zb-auto from its stored order."""
    order = tuple(plan.schedule.order) if plan.schedule.order is not None else None
    return build(plan.schedule.name, plan.parallel.pp, plan.microbatch.count, plan.schedule.virtual_stages, order)


def replay_plan(plan: Plan, costs: list[StageCost] | None = None, *, timeline: bool = False) -> SimResult:
    """Simulate a plan from the stage costs it carries (or ``costs`` in their place); with
    ``timeline`` the result carries every event, for drawing."""
    schedule = plan_schedule(plan)
    if tuple(st.rank for st in plan.stages) != schedule.stage_rank:
        raise InputError(f"plan places stages on ranks {[st.rank for st in plan.stages]}, "
                         f"{plan.schedule.name} places them on {list(schedule.stage_rank)}")
    return simulate(schedule, costs or [st.cost for st in plan.stages], plan_cuts(plan), timeline=timeline)


__all__ = ["check_fingerprint", "plan_cuts", "plan_schedule", "profile_fingerprint", "rebuilt_fingerprint",
           "replay_plan", "to_plan"]
