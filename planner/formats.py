"""The three file formats (profile, cluster, plan): typed, versioned, validated on load.

Each model is frozen and forbids unknown keys, so a typo in a hand-edited plan fails when the file
is loaded, naming the file and the field. ``kind`` tells the formats apart so that passing a
profile where a plan is expected says so. Units are in the names: ``_s`` seconds, ``_bytes`` bytes.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
import signal
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from planner.errors import InputError, ScheduleError, one_line
from planner.schedules import SCHEDULES, canonical, check_combination, from_order

SCHEMA_VERSION: Final = 1
INPUT = "@input"  # pseudo-layer: the batch handed to the first stage
LOSS = "@loss"  # pseudo-layer: the loss function on the last stage

Dtype = Literal["float32", "bfloat16", "float16"]
OptimizerName = Literal["sgd", "sgd-momentum", "adam"]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
JsonScalar = int | float | str | bool | None

# Bounds on what a file may say. A measured quantity beyond them is a unit mistake, not a
# measurement; within them every sum and product planner forms stays finite (no overflow, no
# numpy warnings) and exact enough.
MAX_MEASURED_S = 1e6  # one layer's pass, one message's latency: 11.6 days is no measurement
MAX_MEASURED_BYTES = 2**50  # 1 PiB: beyond any device's memory (a CPU host has a few TiB)
MAX_INT = 2**62  # any integer in any file: int64 (numpy's) with room for a sum
MAX_NUMBER = 1e30  # any number: sums over the 400,000 actions solve simulates stay finite
MAX_DEPTH = 32  # JSON nesting: the formats nest six levels; deeper is not one of them
MAX_FILE_BYTES = 512 * 2**20  # a profile of thousands of layers is a few MiB
MAX_ACTIONS = 400_000  # the largest schedule a plan may have: solve's cap (solve.search.MAX_ACTIONS)


def _integer(value: Any) -> Any:
    if isinstance(value, (bool, float)):  # Literal[1] accepts True and 1.0 (equal to 1) even in strict mode
        raise ValueError(f"Input should be an integer, not {json.dumps(value)}")
    return value


Version = Annotated[Literal[1], BeforeValidator(_integer)]
ZeroStage = Annotated[Literal[0, 1, 2, 3], BeforeValidator(_integer)]
Seconds = Annotated[float, Field(ge=0, le=MAX_MEASURED_S)]  # measured
Bytes = Annotated[int, Field(ge=0, le=MAX_MEASURED_BYTES)]  # measured or a device's memory
Factor = Annotated[float, Field(ge=1e-6, le=1e6)]  # a relative speed or a scale


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------- profile


class ModelRef(_Frozen):
    """Which model, how to build it again, and a fingerprint of its structure."""

    name: str
    factory: str = Field(description="'path/to/file.py:function' or 'package.module:function'")
    args: dict[str, JsonScalar] = Field(default_factory=dict)
    depth: int | None = Field(default=None, description="module depth layers were cut at (None: natural blocks)")
    fingerprint: str = Field(description="sha256 of module paths, types and parameter shapes")
    tensor_parallel: bool | None = Field(default=None, description="whether the factory gives a tp_plan, which "
                                         "planner execute needs to split the model over tp > 1 ranks (None: "
                                         "not recorded)")
    sequence_parallel: bool | None = Field(default=None, description="whether its tp_plan runs sequence "
                                           "parallelism (marks norms 'sequence'); solve plans without it for "
                                           "a model that does not (None: not recorded)")


class DeviceInfo(_Frozen):
    type: Literal["cpu", "cuda"]
    name: str
    memory_bytes: Bytes
    workspace_bytes: Bytes = Field(default=0, description="kept by the runtime once used (cuBLAS "
                                 "workspace), on top of any tensor")


class LayerCost(_Frozen):
    """One layer at one micro-batch size. Times are medians; ``*_spread`` is (p90 - p10) / median."""

    fwd_s: Seconds
    bwd_s: Seconds = Field(description="whole backward: input and weight gradients")
    bwd_input_s: Seconds | None = None
    bwd_weight_s: Seconds | None = None
    act_bytes: Bytes = Field(description="bytes the layer creates and saves for backward")
    out_bytes: Bytes
    peak_bytes: Bytes = Field(default=0, description="transient bytes above inputs, forward or backward")
    wgrad_bytes: Bytes = Field(default=0, description="kept from the input-gradient pass until the "
                             "weight-gradient pass (split backward)")
    fwd_spread: float = Field(default=0.0, ge=0, le=1e6)
    bwd_spread: float = Field(default=0.0, ge=0, le=1e6)


class TpLayerCost(_Frozen):
    """One layer at one micro-batch size split over tp devices by the model's tp_plan, as one
    device measured it (the slowest of the tp ranks): times include the layer's collectives."""

    fwd_s: Seconds
    bwd_s: Seconds = Field(description="whole backward: input and weight gradients")
    bwd_input_s: Seconds | None = None
    bwd_weight_s: Seconds | None = None
    act_bytes: Bytes | None = Field(default=None, description="bytes one device saves for backward; None: "
                                    "not measured (the cost model divides the tp-1 bytes)")
    fwd_spread: float = Field(default=0.0, ge=0, le=1e6)
    bwd_spread: float = Field(default=0.0, ge=0, le=1e6)


