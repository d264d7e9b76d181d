"""The partitioning problem as an integer linear program (PuLP with CBC), for what the DP does
not cover: recomputation chosen per layer together with the cuts, and stages of one rank that
must fit its memory together (interleaved and V schedules).

Variables: ``y[l, s] = 1`` when layer l sits in stage s or earlier, so stage s holds
``x[l, s] = y[l, s] - y[l, s-1]`` and starts at layer l when ``y[l-1, s-1] - y[l, s-1] = 1``.
Every term of the DP's stage bound (``bounds.py``) and of the simulator's memory is linear in
these, so the program minimises the same bound under the same memory model; with several
stages per rank it also bounds each rank's total work and checks its memory at every point of
its action list. The simulator then decides, as for the DP: partitions are excluded one by one
(no-good cuts) until the program's bound reaches the best simulated time.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pulp

from planner.cost import Segment
from planner.errors import InputError
from planner.simulate import memory_states, rank_undominated
from planner.solve.bounds import StageBounds
from planner.solve.exact import Evaluator, InnerResult

MODES = ("none", "full", "auto", "selective")


@dataclass
class IlpSolution:
    objective: float  # the bound of the partition found
    bound: float  # proven lower bound (CBC's "best possible")
    segments: list[Segment] | None
    status: str

    @property
    def gap(self) -> float:
        """How far the partition found may be above the optimum, as a fraction of it."""
        if not self.segments or self.objective <= 0:
            return 0.0
        return max(self.objective - self.bound, 0.0) / self.objective


class _Model:
    def __init__(self, b: StageBounds, mode: str):
        if mode not in MODES:
            raise InputError(f"unknown recomputation mode {mode!r}")
        self.b, self.mode = b, mode
        t = b.t
        n, S = b.n, b.S
        self.n, self.S = n, S
        prob = pulp.LpProblem("planner_partition", pulp.LpMinimize)
        self.prob = prob
        L, Ss = range(n), range(S)
        y = {(l, s): pulp.LpVariable(f"y_{l}_{s}", cat="Binary") for l in L for s in Ss}
        self.y = y
        for l in L:
            prob += y[l, S - 1] == 1
            for s in range(S - 1):
                prob += y[l, s] <= y[l, s + 1]
        for s in Ss:
            for l in range(n - 1):
                prob += y[l + 1, s] <= y[l, s]
        prob += y[0, 0] == 1

        def Y(l: int, s: int):
            return 0 if s < 0 else (1 if l < 0 else y[l, s])

        self.Y = Y
        x = {(l, s): y[l, s] - Y(l, s - 1) for l in L for s in Ss}
        self.x = x
        for s in Ss:
            prob += pulp.lpSum(x[l, s] for l in L) >= 1
        # start[s][l] = 1 when stage s begins at layer l
        start = {(l, s): (1 if l == 0 else 0) if s == 0 else Y(l - 1, s - 1) - Y(l, s - 1)
                 for l in L for s in Ss}
        cut_in = [pulp.lpSum(float(t.cut[l]) * start[l, s] for l in range(1, n)) if s else 0 for s in Ss]
        cut_out = [cut_in[s + 1] if s + 1 < S else 0 for s in Ss]

        # recomputation: u[l, s] = 1 when layer l is in stage s and recomputed
        c = {}
        if mode == "selective":
            u = {(l, s): pulp.LpVariable(f"r_{l}_{s}", cat="Binary") for l in L for s in Ss}
            for key in u:
                prob += u[key] <= x[key]
        elif mode == "none":
            u = {key: 0 for key in x}
        elif mode == "full":
            u = dict(x)
        else:  # auto: one choice per stage, u = x * c
            c = {s: pulp.LpVariable(f"c_{s}", cat="Binary") for s in Ss}
            u = {}
            for (l, s) in x:
                v = pulp.LpVariable(f"u_{l}_{s}", lowBound=0, upBound=1)
                prob += v <= x[l, s]
                prob += v <= c[s]
                prob += v >= x[l, s] + c[s] - 1
                u[l, s] = v
        self.u, self.c = u, c

        tau = pulp.LpVariable("tau", lowBound=0)
        self.tau = tau
        prob += tau
        f_l, bi_l = t.fwd, t.bwd_input
        b_l = t.bwd_input + t.bwd_weight if b.split else t.bwd
        back = bi_l if b.split else b_l
        lat = b.lat
        work, after, head_tail = [], [], []
        stage_params: dict[int, object] = {}
        for s in Ss:
            sp = b.speed[s]
            f_s = pulp.lpSum(float(f_l[l] / sp) * x[l, s] for l in L)
            rec = pulp.lpSum(float(f_l[l] / sp) * u[l, s] for l in L) if mode != "none" else 0
            b_s = pulp.lpSum(float(b_l[l] / sp) * x[l, s] for l in L) + rec
            w = b.m * (f_s + b_s)
            params = stage_params[s] = pulp.lpSum(float(t.params[l]) * x[l, s] for l in L) - self._tied(s)
            a, const = b.ar[s]
            has = pulp.LpVariable(f"has_params_{s}", cat="Binary")
            prob += params <= float(t.PARAMS[-1] + 1) * has
            aft = a * params + const * has + b.opt_per_byte / sp * params
            hops = int(b.hops[s]) * lat
            head = pulp.lpSum(float(f_l[l] / b.vmax) * Y(l, s - 1) for l in L) + hops if s else 0
            tail = 0 if b.split or s == 0 else pulp.lpSum(float(b_l[l] / b.vmax) * Y(l, s - 1) for l in L) + hops
            own_after, last = 0, tail  # as in StageBounds.bound: the drain after the last I
            if b.split and s:
                last = pulp.lpSum(float(bi_l[l] / b.vmax) * Y(l, s - 1) for l in L) + hops
                own_after = b.w_after[s] * pulp.lpSum(float(t.bwd_weight[l] / sp) * x[l, s] for l in L)
            if b.schedule.stream:
                prob += tau >= w + aft
                work.append(w)
                after.append(aft)
                head_tail.append(0)
                continue
            gap = 0
            if b.one_chunk:
                rest = pulp.lpSum(float((f_l[l] + back[l]) / b.vmax) * (1 - Y(l, s)) for l in L) \
                    + 2 * (S - 1 - s) * lat
                if b.flush_all:
                    gap = rest
                else:
                    gap = pulp.LpVariable(f"gap_{s}", lowBound=0)
                    prob += gap >= rest - (b.k[s] - 1) * f_s
                    if b.m > b.k[s]:
                        drain = pulp.LpVariable(f"drain_{s}", lowBound=0)
                        prob += drain >= rest - (b.k[s] - 1) * b_s
                        gap = gap + drain
            prob += tau >= head + w - own_after + gap + last
            prob += tau >= head + w + gap + aft
            work.append(w)
            after.append(aft)
            head_tail.append(head + tail)

        # rank-level bound when a rank holds several stages
        if not b.one_chunk and not b.schedule.stream:
            for r in range(b.schedule.pp):
                mine = b.schedule.stages_of(r)
                first = mine[0]
                prob += tau >= head_tail[first] + pulp.lpSum(work[s] for s in mine)
                prob += tau >= pulp.lpSum(work[s] for s in mine) + pulp.lpSum(after[s] for s in mine)

        # memory
        held, transient, static, wgrads = [], [], [], []
        tensors = [tt for tt in t.graph.tensors if tt.producer >= 0]
        for s in Ss:
            held_s = pulp.lpSum(float(t.act[l]) * (x[l, s] - u[l, s]) for l in L)
            for k, tt in enumerate(tensors):
                nb = float(tt.bytes_per_sample * t.mbs)
                p = tt.producer
                if mode == "selective":
                    keep = x[p, s] if (tt.saved or tt.last_consumer >= n) else None
                    if keep is None:
                        h = pulp.LpVariable(f"h_{k}_{s}", lowBound=0)
                        prob += h >= x[p, s] - Y(tt.last_consumer, s)
                        keep = h
                    held_s += nb * keep
                else:
                    if tt.saved or tt.last_consumer >= n:
                        held_s += nb * (x[p, s] - u[p, s])
                    else:
                        h = pulp.LpVariable(f"h_{k}_{s}", lowBound=0)
                        prob += h >= x[p, s] - Y(tt.last_consumer, s) - (c[s] if mode == "auto" else (1 if mode == "full" else 0))
                        held_s += nb * h
                    held_s += nb * u[p, s]
            if mode == "selective":
                held_s += pulp.lpSum(float(t.in_bytes[l]) * u[l, s] for l in L)
            tr = pulp.LpVariable(f"transient_{s}", lowBound=0)
            for l in L:
                prob += tr >= float(t.peak[l]) * x[l, s]
                if mode != "none":
                    prob += tr >= float(t.act[l] + t.peak[l]) * u[l, s]
            st = stage_params[s] * (b.bpp + b.versions[s] - 1) + b.m * (cut_in[s] + cut_out[s])
            st += (b.m * t.input_batch if s == 0 else 0) + (b.m * t.target_batch if s == S - 1 else 0)
            held.append(held_s)
            wgrads.append(pulp.lpSum(float(t.wgrad[l]) * x[l, s] for l in L))
            transient.append(tr + cut_in[s] + t.workspace)
            static.append(st)
        for r, states in enumerate(memory_states(b.schedule)):
            mine = b.schedule.stages_of(r)
            v = len(mine)
            cap = min(b.cap[s] for s in mine)
            base = pulp.lpSum(static[s] for s in mine)
            for state in rank_undominated(states).tolist():
                k, counts, split, done, sent = state[0], *(state[1 + q * v: 1 + (q + 1) * v] for q in range(4))
                prob += base + pulp.lpSum(
                    n_c * held[s] + i_c * wgrads[s] + d_c * cut_in[s]
                    + (o_c * cut_out[s] if s + 1 < S and b.schedule.stage_rank[s + 1] != r else 0)
                    for n_c, i_c, d_c, o_c, s in zip(counts, split, done, sent, mine)) + transient[mine[k]] <= cap

    def _tied(self, s: int):
        """Bytes counted twice when tied layers share stage s (cached: one set of variables)."""
        if not hasattr(self, "_tied_cache"):
            self._tied_cache = {}
        if s in self._tied_cache:
            return self._tied_cache[s]
        out = 0
        for members, nbytes in self.b.t._tied:
            for a, c in zip(members, members[1:]):
                w = pulp.LpVariable(f"tied_{a}_{c}_{s}", lowBound=0, upBound=1)
                self.prob += w <= self.x[a, s]
                self.prob += w <= self.x[c, s]
                out = out + nbytes * w
        self._tied_cache[s] = out
        return out

    def exclude(self, seg: list[Segment]) -> None:
        """A no-good cut: the next solution differs from ``seg`` in some cut or recomputation."""
        bounds = [sg.start for sg in seg] + [self.n]
        terms = []
        for s in range(self.S):
            for l in range(self.n):
                inside = l < bounds[s + 1]
                terms.append(1 - self.y[l, s] if inside else self.y[l, s])
        if self.mode in ("auto", "selective"):
            for s, sg in enumerate(seg):
                if self.mode == "auto":
                    terms.append(1 - self.c[s] if sg.recompute == "full" else self.c[s])
                else:
                    for l in range(sg.start, sg.stop):
                        terms.append(1 - self.u[l, s] if l in sg.recompute_layers else self.u[l, s])
        self.prob += pulp.lpSum(terms) >= 1

    def solve(self, time_limit: float) -> IlpSolution:
        fd, log = tempfile.mkstemp(suffix=".log")
        os.close(fd)
        try:
            solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=max(1, int(time_limit)), logPath=log)
            self.prob.solve(solver)
            text = open(log, encoding="utf-8", errors="replace").read()
        finally:
            os.unlink(log)
        status = pulp.LpStatus[self.prob.status]
        if self.prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            return IlpSolution(np.inf, _bound(text, np.inf), None, status)
        objective = float(pulp.value(self.tau))
        proven = self.prob.sol_status == pulp.LpSolutionOptimal
        return IlpSolution(objective, objective if proven else _bound(text, 0.0), self._segments(), status)

    def _segments(self) -> list[Segment]:
        n, S = self.n, self.S
        starts = [0]
        for s in range(S - 1):
            count = sum(round(pulp.value(self.y[l, s])) for l in range(n))
            starts.append(count)
        ends = starts[1:] + [n]
        out = []
        for s, (a, z) in enumerate(zip(starts, ends)):
            if self.mode == "selective":
                chosen = tuple(l for l in range(a, z) if round(pulp.value(self.u[l, s]) or 0) == 1)
                out.append(Segment(a, z, "selective" if chosen else "none", chosen))
            elif self.mode == "auto":
                out.append(Segment(a, z, "full" if round(pulp.value(self.c[s])) == 1 else "none"))
            else:
                out.append(Segment(a, z, self.mode))  # type: ignore[arg-type]
        return out


def _bound(log: str, default: float) -> float:
    """CBC's proven lower bound from its log ("Lower bound:" or "best possible")."""
    for pattern in (r"Lower bound:\s*([-+0-9.eE]+)", r"best possible\s*([-+0-9.eE]+)"):
        found = re.findall(pattern, log)
        if found:
            try:
                return float(found[-1])
            except ValueError:
                pass
    return default


