"""zb-auto's refinement: an integer program over each rank's order, warm-started from the list
scheduler's best (Qi et al., Zero Bubble Pipeline Parallelism, ICLR 2024, section 3: the
ILP over the order of F, B and W passes that their heuristic seeds).

Every pass gets a start time; passes of one kind on a stage keep micro-batch order, and a
binary per pair of passes of different kinds on a rank says which runs first. Data waits for
its producer plus the link's time (link contention is left to the simulator, which judges the
result); a rank starts a forward only while fewer than its cap hold activations (counted from
F to W), the cap being the incumbent's own count plus what the memory budget has room for. The
objective is the step: every rank's last weight gradient plus its all-reduce and optimizer step.
The order found is priced by the simulator and kept only where it is faster and fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import product

import pulp

from planner.autosched import NAME, AutoResult, _fits, rows
from planner.errors import ScheduleError
from planner.formats import StageCost
from planner.schedules import Action, Kind, from_order, one_stage_per_rank
from planner.simulate import CutLink, action_seconds, peak_memory, simulate

FWD, INP, WGT = Kind.FORWARD, Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT


def _split(order: tuple[tuple[Action, ...], ...]) -> tuple[tuple[Action, ...], ...]:
    """The order with every whole backward B written as its I then its W."""
    return tuple(tuple(x for a in acts for x in ((Action(INP, a.stage, a.mb), Action(WGT, a.stage, a.mb))
                                                  if a.kind == Kind.FULL_BACKWARD else (a,))) for acts in order)


def _caps(start: AutoResult, costs: Sequence[StageCost], budget: Sequence[int]) -> list[int]:
    """Per rank: the incumbent's most micro-batches in flight, plus as many more as the budget's
    headroom holds (each one its activations and weight-gradient intermediates)."""
    out = []
    for r, acts in enumerate(start.schedule.ranks):
        held = peak = 0
        for a in acts:
            held += 1 if a.kind == FWD else -1 if a.kind in (WGT, Kind.FULL_BACKWARD) else 0
            peak = max(peak, held)
        per = costs[r].act_bytes + costs[r].wgrad_bytes
        room = budget[r] - start.peak_memory_bytes[r]
        out.append(peak + (room // per if per > 0 else len(start.schedule.ranks[r])))
    return out


def refine_by_ilp(start: AutoResult, costs: Sequence[StageCost], cuts: Sequence[CutLink] | None,
                  memory_limit_bytes: Sequence[int], time_limit_s: float) -> AutoResult:
    """The ILP's order where it is faster than ``start`` and fits, else ``start``."""
    sched, m = start.schedule, start.schedule.microbatches
    S = sched.pp
    links = list(cuts) if cuts is not None else [CutLink()] * (S - 1)
    delay = [c.busy_s + c.latency_s + c.cpu_s for c in links]
    dur = [action_seconds(c) for c in costs]
    tails = [c.allreduce_s + c.optimizer_s for c in costs]
    order = _split(sched.ranks)
    sim = simulate(one_stage_per_rank(NAME, m, order), list(costs), links)
    began = {e.action: e.start_s for e in sim.events}
    horizon = sim.step_time_s * 2 + sum(delay)  # big-M: no sensible schedule is slower

    prob = pulp.LpProblem("zb_auto_order", pulp.LpMinimize)
    t = {a: pulp.LpVariable(f"t_{a}", lowBound=0) for acts in order for a in acts}
    step = pulp.LpVariable("step", lowBound=0)
    prob += step
    for s, k in product(range(S), range(m)):
        f, i, w = Action(FWD, s, k), Action(INP, s, k), Action(WGT, s, k)
        d = dur[s]
        if s > 0:
            prob += t[f] >= t[Action(FWD, s - 1, k)] + dur[s - 1][FWD.slot] + delay[s - 1]
        if s < S - 1:
            prob += t[i] >= t[Action(INP, s + 1, k)] + dur[s + 1][INP.slot] + delay[s]
        prob += t[i] >= t[f] + d[FWD.slot]
        prob += t[w] >= t[i] + d[INP.slot]
        if k > 0:
            for kind in (FWD, INP, WGT):
                prob += t[Action(kind, s, k)] >= t[Action(kind, s, k - 1)] + d[kind.slot]
    before = _orderings(prob, t, order, dur, began, horizon, m)
    for s, cap in enumerate(_caps(start, costs, memory_limit_bytes)):
        for k in range(cap, m):  # at F_k, k forwards have run: at least k + 1 - cap of their W done
            prob += pulp.lpSum(before[(Action(WGT, s, j), Action(FWD, s, k))] for j in range(k)) >= k + 1 - cap
        prob += step >= t[Action(WGT, s, m - 1)] + dur[s][WGT.slot] + tails[s]
    for a, v in t.items():
        v.setInitialValue(began[a])
    step.setInitialValue(sim.step_time_s)
    solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=max(1, int(time_limit_s)), warmStart=True)
    prob.solve(solver)
    if pulp.LpStatus[prob.status] not in ("Optimal", "Not Solved") or any(v.value() is None for v in t.values()):
        return start
    position = {a: n for acts in order for n, a in enumerate(acts)}
    found = tuple(tuple(sorted(acts, key=lambda a: (round(t[a].value(), 12), position[a]))) for acts in order)
    return _better(start, found, costs, links, memory_limit_bytes)


def _orderings(prob: pulp.LpProblem, t: dict[Action, pulp.LpVariable], order: tuple[tuple[Action, ...], ...],
               dur: list[tuple[float, float, float, float]], began: dict[Action, float], horizon: float,
               m: int) -> dict[tuple[Action, Action], pulp.LpAffineExpression | int]:
    """For each pair of passes of different kinds on a rank, whether the first runs before the
    second: 1 or 0 where dependencies decide it, else a binary (warm-started from the incumbent)
    with the two disjunctive constraints that keep the passes apart."""
    before: dict[tuple[Action, Action], pulp.LpAffineExpression | int] = {}
    for s in range(len(order)):
        for (x, y) in ((FWD, INP), (FWD, WGT), (INP, WGT)):
            for j, k in product(range(m), range(m)):
                a, b = Action(x, s, j), Action(y, s, k)
                if j <= k:  # a pass's own earlier kinds, and those of earlier micro-batches, come first
                    before[(a, b)], before[(b, a)] = 1, 0
                    continue
                z = pulp.LpVariable(f"o_{a}_{b}", cat="Binary")
                z.setInitialValue(1 if began[a] < began[b] else 0)
                prob += t[b] >= t[a] + dur[s][x.slot] - horizon * (1 - z)
                prob += t[a] >= t[b] + dur[s][y.slot] - horizon * z
                before[(a, b)], before[(b, a)] = z, 1 - z
    return before


def _better(start: AutoResult, found: tuple[tuple[Action, ...], ...], costs: Sequence[StageCost],
            links: list[CutLink], budget: Sequence[int]) -> AutoResult:
    """The found order as a result, where it is valid, fits and is faster than ``start``."""
    m = start.schedule.microbatches
    try:
        schedule = from_order(NAME, len(found), m, rows(found))
    except ScheduleError:
        return start
    peaks = peak_memory(schedule, list(costs))
    step = simulate(schedule, list(costs), links, timeline=False).step_time_s
    if not _fits(peaks, budget) or step >= start.step_time_s * (1 - 1e-12):
        return start
    return AutoResult(schedule, step, peaks, start.source + ", reordered by the ILP", start.tried + 1)
