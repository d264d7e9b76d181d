"""Run per-rank action lists against stage costs: step time, idle time, memory, timeline.

Each rank executes its list in order. An action starts when its rank is free and its inputs have
arrived: a forward needs the previous stage's forward of the same micro-batch, a backward the
next stage's backward, a weight gradient its own input gradient. A transfer between ranks starts
when its producer finishes and the link is free (one transfer at a time per direction), and
arrives after its bandwidth time plus the link latency; compute and transfers overlap, as they do
with the engine's asynchronous sends. After its last action a rank all-reduces its gradients
across data-parallel replicas and steps its optimizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from planner.errors import ScheduleError
from planner.formats import Collectives, StageCost
from planner.schedules import Action, Kind, Schedule


@dataclass(frozen=True)
class Event:
    rank: int
    action: Action
    start_s: float
    end_s: float


@dataclass(frozen=True)
class Transfer:
    src_rank: int
    dst_rank: int
    kind: str  # "act" (forward output) or "grad" (input gradient)
    stage: int  # the receiving stage
    mb: int
    start_s: float
    end_s: float


@dataclass(frozen=True)
class CutLink:
    """Transfer cost across the cut after stage s: seconds the link is busy, plus latency, plus
    what receiving costs the receiving rank's own thread."""

    busy_s: float = 0.0
    latency_s: float = 0.0
    cpu_s: float = 0.0


@dataclass(frozen=True)
class SimResult:
    step_time_s: float
    compute_s: list[float]  # per rank: F, B, I, W time
    stage_compute_s: list[float]  # per stage: the time of its own actions, overheads included
    tail_s: list[float]  # per rank: gradient all-reduce and optimizer step after the last action
    idle_s: list[float]
    bubble_fraction: float
    peak_memory_bytes: list[int]  # per rank
    events: list[Event]
    transfers: list[Transfer]

    @property
    def bottleneck_rank(self) -> int:
        return max(range(len(self.compute_s)), key=lambda r: self.compute_s[r] + self.tail_s[r])


@dataclass(frozen=True, eq=False)
class Compiled:
    """A schedule as a DAG in one topological order, independent of durations.

    Node n is a compute action (``action[n]`` set) or a transfer between ranks. It starts when
    ``prev[n]`` (the previous action on its rank, or the previous transfer on its link) has
    ended and its data ``dep[n]`` has arrived (a transfer arrives ``latency`` after it ends).
    """

    action: list[Action | None]
    rank: list[int]  # compute: its rank; transfer: the sending rank
    prev: list[int]
    dep: list[int]
    cut: list[int]  # transfer: index of the cut it crosses, else -1
    receiver: list[int]  # transfer: receiving rank, else -1
    kind: list[str]  # transfer: "act" or "grad"; compute: the action kind
    slot: list[int]  # index into the duration table: 4 * stage + (F, B, I, W), or 4 * S + cut
    last: list[int]  # each rank's last action
    receives: list[int]  # compute node: the cut its input crossed, else -1


