"""``zb-auto``: a zero-bubble schedule built for given stage costs and a per-rank memory budget.

Qi et al., Zero Bubble Pipeline Parallelism, ICLR 2024, section 3 ("automatic scheduling"):
a heuristic list scheduler orders each rank's forwards (F), input gradients (I) and weight
gradients (W) for the measured F, I, W and communication times under a memory limit, and an
ILP may refine it. Here the heuristic is a cost-aware list scheduler run over a small family of
warm-ups, in-flight caps and weight-gradient policies, each order also tried with a whole
backward wherever a W directly follows its own I and the measured B is the shorter; the
published ``zb-h1``, ``zb-h2`` and ``1f1b`` orders join as candidates, every candidate is
priced by the simulator with the real costs and links, and the fastest that fits the budget is
kept. The published orders being candidates, ``zb-auto`` is never slower than any of them that
fits the same memory. ``planner.autosched_ilp`` then reorders small schedules by an integer
program (``solve --ilp``).

The result is an ordinary action list (one stage per rank, loop placement), so the simulator,
the timeline and the engine's runtime take it like any other schedule; a plan stores the order.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from planner.errors import ScheduleError
from planner.formats import StageCost
from planner.schedules import Action, Kind, Schedule, build, from_order, one_stage_per_rank
from planner.simulate import CutLink, action_seconds, peak_memory, step_time

NAME = "zb-auto"
SEEDS = ("zb-h1", "zb-h2", "1f1b")  # published orders tried as they are
ALPHAS = (0.25, 0.5)  # W fills a gap of at least alpha * W (tried: 0 to 1 and never; these won most)


@dataclass(frozen=True)
class Policy:
    """One run of the list scheduler. Rank r first runs ``warm[r]`` forwards, then alternates
    forwards and input gradients (1F1B's steady state; ``strict``: it waits for the one due,
    else it takes whichever can start first); it starts a new micro-batch only while fewer than
    ``caps[r]`` hold activations (counted from F to W). A weight gradient runs when the rank
    would otherwise wait at least ``alpha`` times its length (it fills a bubble, the zero-bubble
    idea), when a forward is blocked by the cap, or when nothing else is left."""

    warm: tuple[int, ...]
    caps: tuple[int, ...]
    alpha: float
    strict: bool

    def describe(self) -> str:
        w = "when blocked" if self.alpha == float("inf") else f"in gaps >= {self.alpha:g} W"
        return (f"list scheduler: warm-up {list(self.warm)}, in flight <= {list(self.caps)}, W {w}"
                + (", strict 1F1B" if self.strict else ""))


@dataclass(frozen=True)
class AutoResult:
    schedule: Schedule
    step_time_s: float
    peak_memory_bytes: list[int]
    source: str  # which candidate won: a seed's name or the list scheduler's policy
    tried: int  # candidates priced


class _ListScheduler:
    """One stage per rank (stage s on rank s). Each rank's next action is the one it could start
    first, known from the actions already placed; the globally earliest is placed next, so an
    action never starts before data that a later placement could deliver."""

    def __init__(self, costs: Sequence[StageCost], cuts: Sequence[CutLink], m: int, policy: Policy):
        self.S, self.m, self.p = len(costs), m, policy
        self.dur = [action_seconds(c) for c in costs]
        self.delay = [c.busy_s + c.latency_s + c.cpu_s for c in cuts]  # contention left to the simulator
        S = self.S
        self.f_end: list[list[float | None]] = [[None] * m for _ in range(S)]
        self.i_end: list[list[float | None]] = [[None] * m for _ in range(S)]
        self.next_f, self.next_i, self.held = [0] * S, [0] * S, [0] * S
        self.clock = [0.0] * S
        self.pending_w: list[deque[int]] = [deque() for _ in range(S)]
        self.lists: list[list[Action]] = [[] for _ in range(S)]
        self.last_input = [False] * S  # whether the rank's last F or I was an I

    # A rank's candidate next action is (start, kind, micro-batch), its stage the rank's own:
    # the Action itself is made only for the one committed (the scheduler weighs three options
    # per rank each time a neighbour moves, tens of thousands of times per run).

    def _input(self, s: int) -> tuple[float, Kind, int] | None:
        k = self.next_i[s]
        if k >= self.m or (own := self.f_end[s][k]) is None:
            return None
        if s == self.S - 1:
            return max(self.clock[s], own), Kind.BACKWARD_INPUT, k
        grad = self.i_end[s + 1][k]
        if grad is None:
            return None
        return max(self.clock[s], own, grad + self.delay[s]), Kind.BACKWARD_INPUT, k

    def _forward(self, s: int) -> tuple[float, Kind, int] | None:
        k = self.next_f[s]
        if k >= self.m or self.held[s] >= self.p.caps[s]:
            return None
        if s == 0:
            return self.clock[s], Kind.FORWARD, k
        act = self.f_end[s - 1][k]
        if act is None:
            return None
        return max(self.clock[s], act + self.delay[s - 1]), Kind.FORWARD, k

    def best(self, s: int) -> tuple[float, Kind, int] | None:
        """Rank s's next action (start, kind, micro-batch), or None while it has nothing it
        could start."""
        clock, p = self.clock[s], self.p
        i, f = self._input(s), self._forward(s)
        blocked = self.next_f[s] < self.m and self.held[s] >= p.caps[s]
        w = (clock, Kind.BACKWARD_WEIGHT, self.pending_w[s][0]) if self.pending_w[s] else None
        if w and blocked and (i is None or i[0] > clock):
            return w  # the memory limit: free a micro-batch before the next forward
        if self.next_f[s] < p.warm[s]:
            pick = f or i
        else:
            want_f = self.last_input[s]
            due, other = (f, i) if want_f else (i, f)
            possible = (self.next_f[s] < self.m and not blocked) if want_f else self.next_i[s] < self.next_f[s]
            if due is not None and (p.strict or other is None or due[0] <= other[0]):
                pick = due
            elif p.strict and possible:
                pick = None  # wait for the one due
            else:
                pick = other
        if w and (pick is None or pick[0] - clock >= p.alpha * self.dur[s][_W]):
            return w
        return pick

    def commit(self, s: int, start: float, kind: Kind, mb: int) -> None:
        end = start + self.dur[s][_SLOT_OF[kind]]
        self.clock[s] = end
        self.lists[s].append(Action(kind, s, mb))
        if kind is Kind.FORWARD:
            self.f_end[s][mb] = end
            self.next_f[s] += 1
            self.held[s] += 1
        elif kind is Kind.BACKWARD_INPUT:
            self.i_end[s][mb] = end
            self.next_i[s] += 1
            self.pending_w[s].append(mb)
        if kind is not Kind.BACKWARD_WEIGHT:
            self.last_input[s] = kind is Kind.BACKWARD_INPUT
        else:
            self.pending_w[s].popleft()
            self.held[s] -= 1

    def run(self) -> list[list[Action]]:
        heap: list[tuple[float, int, int, Kind, int]] = []  # start, rank, version, kind, micro-batch
        version = [0] * self.S

        def push(s: int) -> None:
            version[s] += 1
            if (b := self.best(s)) is not None:
                heapq.heappush(heap, (b[0], s, version[s], b[1], b[2]))

        for s in range(self.S):
            push(s)
        for _ in range(3 * self.S * self.m):
            while heap and heap[0][2] != version[heap[0][1]]:
                heapq.heappop(heap)
            if not heap:
                raise ScheduleError(f"zb-auto's list scheduler deadlocked (caps {list(self.p.caps)})")
            start, s, _, kind, mb = heapq.heappop(heap)
            self.commit(s, start, kind, mb)
            for q in (s - 1, s, s + 1):
                if 0 <= q < self.S:
                    push(q)
        return self.lists


_SLOT_OF = {k: k.slot for k in Kind}
_W = Kind.BACKWARD_WEIGHT.slot


def list_schedule(costs: Sequence[StageCost], cuts: Sequence[CutLink] | None, m: int, policy: Policy) -> Schedule:
    """The list scheduler's order for these costs and cut links (None: free) under ``policy``."""
    if any(c < 1 for c in policy.caps) or len(policy.caps) != len(costs) or len(policy.warm) != len(costs):
        raise ScheduleError(f"zb-auto needs one warm-up and one in-flight cap >= 1 per rank, got "
                            f"{list(policy.warm)} and {list(policy.caps)}")
    links = list(cuts) if cuts is not None else [CutLink()] * (len(costs) - 1)
    ranks = _ListScheduler(costs, links, m, policy).run()
    return from_order(NAME, len(costs), m, rows(ranks))  # checked, as a stored order is