class TpCosts(_Frozen):
    """A layer measured at one tensor-parallel degree (``planner profile --tp``)."""

    sequence_parallel: bool = Field(description="measured with sequence parallelism (the layer's inputs and "
                                    "outputs the local part of the sequence)")
    param_bytes: Bytes | None = Field(default=None, description="one device's share of the layer's "
                                      "parameters; None: not measured")
    by_mbs: dict[str, TpLayerCost] = Field(min_length=1)


class Layer(_Frozen):
    name: str = Field(description="module path, e.g. 'transformer.h.3'; 'block@2' for the second call of a "
                                  "module called several times")
    param_bytes: Bytes
    by_mbs: dict[str, LayerCost]
    same_as: str | None = Field(default=None, description="the identical layer (module class, parameter "
                                "shapes, input shapes and dtypes) whose measured costs this one shares; "
                                "None: measured itself")
    optimizer_peak_bytes: dict[OptimizerName, Bytes] = Field(
        default_factory=dict, description="per optimizer: the bytes one step over this layer's parameters "
        "alone allocates above its state and frees again (its temporaries); absent: not measured")
    tp_costs: dict[str, TpCosts] = Field(
        default_factory=dict, description="per tensor-parallel degree above 1 (a key such as '2'): the "
        "layer measured split over that many devices; absent: the cost model derives it from by_mbs")

    @model_validator(mode="after")
    def _tp_keys(self) -> Layer:
        for key, costs in self.tp_costs.items():
            if not re.fullmatch(r"[1-9][0-9]{0,3}", key) or key == "1":
                raise ValueError(f"tp_costs key {key!r} is not a tensor-parallel degree above 1")
            extra = sorted(set(costs.by_mbs) - set(self.by_mbs))
            if extra:
                raise ValueError(f"tp_costs[{key!r}] has micro-batch sizes {extra} that by_mbs lacks")
        return self


class Edge(_Frozen):
    """A tensor flowing from one layer to another. One edge per (tensor, consumer)."""

    src: str
    dst: str
    bytes_per_sample: Bytes
    tensor: int = Field(default=0, ge=0, le=2**20, description="which output of src")
    saved: bool = Field(default=False, description="dst keeps this tensor for its backward")


class TiedGroup(_Frozen):
    """Parameters shared by several layers (e.g. embedding and LM head); counted in each layer."""

    layers: list[str] = Field(min_length=2)
    param_bytes: Bytes


class WholeCost(_Frozen):
    """The whole model timed at once, and the scale that makes the layer sum agree with it."""

    fwd_s: Seconds
    bwd_s: Seconds
    optimizer_s: Seconds = 0.0
    layer_sum_s: float = Field(ge=0, description="sum of layer and loss fwd_s + bwd_s, unscaled")
    scale: Factor = Field(description="multiply layer times by this to match the whole")
    launch_bound: bool = False
    calibrated_on: list[str] | None = Field(default=None, min_length=2, max_length=2, description="first and "
                                            "last layer of the chain timed at once where the whole model did "
                                            "not fit the device (fwd_s, bwd_s and layer_sum_s are the chain's, "
                                            "optimizer_s the layers' summed); None: the whole model")


class LossCost(_Frozen):
    by_mbs: dict[str, LayerCost]


class Measurement(_Frozen):
    timer: str
    repeats: int = Field(ge=1)
    warmup: int = Field(ge=0)
    threads: int | None = Field(default=None, ge=1)
    dedupe: bool = Field(default=False, description="identical layers measured once (see Layer.same_as)")

    @property
    def estimated(self) -> str | None:
        """How the costs were estimated (``planner profile --estimate``), or None where measured."""
        return self.timer if self.timer.startswith("estimate") else None


class BatchInfo(_Frozen):
    input_bytes_per_sample: Bytes
    target_bytes_per_sample: Bytes


class Profile(_Frozen):
    kind: Literal["profile"] = "profile"
    schema_version: Version = SCHEMA_VERSION
    model: ModelRef
    device: DeviceInfo
    dtype: Dtype
    layers: list[Layer] = Field(min_length=1)
    edges: list[Edge] = Field(default_factory=list)
    loss: LossCost | None = None
    tied: list[TiedGroup] = Field(default_factory=list)
    batch: BatchInfo = BatchInfo(input_bytes_per_sample=0, target_bytes_per_sample=0)
    whole: dict[str, WholeCost] = Field(default_factory=dict)
    measurement: Measurement | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"layer name {dup!r} appears twice")
        reserved = next((n for n in names if n in (INPUT, LOSS)), None)
        if reserved is not None:
            raise ValueError(f"layer name {reserved!r} is reserved: edges use it for the batch and the loss")
        sizes = set(self.layers[0].by_mbs)
        if not sizes:
            raise ValueError("layers[0].by_mbs is empty")
        for key in sizes:
            if not re.fullmatch(r"[1-9][0-9]{0,5}", key):
                raise ValueError(f"by_mbs key {key!r} is not a micro-batch size (a positive integer "
                                 "written without leading zeros)")
        for i, layer in enumerate(self.layers):
            if set(layer.by_mbs) != sizes:
                raise ValueError(f"layers[{i}] ({layer.name}) has micro-batch sizes "
                                 f"{sorted(layer.by_mbs)}, layers[0] has {sorted(sizes)}")
        index = {n: i for i, n in enumerate(names)}
        for k, e in enumerate(self.edges):
            if e.src != INPUT and e.src not in index:
                raise ValueError(f"edges[{k}].src {e.src!r} is not a layer")
            if e.dst != LOSS and e.dst not in index:
                raise ValueError(f"edges[{k}].dst {e.dst!r} is not a layer")
            if index.get(e.src, -1) >= index.get(e.dst, len(names)):
                raise ValueError(f"edges[{k}] goes from {e.src!r} back to {e.dst!r}: "
                                 "layers must be in topological order")
        problem = _edge_problem(self.edges) or _tied_problem(self.tied, {layer.name: layer for layer in self.layers}) \
            or _time_problem(self.layers, self.loss)
        if problem:
            raise ValueError(problem)
        if self.loss is not None and set(self.loss.by_mbs) != sizes:
            raise ValueError("loss.by_mbs sizes differ from the layers'")
        if set(self.whole) - sizes:
            raise ValueError(f"whole has micro-batch sizes {sorted(set(self.whole) - sizes)} the layers lack")
        return self

    @property
    def mbs_sizes(self) -> list[int]:
        return sorted(int(k) for k in self.layers[0].by_mbs)