@lru_cache(maxsize=512)
def compile_schedule(schedule: Schedule) -> Compiled:
    """The DAG of ``schedule``, one node per action in its global order, each action followed by
    the transfer that sends its output to another rank (if any). Built once per schedule (it is
    independent of durations); written as one loop over plain lists, the hottest structural
    step of a search."""
    S, m = schedule.n_stages, schedule.microbatches
    place = schedule.stage_rank
    action: list[Action | None] = []
    rank: list[int] = []
    prev: list[int] = []
    dep: list[int] = []
    cut: list[int] = []
    receiver: list[int] = []
    kind: list[str] = []
    slot: list[int] = []
    receives: list[int] = []
    # node_of[(slot * S + stage) * m + mb]: the node of that action (slots F, B, I, W = 0..3);
    # -1 until it is placed. arrive_act / arrive_grad[stage * m + mb]: the transfer delivering
    # to that stage.
    node_of = [-1] * (4 * S * m)
    arrive_act, arrive_grad = [-1] * (S * m), [-1] * (S * m)
    last_on_rank = [-1] * schedule.pp
    last_on_link: dict[tuple[int, int], int] = {}
    b_base, i_base = S * m, 2 * S * m

    def transfer(r: int, dst: int, n: int, c: int, k: str) -> int:
        t = len(action)
        action.append(None)
        rank.append(r)
        prev.append(last_on_link.get((r, dst), -1))
        dep.append(n)
        cut.append(c)
        receiver.append(dst)
        kind.append(k)
        slot.append(4 * S + c)
        receives.append(-1)
        last_on_link[(r, dst)] = t
        return t

    for a in schedule.global_order():
        k, s, mb = a
        sl = _SLOT_OF[k]
        r = place[s]
        # the node whose end (plus latency, for a transfer) makes a's input ready, placed before
        # a in the global order; -1: none. A backward's own forward precedes it on its rank.
        if sl == 0:  # F: the previous stage's forward
            d = -1 if s == 0 else node_of[(s - 1) * m + mb] if place[s - 1] == r else arrive_act[s * m + mb]
        elif sl == 3:  # W: its own input gradient
            d = node_of[i_base + s * m + mb]
        elif s == S - 1:  # B or I on the last stage: its own forward
            d = node_of[s * m + mb]
        elif place[s + 1] == r:  # the next stage's backward, on this rank
            d = node_of[b_base + (s + 1) * m + mb]
            if d < 0:
                d = node_of[i_base + (s + 1) * m + mb]
        else:
            d = arrive_grad[s * m + mb]
        n = len(action)
        action.append(a)
        rank.append(r)
        prev.append(last_on_rank[r])
        dep.append(d)
        cut.append(-1)
        receiver.append(-1)
        kind.append(k)
        slot.append(4 * s + sl)
        receives.append(cut[d] if d >= 0 and action[d] is None else -1)
        last_on_rank[r] = n
        node_of[(sl * S + s) * m + mb] = n
        if sl == 0:
            if s < S - 1 and place[s + 1] != r:
                arrive_act[(s + 1) * m + mb] = transfer(r, place[s + 1], n, s, "act")
        elif sl != 3 and s > 0 and place[s - 1] != r:
            arrive_grad[(s - 1) * m + mb] = transfer(r, place[s - 1], n, s - 1, "grad")
    return Compiled(action, rank, prev, dep, cut, receiver, kind, slot, last_on_rank, receives)


_SLOT_OF = {k: k.slot for k in Kind}


def action_seconds(x: StageCost) -> tuple[float, float, float, float]:
    """How long one F, B (whole backward), I (input gradient) and W (weight gradient) action of
    the stage takes, each with the per-action overhead."""
    o = x.overhead_s
    b = x.bwd_s if x.bwd_s is not None else x.bwd_input_s + x.bwd_weight_s
    return x.fwd_s + o, b + o, x.bwd_input_s + o, x.bwd_weight_s + o


def collective_seconds(c: Collectives) -> tuple[float, float, float, float]:
    """The part of one F, B, I and W action (as ``action_seconds`` orders them) that is the
    collectives ``c``: a whole backward runs those of both its parts."""
    return c.fwd_s, c.bwd_input_s + c.bwd_weight_s, c.bwd_input_s, c.bwd_weight_s


def _times(c: Compiled, costs: list[StageCost], cuts: list[CutLink]) -> tuple[list[float], list[float]]:
    """Start and end of every node; a transfer ends when its link frees up and its data
    arrives a latency later."""
    dur: list[float] = []
    lat: list[float] = []
    for x in costs:
        dur += action_seconds(x)
        lat += [0.0, 0.0, 0.0, 0.0]
    for link in cuts:
        dur.append(link.busy_s)
        lat.append(link.latency_s)
    cpu = [link.cpu_s for link in cuts]
    thread = any(cpu)
    n = len(c.slot)
    start = [0.0] * n
    end = [0.0] * n
    arrive = [0.0] * n
    prev, dep, slot, receives = c.prev, c.dep, c.slot, c.receives
    for i in range(n):
        p, d, k = prev[i], dep[i], slot[i]
        t = end[p] if p >= 0 else 0.0
        if d >= 0 and arrive[d] > t:
            t = arrive[d]
        e = t + dur[k]
        if thread and receives[i] >= 0:  # a receive handled by the rank's own thread
            e += cpu[receives[i]]
        start[i] = t
        end[i] = e
        arrive[i] = e + lat[k]
    return start, end


