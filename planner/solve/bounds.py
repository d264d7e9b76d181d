"""Per-stage lower bounds on the simulated step time, and stage memory, for whole arrays of
segments at once.

For stage s holding layers [i, j), ``g_s(i, j)`` is a time no schedule run can beat once stage s
holds exactly those layers, whatever the other stages hold:

    g = head + m * work - own_after + gap + max(tail, own_after + after)

* head: the first micro-batch must cross every earlier layer before stage s can start;
* m * work: stage s itself computes every micro-batch's forward and backward;
* gap (one-stage-per-rank schedules only): after its first forward, stage s waits for that
  micro-batch to cross every later layer and come back, and meanwhile can run only the forwards
  its schedule puts in between (k - 1 of them for 1F1B, where k is its in-flight limit; none for
  GPipe, whose first backward waits for the last forward to come back). When m > k the wait
  comes again after its last forward, filled by at most k - 1 backwards;
* tail: after stage s's last backward (or input gradient I), earlier layers still run that
  micro-batch's backward (or I); meanwhile stage s runs only the weight gradients its schedule
  puts after its last I (own_after); after: its own gradient all-reduce and optimizer step.
  Either may end the step.

Prefix terms use the fastest rank's speed and the smallest link latency, so the bound holds
whatever the other stages hold. A speed divides the compute only, not the tensor-parallel
collectives inside it (``CostTable.prefix_at``). ``tests/test_solve.py`` checks the bound against the simulator
on random partitions. The bound is what the dynamic program minimises; the simulator then
settles which partition is fastest (``planner.solve.exact``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from planner.cost import CostTable
from planner.evaluate import Config, RankDevice
from planner.formats import Cluster
from planner.schedules import Schedule, inflight_peaks, weight_versions
from planner.simulate import stage_states

# A stage cost for lb_partition: (stage, starts, ends) -> (value per segment, choice per segment).
# Layer positions: one, or one per segment.
Starts = int | np.ndarray
StageCostFn = Callable[[int, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]

NONE, FULL = 0, 1


@dataclass(frozen=True)
class Policy:
    """Which recomputation a stage may use: 'none', 'full', or 'auto' (none if it fits, else full)."""

    name: str = "auto"

    def options(self) -> tuple[int, ...]:
        return {"none": (NONE,), "full": (FULL,), "auto": (NONE, FULL)}[self.name]


class StageBounds:
    def __init__(self, table: CostTable, cluster: Cluster, config: Config, schedule: Schedule,
                 ranks: list[RankDevice], policy: Policy = Policy(), share: float = 1.0,
                 stage_work_cap: float = np.inf):
        """``share``: the fraction of its rank's memory a stage may use. 1 is a relaxation (a
        rank with several stages needs them all to fit at once); 1 / chunks a restriction.
        ``stage_work_cap``: the most seconds of work one stage may take in a step, a restriction
        too (inf: none); both are for finding partitions only, not for bounds."""
        self.t = table
        self.cfg = config
        self.schedule = schedule
        self.ranks = ranks
        self.policy = policy
        self.n = table.n
        self.S = schedule.n_stages
        self.m = config.m
        place = schedule.stage_rank
        self.remote_next = [s + 1 < self.S and place[s + 1] != place[s] for s in range(self.S)]
        self.hops = np.concatenate([[0], np.cumsum(self.remote_next[:-1])]).astype(int)  # links before each stage
        self.speed = [ranks[place[s]].speed for s in range(self.S)]
        self.cap = [ranks[place[s]].capacity_bytes * share for s in range(self.S)]
        self.vmax = max(r.speed for r in ranks)
        links = [cluster.intra_node] + ([cluster.inter_node] if cluster.inter_node else [])
        self.lat = min(link.latency_s for link in links) if len(ranks) > 1 else 0.0
        # data-parallel replicas: their ZeRO sharding and collectives (planner.cost.DataParallel)
        self.dps = [ranks[place[s]].data_parallel(cluster, config.zero) for s in range(self.S)]
        self.bpp = self.dps[0].state_factor(config.training, table.profile.dtype)
        self.versions = [weight_versions(config.schedule, config.pp, place[s]) for s in range(self.S)]
        self.split = schedule.split_backward
        self.one_chunk = schedule.n_stages == schedule.pp
        # all forwards before any backward: a stage waits for the whole rest of the pipeline
        self.flush_all = config.schedule in ("gpipe", "naive")
        # data-parallel all-reduce is linear in gradient bytes: seconds = a * bytes + c
        self.ar = [dp.step_coeffs() for dp in self.dps]
        self.opt_per_byte = table.optimizer_per_byte * self.dps[0].optimizer_share()
        self.optimizer = config.training.optimizer
        self.stage_work_cap = stage_work_cap

    # ------------------------------------------------------------------------ the order's facts

    @cached_property
    def _order(self) -> _OrderFacts:
        """What the schedule's order fixes (in-flight peaks, memory states): computed on first
        use, since a configuration the fluid program rules out needs none of it."""
        return _order_facts(self.schedule)

    @property
    def k(self) -> list[int]:
        return self._order.k

    @property
    def states(self) -> list[np.ndarray]:
        return self._order.states

    @property
    def tops(self) -> list[np.ndarray]:
        return self._order.tops

    @property
    def probes(self) -> list[np.ndarray]:
        return self._order.probes

    @property
    def w_after(self) -> list[int]:
        return self._order.w_after

    # ------------------------------------------------------------------------ pieces

    def params(self, i: Starts, j: Starts) -> np.ndarray:
        t = self.t
        i, j = np.asarray(i), np.asarray(j)
        out: np.ndarray = t.PARAMS[j] - t.PARAMS[i]
        for members, nbytes in t._tied:
            inside = sum(((i <= mbr) & (mbr < j)).astype(float) for mbr in members)
            out = out - np.maximum(inside - 1, 0) * nbytes
        return out

    def _parts(self, s: int, i: np.ndarray, j: np.ndarray, choice: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stage s's memory as (fixed bytes, the four per-micro-batch sizes its states count:
        activations held, weight-gradient inputs held, input gradient, output being sent, and
        what the optimizer step holds beyond the fixed bytes: ``simulate.optimizer_peak``)."""
        t = self.t
        params = self.params(i, j)
        dp = self.dps[s]  # the fullest replica's whole elements (CostTable.stage_cost)
        static = params * self.bpp + dp.padding_bytes(params, self.cfg.training, t.profile.dtype)
        static = static + (self.versions[s] - 1) * params
        static = static + t.GRAD_EXTRA[j] - t.GRAD_EXTRA[i]  # CostTable.grad_extra
        static = static + self.m * (t.cut[i] + t.cut[j])  # receive buffers, per micro-batch
        batch = np.where(i == 0, self.m * t.input_batch, 0.0) + np.where(j == self.n, self.m * t.target_batch, 0.0)
        if choice == FULL:
            held = t.PRODUCED[j] - t.PRODUCED[i]
            transient = t.recompute_peak_max[i, j]
        else:
            held = t.ACT[j] - t.ACT[i] + t.held_extra[i, j]
            transient = t.peak_max[i, j]
        # CostTable.shared_grad_bytes: a fully recomputed stage frees no saved tensors for it
        transient = transient + (t.shared_held[0][i, j] if choice == FULL else t.shared_grad[i, j])
        sent = t.cut[j] if self.remote_next[s] else np.zeros(i.shape)
        sizes = np.stack([held, t.WGRAD[j] - t.WGRAD[i], t.cut[i], sent])
        opt = t.optimizer_transient_matrix(self.optimizer)[i, j] * dp.optimizer_share()
        step = self.m * t.cut[i] + opt
        # CostTable.transient_bytes: the layer's workspace, the gradient sent and ZeRO 3's gather
        gather = params if self.dps[s].regathers else np.zeros(i.shape)
        transient = transient + t.cut[i] + gather + t.workspace
        return static + batch + transient, sizes, step - transient

    def memory(self, s: int, i: np.ndarray, j: np.ndarray, choice: int) -> np.ndarray:
        """Peak bytes of stage s's rank if it held only this stage (exact for one chunk per rank)."""
        fixed, sizes, step = self._parts(s, i, j, choice)
        peak: np.ndarray = fixed + np.maximum(self._inflight(self.states[s], sizes), step)
        return peak

    def fits(self, s: int, i: np.ndarray, j: np.ndarray, choice: int) -> np.ndarray:
        """memory(s, i, j, choice) <= cap[s], without weighing every state for every segment:
        each state count at its largest over-estimates the in-flight bytes, the few states
        ``probe`` keeps under-estimate them; only segments in between get every state."""
        fixed, sizes, step = self._parts(s, i, j, choice)
        room = self.cap[s] - fixed
        stepped = step <= room
        ok: np.ndarray = (self.tops[s] @ sizes <= room) & stepped
        maybe = np.flatnonzero(~ok & stepped & (self._inflight(self.probes[s], sizes) <= room))
        if len(maybe):
            ok[maybe] = self._inflight(self.states[s], sizes[:, maybe]) <= room[maybe]
        return ok

    @staticmethod
    def _inflight(states: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """The most any state holds: max over rows of counts . sizes, in column blocks."""
        out = np.empty(sizes.shape[1])
        step = max(1, 2**22 // max(len(states), 1))
        for a in range(0, sizes.shape[1], step):
            out[a: a + step] = (states @ sizes[:, a: a + step]).max(axis=0)
        return out

    def work(self, s: int, i: Starts, j: Starts, choice: int) -> np.ndarray:
        """Seconds stage s computes in a step: every micro-batch's forward and backward, with the
        gather ZeRO 3 runs after every forward."""
        at = self._at(s)
        f = at("F", j) - at("F", i)
        ef, ei, ew = self._zero_extra(s, i, j)
        if self.split:  # input and weight gradients as separate actions
            b = at("BI", j) - at("BI", i) + at("BW", j) - at("BW", i)
        else:
            b = at("B", j) - at("B", i)
        if choice == FULL:
            b = b + f
        seconds: np.ndarray = self.m * (f + ef + b + ei + ew)
        return seconds

    def _at(self, s: int | None) -> Callable[[str, Starts], np.ndarray]:
        """Prefix sums on stage s's rank (None: the fastest rank), indexed."""
        speed = self.vmax if s is None else self.speed[s]
        return lambda name, k: self.t.prefix_at(name, speed)[k]

    def _zero_extra(self, s: int, i: Starts, j: Starts) -> tuple[np.ndarray | float, ...]:
        """Per micro-batch, the seconds ZeRO adds to stage s's forward, input and weight gradients
        (``DataParallel.per_microbatch``, vectorised)."""
        dp = self.dps[s]
        if not dp.regathers:  # only ZeRO 3 gathers, after every forward
            return 0.0, 0.0, 0.0
        params = self.params(i, j)
        return np.where(params > 0, 0.5 * (dp.per_byte * params + dp.fixed), 0.0), 0.0, 0.0

    def head(self, s: int, i: Starts) -> np.ndarray:
        """Earliest start of stage s: the first micro-batch crosses every earlier layer."""
        start: np.ndarray = self._at(None)("F", i) + self.hops[s] * self.lat
        return start

    def tail(self, s: int, i: Starts) -> np.ndarray | float:
        """After stage s's last backward, earlier layers still run it (unless W may come last)."""
        return 0.0 if self.split else self._at(None)("B", i) + self.hops[s] * self.lat

    def bound(self, s: int, i: np.ndarray, j: np.ndarray, choice: int) -> np.ndarray:
        n, at, fastest = self.n, self._at(s), self._at(None)
        work = self.work(s, i, j, choice)
        ef, _, ew = self._zero_extra(s, i, j)
        f = at("F", j) - at("F", i) + ef  # one forward action, ZeRO-3's gather included
        if self.schedule.stream:  # steady state: no fill or drain
            steady: np.ndarray = work + self._after(s, i, j)
            return steady
        head = self.head(s, i)
        tail = self.tail(s, i)
        own_after = 0.0  # stage s's weight gradients its schedule runs after its last I
        if self.split:
            # that I's gradient still crosses every earlier layer's input gradient, while stage s
            # runs only those weight gradients
            tail = fastest("BI", i) + self.hops[s] * self.lat
            own_after = self.w_after[s] * (at("BW", j) - at("BW", i) + ew)
        gap = 0.0
        if self.one_chunk:
            back = "BI" if self.split else "B"
            rest = (fastest("F", n) - fastest("F", j) + fastest(back, n) - fastest(back, j)
                    + 2 * (self.S - 1 - s) * self.lat)
            if self.flush_all:
                gap = rest
            else:
                k = self.k[s]
                gap = np.maximum(rest - (k - 1) * f, 0.0)
                if self.m > k:  # and again after its last forward, waiting for that gradient
                    backward = work / self.m - f  # per micro-batch, recomputation included
                    gap = gap + np.maximum(rest - (k - 1) * backward, 0.0)
        total: np.ndarray = head + work - own_after + gap + np.maximum(tail, own_after + self._after(s, i, j))
        return total

    def _after(self, s: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        params = self.params(i, j)
        a, c = self.ar[s]
        ar = np.where(params > 0, a * params + c, 0.0)
        after: np.ndarray = ar + self.opt_per_byte * params / self.speed[s]
        return after

    # ------------------------------------------------------------------------ combined

    def eval(self, s: int, i: np.ndarray, j: np.ndarray, ub: float = np.inf) -> tuple[np.ndarray, np.ndarray]:
        """(bound, choice) for segments [i, j) as stage s; inf where nothing fits, or where the
        bound reaches ``ub`` (memory is not computed for those)."""
        best = np.full(i.shape, np.inf)
        choice = np.full(i.shape, -1, dtype=np.int8)
        todo = np.arange(len(i))
        for c in self.policy.options():  # recomputing never lowers the bound: first fit wins
            if not len(todo):
                break
            g = self.bound(s, i[todo], j[todo], c)
            keep = g < ub
            todo, g = todo[keep], g[keep]
            if not len(todo):
                break
            fits = self.fits(s, i[todo], j[todo], c)
            best[todo[fits]] = g[fits]
            choice[todo[fits]] = c
            todo = todo[~fits]
        return best, choice

    def least_memory(self, s: int, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Least memory stage s can need for [i, j) under the policy, and the choice giving it."""
        options = self.policy.options()
        values = np.array([self.memory(s, i, j, c) for c in options])
        best = values.argmin(axis=0)
        return values[best, np.arange(len(i))], np.array(options, dtype=np.int8)[best]

    def min_memory(self, s: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Least memory stage s can need for [i, j) under the policy (for 'nothing fits' reports)."""
        return self.least_memory(s, i, j)[0]


@dataclass(frozen=True)
class _OrderFacts:
    """What a schedule's order alone fixes for the bounds, whatever the costs: computed once per
    schedule and shared by every configuration run in it (its ZeRO stages, tp degrees,
    micro-batch sizes). Read only."""

    k: list[int]  # in-flight peak per stage
    states: list[np.ndarray]  # (activations held, I-to-W held, input gradients done, outputs being sent)
    tops: list[np.ndarray]  # every count at its largest
    probes: list[np.ndarray]
    w_after: list[int]


@lru_cache(maxsize=512)
def _order_facts(schedule: Schedule) -> _OrderFacts:
    states = [np.array(x, dtype=float) for x in stage_states(schedule)]
    return _OrderFacts(k=inflight_peaks(schedule), states=states, tops=[x.max(axis=0) for x in states],
                       probes=[_probes(x) for x in states], w_after=_weight_gradients_after_last_input(schedule))


def _probes(states: np.ndarray) -> np.ndarray:
    """A few states standing in for all of them in a quick under-estimate: those with the most
    activations held, the most held in all, and the largest total count."""
    picks = {int(np.lexsort(states.T[::-1])[-1])}  # most held, ties by the next counts
    for w in ([1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]):
        picks.add(int(np.argmax(states @ np.array(w))))
    return states[sorted(picks)]


def _weight_gradients_after_last_input(schedule: Schedule) -> list[int]:
    """Per stage: the W actions its rank runs for it after its last I (0 without a split)."""
    out = [0] * schedule.n_stages
    for actions in schedule.ranks:
        seen_last_i: set[int] = set()
        for a in reversed(actions):
            if a.kind == "I":
                seen_last_i.add(a.stage)
            elif a.kind == "W" and a.stage not in seen_last_i:
                out[a.stage] += 1
    return out


def least_memory_cost(b: StageBounds, within_capacity: bool = False) -> StageCostFn:
    """A stage cost for ``lb_partition``: ``b.least_memory``, inf where it exceeds the stage's
    device with ``within_capacity``."""
    def memory(s: int, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        least, choice = b.least_memory(s, i, j)
        return (np.where(least <= b.cap[s], least, np.inf) if within_capacity else least), choice
    return memory