def _edge_problem(edges: list[Edge]) -> str | None:
    """One edge per (tensor, consumer): a repeated edge would send and hold its bytes twice."""
    seen: dict[tuple[str, int, str], int] = {}
    for k, e in enumerate(edges):
        j = seen.setdefault((e.src, e.tensor, e.dst), k)
        if j != k:
            return f"edges[{k}] repeats edges[{j}] ({e.src!r} output {e.tensor} to {e.dst!r})"
    return None


def _time_problem(layers: list[Layer], loss: LossCost | None) -> str | None:
    """Some time at every micro-batch size: a step of no time has no throughput to compare."""
    for key in layers[0].by_mbs:
        costs = [layer.by_mbs[key] for layer in layers] + ([loss.by_mbs[key]] if loss and key in loss.by_mbs else [])
        if not any(c.fwd_s > 0 or c.bwd_s > 0 for c in costs):
            return f"every layer takes 0 s forward and backward at micro-batch {key}: a profile needs measured times"
    return None


def _tied_problem(tied: list[TiedGroup], layers: dict[str, Layer]) -> str | None:
    """Tied bytes are counted in each member's param_bytes and subtracted where members share a
    stage, so a layer's tied bytes, over all its groups, are at most its own parameter bytes."""
    shared: dict[str, int] = {}
    for k, group in enumerate(tied):
        for name in group.layers:
            if name not in layers:
                return f"tied[{k}] names unknown layer {name!r}"
            shared[name] = shared.get(name, 0) + group.param_bytes
        if len(set(group.layers)) != len(group.layers):
            dup = next(n for n in group.layers if group.layers.count(n) > 1)
            return f"tied[{k}] names layer {dup!r} twice"
    for name, nbytes in shared.items():
        if nbytes > layers[name].param_bytes:
            return (f"tied groups share {nbytes:,} parameter bytes of layer {name!r}, which has "
                    f"{layers[name].param_bytes:,}: tied bytes are counted in each layer's param_bytes")
    return None


# --------------------------------------------------------------------------------------- cluster


class Link(_Frozen):
    bandwidth_bytes_per_s: float = Field(ge=1)
    latency_s: Seconds
    cpu_s: Seconds = Field(default=0.0, description="time the receiving rank's own thread spends per "
                         "message (gloo receives on the calling thread; NCCL works on the GPU: 0)")


class DeviceSpec(_Frozen):
    name: str
    type: Literal["cpu", "cuda"] = "cuda"
    memory_bytes: Bytes = Field(gt=0)
    speed: Factor = Field(default=1.0, description="throughput relative to the profiled device")
    action_overhead_s: Seconds = Field(default=0.0, description="the engine's bookkeeping per action on "
                                     "the rank's thread (hidden behind GPU kernels: 0 on GPUs)")


class NodeSpec(_Frozen):
    name: str = ""
    devices: list[DeviceSpec] = Field(min_length=1)


class Cluster(_Frozen):
    kind: Literal["cluster"] = "cluster"
    schema_version: Version = SCHEMA_VERSION
    name: str
    nodes: list[NodeSpec] = Field(min_length=1)
    intra_node: Link
    inter_node: Link | None = None
    reserved_bytes: Bytes = Field(default=0,
                                description="per device, not available to tensors (runtime context)")

    @model_validator(mode="after")
    def _inter_node_link(self) -> Cluster:
        if len(self.nodes) > 1 and self.inter_node is None:
            raise ValueError("a cluster of several nodes needs an inter_node link")
        return self

    @cached_property
    def devices(self) -> list[DeviceSpec]:
        return [d for node in self.nodes for d in node.devices]

    def usable_bytes(self, devices: list[int]) -> int:
        """Memory a stage placed on these devices (its data-parallel replicas) may use: the
        smallest one's, less the reserve."""
        return min(self.devices[d].memory_bytes for d in devices) - self.reserved_bytes

    def node(self, device: int) -> int:
        return bisect.bisect_right(self._node_starts, device) - 1

    @cached_property
    def _node_starts(self) -> list[int]:
        """The global index of each node's first device."""
        out, total = [], 0
        for n in self.nodes:
            out.append(total)
            total += len(n.devices)
        return out

    def link(self, a: int, b: int) -> Link:
        """The link between global device indices a and b."""
        if self.inter_node is None or self.node(a) == self.node(b):
            return self.intra_node
        return self.inter_node


