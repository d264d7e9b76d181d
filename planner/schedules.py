"""Pipeline schedules as per-rank action lists: the one description of a schedule.

The simulator times these lists, the timeline draws them, and the executor loads them into
PyTorch's pipeline runtime, so what is predicted is what runs. An action is a forward ``F``, a
whole backward ``B``, or a backward split into its input-gradient part ``I`` and its
weight-gradient part ``W`` (zero-bubble schedules), of one stage on one micro-batch. Transfers
between ranks are implied: a stage's forward output goes to the next stage, its input gradient to
the previous one.

Stage ``s`` lives on rank ``stage_rank[s]``: a loop placement (``s % pp``) for the classic and
interleaved schedules, a V placement (rank r holds stages r and 2pp-1-r) for ZB-V and DualPipeV.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property, lru_cache
from typing import NamedTuple

from planner.errors import ScheduleError


class Kind(StrEnum):
    """What an action computes, written as the engine writes it (torch's ``_ComputationType``)."""

    FORWARD = "F"
    FULL_BACKWARD = "B"
    BACKWARD_INPUT = "I"  # the input-gradient part of a split backward
    BACKWARD_WEIGHT = "W"  # its weight-gradient part

    @property
    def slot(self) -> int:
        """Its position in the per-stage tables of times and counts: F, B, I, W."""
        return _SLOT[self]


_SLOT = {k: i for i, k in enumerate(Kind)}


class Action(NamedTuple):
    kind: Kind
    stage: int
    mb: int

    def __str__(self) -> str:  # the engine's notation: stage, kind, micro-batch ("2F0")
        return f"{self.stage}{self.kind}{self.mb}"


@dataclass(frozen=True, eq=False)  # built once per (name, pp, m, v): compare by identity
class Schedule:
    name: str
    pp: int
    virtual_stages: int
    microbatches: int
    stage_rank: tuple[int, ...]
    ranks: tuple[tuple[Action, ...], ...]
    split_backward: bool
    executable: bool  # PyTorch's engine can run it
    stream: bool = False  # asynchronous: no flush between steps (PipeDream)

    @property
    def n_stages(self) -> int:
        return len(self.stage_rank)

    def stages_of(self, rank: int) -> list[int]:
        return self._stages[rank]

    def global_order(self) -> list[Action]:
        """Every rank's actions merged into one order that keeps each rank's own order and puts
        every action after the actions it takes input from: ranks take turns, each running its
        list until an action waits for another rank. The simulator times the schedule in this
        order, and a single process can run the whole pipeline in it."""
        return list(self._global_order)

    @cached_property
    def _global_order(self) -> tuple[Action, ...]:
        S, m = self.n_stages, self.microbatches
        # done[(slot * S + stage) * m + mb]: that action is in the order (slots F, B, I, W = 0..3)
        done = [False] * (4 * S * m)
        b_base, i_base = S * m, 2 * S * m

        def ready(a: Action) -> bool:
            k, s, mb = a
            if k is Kind.FORWARD:
                return s == 0 or done[(s - 1) * m + mb]
            if k is Kind.BACKWARD_WEIGHT:
                return done[i_base + s * m + mb]
            return done[s * m + mb] and (s == S - 1 or done[b_base + (s + 1) * m + mb]
                                         or done[i_base + (s + 1) * m + mb])

        order: list[Action] = []
        pos, total = [0] * self.pp, sum(map(len, self.ranks))
        while len(order) < total:
            before = len(order)
            for r, acts in enumerate(self.ranks):
                at, end = pos[r], len(acts)
                while at < end and ready(a := acts[at]):
                    done[(_SLOT[a.kind] * S + a.stage) * m + a.mb] = True
                    order.append(a)
                    at += 1
                pos[r] = at
            if len(order) == before:
                stuck = {r: str(acts[pos[r]]) for r, acts in enumerate(self.ranks) if pos[r] < len(acts)}
                raise ScheduleError(f"schedule deadlocks: ranks wait forever at {stuck}")
        return tuple(order)

    @cached_property
    def _stages(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(self.pp)]
        for s, r in enumerate(self.stage_rank):
            out[r].append(s)
        return out


@dataclass(frozen=True)
class ScheduleInfo:
    name: str
    summary: str
    reference: str
    executable: bool
    placement: str  # "loop" or "v"
    split_backward: bool
    bubble: str  # the published idle time per rank (p ranks, m micro-batches, v chunks; t: one pass)
    memory: str  # the published peak of micro-batches in flight


SCHEDULES: dict[str, ScheduleInfo] = {s.name: s for s in [
    ScheduleInfo("naive", "one batch, no micro-batching: one stage busy at a time",
                 "naive model parallelism", True, "loop", False,
                 "(p - 1)(tF + tB): every rank idles while the others compute", "the whole batch (m = 1)"),
    ScheduleInfo("gpipe", "all forwards, then all backwards",
                 "Huang et al., GPipe, NeurIPS 2019", True, "loop", False,
                 "(p - 1)(tF + tB)", "m micro-batches"),
    ScheduleInfo("1f1b", "PipeDream-Flush: warm-up forwards, then one forward one backward",
                 "Narayanan et al., PipeDream-2BW, ICML 2021 (PipeDream-Flush)", True, "loop", False,
                 "(p - 1)(tF + tB)", "p - r on rank r (p on rank 0)"),
    ScheduleInfo("interleaved-1f1b", "1F1B over v model chunks per rank",
                 "Narayanan et al., Megatron-LM, SC 2021, section 2.2", True, "loop", False,
                 "(p - 1)(tF + tB) / v", "(2(p - 1) + (v - 1)p + 1) / v on rank 0 (Megatron-LM's warm-up)"),
    ScheduleInfo("zb-h1", "1F1B's warm-up, backward split, weight gradients deferred into the drain",
                 "Qi et al., Zero Bubble Pipeline Parallelism, ICLR 2024, section 2.1 (ZB-H1)", True, "loop", True,
                 "(p - 1)(tF + tI - tW)", "p on every rank"),
    ScheduleInfo("zb-h2", "deeper warm-up (2(pp - r) - 1 forwards), split backward, about 2pp in flight",
                 "Qi et al., Zero Bubble Pipeline Parallelism, ICLR 2024, section 2.2 (ZB-H2)", True, "loop", True,
                 "(p - 1)(tF + tI - 2tW), at least (p - 1)tF", "2p - 1 on every rank"),
    ScheduleInfo("zb-auto", "built for the stage costs, links and memory budget: a cost-aware list scheduler "
                 "beside the zb-h1, zb-h2 and 1f1b orders, the fastest that fits",
                 "Qi et al., Zero Bubble Pipeline Parallelism, ICLR 2024, section 3 (automatic scheduling)",
                 True, "loop", True,
                 "no closed form: at most zb-h1's, zb-h2's or 1f1b's within the same memory",
                 "within the budget: each device's usable memory"),
    ScheduleInfo("zb-v", "V placement, the authors' handcrafted order, 1F1B's activation memory",
                 "Qi et al., Pipeline Parallelism with Controllable Memory, NeurIPS 2024 (ZB-V)",
                 True, "v", True,
                 "0 with tF = tI = tW (none published for unequal passes)", "p (2p chunks): 1F1B's peak"),
    ScheduleInfo("dualpipe-v", "V placement, DualPipeV's eight steps, 2pp + 1 chunk activations",
                 "DeepSeek-AI, DeepSeek-V3 technical report, 2024 (DualPipe); deepseek-ai/DualPipe (DualPipeV)",
                 True, "v", True,
                 "(p - 1)(tF&B + tB - 3tW) in chunk times (the report's PP/2 - 1, PP = 2p)",
                 "p + 1/2 (2p + 1 chunks)"),
    ScheduleInfo("pipedream", "asynchronous 1F1B with weight stashing (model only)",
                 "Narayanan et al., PipeDream, SOSP 2019", False, "loop", False,
                 "none in steady state (no flush)", "p - r, and as many weight versions"),
    ScheduleInfo("pipedream-2bw", "asynchronous 1F1B with two weight versions (model only)",
                 "Narayanan et al., PipeDream-2BW, ICML 2021", False, "loop", False,
                 "none in steady state (no flush)", "p - r, and two weight versions"),
]}

ALIASES = {
    "pipedream-flush": "1f1b", "1f1b-flush": "1f1b", "interleaved": "interleaved-1f1b",
    "interleaved1f1b": "interleaved-1f1b", "i1f1b": "interleaved-1f1b", "zbh1": "zb-h1",
    "zb1p": "zb-h1", "zero-bubble": "zb-h1", "zbh2": "zb-h2", "zb2p": "zb-h2", "zbv": "zb-v",
    "dualpipev": "dualpipe-v", "dualpipe": "dualpipe-v",
    "zbauto": "zb-auto", "2bw": "pipedream-2bw", "pipedream2bw": "pipedream-2bw", "none": "naive",
}


def canonical(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    if key not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {name!r}: choose one of {', '.join(SCHEDULES)}")
    return key


def weight_versions(name: str, pp: int, rank: int) -> int:
    """Weight copies a rank keeps: PipeDream stashes one per micro-batch in flight (pp - rank),
    2BW keeps two (Narayanan et al., 2019 section 3.3; 2021 section 3.1)."""
    if name == "pipedream":
        return pp - rank
    if name == "pipedream-2bw":
        return 2
    return 1


# ----------------------------------------------------------------------------- validation


def check_combination(name: str, pp: int, m: int, v: int) -> None:
    """Refuse combinations a schedule cannot run, with the reason."""
    info = SCHEDULES[name]
    if pp < 1 or m < 1 or v < 1:
        raise ScheduleError(f"{name}: pp, micro-batches and virtual stages must be >= 1")
    if name == "naive" and m != 1:
        raise ScheduleError(f"naive runs one batch without micro-batching: micro-batches must be 1, got {m}")
    if info.placement == "v" and v != 2:
        raise ScheduleError(f"{name} places two chunks per rank in a V: virtual stages must be 2, got {v}")
    if name == "zb-auto" and v != 1:
        raise ScheduleError(f"zb-auto runs one stage per rank: virtual stages must be 1, got {v}")
    if name == "interleaved-1f1b" and v < 2:
        raise ScheduleError("interleaved-1f1b needs at least 2 virtual stages per rank (use 1f1b for 1)")
    if v > 1 and info.placement == "loop":
        if name not in ("interleaved-1f1b", "zb-h1"):
            raise ScheduleError(f"{name} runs one stage per rank: virtual stages must be 1, got {v}")
        if pp < 2:
            raise ScheduleError(f"{name} with virtual stages needs pp >= 2")
        if m < pp or m % pp:
            raise ScheduleError(f"{name} with {v} virtual stages needs the micro-batch count to be a "
                                f"multiple of pp (Megatron-LM's rule): got {m} micro-batches, pp {pp}")


def validate(schedule: Schedule) -> None:
    """Every stage runs every micro-batch's F, then B (or I then W), on its own rank."""
    S, m = schedule.n_stages, schedule.microbatches
    seen: dict[tuple[Kind, int, int], int] = {}
    for rank, actions in enumerate(schedule.ranks):
        for pos, a in enumerate(actions):
            if schedule.stage_rank[a.stage] != rank:
                raise ScheduleError(f"rank {rank} runs {a}, but stage {a.stage} is on rank "
                                    f"{schedule.stage_rank[a.stage]}")
            if (a.kind, a.stage, a.mb) in seen:
                raise ScheduleError(f"rank {rank} runs {a} twice")
            need = {Kind.FULL_BACKWARD: Kind.FORWARD, Kind.BACKWARD_INPUT: Kind.FORWARD,
                    Kind.BACKWARD_WEIGHT: Kind.BACKWARD_INPUT}.get(a.kind)
            if need and (need, a.stage, a.mb) not in seen:
                raise ScheduleError(f"rank {rank} runs {a} before {Action(need, a.stage, a.mb)}")
            seen[(a.kind, a.stage, a.mb)] = pos
    for s in range(S):
        for k in range(m):
            if (Kind.FORWARD, s, k) not in seen:
                raise ScheduleError(f"stage {s} never runs the forward of micro-batch {k}")
            if (Kind.FULL_BACKWARD, s, k) not in seen and (Kind.BACKWARD_WEIGHT, s, k) not in seen:
                raise ScheduleError(f"stage {s} never runs the backward of micro-batch {k}")


# ----------------------------------------------------------------------------- builders


def _loop(pp: int, v: int) -> tuple[int, ...]:
    return tuple(s % pp for s in range(pp * v))


def _vee(pp: int) -> tuple[int, ...]:
    return tuple(range(pp)) + tuple(reversed(range(pp)))


def _gpipe(pp: int, m: int) -> list[list[Action]]:
    # Huang et al. 2019: every forward, then every backward (in micro-batch order, as the engine does)
    return [[Action(Kind.FORWARD, r, k) for k in range(m)]
            + [Action(Kind.FULL_BACKWARD, r, k) for k in range(m)] for r in range(pp)]


def _backward(stage: int, mb: int, split: bool) -> list[Action]:
    """A micro-batch's backward on a stage: whole, or its input gradient then its weight gradient."""
    if split:
        return [Action(Kind.BACKWARD_INPUT, stage, mb), Action(Kind.BACKWARD_WEIGHT, stage, mb)]
    return [Action(Kind.FULL_BACKWARD, stage, mb)]


def _one_f_one_b(pp: int, m: int) -> list[list[Action]]:
    """Rank r runs min(pp - r, m) warm-up forwards, then alternates backward and forward, so it
    holds at most pp - r micro-batches (Narayanan et al. 2021, PipeDream-Flush)."""
    out = []
    for r in range(pp):
        warm = min(pp - r, m)
        acts = [Action(Kind.FORWARD, r, k) for k in range(warm)]
        for k in range(m):
            acts.append(Action(Kind.FULL_BACKWARD, r, k))
            if warm + k < m:
                acts.append(Action(Kind.FORWARD, r, warm + k))
        out.append(acts)
    return out


def _zb_h1(pp: int, m: int) -> list[list[Action]]:
    """ZB-H1 (Qi et al. 2024, section 2.1 and figure 3): 1F1B's warm-up and steady state with
    each backward split, rank r's weight gradients starting r input gradients late ("the starting
    points of W passes adjusted by the number of warm-up micro-batches"; PyTorch's
    ScheduleInterleavedZeroBubble delays W the same way, by ``rank`` backwards). Later ranks
    thereby pass input gradients up sooner, and the deferred W fill the drain: with uniform
    stages and no communication the step is m(F + B + W) + (pp - 1)(F + B - W), B the input
    gradient (section 2's table of bubble sizes; 1F1B: (pp - 1)(F + B + W)).

    Memory, counting a micro-batch from its F until its W: every rank holds at most pp ("all
    stages have the same number of in-flight micro-batches"), 1F1B's peak on rank 0; the paper's
    claim is about that peak, W needing less memory than B (Table 1). On rank r > 0 this is more
    than 1F1B's pp - r; the micro-batches still waiting for their input gradient stay pp - r."""
    out = []
    for r in range(pp):
        warm = min(pp - r, m)
        acts = [Action(Kind.FORWARD, r, k) for k in range(warm)]
        done_w = 0
        for k in range(m):
            acts.append(Action(Kind.BACKWARD_INPUT, r, k))
            if k >= r:  # W runs r input gradients behind; before the next F, so at most pp held
                acts.append(Action(Kind.BACKWARD_WEIGHT, r, done_w))
                done_w += 1
            if warm + k < m:
                acts.append(Action(Kind.FORWARD, r, warm + k))
        acts += [Action(Kind.BACKWARD_WEIGHT, r, k) for k in range(done_w, m)]
        out.append(acts)
    return out


def _zb_h2(pp: int, m: int) -> list[list[Action]]:
    """ZB-H2 (Qi et al. 2024, section 2.2 and figure 4): rank r warms up with 2(pp - r) - 1
    forwards, enough to fill the wait for its first input gradient; then each input gradient is
    followed by a forward, a W running only when the next forward would hold more than 2pp - 1
    micro-batches (the paper's (2p - 1) M_B peak); in the drain each input gradient is followed
    by one W and the rest come last, which makes the paper's parallelogram. The paper's bubble
    for it, (pp - 1)(F + B - 2W) (section 2's table of bubble sizes), is rank 0's idle time: the
    authors measure a bubble on the longest rank's own span, from its first action to its last
    (their schedule playground: 1 - m(F + B + W) / longest stage time). A flushed step also
    waits for the last rank, which starts (pp - 1)F late and then computes m(F + B + W), so the
    step is the larger of m(F + B + W) + (pp - 1)(F + B - 2W) and m(F + B + W) + (pp - 1)F."""
    cap = 2 * pp - 1
    out = []
    for r in range(pp):
        started = min(2 * (pp - r) - 1, m)
        acts = [Action(Kind.FORWARD, r, k) for k in range(started)]
        done_w = 0
        for k in range(m):
            acts.append(Action(Kind.BACKWARD_INPUT, r, k))
            if started < m:
                while started - done_w >= cap:
                    acts.append(Action(Kind.BACKWARD_WEIGHT, r, done_w))
                    done_w += 1
                acts.append(Action(Kind.FORWARD, r, started))
                started += 1
            elif done_w <= k:
                acts.append(Action(Kind.BACKWARD_WEIGHT, r, done_w))
                done_w += 1
        acts += [Action(Kind.BACKWARD_WEIGHT, r, k) for k in range(done_w, m)]
        out.append(acts)
    return out


def _interleaved_slot(pp: int, v: int, rank: int, n: int, backward: bool) -> tuple[int, int]:
    """(stage, micro-batch) of rank's n-th forward (or backward) in Megatron-LM's interleaved
    order: groups of pp micro-batches go through chunk 0, then chunk 1, ... (backwards: the
    last chunk first)."""
    group, within = divmod(n, pp * v)
    chunk = within // pp
    if backward:
        chunk = v - 1 - chunk
    return chunk * pp + rank, group * pp + within % pp


def _interleaved(pp: int, v: int, m: int, split: bool) -> list[list[Action]]:
    """Megatron-LM's interleaved 1F1B (Narayanan et al. 2021, section 2.2): rank r warms up with
    (pp - r - 1) * 2 + (v - 1) * pp forwards, then alternates forward and backward. Its step on
    uniform stages is m(tF + tB) + (pp - 1)(tF + tB) / v, tF and tB a rank's whole share."""
    total = v * m
    slots = [_interleaved_slot(pp, v, 0, n, False) for n in range(total)]  # rank 0's; others shift the stage
    back = [_interleaved_slot(pp, v, 0, n, True) for n in range(total)]
    out = []
    for r in range(pp):
        fwd = [Action(Kind.FORWARD, s + r, k) for s, k in slots]
        bwd: list[tuple[Action, ...]]
        if split:
            bwd = [(Action(Kind.BACKWARD_INPUT, s + r, k), Action(Kind.BACKWARD_WEIGHT, s + r, k)) for s, k in back]
        else:
            bwd = [(Action(Kind.FULL_BACKWARD, s + r, k),) for s, k in back]
        warm = min((pp - r - 1) * 2 + (v - 1) * pp, total)
        acts = fwd[:warm]
        for n in range(total - warm):
            acts.append(fwd[warm + n])
            acts += bwd[n]
        for n in range(total - warm, total):
            acts += bwd[n]
        out.append(acts)
    return out


class _Option(NamedTuple):
    """A rank's candidate next action, ordered as the list scheduler prefers: earliest start,
    then priority (-1 warm-up forward, 0 input gradient, 1 forward, 2 deferred W), then later
    stages first."""

    start: int
    priority: int
    minus_stage: int
    action: Action


class _Greedy:
    """List-schedule split-backward actions on unit costs (F = I = W = 1).

    Each rank takes, among the actions it could start earliest, a backward input gradient
    first, then a forward (later stages first), then a deferred weight gradient: deferred W fill
    what would be idle time (the zero-bubble idea, Qi et al. 2024). A rank starts a new
    micro-batch on its first stage only while fewer than ``cap`` stage-micro-batches are in
    flight on it, which bounds activation memory. ``first_forward_priority(rank, started)`` lets
    a policy put forwards ahead of backwards during warm-up. The order found on unit costs is
    kept for any stage costs: it is a valid order whatever the durations, but tuned for F = I
    = W only (with the input gradient 1.5 to 2 times the forward, such orders ran 9 to 46% over
    DualPipeV's published bubble). It now serves only DualPipe-V with fewer than 2pp
    micro-batches, which DualPipeV's own order does not cover.
    """

    def __init__(self, pp: int, stage_rank: tuple[int, ...], m: int, cap: int,
                 first_forward_priority: Callable[[int, int], bool]):
        self.pp, self.stage_rank, self.m, self.cap = pp, stage_rank, m, cap
        self.first_forward_priority = first_forward_priority
        S = self.S = len(stage_rank)
        stages = [[s for s in range(S) if stage_rank[s] == r] for r in range(pp)]
        self.first_stage = [x[0] for x in stages]
        self.later_first = [sorted(x, reverse=True) for x in stages]
        self.end_f = [[-1] * m for _ in range(S)]  # when each forward / input gradient ends; -1: not yet
        self.end_i = [[-1] * m for _ in range(S)]
        self.next_f, self.next_i = [0] * S, [0] * S
        self.clock, self.inflight, self.started = [0] * pp, [0] * pp, [0] * pp
        self.pending_w: list[deque[Action]] = [deque() for _ in range(pp)]
        self.lists: list[list[Action]] = [[] for _ in range(pp)]

    def _input_gradient(self, r: int, s: int) -> _Option | None:
        """Stage s's next I, once its own forward and the next stage's I have ended."""
        k = self.next_i[s]
        if k >= self.m or (own := self.end_f[s][k]) < 0:
            return None
        if s == self.S - 1:
            ready = own
        elif (grad := self.end_i[s + 1][k]) >= 0:
            ready = max(own, grad)
        else:
            return None
        return _Option(max(self.clock[r], ready), 0, -s, Action(Kind.BACKWARD_INPUT, s, k))

    def _forward(self, r: int, s: int) -> _Option | None:
        """Stage s's next F, once the previous stage's has ended and, on the rank's first stage,
        while fewer than ``cap`` micro-batches are in flight."""
        k = self.next_f[s]
        if k >= self.m or (s == self.first_stage[r] and self.inflight[r] >= self.cap):
            return None
        ready = 0 if s == 0 else self.end_f[s - 1][k]
        if ready < 0:
            return None
        prio = -1 if self.first_forward_priority(r, self.started[r]) else 1
        return _Option(max(self.clock[r], ready), prio, -s, Action(Kind.FORWARD, s, k))

    def best(self, r: int) -> _Option | None:
        """Rank r's preferred next action, or None while it has nothing it could start."""
        options = [o for s in self.later_first[r] for o in (self._input_gradient(r, s), self._forward(r, s))
                   if o is not None]
        if self.pending_w[r]:
            w = self.pending_w[r][0]
            options.append(_Option(self.clock[r], 2, -w.stage, w))
        return min(options, default=None)

    def commit(self, r: int, start: int, a: Action) -> None:
        """Run ``a`` on rank r from ``start`` for one unit."""
        finish = start + 1
        self.clock[r] = finish
        self.lists[r].append(a)
        if a.kind == Kind.FORWARD:
            self.end_f[a.stage][a.mb] = finish
            self.next_f[a.stage] += 1
            self.inflight[r] += 1
            self.started[r] += a.stage == self.first_stage[r]
        elif a.kind == Kind.BACKWARD_INPUT:
            self.end_i[a.stage][a.mb] = finish
            self.next_i[a.stage] += 1
            self.pending_w[r].append(Action(Kind.BACKWARD_WEIGHT, a.stage, a.mb))
        else:
            self.pending_w[r].popleft()
            self.inflight[r] -= 1

    def neighbours(self, stage: int) -> set[int]:
        """The ranks whose options an action of ``stage`` can change: its own and its neighbours'."""
        out = {self.stage_rank[stage]}
        if stage + 1 < self.S:
            out.add(self.stage_rank[stage + 1])
        if stage > 0:
            out.add(self.stage_rank[stage - 1])
        return out

    def run(self) -> list[list[Action]]:
        # Each rank's best option is cached in a heap and recomputed only when an action that
        # could change it completes (its own, or a neighbour stage's); stale entries are skipped.
        heap: list[tuple[int, int, int, int, Action]] = []  # start, priority, rank, version, action
        version = [0] * self.pp

        def push(r: int) -> None:
            version[r] += 1
            if (b := self.best(r)) is not None:
                heapq.heappush(heap, (b.start, b.priority, r, version[r], b.action))

        for r in range(self.pp):
            push(r)
        for _ in range(3 * self.S * self.m):
            while heap and heap[0][3] != version[heap[0][2]]:
                heapq.heappop(heap)
            if not heap:
                raise ScheduleError(f"schedule builder deadlocked (pp={self.pp}, m={self.m}, cap={self.cap})")
            start, _, r, _, a = heapq.heappop(heap)
            self.commit(r, start, a)
            for q in self.neighbours(a.stage):
                push(q)
        return self.lists


def _greedy(pp: int, stage_rank: tuple[int, ...], m: int, cap: int,
            first_forward_priority: Callable[[int, int], bool]) -> list[list[Action]]:
    """The unit-cost list schedule of ``_Greedy`` for this placement and in-flight cap."""
    return _Greedy(pp, stage_rank, m, cap, first_forward_priority).run()


class _VRank:
    """One rank's action list under a V placement: chunk 0 is stage r, chunk 1 stage 2pp-1-r,
    each running its micro-batches in order; deferred weight gradients wait in a queue."""

    def __init__(self, pp: int, rank: int):
        self.stage = (rank, 2 * pp - 1 - rank)
        self.next_f, self.next_b = [0, 0], [0, 0]
        self.deferred: deque[Action] = deque()
        self.actions: list[Action] = []

    def forward(self, chunk: int) -> None:
        self.actions.append(Action(Kind.FORWARD, self.stage[chunk], self.next_f[chunk]))
        self.next_f[chunk] += 1

    def backward(self, chunk: int, defer_w: bool = False) -> None:
        """The next backward of ``chunk``: I then W at once, or I with its W queued."""
        s, k = self.stage[chunk], self.next_b[chunk]
        self.next_b[chunk] += 1
        self.actions.append(Action(Kind.BACKWARD_INPUT, s, k))
        w = Action(Kind.BACKWARD_WEIGHT, s, k)
        if defer_w:
            self.deferred.append(w)
        else:
            self.actions.append(w)

    def weight(self, chunk: int | None = None) -> None:
        """The oldest deferred W, or the oldest of ``chunk``."""
        at = 0 if chunk is None else next(n for n, w in enumerate(self.deferred) if w.stage == self.stage[chunk])
        self.actions.append(self.deferred[at])
        del self.deferred[at]


def _zb_v_rank(pp: int, m: int, r: int) -> list[Action]:
    """Rank r's order in ZB-V (Qi et al., Pipeline Parallelism with Controllable Memory,
    NeurIPS 2024; the ZB paper's V schedule; the authors' handcrafted ZB-V,
    sail-sg/zero-bubble-pipeline-parallelism, handcrafted_zb_v): built for
    max(m, 2pp - 1) micro-batches, the extra ones then dropped. Every rank holds at most 2pp
    chunk activations, pp whole micro-batches: 1F1B's peak. With F = I = W the only idle time
    is the last rank's (pp - 1) chunk forwards before it starts."""
    n = max(m, 2 * pp - 1)
    q = _VRank(pp, r)
    for _ in range(2 * (pp - r) - 1):  # warm-up: chunk-0 forwards,
        q.forward(0)
    for _ in range(r):  # then chunk-1 and chunk-0 forwards in turn,
        q.forward(1)
        q.forward(0)
    for _ in range(pp - r):  # then chunk-1 forward and backward
        q.forward(1)
        q.backward(1)
    while q.next_f[1] < q.next_f[0] or q.next_f[0] < n:  # steady: F0 B0 F1 B1, each B with its W
        if q.next_f[0] < n:
            q.forward(0)
        q.backward(0)
        q.forward(1)
        q.backward(1)
    for _ in range(r):  # cool-down: input gradients first, their W deferred
        q.backward(0, defer_w=True)
        q.backward(1, defer_w=True)
    for _ in range(pp - r):
        q.backward(0, defer_w=True)
        q.weight(0)
    for chunk in (1, 0):
        while any(w.stage == q.stage[chunk] for w in q.deferred):
            q.weight(chunk)
    return [a for a in q.actions if a.mb < m]


def _dualpipe_v_rank(pp: int, m: int, r: int) -> list[Action]:
    """Rank r's order in DualPipeV, DualPipe (DeepSeek-V3 report, section 3.3.1) cut in half
    onto a V (deepseek-ai/DualPipe, DualPipeV: eight steps, m >= 2pp). Where DualPipe overlaps
    a forward of one chunk with a backward of the other (F&B), planner runs them one after the
    other; a backward DualPipe runs whole is I then W at once, priced like every backward of a
    split schedule. Every rank holds at most 2pp + 1 chunk activations (the README's PP + 1),
    and the bubble stays within the published (PP/2 - 1)(F&B + B - 3W), PP = 2pp stages."""
    q, x, last = _VRank(pp, r), pp - r - 1, r + 1
    for _ in range(2 * x):  # 1: chunk-0 forwards
        q.forward(0)
    for _ in range(last):  # 2: forward pairs down chunk 0 and back up chunk 1
        q.forward(0)
        q.forward(1)
    for _ in range(x):  # 3: zero-bubble chunk-1 backward, its W, a chunk-1 forward
        q.backward(1, defer_w=True)
        q.weight()
        q.forward(1)
    for _ in range(m - 2 * pp + last):  # 4: steady state, F0 & B1 then F1 & B0
        q.forward(0)
        q.backward(1)
        q.forward(1)
        q.backward(0)
    for _ in range(x):  # 5: chunk-0 forwards are done
        q.backward(1)
        q.forward(1)
        q.backward(0)
    for i in range(last):  # 6: backward pairs; the second half defers W
        q.backward(1, defer_w=i > last // 2 or (i == last // 2 and r % 2 == 1))
        q.backward(0, defer_w=i >= last // 2)
    for _ in range(x):  # 7: deferred W interleaved with the last chunk-0 backwards
        q.weight()
        q.backward(0, defer_w=True)
    while q.deferred:  # 8: the remaining W
        q.weight()
    return q.actions


def _parse(text: str) -> Action:
    """One action in the engine's notation: stage, kind, micro-batch ("2F0")."""
    at = next((i for i, ch in enumerate(text) if not ch.isdigit()), 0)
    kind, mb = text[at:at + 1], text[at + 1:]
    if at == 0 or kind not in Kind._value2member_map_ or not mb.isdigit():
        raise ScheduleError(f"{text!r} is not an action: write stage, kind (F, B, I or W), micro-batch, as in 2F0")
    return Action(Kind(kind), int(text[:at]), int(mb))


@lru_cache(maxsize=256)
def from_order(name: str, pp: int, m: int, order: tuple[str, ...]) -> Schedule:
    """A one-stage-per-rank schedule from its per-rank action lists in the engine's notation
    (one comma-separated row per rank, as ``to_engine_csv`` writes them): how a cost-built
    schedule (zb-auto) is stored in a plan and rebuilt exactly. Checked like every builder."""
    if len(order) != pp:
        raise ScheduleError(f"{name}: {len(order)} rows of actions for pp {pp}")
    ranks = tuple(tuple(_parse(t.strip()) for t in row.split(",") if t.strip()) for row in order)
    if any(a.mb >= m or a.stage >= pp for acts in ranks for a in acts):
        raise ScheduleError(f"{name}: an action names a stage or micro-batch beyond pp {pp}, m {m}")
    schedule = one_stage_per_rank(name, m, ranks)
    validate(schedule)
    schedule.global_order()  # refuses an order that deadlocks
    return schedule


def one_stage_per_rank(name: str, m: int, ranks: tuple[tuple[Action, ...], ...]) -> Schedule:
    """A schedule of these per-rank action lists, stage r on rank r (unchecked: see validate)."""
    split = any(a.kind in (Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT) for acts in ranks for a in acts)
    return Schedule(name=name, pp=len(ranks), virtual_stages=1, microbatches=m, stage_rank=_loop(len(ranks), 1),
                    ranks=ranks, split_backward=split, executable=SCHEDULES[name].executable)


@lru_cache(maxsize=256)
def build(name: str, pp: int, m: int, v: int = 1, order: tuple[str, ...] | None = None) -> Schedule:
    """The per-rank action lists of schedule ``name`` for pp ranks, m micro-batches and v chunks.
    zb-auto depends on the stage costs: it is made by ``planner.autosched.build_auto`` and
    rebuilt here from its stored ``order``."""
    name = canonical(name)
    check_combination(name, pp, m, v)
    if name == "zb-auto" or order is not None:
        if order is None:
            raise ScheduleError("zb-auto is built for given stage costs and memory: it needs its stored "
                                "action order (planner.autosched.build_auto makes one)")
        return from_order(name, pp, m, order)
    info = SCHEDULES[name]
    if name in ("naive", "gpipe"):
        ranks, placement = _gpipe(pp, m), _loop(pp, 1)
    elif name in ("1f1b", "pipedream", "pipedream-2bw"):
        ranks, placement = _one_f_one_b(pp, m), _loop(pp, 1)
    elif name == "zb-h1" and v == 1:
        ranks, placement = _zb_h1(pp, m), _loop(pp, 1)
    elif name == "zb-h2":
        ranks, placement = _zb_h2(pp, m), _loop(pp, 1)
    elif name in ("interleaved-1f1b", "zb-h1"):
        ranks, placement = _interleaved(pp, v, m, split=info.split_backward), _loop(pp, v)
    elif name == "zb-v":
        placement = _vee(pp)
        ranks = [_zb_v_rank(pp, m, r) for r in range(pp)]
    elif m >= 2 * pp:  # dualpipe-v as published
        placement = _vee(pp)
        ranks = [_dualpipe_v_rank(pp, m, r) for r in range(pp)]
    else:  # dualpipe-v with fewer micro-batches than DualPipeV runs: a greedy order with its
        # deeper warm-up, 2(pp - r) - 1 first-chunk forwards before any backward
        placement = _vee(pp)
        ranks = _greedy(pp, placement, m, cap=2 * pp + 1,
                        first_forward_priority=lambda r, n: n < 2 * (pp - r) - 1)
    schedule = Schedule(name=name, pp=pp, virtual_stages=v if info.placement == "loop" else 2,
                        microbatches=m, stage_rank=placement,
                        ranks=tuple(tuple(a) for a in ranks), split_backward=info.split_backward,
                        executable=info.executable, stream=name.startswith("pipedream"))
    return schedule  # every builder is checked by validate() in the tests


# ------------------------------------------------------------------------------ analysis


def inflight_peaks(schedule: Schedule) -> list[int]:
    """For each stage, the most micro-batches whose activations it holds at once, counting the
    one being computed. It depends only on the order of actions, not on their durations."""
    peak = [0] * schedule.n_stages
    forward, frees = Kind.FORWARD, (Kind.FULL_BACKWARD, Kind.BACKWARD_WEIGHT)
    for actions in schedule.ranks:
        held = [0] * schedule.n_stages
        for kind, s, _ in actions:
            if kind is forward:
                held[s] += 1
                if held[s] > peak[s]:
                    peak[s] = held[s]
            elif kind in frees:
                held[s] -= 1
    return peak


def to_engine_csv(schedule: Schedule) -> str:
    """The compute-only CSV (one row per rank) that PyTorch's _PipelineScheduleRuntime loads."""
    return "\n".join(",".join(str(a) for a in actions) for actions in schedule.ranks) + "\n"
