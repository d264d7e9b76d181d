"""A memory-aware lower bound on the step time of a whole configuration, whatever its partition.

For every partition and recomputation choice, each rank r

* starts its first action (a forward of stage s0) no earlier than that micro-batch's forward
  through every earlier stage (``head``, as ``bounds.py`` has it per stage);
* then computes every micro-batch's forward and backward of its layers (the forward twice where
  it recomputes), one action at a time, and after its last action all-reduces its gradients and
  steps its optimizer, so the step is at least
  ``head_r + m * work_r / speed_r + m * collectives_r + allreduce_r + optimizer_r`` (the
  simulator's step rule; the tensor-parallel collectives inside the work run at the link's speed,
  not the device's);
* ends its last backward (or input gradient) of some stage s_l, with only weight gradients after
  it, before that micro-batch's backward crosses every stage below s_l (``tail``): the step is
  also at least ``head_r`` + the rank's work up to that action + ``tail_r``;
* holds, at each of its states (``simulate.memory_states``), its weights, gradients and optimizer
  state, per own stage the activations of as many micro-batches as that state counts and the
  weight-gradient inputs of those between I and W, and at least the smallest inter-stage tensor
  for every receive buffer (one per micro-batch and stage boundary), input gradient kept and
  output being sent, with the first stage's inputs and the last one's targets, within its usable
  memory.

Every stage holds at least one layer. Letting every layer be split in any fractions over any
stages turns this into a linear program whose optimum is a lower bound on the step: the search
uses it for ranks holding several stages (interleaved, V), where the per-stage bounds of
``bounds.py`` cannot see that memory forces recomputation. Layers of similar cost share a class
priced at its members' smallest costs, which keeps the program small and only lowers the bound.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from planner.schedules import Kind, Schedule
from planner.simulate import memory_states
from planner.solve.bounds import FULL, StageBounds

BIN = 1.1  # costs within 10% of each other share a class
GiB = 2**30


@dataclass(frozen=True)
class _Classes:
    """Per class of similar layers, its members' smallest costs (compute at speed 1, the
    tensor-parallel collectives apart), and its size."""

    f: np.ndarray  # forward compute
    b: np.ndarray  # whole backward compute
    bi: np.ndarray  # input-gradient compute
    bw: np.ndarray  # weight-gradient compute
    act: np.ndarray  # bytes saved per micro-batch
    prod: np.ndarray  # bytes produced per micro-batch (what a recomputed stage keeps)
    params: np.ndarray  # parameter bytes (a tied weight once)
    comm: np.ndarray  # tensor-parallel collectives, one in each forward and backward
    wgrad: np.ndarray  # weight-gradient inputs held from I to W
    count: np.ndarray


@dataclass(frozen=True)
class _Row:
    """One constraint of the program over y[k, s, c], the layers of class k on stage s with
    recomputation choice c: ``const + sum coef * y[k, stages, c]``, plus the forward prefix of
    every stage before ``head`` and the backward prefix of every stage before ``tail``. A step
    row (``limit`` None) is at most the step; a memory row (in GiB) at most ``limit``."""

    stages: list[int]
    coef: np.ndarray  # (classes, len(stages), choices)
    const: float
    head: int = 0
    tail: int = 0
    limit: float | None = None


def fluid_bound(b: StageBounds, floor: float = 0.0, time_limit: float = 5.0) -> float:
    """The larger of ``floor`` (a lower bound known already) and the least step time of the
    relaxed program; inf where no fraction of the layers fits. Where the solver does not finish
    the program gives no bound (``floor``). The program is not solved where one of its feasible
    points already costs no more than ``floor``: its optimum cannot raise the bound then."""
    return Program(b, time_limit).bound(floor)


class Program:
    """One configuration's relaxed program, built once and solved only where its optimum can
    matter (then once)."""

    def __init__(self, b: StageBounds, time_limit: float = 5.0):
        self.b, self.time_limit = b, time_limit
        self.classes = _classes(b)
        self.rows = _rows(b, self.classes)
        self.spread, self.feasible = _spread(b, self.classes, self.rows)  # a feasible point's step
        self._optimum: float | None = None

    def bound(self, floor: float, reach: float = -math.inf) -> float:
        """``fluid_bound``: max(floor, the optimum). With ``reach``, only where the optimum could
        reach it: where a feasible point costs less, ``floor`` is returned unsolved (a lower bound
        still, which cannot reach ``reach`` either)."""
        if self.feasible and self.spread <= max(floor, reach * (1 - 1e-12)):
            return floor
        if self._optimum is None:
            self._optimum = _solve(self.b, self.classes, self.rows, self.time_limit)
        return max(floor, self._optimum)


def _options(b: StageBounds) -> tuple[int, ...]:
    return b.policy.options()


def _recomputes(b: StageBounds) -> np.ndarray:
    """Per recomputation choice the policy allows, 1.0 where it recomputes the stage."""
    return np.array([c == FULL for c in _options(b)], dtype=float)


def _durations(b: StageBounds, cls: _Classes, speed: float) -> dict[Kind, np.ndarray]:
    """Seconds of one F, B, I and W action per layer of each class and choice on a device of
    ``speed`` (``CostTable.times``, ``stage_cost``): a recomputed layer's forward runs again in
    its backward, collectives included; a split schedule runs a recomputing stage's whole
    backward in I and leaves its W empty. Each (classes, choices)."""
    rec = _recomputes(b)[None, :]
    f, bw, comm = cls.f[:, None], cls.bw[:, None], cls.comm[:, None]
    split = 1.0 if b.split else 0.0
    return {Kind.FORWARD: f / speed + comm + 0 * rec,
            Kind.FULL_BACKWARD: (cls.b[:, None] + rec * f) / speed + comm * (1 + rec),
            Kind.BACKWARD_INPUT: (cls.bi[:, None] + rec * (f + split * bw)) / speed + comm * (1 + rec),
            Kind.BACKWARD_WEIGHT: bw / speed * (1 - split * rec)}


def _chains(b: StageBounds, cls: _Classes) -> tuple[np.ndarray, np.ndarray]:
    """(forward, backward) seconds per layer of each class and choice on the fastest rank as one
    micro-batch crosses a stage; backward: the whole one, or where split the cheaper of it and
    the input gradient."""
    at = _durations(b, cls, b.vmax)
    back = at[Kind.FULL_BACKWARD]
    if b.split:
        back = np.minimum(back, at[Kind.BACKWARD_INPUT])
    return at[Kind.FORWARD], back


def _rows(b: StageBounds, cls: _Classes) -> list[_Row]:
    """The program's step and memory rows, rank by rank."""
    sched = b.schedule
    held = np.where(_recomputes(b) > 0, cls.prod[:, None], cls.act[:, None])  # (classes, choices)
    cmin = float(b.t.cut[1:-1].min()) if b.n > 1 else 0.0  # every stage boundary is inside the model
    rows: list[_Row] = []
    for r, states in enumerate(memory_states(sched)):
        mine = sched.stages_of(r)
        speed = b.speed[mine[0]]
        per_byte = b.ar[mine[0]][0] + b.opt_per_byte / speed  # all-reduce and optimizer
        overheads = 2 * b.m * len(mine) * b.ranks[r].overhead_s  # an F and a backward each
        at = _durations(b, cls, speed)  # the backward priced as the cheaper of whole and split: any schedule's
        backward = np.minimum(at[Kind.FULL_BACKWARD], at[Kind.BACKWARD_INPUT] + at[Kind.BACKWARD_WEIGHT])
        work = b.m * (at[Kind.FORWARD] + backward) + (cls.params * per_byte)[:, None]
        first = sched.ranks[r][0]
        s0 = first.stage if first.kind == Kind.FORWARD else 0
        rows.append(_Row(mine, np.repeat(work[:, None, :], len(mine), axis=1),
                         overheads + b.hops[s0] * b.lat, head=s0))
        tail = _tail_row(b, sched, r, mine, at, s0)
        if tail is not None:
            rows.append(tail)
        room = float(b.cap[mine[0]] - b.t.workspace)
        fixed = sum(b.m * cmin * ((s > 0) + (s < b.S - 1)) for s in mine)  # receive buffers
        fixed += (b.m * b.t.input_batch if 0 in mine else 0.0) + (b.m * b.t.target_batch if b.S - 1 in mine else 0.0)
        v = len(mine)
        for state in _fullest_states(states, v):
            running, counts = mine[int(state[0])], state[1:]
            kept, between = counts[:v], counts[v: 2 * v]
            done, sent = counts[2 * v: 3 * v], counts[3 * v:]
            extra = fixed + cmin * (running > 0)  # the running action's input gradient being sent
            for q, s in enumerate(mine):
                remote = s + 1 < b.S and sched.stage_rank[s + 1] != r
                extra += cmin * (done[q] * (s > 0) + sent[q] * remote)
            coef = ((cls.params * b.bpp)[:, None, None] + kept[None, :, None] * held[:, None, :]
                    + between[None, :, None] * cls.wgrad[:, None, None])
            rows.append(_Row(mine, coef / GiB, extra / GiB, limit=room / GiB))
    return rows