# ------------------------------------------------------------------------------------------ plan


class Parallel(_Frozen):
    """Pipeline, data-parallel and tensor-parallel degrees, and how data-parallel replicas shard
    their state. ``zero`` is the ZeRO stage (Rajbhandari et al., SC'20): 1 shards optimizer state
    over dp (Megatron-LM's distributed optimizer), 2 also gradients (FSDP ``SHARD_GRAD_OP``), 3 also
    parameters (FSDP ``FULL_SHARD``, FSDP2 ``fully_shard``)."""

    pp: int = Field(ge=1)
    dp: int = Field(ge=1)
    tp: int = Field(default=1, ge=1, le=72, description="tensor-parallel degree: devices per replica of a stage "
                    "(Megatron-LM's --tensor-model-parallel-size)")
    zero: ZeroStage = Field(default=0, description="ZeRO stage over dp: 0 replicates, 1 shards optimizer "
                                      "state, 2 also gradients (FSDP SHARD_GRAD_OP), 3 also parameters (FSDP "
                                      "FULL_SHARD)")
    sequence_parallel: bool = Field(default=False, description="tp > 1 only: activations outside the tensor-"
                                    "parallel matmuls sharded along the sequence (Korthikanti et al., 2022)")


class Microbatch(_Frozen):
    size: int = Field(ge=1)
    count: int = Field(ge=1)
    global_batch: int = Field(ge=1)

    @model_validator(mode="after")
    def _global(self) -> Microbatch:
        if self.global_batch % (self.size * self.count):
            raise ValueError(f"global_batch {self.global_batch} is not a multiple of "
                             f"size x count = {self.size * self.count}")
        return self


class ScheduleSpec(_Frozen):
    name: str
    virtual_stages: int = Field(default=1, ge=1)
    order: list[str] | None = Field(
        default=None, exclude_if=lambda v: v is None,
        description="zb-auto only: each rank's actions in the engine's notation, comma separated "
                    "(0F0,0I0,0W0,...), the schedule built for this plan's stage costs and memory")


class Training(_Frozen):
    """What the optimizer keeps per parameter. 'param': gradients and states in the parameter
    dtype (plain PyTorch). 'mixed': fp32 master weights and states beside low-precision
    parameters (Megatron-LM, DeepSpeed)."""

    optimizer: OptimizerName = "adam"
    precision: Literal["param", "mixed"] = "param"


class Collectives(_Frozen):
    """Seconds of collective communication inside a stage's fwd_s, bwd_input_s and bwd_weight_s,
    per micro-batch, as the cost model prices them; a whole backward runs the input- and the
    weight-gradient parts' both. For reports: the simulator reads only the totals."""

    fwd_s: float = Field(default=0.0, ge=0)
    bwd_input_s: float = Field(default=0.0, ge=0)
    bwd_weight_s: float = Field(default=0.0, ge=0)


class StageCost(_Frozen):
    """Per micro-batch, on the stage's device, as the simulator consumes it."""

    fwd_s: float = Field(ge=0)
    bwd_input_s: float = Field(ge=0, description="input-gradient part of backward, recompute included")
    bwd_weight_s: float = Field(ge=0)
    bwd_s: float | None = Field(default=None, ge=0, description="whole backward, recompute included "
                                "(None: input plus weight parts)")
    send_bytes: int = Field(ge=0, description="bytes sent to the next stage per micro-batch")
    act_bytes: int = Field(ge=0, description="held per micro-batch in flight")
    wgrad_bytes: int = Field(default=0, ge=0, description="held per micro-batch between its I and W")
    grad_in_bytes: int = Field(default=0, ge=0, description="input gradient kept per micro-batch until the "
                               "step ends (the engine accumulates it into the receive buffer)")
    static_bytes: int = Field(ge=0, description="weights, gradients, optimizer state")
    transient_bytes: int = Field(ge=0, description="workspace while one micro-batch computes")
    optimizer_transient_bytes: int = Field(default=0, ge=0, description="above the static bytes while the "
                                           "optimizer steps (its temporaries)")
    param_bytes: int = Field(ge=0)
    batch_bytes: int = Field(default=0, ge=0, description="inputs/targets of all micro-batches held")
    optimizer_s: float = Field(default=0.0, ge=0)
    allreduce_s: float = Field(default=0.0, ge=0)
    tp_comm: Collectives = Field(default=Collectives(), description="the tensor-parallel all-reduces (reduce-"
                                 "scatter + all-gather pairs with sequence parallelism) inside the times above")
    zero_comm: Collectives = Field(default=Collectives(), description="ZeRO-3's weight all-gathers over dp "
                                   "after every forward, inside the times above (ZeRO 1 and 2 collect once "
                                   "a step: allreduce_s)")
    overhead_s: float = Field(default=0.0, ge=0, description="runtime bookkeeping per action")


class StagePrediction(_Frozen):
    compute_s: float = Field(ge=0)
    peak_memory_bytes: int = Field(ge=0)


class Stage(_Frozen):
    index: int = Field(ge=0)
    layers: list[str] = Field(min_length=1)
    rank: int = Field(ge=0, description="pipeline rank holding this stage")
    devices: list[Annotated[int, Field(ge=0)]] = Field(min_length=1,
                                                       description="cluster device per data-parallel replica: "
                                                       "the first of its parallel.tp consecutive devices")
    recompute: Literal["none", "full", "selective"] = "none"
    recompute_layers: list[str] = Field(default_factory=list)
    cost: StageCost
    predicted: StagePrediction


