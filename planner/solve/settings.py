"""What the search reads (``Settings``, checked when made) and the configurations it walks:
tensor-parallel degree, pipeline and data-parallel degrees, ZeRO stage, micro-batch size and
count, schedule, virtual stages."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, get_args

from pydantic import ConfigDict, Field, ValidationError, model_validator

from planner.autosched import NAME as AUTO
from planner.autosched import SEEDS
from planner.errors import InputError, ScheduleError
from planner.evaluate import Config
from planner.formats import Cluster, Objective, Profile, Recompute, SolverSettings, Training, describe
from planner.schedules import SCHEDULES, canonical, check_combination

VIRTUAL = (2, 4)  # chunks per rank tried for interleaved schedules
SMALL_CLUSTER = 64  # up to this many devices every pp is tried, above it the divisors

RECOMPUTE: tuple[Recompute, ...] = get_args(Recompute)
OBJECTIVES: tuple[Objective, ...] = get_args(Objective)
NOT_RECORDED = frozenset({"training", "jobs"})  # the plan holds the training; jobs do not change the answer


class Settings(SolverSettings):
    """What the search reads: the settings a plan records (``SolverSettings``) plus the training
    and the worker count. Checked when made, so a typo fails here, in one line, and not as a
    silently different search."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    training: Training = Training()
    jobs: int | None = Field(default=None, ge=1)  # worker processes; None: one per core for large searches

    if not TYPE_CHECKING:  # type checkers read the fields' own signature

        def __init__(self, **values: Any) -> None:
            try:
                super().__init__(**values)
            except ValidationError as err:
                raise InputError(f"solver settings: {describe(err)}") from None

    @model_validator(mode="before")
    @classmethod
    def _flags(cls, values: Any) -> Any:
        """The checks whose message names the flag to change, before the field types are read."""
        if not isinstance(values, dict):
            return values
        zero, tp = values.get("zero"), values.get("tp")
        if zero is not None and zero not in (0, 1, 2, 3):
            raise InputError(f"--zero {zero}: the ZeRO stages are 0, 1, 2 and 3")
        if isinstance(tp, int) and tp < 1:
            raise InputError(f"--tp {tp}: give a degree of at least 1")
        if values.get("recompute", "auto") not in RECOMPUTE:
            raise InputError(f"--recompute {values['recompute']!r}: choose {', '.join(RECOMPUTE)}")
        if values.get("objective", "time") not in OBJECTIVES:
            raise InputError(f"--objective {values['objective']!r}: choose {' or '.join(OBJECTIVES)}")
        schedules = values.get("schedules")
        if schedules is not None and not schedules:
            raise InputError("--schedule names no schedule: give one or more, comma separated (gpipe,1f1b,...)")
        for name in schedules or ():
            if SCHEDULES[canonical(name)].placement == "v" and values.get("virtual_stages") not in (None, 2):
                raise InputError(f"--schedule {name} runs exactly 2 stages per device (V placement): "
                                 f"--virtual-stages {values['virtual_stages']} does not apply (drop it, or give 2)")
        return values

    def replace(self, **changes: Any) -> Settings:
        """These settings with some changed, checked again."""
        return Settings(**{**self._fields(), **changes})

    def _fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in type(self).model_fields}

    def record(self) -> SolverSettings:
        """What a plan's provenance stores (``solver.settings``)."""
        return SolverSettings(**{k: v for k, v in self._fields().items() if k not in NOT_RECORDED})

    @classmethod
    def from_record(cls, saved: SolverSettings | None, training: Training, global_batch: int) -> Settings:
        """The settings a plan's provenance stored, as the search reads them. Plans made before a
        field existed get the value that reproduces their search (tp 1 and ZeRO 0 before they were
        searched); keys this planner does not know are left out."""
        given = saved.model_dump(exclude_unset=True) if saved is not None else {}
        keep = {k: v for k, v in given.items() if k in SolverSettings.model_fields}
        keep["global_batch"] = keep.get("global_batch") or global_batch
        for key, before in (("tp", 1), ("zero", 0)):
            keep.setdefault(key, before)
        return cls(**keep, training=training)


def requested(settings: Settings) -> list[str]:
    """The schedules the plan may use."""
    if settings.schedules:
        return [canonical(s) for s in settings.schedules]
    return [name for name, info in SCHEDULES.items() if info.executable or settings.include_model_only]