def _tail_row(b: StageBounds, sched: Schedule, r: int, mine: list[int], at: dict[Kind, np.ndarray],
              s0: int) -> _Row | None:
    """Rank r's actions (``at``: their durations there) up to its last backward (or input
    gradient), one after another from its first, then that micro-batch's backward through every
    earlier stage; None without one."""
    found = _up_to_last_backward(sched)[r]
    if found is None:
        return None
    counts, last, n_actions = found
    coef = sum(counts[None, :, kind.slot, None] * at[kind][:, None, :] for kind in Kind)
    const = n_actions * b.ranks[r].overhead_s + (b.hops[s0] + b.hops[last]) * b.lat
    return _Row(mine, np.asarray(coef), const, head=s0, tail=last)


@lru_cache(maxsize=512)
def _up_to_last_backward(sched: Schedule) -> list[tuple[np.ndarray, int, int] | None]:
    """Per rank, for its actions up to its last B or I: how many of each kind (F, B, I, W) each
    own stage runs, that action's stage and the number of actions; None without a backward."""
    out: list[tuple[np.ndarray, int, int] | None] = []
    for r, actions in enumerate(sched.ranks):
        where = {s: q for q, s in enumerate(sched.stages_of(r))}
        last = next((k for k in range(len(actions) - 1, -1, -1)
                     if actions[k].kind in (Kind.FULL_BACKWARD, Kind.BACKWARD_INPUT)), None)
        if last is None:
            out.append(None)
            continue
        counts = np.zeros((len(where), 4))
        for (kind, stage), n in Counter((a.kind, a.stage) for a in actions[: last + 1]).items():
            counts[where[stage], kind.slot] = n
        out.append((counts, actions[last].stage, last + 1))
    return out