class Prediction(_Frozen):
    step_time_s: float = Field(ge=0)
    throughput_samples_per_s: float = Field(ge=0)
    bubble_fraction: float = Field(ge=0, le=1)
    peak_memory_bytes: int = Field(ge=0)


class BaselineResult(_Frozen):
    name: str
    layers_per_stage: list[int]
    step_time_s: float | None = Field(description="None when the split does not fit")
    peak_memory_bytes: int
    fits: bool


def _listed(value: Any) -> Any:
    """A JSON array read into a tuple (settings are frozen and hashable); anything else is refused
    in the file's own terms."""
    if isinstance(value, list):
        return tuple(value)
    if value is not None and not isinstance(value, tuple):
        raise ValueError("Input should be a valid list")
    return value


Recompute = Literal["none", "full", "auto", "selective"]
Objective = Literal["time", "memory"]
Schedules = Annotated[tuple[str, ...], Field(min_length=1), BeforeValidator(_listed)]
Cuts = Annotated[tuple[int, ...], BeforeValidator(_listed)]


class SolverSettings(BaseModel):
    """What the search was asked: the pins, the schedules, the recomputation policy, the budgets.
    ``planner.solve.Settings`` is this model plus the training and the worker count, which the
    plan records elsewhere or which do not change the answer; a plan stores it as
    ``provenance.solver.settings``, and ``check --resolve`` searches with it again. Keys a newer
    planner adds are kept; ``None`` leaves a dimension to the search."""

    model_config = ConfigDict(extra="allow", frozen=True)

    global_batch: int | None = Field(default=None, ge=1)
    pp: int | None = Field(default=None, ge=1)
    dp: int | None = Field(default=None, ge=1)
    mbs: int | None = Field(default=None, ge=1)
    microbatches: int | None = Field(default=None, ge=1)
    schedules: Schedules | None = None  # None: every schedule the engine runs
    virtual_stages: int | None = Field(default=None, ge=1)
    recompute: Recompute = "auto"  # none | full | auto (per stage) | selective (per layer, ILP)
    fix_cuts: Cuts | None = None  # stage start positions after the first
    top: int = Field(default=5, ge=1)
    include_model_only: bool = False
    budget: int = Field(default=400, ge=1)  # simulations per configuration in branch and bound
    ilp: bool = False  # bound interleaved / V configurations with the ILP (slower, tighter)
    time_limit_s: float = Field(default=10.0, gt=0, le=MAX_MEASURED_S)
    objective: Objective = "time"  # time: the fastest plan; memory: the least peak memory per device
    tp: int | None = Field(default=None, ge=1)  # None: every divisor of the devices per node
    zero: ZeroStage | None = None  # None: searched (1-3 where dp > 1)
    sequence_parallel: bool = True  # with tp > 1 (Megatron-LM's --sequence-parallel)


class SolverRecord(BaseModel):
    """How the plan was found: the settings, whether the search proved it optimal, and what it
    walked. Keys a newer planner adds are kept; every field may be absent in a hand-made plan."""

    model_config = ConfigDict(extra="allow", frozen=True)

    settings: SolverSettings | None = None
    proven_optimal: bool | None = None
    proven_for_fixed_cuts: bool | None = Field(default=None, description="the split was the user's "
                                               "(--fix-cuts): proven optimal given it")
    lower_bound_s: float | None = Field(default=None, ge=0)
    configurations: int | None = Field(default=None, ge=0)
    configurations_solved: int | None = Field(default=None, ge=0)
    notes: list[str] = Field(default_factory=list)


class Provenance(_Frozen):
    profile_fingerprint: str
    planner_version: str
    solver: SolverRecord = SolverRecord()
    costs_estimated: str | None = Field(default=None, description="how the profile's costs were estimated "
                                        "(planner profile --estimate); None: they were measured")


class Plan(_Frozen):
    kind: Literal["plan"] = "plan"
    schema_version: Version = SCHEMA_VERSION
    model: ModelRef
    cluster: Cluster
    parallel: Parallel
    microbatch: Microbatch
    schedule: ScheduleSpec
    training: Training = Training()
    dtype: Dtype = "float32"
    layers: list[str] | None = Field(default=None, description="the model's layers in order, as profiled: "
                                     "the stages cut this sequence into contiguous runs (None: not recorded)")
    stages: list[Stage] = Field(min_length=1)
    predicted: Prediction
    baselines: list[BaselineResult] = Field(default_factory=list)
    provenance: Provenance

    @model_validator(mode="after")
    def _stages(self) -> Plan:
        want = self.parallel.pp * self.schedule.virtual_stages
        if len(self.stages) != want:
            raise ValueError(f"{len(self.stages)} stages, but pp x virtual_stages = {want}")
        for i, stage in enumerate(self.stages):
            if stage.index != i:
                raise ValueError(f"stages[{i}].index is {stage.index}")
            if stage.rank >= self.parallel.pp:
                raise ValueError(f"stages[{i}].rank {stage.rank} >= pp {self.parallel.pp}")
            if len(stage.devices) != self.parallel.dp:
                raise ValueError(f"stages[{i}] has {len(stage.devices)} devices, dp is {self.parallel.dp}")
            n = len(self.cluster.devices)
            if any(d + self.parallel.tp > n for d in stage.devices):
                raise ValueError(f"stages[{i}] names a device beyond the cluster's {n}"
                                 + (f" (each replica spans tp = {self.parallel.tp} devices)" if self.parallel.tp > 1
                                    else ""))
        if self.microbatch.global_batch != self.microbatch.size * self.microbatch.count * self.parallel.dp:
            raise ValueError("microbatch.global_batch must equal size x count x dp")
        problem = plan_problem(self)
        if problem:
            raise ValueError(problem)
        return self