def ilp_partition(b: StageBounds, mode: str = "auto", time_limit: float = 30.0) -> IlpSolution:
    """The partition (and recomputation) minimising the stage bound, with CBC's proven bound."""
    return _Model(b, mode).solve(time_limit)


def solve_ilp(b: StageBounds, evaluate: Evaluator, mode: str = "auto", *, time_limit: float = 30.0,
              rounds: int = 50, stop_at: float = np.inf) -> tuple[InnerResult, IlpSolution]:
    """Best partition by simulated step time: the ILP's, then further solutions excluded one by
    one until the program's bound reaches the best simulated time (or ``stop_at``, a time
    already achieved elsewhere)."""
    model = _Model(b, mode)
    deadline = time.perf_counter() + time_limit
    if np.isfinite(stop_at):
        model.prob += model.tau <= stop_at
    first = model.solve(time_limit)
    if first.segments is None:
        infeasible = first.status == "Infeasible"
        bound = stop_at if infeasible and np.isfinite(stop_at) else first.bound
        return InnerResult(bound, None, np.inf, proven=infeasible), first
    best_step, best_seg, best_payload = np.inf, None, None
    sol = first
    proven = False
    evaluations = 0
    for _ in range(rounds):
        step, fits, payload = evaluate(sol.segments)
        evaluations += 1
        if fits and step < best_step:
            best_step, best_seg, best_payload = step, sol.segments, payload
        model.exclude(sol.segments)
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            break
        if np.isfinite(best_step):
            model.prob += model.tau <= best_step * (1 - 1e-9)
        sol = model.solve(remaining)
        if sol.segments is None:
            proven = sol.status == "Infeasible"
            break
        if sol.gap == 0 and sol.objective >= best_step * (1 - 1e-9):
            proven = True
            break
    lower = best_step if proven else first.bound
    return InnerResult(lower, best_seg, best_step, proven=proven, evaluations=evaluations,
                       payload=best_payload), first