def _schedules(settings: Settings) -> list[str]:
    """The schedules searched: zb-auto is built afterwards on the partitions found for the
    published orders it starts from (planner.autosched.SEEDS), which are searched in its place."""
    names = requested(settings)
    if AUTO not in names:
        return names
    return [n for n in names if n != AUTO] + [s for s in SEEDS if s not in names]


def _virtuals(name: str, pp: int, n_layers: int, settings: Settings) -> list[int]:
    info = SCHEDULES[name]
    if info.placement == "v":  # two stages per rank, or none where another count is pinned
        return [2] if settings.virtual_stages in (None, 2) else []
    if settings.virtual_stages is not None:
        return [settings.virtual_stages]
    if name == "interleaved-1f1b":
        return [v for v in VIRTUAL if pp * v <= n_layers]
    if name == "zb-h1":
        return [1] + [v for v in VIRTUAL if pp * v <= n_layers]
    return [1]


def _check_pins(profile: Profile, n_dev: int, settings: Settings) -> None:
    if settings.mbs and settings.mbs not in profile.mbs_sizes:
        raise InputError(f"--mbs {settings.mbs} was not profiled (profiled: "
                         f"{', '.join(map(str, profile.mbs_sizes))}); profile it with --mbs")
    tp = settings.tp or 1
    if (settings.pp or 1) * (settings.dp or 1) * tp > n_dev:
        pins = [f"--{k} {v}" for k, v in (("pp", settings.pp), ("dp", settings.dp), ("tp", settings.tp)) if v]
        raise InputError(f"{' x '.join(pins)} needs {(settings.pp or 1) * (settings.dp or 1) * tp} devices; "
                         f"the cluster has {n_dev}")


def tensor_degrees(cluster: Cluster, settings: Settings, profile: Profile | None = None) -> list[int]:
    """tp as pinned, else every divisor of the devices per node (of the smallest node's count,
    where nodes differ): a tensor-parallel group all-reduces twice per block each way, so it
    stays on a node's link (Narayanan et al., 2021, section 3.3). A model whose profile says it
    gives no tp_plan gets tp 1 unless tp is pinned (planner execute could not split it)."""
    if settings.tp:
        return [settings.tp]
    if profile is not None and profile.model.tensor_parallel is False:
        return [1]
    per_node = math.gcd(*(len(node.devices) for node in cluster.nodes))
    return [t for t in range(1, per_node + 1) if per_node % t == 0]


def sequence_parallel(profile: Profile, settings: Settings) -> bool:
    """Sequence parallelism as asked, unless the profile says the model's tp_plan does not run it
    (planner execute could not)."""
    return settings.sequence_parallel and profile.model.sequence_parallel is not False


def zero_stages(dp: int, settings: Settings) -> list[int]:
    """The ZeRO stage as pinned, else 1 over several replicas and 0 over one: stage 1 dominates the
    others under the cost model (``planner.cost.DataParallel``), so no partition, schedule or
    micro-batch size is better with another. Per stage of N parameter elements, with w, g and o
    bytes of weights, gradients and optimizer state per element:

    * stage 0 holds (w + g + o) N, stage 1 (w + g + o/dp) N + the padding
      (ceil(N/dp) - N/dp) o (``DataParallel.padding_bytes``), which is at most (1 - 1/dp) N o for
      N >= 1 (ceil(N/dp) <= N); both move one all-reduce's bytes a step (``step_coeffs``: stage 1
      reduce-scatters and all-gathers, ZeRO section 7.2.1) and stage 1 steps 1/dp of the optimizer;
    * stage 2 holds the same as stage 1 plus (w + g) N / dp (the gathered weights and whole
      gradients beside their shards, the same padding: ``padding_bytes``), the same temporaries
      (1/dp of the optimizer's: ``optimizer_share``) and no gather buffer; it moves the same bytes
      and steps the same share; stage 3 adds a gather buffer and a gather after every forward.

    So every time and memory term of stage 1 is at most stage 0's, 2's and 3's, and the simulated
    step time and peak only grow with each term. Pinned, a stage is priced as any other."""
    if settings.zero is not None:
        return [settings.zero]
    return [1] if dp > 1 else [0]