# ---------------------------------------------------------------------------- plan semantics


def plan_problem(plan: Plan) -> str | None:
    """What makes a well-typed plan one that cannot run, or None: its schedule, its devices,
    its layers, its size. Every command reads plans through this (``Plan`` validates with it)."""
    return (_schedule_problem(plan) or _device_problem(plan) or _layer_problem(plan) or _size_problem(plan)
            or _settings_problem(plan))


def _schedule_problem(plan: Plan) -> str | None:
    name, v = plan.schedule.name, plan.schedule.virtual_stages
    if name not in SCHEDULES:
        try:
            return f"schedule.name {name!r} is an alias: write {canonical(name)!r}"
        except ScheduleError:
            return f"schedule.name {name!r} is unknown: choose one of {', '.join(SCHEDULES)}"
    try:
        check_combination(name, plan.parallel.pp, plan.microbatch.count, v)
        _check_order(plan)
    except ScheduleError as e:
        return f"schedule: {e}"
    pp = plan.parallel.pp
    for s, stage in enumerate(plan.stages):  # loop placement s % pp; V: rank r holds r and 2pp-1-r
        want = s % pp if SCHEDULES[name].placement == "loop" else min(s, 2 * pp - 1 - s)
        if stage.rank != want:
            return f"stages[{s}].rank is {stage.rank}, but {name} places stage {s} on rank {want}"
    return None


def _check_order(plan: Plan) -> None:
    """zb-auto carries its action order, and only zb-auto does; the order must be a valid one."""
    order, name = plan.schedule.order, plan.schedule.name
    if name == "zb-auto" and order is None:
        raise ScheduleError("zb-auto needs schedule.order, its per-rank actions (solve writes them)")
    if name != "zb-auto" and order is not None:
        raise ScheduleError(f"schedule.order is for zb-auto only; {name} builds its own order")
    if order is not None:
        from_order(name, plan.parallel.pp, plan.microbatch.count, tuple(order))


def _device_problem(plan: Plan) -> str | None:
    """A pipeline rank owns tp devices per replica (named by the first), and no device is shared
    by two ranks."""
    owner: dict[int, int] = {}
    held: dict[int, list[int]] = {}
    tp = plan.parallel.tp
    if tp == 1 and plan.parallel.sequence_parallel:
        return "parallel.sequence_parallel needs tp > 1: it shards what tensor parallelism replicates"
    for s, stage in enumerate(plan.stages):
        if len(set(stage.devices)) != len(stage.devices):
            dup = next(d for d in stage.devices if stage.devices.count(d) > 1)
            return f"stages[{s}] lists device {dup} twice: each data-parallel replica needs its own device"
        mine = held.setdefault(stage.rank, stage.devices)
        if mine != stage.devices:
            return (f"stages[{s}] is on devices {stage.devices}, another stage of rank {stage.rank} on "
                    f"{mine}: a rank's stages share its devices")
        for d in (first + k for first in stage.devices for k in range(tp)):
            if owner.setdefault(d, stage.rank) != stage.rank:
                return f"device {d} holds both rank {owner[d]} and rank {stage.rank} (stages[{s}])"
        if any(d % tp for d in stage.devices):
            return (f"stages[{s}] devices {stage.devices}: with tp = {tp} each replica starts at a multiple "
                    f"of {tp} and owns the {tp} devices from there")
    return None


def _layer_problem(plan: Plan) -> str | None:
    """Every layer in exactly one stage, the stages cutting the model's order into contiguous runs."""
    where: dict[str, int] = {}
    for s, stage in enumerate(plan.stages):
        for name in stage.layers:
            if name in where:
                return f"layer {name!r} is in stages[{where[name]}] and stages[{s}]: each layer belongs to one stage"
            where[name] = s
        extra = sorted(set(stage.recompute_layers) - set(stage.layers))
        if extra:
            return f"stages[{s}].recompute_layers names {extra[0]!r}, which is not one of its layers"
        if stage.recompute_layers and stage.recompute != "selective":
            return (f"stages[{s}].recompute_layers names layers, but recompute is {stage.recompute!r}: "
                    "only 'selective' recomputes a chosen list")
    if plan.layers is None:
        return None
    order = {name: k for k, name in enumerate(plan.layers)}
    if len(order) != len(plan.layers):
        dup = next(n for n in plan.layers if plan.layers.count(n) > 1)
        return f"layers lists {dup!r} twice"
    for name, s in where.items():
        if name not in order:
            return f"stages[{s}] names layer {name!r}, which the model lacks (it is not in layers)"
    missing = [n for n in plan.layers if n not in where]
    if missing:
        return f"layer {missing[0]!r} is in no stage" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    flat = [n for stage in plan.stages for n in stage.layers]
    if flat != plan.layers:
        k = next(k for k, (a, b) in enumerate(zip(flat, plan.layers, strict=False)) if a != b)
        return (f"stages[{where[flat[k]]}] has {flat[k]!r} where the model's order has {plan.layers[k]!r}: "
                "stages hold contiguous runs of the layers, in order")
    return None


