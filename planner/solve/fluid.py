"""A memory-aware lower bound on the step time of a whole configuration, whatever its partition.

For every partition and recomputation choice, each rank r

* computes every micro-batch's forward and backward of its layers (the forward twice where it
  recomputes), then all-reduces its gradients and steps its optimizer, so the step is at least
  ``m * work_r / speed_r + m * collectives_r + allreduce_r + optimizer_r`` (the simulator's step
  rule; the tensor-parallel collectives inside the work run at the link's speed, not the device's);
* holds, at each of its states, its weights, gradients and optimizer state, plus per own stage
  the activations of as many micro-batches as that state counts (``simulate.memory_states``):
  ``peak_r >= params_r * bytes_per_param + sum_s count_s * held_s``, within its usable memory.

Letting every layer be split in any fractions over any stages turns this into a linear program
whose optimum is a lower bound on the step: the search uses it for ranks holding several stages
(interleaved, V), where the per-stage bounds of ``bounds.py`` cannot see that memory forces
recomputation. Layers of similar cost share a class priced at its members' smallest costs,
which keeps the program small and only lowers the bound.
"""

from __future__ import annotations

import math

import numpy as np

from planner.simulate import memory_states
from planner.solve.bounds import FULL, StageBounds

BIN = 1.1  # costs within 10% of each other share a class
GiB = 2**30


def fluid_bound(b: StageBounds, floor: float = 0.0, time_limit: float = 5.0) -> float:
    """The larger of ``floor`` (a lower bound known already) and the least step time of the
    relaxed program; inf where no fraction of the layers fits. Where the solver does not finish
    the program gives no bound (``floor``). The program is not solved where one of its feasible
    points already costs no more than ``floor``: its optimum cannot raise the bound then."""
    classes = _classes(b)
    if _spread_within(b, classes, floor):
        return floor
    return max(floor, _solve(b, classes, time_limit))


def _solve(b: StageBounds, classes: tuple[np.ndarray, ...], time_limit: float) -> float:
    import pulp  # only when a search needs it: planner starts faster without

    t, sched = b.t, b.schedule
    f, bmin, act, prod, params, comm, count = classes
    options = b.policy.options()
    prob = pulp.LpProblem("fluid", pulp.LpMinimize)
    step = pulp.LpVariable("step", lowBound=0)
    prob += step
    y = {(k, s, c): pulp.LpVariable(f"y_{k}_{s}_{c}", lowBound=0)
         for k in range(len(count)) for s in range(sched.n_stages) for c in options}
    for k in range(len(count)):
        prob += pulp.lpSum(y[k, s, c] for s in range(sched.n_stages) for c in options) == float(count[k])
    for r, states in enumerate(memory_states(sched)):
        mine = sched.stages_of(r)
        speed = b.speed[mine[0]]
        per_byte = b.ar[mine[0]][0] + b.opt_per_byte / speed  # all-reduce and optimizer
        overheads = 2 * b.m * len(mine) * b.ranks[r].overhead_s  # an F and a backward each
        prob += step >= overheads + pulp.lpSum(
            y[k, s, c] * float(b.m * ((f[k] * (2 if c == FULL else 1) + bmin[k]) / speed
                                      + comm[k] * (3 if c == FULL else 2)) + params[k] * per_byte)
            for k in range(len(count)) for s in mine for c in options)
        room = float(b.cap[mine[0]] - t.workspace) / GiB  # memory rows in GiB: better scaled
        for held_counts in _fullest_states(states, len(mine)):
            prob += pulp.lpSum(
                y[k, s, c] * float(params[k] * b.bpp + n * (prod[k] if c == FULL else act[k])) / GiB
                for k in range(len(count)) for s, n in zip(mine, held_counts, strict=True) for c in options) <= room
    prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit))
    status = pulp.LpStatus[prob.status]
    if status == "Infeasible":
        return math.inf
    if status != "Optimal":
        return 0.0
    return float(pulp.value(step)) * (1 - 1e-6)  # the solver's tolerance


def _spread_within(b: StageBounds, classes: tuple[np.ndarray, ...], floor: float) -> bool:
    """Whether one feasible point of the program costs at most ``floor``: every class spread
    evenly over the stages with the policy's first choice (no recomputation, unless only full
    is allowed), checked against the program's own rows (each rank's step and its fullest
    states' memory). The program minimises over its feasible points, so its optimum is then no
    higher than ``floor``. (The memory rows keep a margin of 1e-9 for the solver's rounding.)"""
    f, bmin, act, prod, params, comm, count = classes
    sched = b.schedule
    choice = b.policy.options()[0]
    share = count / sched.n_stages  # of each class, on every stage
    compute = f * (2 if choice == FULL else 1) + bmin
    collectives = comm * (3 if choice == FULL else 2)
    held = prod if choice == FULL else act
    for r, states in enumerate(memory_states(sched)):
        mine = sched.stages_of(r)
        speed = b.speed[mine[0]]
        per_byte = b.ar[mine[0]][0] + b.opt_per_byte / speed
        overheads = 2 * b.m * len(mine) * b.ranks[r].overhead_s
        if overheads + len(mine) * float(share @ (b.m * (compute / speed + collectives) + params * per_byte)) > floor:
            return False
        room = float(b.cap[mine[0]] - b.t.workspace) / GiB
        for counts in _fullest_states(states, len(mine)):
            used = sum(float(share @ (params * b.bpp + n * held)) for n in counts) / GiB
            if used > room * (1 - 1e-9):
                return False
    return True


def _classes(b: StageBounds) -> tuple[np.ndarray, ...]:
    """Per class of similar layers: the smallest forward and backward (the cheaper of whole and
    split) compute, saved and produced bytes, parameter bytes and tensor-parallel collectives (one
    in each forward and backward: ``CostTable._shard``) among its members, and its size."""
    t = b.t
    params = t.params.copy()
    for members, nbytes in t._tied:  # a tied weight counts once, wherever its copies sit
        params[members[1:]] -= nbytes
    cost = np.stack([t.fwd - t.tp_comm, np.minimum(t.bwd, t.bwd_input + t.bwd_weight) - t.tp_comm, t.act,
                     np.diff(t.PRODUCED), np.maximum(params, 0.0), t.tp_comm], axis=1)
    keys = np.where(cost > 0, np.floor(np.log(np.maximum(cost, 1e-300)) / math.log(BIN)), -10**6)
    _, label = np.unique(keys, axis=0, return_inverse=True)
    label = label.ravel()
    n = label.max() + 1
    least = np.full((n, cost.shape[1]), np.inf)
    np.minimum.at(least, label, cost)
    return (*least.T, np.bincount(label, minlength=n))


def _fullest_states(states: np.ndarray, v: int) -> list[tuple[int, ...]]:
    """A few of a rank's states, as per-stage held counts: the one holding the most in all, and
    for each own stage the one holding the most there."""
    held = states[:, 1: 1 + v]
    total = held.sum(axis=1)
    picks = {int(total.argmax())}
    for k in range(v):
        picks.add(int(np.lexsort((total, held[:, k]))[-1]))
    return sorted({tuple(int(x) for x in held[p]) for p in picks})