def rows(ranks: Sequence[Sequence[Action]]) -> tuple[str, ...]:
    """Each rank's actions in the engine's notation, comma separated: what a plan stores."""
    return tuple(",".join(map(str, acts)) for acts in ranks)


def _families(pp: int, m: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(warm-up, cap) pairs to try: 1F1B's and ZB-H1's warm-up pp - r and ZB-H2's 2(pp - r) - 1;
    caps from 1F1B's pp - r plus a margin (ZB-H1 keeps pp everywhere) up to ZB-H2's 2pp - 1;
    each clipped to [1, m], a warm-up to its cap; duplicates dropped, least memory first."""
    warms = [[pp - r for r in range(pp)], [2 * (pp - r) - 1 for r in range(pp)]]
    extras = sorted({0, 1, 2, pp // 2, pp - 1} & set(range(pp)))
    caps = [[pp - r + extra for r in range(pp)] for extra in extras]
    caps += [[pp] * pp, [2 * (pp - r) - 1 for r in range(pp)], [2 * pp - 1] * pp]
    out: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for cap in caps:
        c = tuple(max(1, min(x, m)) for x in cap)
        for warm in warms:
            pair = (tuple(max(1, min(x, y)) for x, y in zip(warm, c, strict=True)), c)
            if pair not in out:
                out.append(pair)
    return sorted(out, key=lambda wc: (sum(wc[1]), wc[1], wc[0]))


def policies(pp: int, m: int) -> list[Policy]:
    """Every list-scheduler run build_auto tries, in a fixed order (so it is deterministic)."""
    return [Policy(warm, caps, alpha, strict) for warm, caps in _families(pp, m) for alpha in ALPHAS
            for strict in (True, False)]


def _fits(peaks: list[int], budget: Sequence[int]) -> bool:
    return all(p <= b for p, b in zip(peaks, budget, strict=True))


def build_auto(costs: Sequence[StageCost], cuts: Sequence[CutLink] | None, m: int,
               memory_limit_bytes: Sequence[int], *, max_candidates: int | None = None) -> AutoResult | None:
    """The fastest zb-auto order for one stage per rank with these stage costs and cut links
    (len(costs) - 1; None: free transfers) whose peak memory fits ``memory_limit_bytes`` on
    every rank; None where no candidate fits. ``max_candidates`` bounds the list-scheduler runs
    (the published orders are always priced)."""
    pp = len(costs)
    if pp < 1 or m < 1:
        raise ScheduleError("zb-auto needs at least one stage and one micro-batch")
    if len(memory_limit_bytes) != pp:
        raise ScheduleError(f"zb-auto needs one memory limit per rank: {len(memory_limit_bytes)} for {pp} ranks")
    links = list(cuts) if cuts is not None else [CutLink()] * (pp - 1)
    if len(links) != pp - 1:
        raise ScheduleError(f"{len(links)} cut links for {pp} stages (need {pp - 1})")
    stage_costs = list(costs)
    best: tuple[float, int, str, Schedule, list[int]] | None = None
    tried = 0
    seen: set[tuple[tuple[Action, ...], ...]] = set()
    for source, ranks in _candidates(stage_costs, links, m, max_candidates):
        if ranks in seen:
            continue
        seen.add(ranks)
        schedule = one_stage_per_rank(NAME, m, ranks)
        tried += 1
        peaks = peak_memory(schedule, stage_costs)
        if not _fits(peaks, memory_limit_bytes):
            continue
        step = step_time(schedule, stage_costs, links)
        if best is None or (step, max(peaks)) < best[:2]:
            best = (step, max(peaks), source, schedule, peaks)
    if best is None:
        return None
    step, _, source, schedule, peaks = best
    return AutoResult(from_order(NAME, pp, m, rows(schedule.ranks)), step, peaks, source, tried)


def any_order_bound(costs: Sequence[StageCost], cuts: Sequence[CutLink], m: int) -> float:
    """A step time no one-stage-per-rank order of these stage costs beats (zb-auto's, whichever
    candidate wins), under the simulator's rules: rank s's first action is a forward (each of its
    backwards needs its own forward first), and its first forward waits for that micro-batch's
    forwards on every earlier stage and their transfers (link busy time plus latency). From then
    on it runs m forwards and m backwards, each whole (B) or split (I then W), one action at a
    time, then all-reduces and steps its optimizer: step >= head_s + m (F + min(B, I + W)) +
    tail_s, for every s."""
    head, bound = 0.0, 0.0
    for s, c in enumerate(costs):
        f, whole, inp, weight = action_seconds(c)
        bound = max(bound, head + m * (f + min(whole, inp + weight)) + c.allreduce_s + c.optimizer_s)
        if s < len(cuts):
            head += f + cuts[s].busy_s + cuts[s].latency_s
    return bound


def _candidates(costs: list[StageCost], links: list[CutLink], m: int,
                max_candidates: int | None) -> Iterator[tuple[str, tuple[tuple[Action, ...], ...]]]:
    """The published orders, then the list scheduler's, each with where it came from."""
    pp = len(costs)
    for name in SEEDS:
        yield name, build(name, pp, m).ranks
    for policy in policies(pp, m)[:max_candidates]:
        try:
            lists = tuple(map(tuple, _ListScheduler(costs, links, m, policy).run()))
        except ScheduleError:  # this warm-up and cap deadlock the alternation
            continue
        yield policy.describe(), lists
        fused = _fuse(lists, costs)
        if fused != lists:
            yield policy.describe() + ", whole backwards where W follows I", fused
    for name in ("zb-h1", "zb-h2"):
        yield name + ", whole backwards where W follows I", _fuse(build(name, pp, m).ranks, costs)


def _fuse(ranks: tuple[tuple[Action, ...], ...], costs: list[StageCost]) -> tuple[tuple[Action, ...], ...]:
    """The same order with each I directly followed by its own W run as one whole backward B,
    on the stages where B is the shorter (a measured whole backward often beats I + W: one
    pass, one action's overhead)."""
    out = []
    for acts in ranks:
        row: list[Action] = []
        for a in acts:
            prev = row[-1] if row else None
            if (a.kind == Kind.BACKWARD_WEIGHT and prev is not None and prev.kind == Kind.BACKWARD_INPUT
                    and prev.mb == a.mb and prev.stage == a.stage and _whole_is_shorter(costs[a.stage])):
                row[-1] = Action(Kind.FULL_BACKWARD, a.stage, a.mb)
            else:
                row.append(a)
        out.append(tuple(row))
    return tuple(out)


def _whole_is_shorter(c: StageCost) -> bool:
    _, whole, inp, weight = action_seconds(c)
    return whole < inp + weight


__all__ = ["NAME", "AutoResult", "Policy", "any_order_bound", "build_auto", "list_schedule", "policies", "rows"]