def _size_problem(plan: Plan) -> str | None:
    """A plan no larger than what solve simulates, and byte counts the simulator's 64-bit
    arithmetic holds with every micro-batch in flight."""
    m = plan.microbatch.count
    actions = len(plan.stages) * m * 3  # F and B, or F, I and W, per stage and micro-batch (as solve counts)
    if actions > MAX_ACTIONS:
        return (f"{m:,} micro-batches over {len(plan.stages)} stages schedule about {actions:,} actions, "
                f"more than the {MAX_ACTIONS:,} solve simulates: use fewer micro-batches")
    for s, stage in enumerate(plan.stages):
        c = stage.cost
        held = (c.act_bytes + c.wgrad_bytes + c.grad_in_bytes + c.send_bytes) * (m + 1)
        if c.static_bytes + c.batch_bytes + c.transient_bytes + held > MAX_INT // len(plan.stages):
            return f"stages[{s}].cost byte counts are too large to simulate with {m} micro-batches in flight"
    return None


def _settings_problem(plan: Plan) -> str | None:
    """Saved solver settings that a search could run with: cuts that fall inside the plan's own
    layers (their types and ranges are the model's)."""
    saved = plan.provenance.solver.settings
    if saved is None:
        return None
    n = sum(len(stage.layers) for stage in plan.stages)
    cuts = list(saved.fix_cuts or ())
    if cuts != sorted(set(cuts)) or any(not 0 < k < n for k in cuts):
        return (f"provenance.solver.settings.fix_cuts {cuts}: stage starts must increase and lie between "
                f"1 and {n - 1} (the plan's {n} layers)")
    return None


# ---------------------------------------------------------------------------------- load / dump

KINDS: dict[str, type[BaseModel]] = {"profile": Profile, "cluster": Cluster, "plan": Plan}
M = TypeVar("M", bound=BaseModel)


def describe(err: ValidationError) -> str:
    """A validation error in one line: the first problem with its field, and how many more."""
    first = err.errors()[0]
    loc = _path(tuple(first["loc"]), top="")
    msg = one_line(first["msg"].removeprefix("Value error, "))
    more = len(err.errors()) - 1
    return (f"field {loc}: " if loc else "") + msg + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def parse(data: Any, model: type[M], source: str) -> M:
    """Validate already-decoded JSON as ``model``; ``source`` names it in errors. Types are
    strict: a file says ``0``, not ``"0"``, where a number is meant."""
    kind = model.model_fields["kind"].default
    if not isinstance(data, dict):
        check_numbers(data, source)
        raise InputError(f"{source}: expected a JSON object (a planner {kind}), found {_json_type(data)}")
    found = data.get("kind")
    if isinstance(found, str) and found != kind and found in KINDS:
        raise InputError(f"{source}: this is a planner {found}, not a {kind}")
    version = data.get("schema_version")
    if version is not None and (type(version) is not int or version != SCHEMA_VERSION):
        raise InputError(f"{source}: schema_version {version!r} is not supported "
                         f"(this planner reads {kind} schema_version {SCHEMA_VERSION})")
    check_numbers(data, source)
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as err:
        raise InputError(f"{source}: {describe(err)}") from None