@lru_cache(maxsize=512)
def memory_states(schedule: Schedule) -> list[np.ndarray]:
    """Per rank, the distinct memory states at its actions, one row each: the running stage (its
    position among the rank's stages), then four blocks of one count per own stage: micro-batches
    holding activations, micro-batches between their I and W, micro-batches whose input gradient
    is done, micro-batches whose output has left the activations but is still being sent. The
    engine accumulates each received input's gradient into the receive buffer and clears it only
    at the next step, and waits for its sends only at the end of the step, so both stay until
    then. Memory changes only at a rank's own actions, so these states, weighed by stage sizes,
    give the peak for any costs. An action still holds what it releases while it runs."""
    return [_rank_states(actions, schedule.stages_of(r)) for r, actions in enumerate(schedule.ranks)]


def _rank_states(actions: Sequence[Action], stages: list[int]) -> np.ndarray:
    where = {s: k for k, s in enumerate(stages)}
    n, v = len(actions), len(stages)
    slot_of = _SLOT_OF
    kind = np.fromiter([slot_of[a[0]] for a in actions], dtype=np.int8, count=n)
    own = np.fromiter([where[a[1]] for a in actions], dtype=np.int64, count=n)
    rows = np.arange(n)

    def count(mask: np.ndarray, inclusive: bool) -> np.ndarray:
        """(n, v): per own stage, the masked actions up to this one (inclusive or not)."""
        x = np.zeros((n, v), dtype=np.int64)
        x[rows[mask], own[mask]] = 1
        out = np.cumsum(x, axis=0)
        return out if inclusive else out - x

    f, b, i, w = (kind == k.slot for k in Kind)
    sent = count(b | w, inclusive=False)
    states = np.hstack([own[:, None], count(f, True) - sent, count(i, True) - count(w, False),
                        count(b | i, inclusive=False), sent])
    # done and sent only grow along the list: for each (running, held, I-to-W) the latest row
    # has the most of both and stands for the earlier ones
    _, last = np.unique(_row_keys(states[:, : 1 + 2 * v])[::-1], return_index=True)
    return _unique_rows(states[n - 1 - last])


def _row_keys(rows: np.ndarray) -> np.ndarray:
    """One integer per row of non-negative counts, ordered as the rows are lexicographically
    (rows read as mixed-radix numbers); a structured view when that would overflow."""
    span = rows.max(axis=0) + 1 if len(rows) else np.ones(rows.shape[1], dtype=np.int64)
    if np.prod(span.astype(float)) >= 2.0**62:
        return np.unique(rows, axis=0, return_inverse=True)[1].ravel()
    weights = np.cumprod(np.concatenate([[1], span[:0:-1]]))[::-1].astype(np.int64)
    return rows.astype(np.int64) @ weights


def _unique_rows(rows: np.ndarray) -> np.ndarray:
    """np.unique(rows, axis=0), faster for small counts."""
    _, first = np.unique(_row_keys(rows), return_index=True)
    return rows[first]


def undominated(rows: np.ndarray) -> np.ndarray:
    """The rows that no other row matches or exceeds in every column: with non-negative sizes
    the others can never be the peak. Blockwise, largest totals first (a row can only be
    matched by one with at least its total)."""
    rows = _pareto_last_two(_unique_rows(rows))
    rows = rows[np.argsort(-rows.sum(axis=1), kind="stable")]
    kept = rows[:0]
    for at in range(0, len(rows), 256):
        block = rows[at: at + 256]
        if len(kept):
            block = block[~np.greater_equal(kept[None], block[:, None]).all(axis=2).any(axis=1)]
        ge = np.greater_equal(block[None], block[:, None]).all(axis=2)  # ge[a, b]: row b matches or exceeds row a
        np.fill_diagonal(ge, False)  # rows are distinct: b >= a everywhere means b dominates a
        kept = np.vstack([kept, block[~ge.any(axis=1)]])
    return kept


