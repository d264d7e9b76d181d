"""The partitioning problem as an integer linear program (PuLP with CBC), for what the DP does
not cover: recomputation chosen per layer together with the cuts, and stages of one rank that
must fit its memory together (interleaved and V schedules).

Variables: ``y[i, s] = 1`` when layer i sits in stage s or earlier, so stage s holds
``x[i, s] = y[i, s] - y[i, s-1]`` and starts at layer i when ``y[i-1, s-1] - y[i, s-1] = 1``.
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
from itertools import pairwise
from typing import NamedTuple, TypeAlias

import numpy as np
import pulp

from planner.cost import Segment
from planner.errors import InputError
from planner.graph import Tensor
from planner.simulate import memory_states, rank_undominated
from planner.solve.bounds import StageBounds
from planner.solve.exact import Evaluator, InnerResult

# Memory rows are written in GiB: with byte coefficients (1e9) beside binaries and seconds, CBC's
# preprocessing was seen to return a worse solution as "Optimal" (the fluid bound scales the same
# way). CBC's feasibility tolerance (1e-7) is then about 100 bytes: a plan it lets through that
# overshoots by less is still refused by the simulator, which checks the exact bytes.
GIB = float(2**30)

MODES = ("none", "full", "auto", "selective")
Expr: TypeAlias = pulp.LpAffineExpression | pulp.LpVariable | float | int  # a linear term


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


class _StageTime(NamedTuple):
    """Stage s's terms of the bound, in seconds (``params`` in bytes), as the rank rows need them."""

    work: Expr  # m * (forward + backward)
    after: Expr  # gradient all-reduce and optimizer step
    edges: Expr  # head + tail
    params: Expr