def _json_type(value: Any) -> str:
    """What JSON calls a decoded value."""
    for kind, name in ((bool, "a boolean"), (int, "a number"), (float, "a number"), (str, "a string"),
                       (list, "an array")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


class _Refused(str):
    """A number JSON should not hold (NaN, Infinity, a 20-digit integer), kept as its text so
    that ``check_numbers`` can say where it is."""


def _int_or_refused(text: str) -> int | _Refused:
    return int(text) if len(text.lstrip("-")) <= 19 else _Refused(text)


def check_numbers(data: Any, source: str) -> None:
    """Finite numbers of sane size only, nested no deeper than the formats are (iteratively:
    no recursion limit to hit)."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, ())]
    while stack:
        value, where = stack.pop()
        if len(where) > MAX_DEPTH:
            raise InputError(f"{source}: nested deeper than {MAX_DEPTH} levels (at {_path(where)})")
        if isinstance(value, dict):
            stack.extend((v, (*where, k)) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, (*where, k)) for k, v in enumerate(value))
        elif isinstance(value, _Refused):
            raise InputError(f"{source}: field {_path(where)}: {value[:24]}{'...' * (len(value) > 24)} "
                             "is not a finite number of sane size")
        elif isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        elif isinstance(value, int) and abs(value) > MAX_INT:
            raise InputError(f"{source}: field {_path(where)}: {value} is beyond {MAX_INT} (2^62)")
        elif isinstance(value, float) and not (math.isfinite(value) and abs(value) <= MAX_NUMBER):
            raise InputError(f"{source}: field {_path(where)}: {value} is not a finite number "
                             f"of at most {MAX_NUMBER:g}")


def _path(where: tuple[str | int, ...], top: str = "(top level)") -> str:
    """Where in a file, as ``stages.0.cost``; a key that would not read as one (empty, with a dot,
    a newline or other control character) is written as a JSON string."""
    def key(k: str | int) -> str:
        text = str(k)
        return text if text and text.isprintable() and "." not in text else json.dumps(text)
    return ".".join(map(key, where)) or top


def read_json(path: str | os.PathLike[str]) -> Any:
    """A regular file's JSON. Pipes, devices and folders are refused before opening (a pipe
    would block); NaN and Infinity, which Python's json accepts, are kept as ``_Refused``."""
    p = Path(path)
    if not str(path):
        raise InputError("an empty path was given where a file is expected")
    try:
        info = p.stat()
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except OSError as err:
        raise InputError(f"{p}: cannot read: {err.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError(f"{p}: is a directory, expected a JSON file")
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{p}: is not a regular file (a pipe, device or socket): give a JSON file")
    if info.st_size > MAX_FILE_BYTES:
        raise InputError(f"{p}: {info.st_size:,} bytes, more than the {MAX_FILE_BYTES:,} a planner file may have")
    try:
        with open(p, encoding="utf-8") as f:
            text = f.read(MAX_FILE_BYTES + 1)
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{p}: cannot read: {err}") from None
    if not text.strip():
        raise InputError(f"{p}: file is empty")
    try:
        return json.loads(text, parse_constant=_Refused, parse_int=_int_or_refused)
    except json.JSONDecodeError as err:
        raise InputError(f"{p}: not valid JSON (line {err.lineno}, column {err.colno}): "
                         f"{err.msg}") from None
    except RecursionError:
        raise InputError(f"{p}: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as err:  # e.g. a number too long to convert
        raise InputError(f"{p}: not valid planner JSON: {err}") from None


def load(path: str | os.PathLike[str], model: type[M]) -> M:
    return parse(read_json(path), model, str(path))


def load_profile(path: str | os.PathLike[str]) -> Profile:
    return load(path, Profile)


def load_cluster_file(path: str | os.PathLike[str]) -> Cluster:
    return load(path, Cluster)


def load_plan(path: str | os.PathLike[str]) -> Plan:
    return load(path, Plan)


def to_json(obj: BaseModel) -> str:
    return obj.model_dump_json(indent=1, exclude_none=False) + "\n"


def check_output(path: str | os.PathLike[str], *, inputs: tuple[str | os.PathLike[str] | None, ...] = (),
                 flag: str = "-o") -> Path:
    """Refuse, before any work, an output path that cannot be written or that names one of the
    command's inputs (writing it would destroy what is being read). Probes the folder with a
    temporary file, which is removed."""
    p = Path(path)
    if not str(path) or str(path) == ".":  # typer reads '' as Path(""), which is "."
        raise InputError(f"{flag} {str(path)!r}: empty, or the current folder; give a file name")
    if p.is_dir():
        raise InputError(f"{flag} {p}: is a directory; give a file name inside it")
    if p.exists() and not p.is_file():
        raise InputError(f"{flag} {p}: is not a regular file (a pipe or device); give a file name")
    for source in inputs:
        if source is not None and str(source) and p.exists() and Path(source).exists() \
                and os.path.samefile(p, source):
            raise InputError(f"{flag} {p}: is also an input of this command; writing it would "
                             "destroy it, choose another name")
    parent = _parent(p)
    if not parent.is_dir():
        raise InputError(f"{flag} {p}: folder {parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=parent)
    except OSError as err:
        raise InputError(f"{flag} {p}: cannot write in {parent}: {err.strerror}") from None
    os.close(fd)
    os.unlink(tmp)
    return p


def _parent(p: Path) -> Path:
    return p.parent if str(p.parent) else Path(".")


def write_atomic(path: str | os.PathLike[str], text: str | bytes) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written file."""
    p = Path(path)
    parent = _parent(p)
    if not parent.is_dir():
        raise InputError(f"{p}: folder {parent} does not exist")
    if p.is_dir():
        raise InputError(f"{p}: is a directory; give a file name")
    with _signals_held():
        _write_replace(p, parent, text)


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP wait while a file is written and renamed, then act: a file is
    complete or untouched, and no temporary file is left, however the process is stopped."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX: the rename alone keeps the file whole
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _write_replace(p: Path, parent: Path, text: str | bytes) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=parent)
    except OSError as err:
        raise InputError(f"{p}: cannot write in {parent}: {err.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(p))  # mkstemp makes it private; give it what a plain write would
        os.replace(tmp, p)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise InputError(f"{p}: cannot write: {err.strerror}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mode_for(path: Path) -> int:
    """The existing file's permissions, else the default for a new file under the umask."""
    if path.exists():
        return path.stat().st_mode & 0o777
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def dump(obj: BaseModel, path: str | os.PathLike[str]) -> None:
    write_atomic(path, to_json(obj))


def json_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema of a format, generated from the models above."""
    if kind not in KINDS:
        raise InputError(f"unknown format {kind!r}: choose one of {', '.join(KINDS)}")
    schema = KINDS[kind].model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://planner.dev/schemas/{kind}-v{SCHEMA_VERSION}.json"
    return schema


if __name__ == "__main__":  # regenerate the shipped schemas: python -m planner.formats
    here = Path(__file__).resolve().parent / "schemas"
    here.mkdir(exist_ok=True)
    for name in KINDS:
        write_atomic(here / f"{name}.schema.json", json.dumps(json_schema(name), indent=1) + "\n")
        print(f"wrote {here / name}.schema.json")