def _pareto_last_two(rows: np.ndarray) -> np.ndarray:
    """A quick first pass over distinct rows, lexicographically sorted: among rows equal in
    all but the last two columns, drop those another matches or exceeds in both."""
    if len(rows) < 2 or rows.shape[1] < 2:
        return rows
    group = np.concatenate([[0], np.cumsum(np.any(rows[1:, :-2] != rows[:-1, :-2], axis=1))])
    # within a group: the second-last column descending, then the last descending
    order = np.lexsort((-rows[:, -1], -rows[:, -2], group))
    rows, group = rows[order], group[order]
    span = int(rows[:, -1].max()) + 1
    key = group * span + rows[:, -1]  # groups in increasing order: the running max resets
    before = np.concatenate([[-1], np.maximum.accumulate(key)[:-1]])
    kept: np.ndarray = rows[key > before]
    return kept


def rank_undominated(states: np.ndarray) -> np.ndarray:
    """A rank's states less the dominated ones, compared among the same running stage (whose
    transient memory differs)."""
    out = []
    for k in np.unique(states[:, 0]):
        kept = undominated(states[states[:, 0] == k, 1:])
        out.append(np.hstack([np.full((len(kept), 1), k), kept]))
    return np.vstack(out)


@lru_cache(maxsize=512)
def stage_states(schedule: Schedule) -> list[np.ndarray]:
    """Per stage, the distinct undominated (activations held, I-to-W held, input gradients done,
    outputs still being sent) counts its rank passes through, one row each."""
    out: list[np.ndarray] = [np.zeros((0, 4), dtype=np.int64)] * schedule.n_stages
    for r, states in enumerate(memory_states(schedule)):
        mine = schedule.stages_of(r)
        v = len(mine)
        for k, s in enumerate(mine):
            out[s] = undominated(states[:, 1 + k:: v])
    return out


def peak_memory(schedule: Schedule, costs: list[StageCost]) -> list[int]:
    """Peak bytes per rank: static memory of its stages, plus what the micro-batches in flight
    hold, plus the transient workspace of the action running; or, if more, what the optimizer
    step holds after the last action (``optimizer_peak``)."""
    peaks = []
    for r, states in enumerate(memory_states(schedule)):
        stages = schedule.stages_of(r)
        mine = [costs[s] for s in stages]
        # an output sent to another rank is kept by its pending send
        away = [c.send_bytes if s + 1 < schedule.n_stages and schedule.stage_rank[s + 1] != r else 0
                for s, c in zip(stages, mine, strict=True)]
        sizes = np.array([c.act_bytes for c in mine] + [c.wgrad_bytes for c in mine]
                         + [c.grad_in_bytes for c in mine] + away, dtype=np.int64)
        transient = np.array([c.transient_bytes for c in mine], dtype=np.int64)
        base = sum(c.static_bytes + c.batch_bytes for c in mine)
        top = states[:, 1:] @ sizes + transient[states[:, 0]]
        peaks.append(int(base + max(top.max(), optimizer_peak(mine, schedule.microbatches))))
    return peaks


def optimizer_peak(stages: list[StageCost], m: int) -> int:
    """Beyond the static bytes, what a rank holds while its optimizer steps: nothing in flight and
    its sends waited for, but the input gradients of all ``m`` micro-batches still in their
    receive buffers (the engine clears them at the next step), and the step's temporaries. One
    optimizer steps all the rank's stages: their temporaries are added, exact where it steps every
    parameter at once (GPU), an upper bound where it steps one at a time (CPU)."""
    return sum(m * c.grad_in_bytes + c.optimizer_transient_bytes for c in stages)