def _pipeline_degrees(n_dev: int, n_layers: int, settings: Settings) -> list[int]:
    if settings.pp:
        return [settings.pp]
    if n_dev <= SMALL_CLUSTER:
        return list(range(1, min(n_layers, n_dev) + 1))
    return [p for p in range(1, min(n_layers, n_dev) + 1) if n_dev % p == 0]  # every device used


def _data_degrees(n_dev: int, pp: int, settings: Settings) -> list[int]:
    if settings.dp:
        dps = [settings.dp]
    elif n_dev <= SMALL_CLUSTER:  # using fewer devices can pay off when all-reduce is costly
        dps = sorted({n_dev // pp, max(n_dev // pp // 2, 1)}, reverse=True)
    else:
        dps = [n_dev // pp]
    return [dp for dp in dps if dp >= 1 and pp * dp <= n_dev]


def _microbatches(pp: int, dp: int, mbs: int, settings: Settings) -> int | None:
    """Micro-batches per replica, None where the global batch does not split into them."""
    if not settings.global_batch:
        return settings.microbatches or 4 * pp
    per_replica, rem = divmod(settings.global_batch, dp)
    if rem or per_replica % mbs:
        return None
    m = per_replica // mbs
    return None if settings.microbatches and settings.microbatches != m else m


def _wanted(name: str, pp: int, m: int, settings: Settings) -> bool:
    if settings.schedules:
        return True
    if (m == 1) != (name == "naive"):
        return False  # with one micro-batch every schedule is the naive one
    return not (pp == 1 and name != "1f1b" and m > 1)  # one rank runs every schedule alike: keep one


def configurations(profile: Profile, cluster: Cluster, settings: Settings) -> Iterator[Config]:
    n_dev = len(cluster.devices)
    _check_pins(profile, n_dev, settings)
    for tp in tensor_degrees(cluster, settings, profile):
        for pp, dp in _degrees(n_dev // tp, len(profile.layers), settings):
            for zero in zero_stages(dp, settings):
                yield from _schedules_for(profile, settings, pp, dp, tp, zero)


def _degrees(n_dev: int, n_layers: int, settings: Settings) -> Iterator[tuple[int, int]]:
    """(pp, dp) over ``n_dev`` tensor-parallel groups."""
    for pp in _pipeline_degrees(n_dev, n_layers, settings):
        if pp * (settings.virtual_stages or 1) > n_layers:
            continue
        for dp in _data_degrees(n_dev, pp, settings):
            yield pp, dp


def _schedules_for(profile: Profile, settings: Settings, pp: int, dp: int, tp: int, zero: int) -> Iterator[Config]:
    sizes = [settings.mbs] if settings.mbs else profile.mbs_sizes
    names = _schedules(settings)
    only_seeds = set(names) - set(requested(settings))  # searched for zb-auto alone: one chunk
    n_layers = len(profile.layers)
    for mbs in sizes:
        m = _microbatches(pp, dp, mbs, settings)
        if m is None:
            continue
        for name in (n for n in names if _wanted(n, pp, m, settings)):
            for v in _virtuals(name, pp, n_layers, settings):
                if name in only_seeds and v != 1:
                    continue
                try:
                    check_combination(name, pp, m, v)
                except ScheduleError:
                    continue
                yield Config(pp=pp, dp=dp, mbs=mbs, m=m, schedule=name, v=v, training=settings.training,
                             tp=tp, zero=zero, sp=sequence_parallel(profile, settings) and tp > 1)


def search_space(profile: Profile, cluster: Cluster, settings: Settings) -> list[Config]:
    """Every configuration the settings allow (with --fix-cuts, those with its stage count)."""
    configs = list(configurations(profile, cluster, settings))
    if settings.fix_cuts is not None:
        configs = [c for c in configs if c.n_stages == len(settings.fix_cuts) + 1]
        if not configs:
            raise InputError(f"--fix-cuts gives {len(settings.fix_cuts) + 1} stages; no configuration "
                             "matches (pin --pp and --virtual-stages to agree)")
    if not configs:
        raise InputError("no configuration to search: check --pp, --dp, --mbs, --microbatches, "
                         "--global-batch and --schedule against the profile and cluster")
    return configs