class _Model:
    """The program for one configuration: cuts, recomputation, time bound, memory, in that order."""

    def __init__(self, b: StageBounds, mode: str):
        if mode not in MODES:
            raise InputError(f"unknown recomputation mode {mode!r}")
        self.b, self.mode = b, mode
        self.n, self.S = b.n, b.S
        self.prob = pulp.LpProblem("planner_partition", pulp.LpMinimize)
        self.y = self._nested_stages()
        self.x = {(i, s): self.y[i, s] - self._upto(i, s - 1) for i in range(self.n) for s in range(self.S)}
        self._no_empty_stage()
        self.cut_in = self._received_bytes()
        self.cut_out = [self.cut_in[s + 1] if s + 1 < self.S else 0 for s in range(self.S)]
        self.u, self.c = self._recomputation()
        self.tau = pulp.LpVariable("tau", lowBound=0)
        self.prob += self.tau
        stages = [self._stage_time(s) for s in range(self.S)]
        if not b.one_chunk and not b.schedule.stream:
            self._rank_time(stages)
        self._memory([st.params for st in stages])

    # ---------------------------------------------------------------- cuts

    def _nested_stages(self) -> dict[tuple[int, int], pulp.LpVariable]:
        """y[i, s] = 1 when layer i sits in stage s or earlier: monotone in s (the last stage
        holds the rest) and in i (stages are contiguous), layer 0 in stage 0."""
        n, S = self.n, self.S
        y = {(i, s): pulp.LpVariable(f"y_{i}_{s}", cat="Binary") for i in range(n) for s in range(S)}
        for i in range(n):
            self.prob += y[i, S - 1] == 1
            for s in range(S - 1):
                self.prob += y[i, s] <= y[i, s + 1]
        for s in range(S):
            for i in range(n - 1):
                self.prob += y[i + 1, s] <= y[i, s]
        self.prob += y[0, 0] == 1
        return y

    def _upto(self, i: int, s: int) -> Expr:
        """y[i, s], with no stage before the first and every stage holding layers before 0."""
        return 0 if s < 0 else (1 if i < 0 else self.y[i, s])

    def _no_empty_stage(self) -> None:
        for s in range(self.S):
            self.prob += pulp.lpSum(self.x[i, s] for i in range(self.n)) >= 1

    def _starts_at(self, i: int, s: int) -> Expr:
        """1 when stage s begins at layer i."""
        if s == 0:
            return 1 if i == 0 else 0
        return self._upto(i - 1, s - 1) - self._upto(i, s - 1)

    def _received_bytes(self) -> list[Expr]:
        """Per stage, the bytes per micro-batch crossing the cut before it."""
        cut = self.b.t.cut
        return [pulp.lpSum(float(cut[i]) * self._starts_at(i, s) for i in range(1, self.n)) if s else 0
                for s in range(self.S)]

    # ---------------------------------------------------------------- recomputation

    def _recomputation(self) -> tuple[dict[tuple[int, int], Expr], dict[int, pulp.LpVariable]]:
        """u[i, s] = 1 when layer i is in stage s and recomputed; c[s] the per-stage choice (auto)."""
        if self.mode == "selective":
            u: dict[tuple[int, int], Expr] = {
                (i, s): pulp.LpVariable(f"r_{i}_{s}", cat="Binary") for i in range(self.n) for s in range(self.S)}
            for key in u:
                self.prob += u[key] <= self.x[key]
            return u, {}
        if self.mode == "none":
            return {key: 0 for key in self.x}, {}
        if self.mode == "full":
            return dict(self.x), {}
        return self._whole_stage_choice()

    def _whole_stage_choice(self) -> tuple[dict[tuple[int, int], Expr], dict[int, pulp.LpVariable]]:
        """auto: one choice per stage, u = x * c, linearised."""
        c = {s: pulp.LpVariable(f"c_{s}", cat="Binary") for s in range(self.S)}
        u: dict[tuple[int, int], Expr] = {}
        for (i, s) in self.x:
            v = pulp.LpVariable(f"u_{i}_{s}", lowBound=0, upBound=1)
            self.prob += v <= self.x[i, s]
            self.prob += v <= c[s]
            self.prob += v >= self.x[i, s] + c[s] - 1
            u[i, s] = v
        return u, c

    # ---------------------------------------------------------------- time (bounds.py, term by term)

    def _at(self, per_layer: np.ndarray, speed: float) -> np.ndarray:
        """Per layer, its seconds on a rank of that speed: the compute divided, the tensor-parallel
        collectives in every pass but the weight gradient's not (``CostTable.times``)."""
        t = self.b.t
        comm = 0.0 if per_layer is t.bwd_weight else t.tp_comm
        out: np.ndarray = (per_layer - comm) / speed + comm
        return out

    def _prefix_time(self, per_layer: np.ndarray, s: int) -> Expr:
        """Seconds the layers before stage s take on the fastest rank, plus the links crossed."""
        b = self.b
        per_layer = self._at(per_layer, b.vmax)
        return pulp.lpSum(float(per_layer[i]) * self._upto(i, s - 1) for i in range(self.n)) \
            + int(b.hops[s]) * b.lat

    def _own(self, per_layer: np.ndarray, s: int, which: dict[tuple[int, int], Expr] | None = None) -> Expr:
        """Seconds stage s spends on the layers it holds (or on those ``which`` marks)."""
        which = self.x if which is None else which
        per_layer = self._at(per_layer, self.b.speed[s])
        return pulp.lpSum(float(per_layer[i]) * which[i, s] for i in range(self.n))

    def _backward(self) -> np.ndarray:
        t = self.b.t
        return t.bwd_input + t.bwd_weight if self.b.split else t.bwd

    def _stage_time(self, s: int) -> _StageTime:
        """The rows tau >= g_s of ``StageBounds.bound`` for stage s."""
        b, t = self.b, self.b.t
        f_s = self._own(t.fwd, s)
        rec = self._own(t.fwd, s, self.u) if self.mode != "none" else 0
        b_s = self._own(self._backward(), s) + rec
        work = b.m * (f_s + b_s)
        params = pulp.lpSum(float(t.params[i]) * self.x[i, s] for i in range(self.n)) - self._tied(s)
        after = self._after(s, params)
        if b.schedule.stream:  # steady state: no fill or drain
            self.prob += self.tau >= work + after
            return _StageTime(work, after, 0, params)
        head = self._prefix_time(t.fwd, s) if s else 0
        tail = 0 if b.split or s == 0 else self._prefix_time(self._backward(), s)
        own_after: Expr = 0  # as in StageBounds.bound: the drain after the last I
        last: Expr = tail
        if b.split and s:
            last = self._prefix_time(t.bwd_input, s)
            own_after = b.w_after[s] * self._own(t.bwd_weight, s)
        gap = self._fill_gap(s, f_s, b_s) if b.one_chunk else 0
        self.prob += self.tau >= head + work - own_after + gap + last
        self.prob += self.tau >= head + work + gap + after
        return _StageTime(work, after, head + tail, params)

    def _after(self, s: int, params: Expr) -> Expr:
        """All-reduce (a * bytes + c, c only for a stage with parameters) and optimizer step."""
        b = self.b
        a, const = b.ar[s]
        has = pulp.LpVariable(f"has_params_{s}", cat="Binary")
        self.prob += params * (1 / GIB) <= float(b.t.PARAMS[-1] + 1) / GIB * has
        return a * params + const * has + b.opt_per_byte / b.speed[s] * params

    def _fill_gap(self, s: int, f_s: Expr, b_s: Expr) -> Expr:
        """One stage per rank: the wait for the first micro-batch to cross the later layers and
        come back, less the k - 1 forwards run meanwhile; and again after the last forward."""
        b, t = self.b, self.b.t
        back = t.bwd_input if b.split else self._backward()
        both = self._at(t.fwd, b.vmax) + self._at(back, b.vmax)
        rest = pulp.lpSum(float(both[i]) * (1 - self._upto(i, s)) for i in range(self.n)) \
            + 2 * (self.S - 1 - s) * b.lat
        if b.flush_all:
            return rest
        gap = pulp.LpVariable(f"gap_{s}", lowBound=0)
        self.prob += gap >= rest - (b.k[s] - 1) * f_s
        if b.m <= b.k[s]:
            return gap
        drain = pulp.LpVariable(f"drain_{s}", lowBound=0)
        self.prob += drain >= rest - (b.k[s] - 1) * b_s
        return gap + drain

    def _rank_time(self, stages: list[_StageTime]) -> None:
        """A rank holding several stages runs all their work, after its first stage's head and
        tail, and before all their all-reduces."""
        for r in range(self.b.schedule.pp):
            mine = self.b.schedule.stages_of(r)
            work = pulp.lpSum(stages[s].work for s in mine)
            self.prob += self.tau >= stages[mine[0]].edges + work
            self.prob += self.tau >= work + pulp.lpSum(stages[s].after for s in mine)

    def _tied(self, s: int) -> Expr:
        """Bytes counted twice when tied layers share stage s: w may reach 1 only when both members of
        a consecutive pair are in s."""
        out: Expr = 0
        for members, nbytes in self.b.t._tied:
            for a, c in pairwise(members):
                w = pulp.LpVariable(f"tied_{a}_{c}_{s}", lowBound=0, upBound=1)
                self.prob += w <= self.x[a, s]
                self.prob += w <= self.x[c, s]
                out = out + nbytes * w
        return out

    # ---------------------------------------------------------------- memory (simulate.py's model)

    def _memory(self, params: list[Expr]) -> None:
        held, wgrads, transient, static = [], [], [], []
        for s in range(self.S):  # stage by stage, each stage's rows together
            held.append(self._held(s))
            transient.append(self._transient(s, params[s]))
            static.append(self._static(s, params[s]))
            wgrads.append(pulp.lpSum(float(self.b.t.wgrad[i]) * self.x[i, s] for i in range(self.n)))
        for r, states in enumerate(memory_states(self.b.schedule)):
            self._rank_memory(r, rank_undominated(states).tolist(), held, wgrads, transient, static)

    def _held(self, s: int) -> Expr:
        """Bytes stage s holds per micro-batch in flight."""
        t = self.b.t
        held: Expr = pulp.lpSum(float(t.act[i]) * (self.x[i, s] - self.u[i, s]) for i in range(self.n))
        tensors = [tt for tt in t.graph.tensors if tt.producer >= 0]
        for k, tensor in enumerate(tensors):
            nbytes = float(tensor.bytes_per_sample * t.mbs)
            held += nbytes * self._tensor_held(k, tensor, s)
            if self.mode != "selective":  # a recomputed layer keeps its output
                held += nbytes * self.u[tensor.producer, s]
        if self.mode == "selective":
            held += pulp.lpSum(float(t.in_bytes[i]) * self.u[i, s] for i in range(self.n))
        return held

    def _alive_after_stage(self, k: int, tensor: Tensor, s: int, dropped: Expr) -> Expr:
        """1 when stage s produces the tensor, a later stage reads it, and it is not ``dropped``."""
        h = pulp.LpVariable(f"h_{k}_{s}", lowBound=0)
        self.prob += h >= self.x[tensor.producer, s] - self._upto(tensor.last_consumer, s) - dropped
        return h

    def _tensor_held(self, k: int, tensor: Tensor, s: int) -> Expr:
        """How much of one tensor stage s holds for backward (0 to 1): a saved one (or the
        model's output) while its producer keeps its activations, any other while a later stage
        still reads it."""
        p = tensor.producer
        kept = tensor.saved or tensor.last_consumer >= self.n
        if self.mode == "selective":
            return self.x[p, s] if kept else self._alive_after_stage(k, tensor, s, 0)
        if kept:
            return self.x[p, s] - self.u[p, s]
        dropped = self.c[s] if self.mode == "auto" else (1 if self.mode == "full" else 0)
        return self._alive_after_stage(k, tensor, s, dropped)

    def _transient(self, s: int, params: Expr) -> Expr:
        """The largest one-layer workspace of stage s (a recomputed layer's activations included),
        the input gradient it sends back and the runtime's workspace, and ZeRO 3's gather buffer,
        the stage's weights (``CostTable.transient_bytes``)."""
        t = self.b.t
        tr = pulp.LpVariable(f"transient_gib_{s}", lowBound=0)
        for i in range(self.n):
            self.prob += tr >= float(t.peak[i]) / GIB * self.x[i, s]
            if self.mode != "none":
                self.prob += tr >= float(t.act[i] + t.peak[i]) / GIB * self.u[i, s]
        shared = self._shared_grad(s)
        gather = params if self.b.dps[s].regathers else 0
        return GIB * tr + shared + self.cut_in[s] + gather + t.workspace

    def _shared_grad(self, s: int) -> Expr:
        """The gradient sums of weights reused inside stage s (``CostTable.shared_grad``): a tied
        group's bytes once two consecutive members a < c are both in s (w_g >= x_a + x_c - 1),
        less, with one group, the saved bytes of the stage's layers from c on that are not
        recomputed (for the group's last pair in s that is the cost model's credit; an earlier
        pair's is larger, so its row is looser)."""
        t = self.b.t
        groups = t._tied
        total = pulp.LpVariable(f"shared_{s}", lowBound=0)
        if len(groups) == 1:
            members, nbytes = groups[0]
            for a, c in pairwise(members):
                kept = pulp.lpSum(float(t.act[k]) * (self.x[k, s] - self.u[k, s]) for k in range(c, self.n))
                self.prob += total >= nbytes * (self.x[a, s] + self.x[c, s] - 1) - kept
            return total
        out: Expr = 0
        for g, (members, nbytes) in enumerate(groups):
            w = pulp.LpVariable(f"shared_{g}_{s}", lowBound=0, upBound=1)
            for a, c in pairwise(members):
                self.prob += w >= self.x[a, s] + self.x[c, s] - 1
            out = out + nbytes * w
        return total + out

    def _static(self, s: int, params: Expr) -> Expr:
        """Weights, gradients (whole ones at tp: CostTable.grad_extra), optimizer state, stashed
        versions, receive buffers and the batch."""
        b, t = self.b, self.b.t
        out = params * (b.bpp + b.versions[s] - 1) + b.m * (self.cut_in[s] + self.cut_out[s])
        out = out + pulp.lpSum(float(t.grad_extra[i]) * self.x[i, s] for i in range(self.n) if t.grad_extra[i])
        batch = (b.m * t.input_batch if s == 0 else 0) + (b.m * t.target_batch if s == self.S - 1 else 0)
        return out + batch

    def _rank_memory(self, r: int, states: list[list[int]], held: list[Expr], wgrads: list[Expr],
                     transient: list[Expr], static: list[Expr]) -> None:
        """Rank r fits its memory at every undominated state of its action list."""
        b = self.b
        mine = b.schedule.stages_of(r)
        v = len(mine)
        cap = min(b.cap[s] for s in mine)
        base = pulp.lpSum(static[s] for s in mine)
        for state in states:
            k, counts, split, done, sent = state[0], *(state[1 + q * v: 1 + (q + 1) * v] for q in range(4))
            in_flight = pulp.lpSum(
                n_c * held[s] + i_c * wgrads[s] + d_c * self.cut_in[s]
                + (o_c * self.cut_out[s] if s + 1 < self.S and b.schedule.stage_rank[s + 1] != r else 0)
                for n_c, i_c, d_c, o_c, s in zip(counts, split, done, sent, mine, strict=True))
            self.prob += (base + in_flight + transient[mine[k]]) * (1 / GIB) <= cap / GIB

    def exclude(self, seg: list[Segment]) -> None:
        """A no-good cut: the next solution differs from ``seg`` in some cut or recomputation."""
        bounds = [sg.start for sg in seg] + [self.n]
        terms: list[Expr] = []
        for s in range(self.S):
            for i in range(self.n):
                terms.append(1 - self.y[i, s] if i < bounds[s + 1] else self.y[i, s])
        for s, sg in enumerate(seg):
            if self.mode == "auto":
                terms.append(1 - self.c[s] if sg.recompute == "full" else self.c[s])
            elif self.mode == "selective":
                for i in range(sg.start, sg.stop):
                    terms.append(1 - self.u[i, s] if i in sg.recompute_layers else self.u[i, s])
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
        starts = [0] + [sum(round(pulp.value(self.y[i, s])) for i in range(self.n)) for s in range(self.S - 1)]
        ends = starts[1:] + [self.n]
        out = []
        for s, (a, z) in enumerate(zip(starts, ends, strict=True)):
            if self.mode == "selective":
                chosen = tuple(i for i in range(a, z) if round(pulp.value(self.u[i, s]) or 0) == 1)
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
        assert sol.segments is not None  # the first solution is checked above, each next one below
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