def _steady_state(schedule: Schedule, costs: list[StageCost], cuts: list[CutLink], tails: list[float]) -> float:
    """Asynchronous schedules never flush: in steady state every stage runs one forward and one
    backward per micro-batch, so the slowest stage (or link) sets the pace (Narayanan et al.,
    PipeDream, SOSP 2019, section 3.1)."""
    per_mb = max(f + b for f, b, _, _ in map(action_seconds, costs))
    per_mb = max([per_mb] + [link.busy_s for link in cuts])
    return schedule.microbatches * per_mb + max(tails)


def step_time(schedule: Schedule, costs: list[StageCost], cuts: list[CutLink]) -> float:
    """The step time alone (what the solver ranks by); ``simulate`` gives the whole picture."""
    compiled = compile_schedule(schedule)
    _, end = _times(compiled, costs, cuts)
    return _step(schedule, costs, cuts, [end[n] for n in compiled.last])[0]


def _step(schedule: Schedule, costs: list[StageCost], cuts: list[CutLink],
          last_end: list[float]) -> tuple[float, list[float]]:
    """The step time, from when each rank's last action ends, and each rank's tail (gradient
    all-reduce and optimizer step, after its last backward)."""
    tails = [sum(costs[s].allreduce_s + costs[s].optimizer_s for s in schedule.stages_of(r))
             for r in range(schedule.pp)]
    if schedule.stream:
        return _steady_state(schedule, costs, cuts, tails), tails
    return max(e + t for e, t in zip(last_end, tails, strict=True)), tails


def simulate(schedule: Schedule, costs: list[StageCost], cuts: list[CutLink] | None = None, *,
             timeline: bool = True) -> SimResult:
    """Time ``schedule`` with per-stage ``costs`` and per-cut transfer costs ``cuts``
    (len n_stages - 1; omitted: free transfers). Without ``timeline`` the result has no events
    or transfers (faster for a large schedule when only the numbers are wanted)."""
    S = schedule.n_stages
    if len(costs) != S:
        raise ScheduleError(f"{len(costs)} stage costs for a schedule of {S} stages")
    cuts = cuts if cuts is not None else [CutLink()] * (S - 1)
    if len(cuts) != S - 1:
        raise ScheduleError(f"{len(cuts)} cut links for {S} stages (need {S - 1})")

    compiled = compile_schedule(schedule)
    start, end = _times(compiled, costs, cuts)
    pp = schedule.pp
    clock = [0.0] * pp
    compute = [0.0] * pp
    stage_compute = [0.0] * S
    events: list[Event] = []
    transfers: list[Transfer] = []
    for i, a in enumerate(compiled.action):
        r = compiled.rank[i]
        if a is not None:
            if timeline:
                events.append(Event(r, a, start[i], end[i]))
            compute[r] += end[i] - start[i]
            stage_compute[a.stage] += end[i] - start[i]
            clock[r] = max(clock[r], end[i])
        elif timeline:
            link = cuts[compiled.cut[i]]
            dst_stage = compiled.cut[i] + 1 if compiled.kind[i] == "act" else compiled.cut[i]
            sent = compiled.action[compiled.dep[i]]
            assert sent is not None, "a transfer depends on the compute action that sends it"
            mb = sent.mb
            transfers.append(Transfer(r, compiled.receiver[i], compiled.kind[i], dst_stage, mb,
                                      start[i], end[i] + link.latency_s))
    step, tails = _step(schedule, costs, cuts, clock)
    idle = [max(step - c - t, 0.0) for c, t in zip(compute, tails, strict=True)]
    bubble = sum(idle) / (pp * step) if step > 0 else 0.0
    return SimResult(step_time_s=step, compute_s=compute, stage_compute_s=stage_compute, tail_s=tails, idle_s=idle,
                     bubble_fraction=min(max(bubble, 0.0), 1.0),
                     peak_memory_bytes=peak_memory(schedule, costs), events=events, transfers=transfers)
