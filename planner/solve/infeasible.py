"""Why nothing fits: the least memory the allowed configurations need on their fullest device
against what that device has usable, and only the ways out that lower it.

With one stage per device a stage's memory is its device's, so the dynamic program over
stages finds the least any partition needs (``StageBounds.memory`` is exact there). With
several stages per device (interleaved, V) the stages are balanced by the same program and the
split is priced by the simulator: the lightest split found, not a proven least.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from planner.cost import Segment, bytes_per_param
from planner.errors import PlannerError
from planner.evaluate import Config, evaluate
from planner.formats import DTYPE_BYTES, Cluster, Profile, Training
from planner.schedules import build
from planner.solve.bounds import FULL, Policy, StageBounds
from planner.solve.exact import lb_partition

if TYPE_CHECKING:
    from planner.solve.search import Search
    from planner.solve.settings import Settings


@dataclass(frozen=True)
class Need:
    """The memory one configuration needs on its fullest device, at least (``exact``) or for
    the lightest split found."""

    config: Config
    need_bytes: float
    usable_bytes: float
    where: str  # which device holds what, and with which recomputation
    exact: bool

    @property
    def short_bytes(self) -> float:
        return self.need_bytes - self.usable_bytes


# A way out must lower the need by at least this share of it: with the global batch fixed, a smaller
# micro-batch often moves the need by a few bytes, which would read as "--mbs 1 (needs the same)".
_MATTERS = 0.01


def _fmt(n: float) -> str:
    from planner.units import fmt_bytes

    return fmt_bytes(n)


def whole_cluster(profile: Profile, cluster: Cluster, training: Training) -> str | None:
    """Where even perfect sharding cannot fit: the model's weights, gradients and optimizer state
    (ZeRO's (2 + 2 + K) bytes per parameter, section 3.1) against every device's usable memory
    together, which no split of any kind (pipeline, tensor, ZeRO 3) can beat."""
    n_params = (sum(layer.param_bytes for layer in profile.layers)
                - sum((len(g.layers) - 1) * g.param_bytes for g in profile.tied)) / DTYPE_BYTES[profile.dtype]
    per = bytes_per_param(training, profile.dtype)
    need = n_params * per
    usable = [d.memory_bytes - cluster.reserved_bytes for d in cluster.devices]
    if need <= sum(usable) or min(usable) <= 0:  # a reserve beyond a device's memory is explained apart
        return None
    count = f"{n_params / 1e9:.2f} B" if n_params >= 1e8 else f"{n_params / 1e6:.2f} M"
    return (f"nothing fits on {cluster.name} in all: {count} parameters x {per} bytes "
            f"({training.optimizer}, {training.precision} precision: weights, gradients and optimizer state) "
            f"need {_total(need)}, the cluster's {len(cluster.devices)} devices have {_total(sum(usable))} "
            "usable in all: no split of any kind fits; use more devices")


def _total(n: float) -> str:
    """Decimal terabytes for cluster-sized totals (as memory is sold), else binary units."""
    return f"{n / 1e12:.2f} TB" if n >= 1e11 else _fmt(n)


def need_of(search: Search, cfg: Config, policy: Policy, fixed: list[int] | None) -> Need | None:
    """The least memory cfg needs on its fullest device under the recomputation policy, with
    the stage starts ``fixed`` where given; None where it has too few layers for its stages."""
    b = StageBounds(search.table_for(cfg), search.cluster, cfg, build(cfg.schedule, cfg.pp, cfg.m, cfg.v),
                    search.ranks_for(cfg), policy)

    room = max(b.cap)  # shortfalls shifted to stay positive: the program's max starts at 0

    def over(s: int, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        least, choice = b.least_memory(s, i, j)
        return least - b.cap[s] + room, choice

    _, stages = lb_partition(b, cost=over, fixed=fixed)
    if stages is None:
        return None
    names = [layer.name for layer in search.profile.layers]
    if b.one_chunk:
        shortfall = [float(b.memory(s, np.array([i]), np.array([j]), c)[0]) - b.cap[s]
                     for s, (i, j, c) in enumerate(stages)]
        s = int(np.argmax(shortfall))
        i, j, c = stages[s]
        where = f"stage {s} holding {_span(names, i, j)}, {_recompute(c)}"
        return Need(cfg, shortfall[s] + b.cap[s], b.cap[s], where, exact=True)
    segments = [Segment(i, j, "full" if c == FULL else "none") for i, j, c in stages]
    ranks = search.ranks_for(cfg)
    ev = evaluate(search.table_for(cfg), search.cluster, cfg, segments, detail=False, ranks=ranks)
    r = max(range(len(ranks)), key=lambda k: ev.peak_memory_bytes[k] - ranks[k].capacity_bytes)
    held = [_span(names, i, j) for s, (i, j, _) in enumerate(stages) if b.schedule.stage_rank[s] == r]
    return Need(cfg, float(ev.peak_memory_bytes[r]), float(ranks[r].capacity_bytes),
                f"several stages per device: rank {r} holding {' and '.join(held)}", exact=False)


def _span(names: Sequence[str], i: int, j: int) -> str:
    return names[i] if j == i + 1 else f"{names[i]}..{names[j - 1]}"


def _recompute(choice: int) -> str:
    return "full recomputation" if choice == FULL else "no recomputation"


def least_need(search: Search, configs: Iterable[Config], policy: Policy, *, pinned_cuts: bool = True,
               deadline: float = float("inf")) -> tuple[Need | None, Need | None]:
    """(one stage per device, several stages per device): the configuration of each kind with
    the least shortfall (the user's --fix-cuts applied unless ``pinned_cuts`` is False). After
    ``deadline``, the configurations not reached are skipped once one has an answer."""
    best: dict[bool, Need] = {}
    for cfg in sorted(configs, key=lambda c: (-c.pp, c.mbs)):  # the most memory-friendly first
        if time.perf_counter() > deadline and best:
            break
        need = need_of(search, cfg, policy, search.fixed(cfg) if pinned_cuts else None)
        if need is not None and (need.exact not in best or need.short_bytes < best[need.exact].short_bytes):
            best[need.exact] = need
    return best.get(True), best.get(False)


def _headline(one: Need | None, several: Need | None) -> Need | None:
    """The figure to lead with: the proven least where one stage per device was allowed; the
    several-stage one where it needs less (or where it is all there is)."""
    if one is None or (several is not None and several.short_bytes < one.short_bytes):
        return several
    return one


def explain(search: Search, configs: Sequence[Config], deadline: float = float("inf")) -> str:
    """The least memory any allowed configuration needs, where it overflows, and the ways out."""
    cluster, s = search.cluster, search.settings
    top = max(d.memory_bytes for d in cluster.devices)
    if top - cluster.reserved_bytes <= 0:
        return (f"nothing fits: the devices have no usable memory ({_fmt(top)} each at most, "
                f"{_fmt(cluster.reserved_bytes)} reserved for the runtime): use a cluster with more "
                "memory per device, or a smaller reserve in the cluster file")
    one, several = least_need(search, configs, search.policy, deadline=deadline)
    lead = _headline(one, several)
    if lead is None:
        return "nothing fits: no configuration has enough layers for its stages"
    text = f"nothing fits: {_claim(lead, one, several, s)}"
    ways = ways_out(search, configs, lead, deadline)
    return text + (f". Ways out: {', '.join(ways)}" if ways else "")


def _claim(lead: Need, one: Need | None, several: Need | None, s: Settings) -> str:
    terms = (["your --fix-cuts split"] if s.fix_cuts is not None else []) + \
        (["one stage per device"] if lead.exact and several is not None else [])
    among = f", with {' and '.join(terms)}" if terms else ""
    if lead.exact:
        what = f"the least memory any plan needs is {_fmt(lead.need_bytes)} on its fullest device{among}"
    else:
        what = f"the lightest plan found needs {_fmt(lead.need_bytes)} on its fullest device{among}"
    text = f"{what} ({lead.config.describe()}, {lead.where})"
    if lead.usable_bytes <= 0:
        return text + "; it has no usable memory (the runtime's reserve is larger than the device)"
    if lead.short_bytes > 0:
        return text + f"; it has {_fmt(lead.usable_bytes)} usable, {_fmt(lead.short_bytes)} short"
    # the stage bounds allow it, yet every plan simulated overflows
    return text + f"; it has {_fmt(lead.usable_bytes)} usable, but no partition found fits in the simulation"


def ways_out(search: Search, configs: Sequence[Config], lead: Need, deadline: float = float("inf")) -> list[str]:
    """Only the changes that lower the least memory needed: each pinned setting let go in turn
    (priced again), a smaller micro-batch to profile, more devices, more memory."""
    s = search.settings
    out = []
    for flag, relaxed, policy in _relaxations(s, search.policy):
        try:
            others = _configs(search, relaxed)
        except PlannerError:  # no configuration without that pin either: nothing to suggest
            continue
        one, several = least_need(search, others, policy, pinned_cuts=relaxed.fix_cuts is not None,
                                  deadline=deadline)
        better = _headline(one, several)
        enough = lead.short_bytes - _MATTERS * lead.need_bytes
        if better is not None and (better.short_bytes <= 0 or better.short_bytes < enough):
            out.append(f"{flag(better.config)} (needs {_fmt(better.need_bytes)}"
                       + (", fits)" if better.short_bytes <= 0 else ")"))
    smallest = min(search.profile.mbs_sizes)
    if lead.config.mbs == smallest > 1:
        out.append(f"a micro-batch smaller than {smallest} (planner profile --mbs 1)")
    n_dev, n_layers = len(search.cluster.devices), len(search.profile.layers)
    if s.pp is None and s.fix_cuts is None and lead.config.pp == n_dev < n_layers:
        out.append("more devices, for more stages (--cluster with more GPUs or nodes)")
    more = _fmt(lead.need_bytes + search.cluster.reserved_bytes)
    out.append(f"devices with {more} of memory or more" if lead.exact else f"devices with about {more} of memory")
    return out


def _configs(search: Search, settings: Settings) -> list[Config]:
    from planner.solve.settings import search_space

    return search_space(search.profile, search.cluster, settings)


def _relaxations(s: Settings, policy: Policy) -> Iterator[tuple[Callable[[Config], str], Settings, Policy]]:
    """(how to say it, the settings without that pin, the recomputation policy) for each pin."""
    if s.recompute == "none":
        yield (lambda cfg: "--recompute auto"), s, Policy("auto")
    if s.fix_cuts is not None:
        yield (lambda cfg: "drop --fix-cuts"), s.replace(fix_cuts=None), policy
    if s.pp is not None or s.dp is not None:
        yield ((lambda cfg: f"--pp {cfg.pp}" + (f" --dp {cfg.dp}" if s.dp is not None else "")),
               s.replace(pp=None, dp=None), policy)
    if s.mbs is not None:
        yield (lambda cfg: f"--mbs {cfg.mbs}"), s.replace(mbs=None), policy
    if s.microbatches is not None:
        yield (lambda cfg: f"--microbatches {cfg.m}"), s.replace(microbatches=None), policy
    if s.schedules is not None or s.virtual_stages is not None:
        yield ((lambda cfg: f"--schedule {cfg.schedule}" + (f" --virtual-stages {cfg.v}" if cfg.v > 1 else "")),
               s.replace(schedules=None, virtual_stages=None), policy)


def explain_undecided(search: Search, configs: Sequence[Config], undecided: Sequence[Config],
                      deadline: float = float("inf")) -> str:
    """No plan found, and time did not bind: what the decided configurations need, and why the
    others stayed open (so that raising the time limit is not offered where it changes nothing)."""
    from planner.solve.search import ILP_VARIABLES

    s = search.settings
    loose = [c for c in undecided if search.large_multi(c)]
    ilp = [c for c in loose if len(search.profile.layers) * c.n_stages <= ILP_VARIABLES]
    why = ("their stage bounds are too loose to branch on that many partitions" if loose
           else f"branch and bound stopped at its budget ({search.budget(undecided[0])} simulations, or its "
                "search nodes, each)")
    text = (f"no plan found: {len(undecided)} configuration(s) stayed undecided (e.g. {undecided[0].describe()}): "
            f"{why}, not the time limit (raising --time-limit does not help)")
    ways = (["add --ilp for tighter bounds"] if ilp and not s.ilp else []) + [
        "pin --virtual-stages 1 or a one-stage-per-device --schedule"
        if all(c.n_stages > c.pp for c in undecided) else "pin --pp, --mbs or --schedule"]
    left_open = set(undecided)
    decided = [c for c in configs if c not in left_open]
    one, several = least_need(search, decided, search.policy, deadline=deadline)
    lead = _headline(one, several)
    known = ""
    if lead is not None and lead.short_bytes > 0:
        known = f"; of the others, {_claim(lead, one, several, s)}"
        ways += ways_out(search, decided, lead, deadline)
    return text + known + f". Ways out: {', '.join(ways)}"