def _solve(b: StageBounds, classes: _Classes, rows: list[_Row], time_limit: float) -> float:
    import pulp  # only when a search needs it: planner starts faster without

    options = _options(b)
    K, S, C = len(classes.count), b.S, len(options)
    prob = pulp.LpProblem("fluid", pulp.LpMinimize)
    step = pulp.LpVariable("step", lowBound=0)
    prob += step
    y = [[[pulp.LpVariable(f"y_{k}_{s}_{c}", lowBound=0) for c in range(C)] for s in range(S)] for k in range(K)]
    for k in range(K):
        prob += pulp.lpSum(y[k][s][c] for s in range(S) for c in range(C)) == float(classes.count[k])
    for s in range(S):  # no stage is empty
        prob += pulp.lpSum(y[k][s][c] for k in range(K) for c in range(C)) >= 1
    forward, backward = _chains(b, classes)
    heads = _prefixes(pulp, prob, y, forward, max(row.head for row in rows), "head")
    tails = _prefixes(pulp, prob, y, backward, max(row.tail for row in rows), "tail")
    for row in rows:
        expr = pulp.LpAffineExpression([(y[k][s][c], float(row.coef[k, q, c]))
                                        for k in range(K) for q, s in enumerate(row.stages) for c in range(C)
                                        if row.coef[k, q, c]], constant=row.const)
        if row.head:
            expr += heads[row.head]
        if row.tail:
            expr += tails[row.tail]
        prob += (expr <= row.limit) if row.limit is not None else (step >= expr)
    prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit))
    status = pulp.LpStatus[prob.status]
    if status == "Infeasible":
        return math.inf
    if status != "Optimal":
        return 0.0
    return float(pulp.value(step)) * (1 - 1e-6)  # the solver's tolerance


def _prefixes(pulp: Any, prob: Any, y: list[list[list[Any]]], per_layer: np.ndarray, upto: int,
              name: str) -> list[Any]:
    """Variables p[j] (j = 1..upto) equal to the seconds one micro-batch spends crossing stages
    0..j-1 at ``per_layer`` seconds per layer of each class and choice."""
    K, C = per_layer.shape
    out = [None]
    for j in range(1, upto + 1):
        p = pulp.LpVariable(f"{name}_{j}", lowBound=0)
        terms = [(y[k][j - 1][c], float(per_layer[k, c])) for k in range(K) for c in range(C) if per_layer[k, c]]
        prob += p == pulp.LpAffineExpression(terms) + (out[-1] if j > 1 else 0)
        out.append(p)
    return out


def _spread(b: StageBounds, classes: _Classes, rows: list[_Row]) -> tuple[float, bool]:
    """Every class spread evenly over the stages with the policy's first choice (no
    recomputation, unless only full is allowed): the step the program's rows give it, and whether
    it is a feasible point of the program (then the optimum is no higher than that step). The
    memory rows keep a margin of 1e-9 for the solver's rounding."""
    if classes.count.sum() < b.S:
        return math.inf, False
    share = classes.count / b.S  # of each class, on every stage: n / S >= 1 layers each
    forward, backward = (float(x[:, 0] @ share) for x in _chains(b, classes))
    step, feasible = 0.0, True
    for row in rows:
        value = row.const + float(share @ row.coef[:, :, 0].sum(axis=1)) + row.head * forward + row.tail * backward
        if row.limit is None:
            step = max(step, value)
        elif value > row.limit * (1 - 1e-9):
            feasible = False
    return step, feasible


def _classes(b: StageBounds) -> _Classes:
    """Layers whose costs are within ``BIN`` of each other in every respect share a class."""
    t = b.t
    params = t.params.copy()
    for members, nbytes in t._tied:  # a tied weight counts once, wherever its copies sit
        params[members[1:]] -= nbytes
    cost = np.stack([t.fwd - t.tp_comm, t.bwd - t.tp_comm, t.bwd_input - t.tp_comm, t.bwd_weight, t.act,
                     np.diff(t.PRODUCED), np.maximum(params, 0.0), t.tp_comm, t.wgrad], axis=1)  # _Classes' order
    keys = np.where(cost > 0, np.floor(np.log(np.maximum(cost, 1e-300)) / math.log(BIN)), -10**6)
    _, label = np.unique(keys, axis=0, return_inverse=True)
    label = label.ravel()
    n = label.max() + 1
    least = np.full((n, cost.shape[1]), np.inf)
    np.minimum.at(least, label, cost)
    f, whole, bi, bw, act, prod, weights, comm, wgrad = (least[:, k] for k in range(9))
    return _Classes(f=f, b=whole, bi=bi, bw=bw, act=act, prod=prod, params=weights, comm=comm, wgrad=wgrad,
                    count=np.bincount(label, minlength=n))


def _fullest_states(states: np.ndarray, v: int) -> list[np.ndarray]:
    """A few of a rank's states (``memory_states`` rows): the one holding the most in all, and
    for each own stage the one holding the most there."""
    held = states[:, 1: 1 + v]
    total = held.sum(axis=1)
    picks = {int(total.argmax())}
    for k in range(v):
        picks.add(int(np.lexsort((total, held[:, k]))[-1]))
    return [states[p] for p in sorted(picks)]
