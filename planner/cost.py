"""Cost model: time and memory of a pipeline stage, pure arithmetic (no torch).

A stage is a contiguous run of layers ``[i, j)`` of the profile's topological order. Everything
here is per micro-batch on the stage's device unless the name says otherwise. ``CostTable`` holds
one micro-batch size's numbers as prefix sums and matrices so that the solver can price every
segment at once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np

from planner.errors import InputError
from planner.formats import (
    DTYPE_BYTES,
    Collectives,
    Layer,
    LayerCost,
    Link,
    Profile,
    StageCost,
    TpCosts,
    TpLayerCost,
    Training,
)
from planner.graph import LayerGraph

Recompute = Literal["none", "full", "selective"]

# Bytes per parameter beyond the weights themselves, as multiples of the parameter dtype size,
# or absolute fp32 bytes for the master copy and states of mixed precision.
# Mixed-precision Adam keeps fp32 master weights, momentum and variance: 12 bytes per parameter
# (Rajbhandari et al., "ZeRO", SC'20, section 3.1: K = 12).
_STATE_MULTIPLIER = {"sgd": 0, "sgd-momentum": 1, "adam": 2}


def state_bytes(training: Training, dtype: str) -> tuple[int, int, int]:
    """(weights, gradients, optimizer state) bytes per parameter: the ZeRO paper's 2 + 2 + K for
    mixed precision (section 3.1), the parameter dtype throughout otherwise."""
    d = DTYPE_BYTES[dtype]
    states = _STATE_MULTIPLIER[training.optimizer]
    if training.precision == "param":
        return d, d, states * d
    return d, d, 4 + states * 4


def bytes_per_param(training: Training, dtype: str) -> int:
    """Weights + gradients + optimizer state per parameter."""
    return sum(state_bytes(training, dtype))


def block_range(names: Sequence[str]) -> tuple[int, int] | None:
    """The longest run of layer names that differ only by a trailing index ('h.0', 'h.1', ...):
    the model's repeated blocks, [start, stop)."""
    best, run_start, prev = None, 0, None
    for k, name in enumerate([*names, ""]):
        m = re.fullmatch(r"(.*?)(\d+)", name)
        key = m.group(1) if m else None
        if key is None or key != prev:
            if prev is not None and (best is None or k - run_start > best[1] - best[0]):
                best = (run_start, k)
            run_start, prev = k, key
    if best is None or best[1] - best[0] < 2:
        return None
    return best


# A layer holding only vectors (a norm's scale and shift) has O(width) parameters, a layer with
# weight matrices O(width^2): below this share of the largest layer's parameters, a layer is a
# vector-only one that tensor parallelism replicates.
VECTOR_ONLY_SHARE = 0.01


def tp_shardable(profile: Profile) -> np.ndarray:
    """Per layer, the share of its compute that tensor parallelism divides: its matrix products,
    which Megatron-LM splits column- and row-wise in attention and MLP and over the vocabulary in
    the embedding and output layer (Shoeybi et al., 2019, section 3). The profile has no
    per-operator FLOPs, so they are derived from the parameters: a layer with weight matrices is
    taken as all matrix products (1), a layer without parameters or with vectors only (norms) as
    none (0)."""
    params = np.array([layer.param_bytes for layer in profile.layers], dtype=float)
    out: np.ndarray = (params > VECTOR_ONLY_SHARE * params.max()).astype(float)
    return out


def tp_allreduces(profile: Profile, shardable: np.ndarray) -> np.ndarray:
    """Per layer, the all-reduces of its activation size each of its forward and backward runs
    at tp > 1: two in a transformer block (after attention and after the MLP forward, their
    conjugates backward; Shoeybi et al., 2019, section 3, figure 4), one in another sharded layer
    (the embedding's output forward, the output layer's input gradient backward: an upper bound
    on each), none in a replicated one. With sequence parallelism each is a reduce-scatter and
    all-gather pair of the same volume (Korthikanti et al., 2022, section 4.2.2)."""
    out = shardable.copy()
    blocks = block_range([layer.name for layer in profile.layers])
    if blocks is not None:
        out[blocks[0]:blocks[1]] *= 2
    return out


def replicated_act_bytes(act: np.ndarray, in_bytes: np.ndarray, allreduces: np.ndarray, dtype: str,
                         sequence_parallel: bool = False, embedding: np.ndarray | None = None) -> np.ndarray:
    """The saved bytes tensor parallelism does not divide, of whole (unsplit) inputs ``in_bytes``.
    A layer's saved bytes (``act``) exclude its input, which crosses from the layer before and is
    held as that layer's output (``held_extra``).

    Without sequence parallelism: in a block the inputs of its second norm, of the QKV and of the
    first MLP matmul (three hidden-state tensors) and its two dropout masks (one byte an element):
    Korthikanti et al. (2022, section 4.1, equation 2) count 10sbh of 34sbh in 16-bit, the fourth
    tensor being the first norm's input, the block's own; in another sharded layer its input (where
    it saves it); a replicated layer keeps all of it.

    With sequence parallelism the norms and dropouts run on the local part of the sequence, but
    the inputs of the QKV and of the first MLP matmul are all-gathered, and torch's
    ``ColwiseParallel`` saves the gathered (``Replicate``) input for its weight gradient: two
    whole hidden-state tensors in a block, and in another sharded layer, bar an embedding (whose
    input is its token ids), its gathered input beside the local part it received (the output
    layer's). Megatron-LM saves the local part and gathers it again in backward (Korthikanti et
    al., 2022, section 4.2.2); DTensor does not (``PrepareModuleInput`` makes the gathered tensor
    the linear's input). Measured on planner's executor: 2 x 256 KiB a block and micro-batch of
    the bundled GPT at micro-batch 4, tp 2."""
    if sequence_parallel:
        gathered = np.where(allreduces == 1, in_bytes, 0.0)
        if embedding is not None:
            gathered = np.where(embedding, 0.0, gathered)
        out: np.ndarray = np.minimum(np.where(allreduces >= 2, 2 * in_bytes, 0.0), act) + gathered
        return out
    block = 3 * in_bytes + 2 * in_bytes / DTYPE_BYTES[dtype]
    rep: np.ndarray = np.minimum(np.where(allreduces >= 2, block, np.where(allreduces >= 1, in_bytes, act)), act)
    return rep


def vocab_layers(shardable: np.ndarray, blocks: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, whether it is a vocabulary-parallel embedding (a sharded layer before the model's
    repeated blocks: Megatron-LM splits the table by rows; Shoeybi et al., 2019, section 3), and
    whether it is a vocabulary-parallel output layer (a sharded layer after them: its logits split
    by the vocabulary and gathered for the loss). Without blocks none is known."""
    sharded = shardable > 0
    before, after = np.zeros(len(shardable), dtype=bool), np.zeros(len(shardable), dtype=bool)
    if blocks is not None:
        before[:blocks[0]], after[blocks[1]:] = sharded[:blocks[0]], sharded[blocks[1]:]
    return before, after


def measured_tp_cost(layer: Layer, tp: int, sequence_parallel: bool, mbs: str) -> tuple[TpCosts, TpLayerCost] | None:
    """The layer's costs measured at degree ``tp`` with this sequence parallelism and micro-batch
    size, or None where the profile has none (the cost model then derives them)."""
    costs = layer.tp_costs.get(str(tp))
    if costs is None or costs.sequence_parallel != sequence_parallel or mbs not in costs.by_mbs:
        return None
    return costs, costs.by_mbs[mbs]


def tp_costs_note(profile: Profile, tp: int, sequence_parallel: bool, mbs: int) -> str | None:
    """What ``planner solve`` says of a plan's tensor-parallel costs: how many layers were measured
    at its tp (and how the profile's measurements differ where none match); None at tp 1."""
    if tp <= 1:
        return None
    key, n = str(mbs), len(profile.layers)
    hits = sum(measured_tp_cost(layer, tp, sequence_parallel, key) is not None for layer in profile.layers)
    sp = "with" if sequence_parallel else "without"
    if hits:
        rest = "" if hits == n else f"; the other {n - hits} modelled"
        return f"tp {tp} costs measured for {hits} of {n} layers ({sp} sequence parallelism){rest}"
    held = sorted({(int(k), c.sequence_parallel) for layer in profile.layers for k, c in layer.tp_costs.items()})
    have = ", ".join(f"tp {k} {'with' if s else 'without'} sequence parallelism" for k, s in held)
    where = f"the profile measured {have}, not tp {tp} {sp} it at micro-batch {mbs}" if held else \
        f"planner profile --tp {tp} measures them"
    return f"tp {tp} costs modelled (matrix products divided, ring all-reduces added), not measured: {where}"


@dataclass(frozen=True)
class DataParallel:
    """How a stage's dp replicas share their state: ZeRO stage ``zero`` (Rajbhandari et al., SC'20)
    and their ring's all-reduce as (seconds per byte, fixed seconds). A reduce-scatter or an
    all-gather is half an all-reduce: (n-1)/n bytes / bandwidth and n-1 latencies each.

    Stages 2 and 3 are priced as torch's pipeline engine runs them with an FSDP2 stage
    (``fully_shard`` of the stage module: one parameter group; torchtitan uses the same engine), not
    as the ZeRO paper runs them with gradient accumulation (gradients reduce-scattered micro-batch
    by micro-batch, stage 3's weights gathered one layer at a time). In torch 2.13's
    ``torch/distributed/pipelining``:

    * ``schedules._add_unshard_reshard`` puts an UNSHARD (all-gather of the stage's weights) before a
      stage's first action of the step and a RESHARD after its last; ``_add_reduce_grad`` one
      REDUCE_GRAD after its last backward.
    * ``stage.backward_maybe_with_nosync`` sets ``requires_gradient_sync(False)`` and
      ``reshard_after_backward(False)`` before every backward: FSDP accumulates whole (unsharded)
      gradients and keeps the gathered weights after each backward; ``perform_reduce_grad`` turns
      both back on and runs FSDP's post-backward once: one reduce-scatter of the whole gradients,
      then the gathered weights are freed (``FSDPParamGroup.post_backward``).
    * ZeRO 2 is ``reshard_after_forward=False`` (``planner.execute.parallel.shard_stage``): the
      weights stay gathered from the UNSHARD to the REDUCE_GRAD. ZeRO 3 is
      ``reshard_after_forward=True``: FSDP frees them after every forward
      (``FSDPParamGroup.post_forward`` -> ``reshard``), so the stage's next action, forward or
      backward, gathers them again (``pre_forward`` / ``pre_backward`` -> ``unshard``); after a
      backward they stay until the next forward ends. Every forward is followed by one more
      gather: m per step beside the UNSHARD, whatever the order.

    So during the step a device holds, per parameter byte, the gathered weights beside their shard,
    the whole gradients from the first backward to the reduce-scatter beside the sharded gradients
    (kept from step to step: the executor zeroes gradients, ``zero_grad(set_to_none=False)``), and
    the optimizer state's shard: ``(w + g)(1 + 1/n) + o/n``, for stage 2 and 3 alike (at stage 3
    the gathered weights are there during every forward and backward, hence at the peak). Shards
    alone are held only between steps and in the optimizer step, which this prices from the same
    in-step bytes (an upper bound). Stage 1's ``w + g + o/n`` is never more: with the same time
    (below), stage 2 costs what stage 1 costs and holds ``(w + g)/n`` more, stage 3 adds a gather
    per micro-batch, so neither is ever better (``planner.solve.settings.zero_stages``). The
    engine's window of three gathered stages per rank (``max_active_stages``) is not modelled: a
    rank with more than three stages re-gathers evicted ones (more time, less memory).
    """

    dp: int = 1
    zero: int = 0
    per_byte: float = 0.0
    fixed: float = 0.0

    @property
    def fsdp(self) -> bool:
        """Stages 2 and 3 over several replicas: an FSDP2 stage under the pipeline engine."""
        return self.zero >= 2 and self.dp > 1

    @property
    def regathers(self) -> bool:
        """Stage 3 over several replicas: the weights are freed after every forward and gathered
        again (``reshard_after_forward``)."""
        return self.fsdp and self.zero >= 3

    def state_factor(self, training: Training, dtype: str) -> float:
        """Bytes of weights, gradients and optimizer state per parameter byte on one device, the
        optimizer state divided evenly, up to ``padding_bytes``: stage 1 divides it over dp (ZeRO
        section 5, table 1); stages 2 and 3 hold, during the step, the gathered weights and the
        whole gradients beside their shards (class doc)."""
        w, g, o = state_bytes(training, dtype)
        if self.fsdp:
            total = (w + g) * (1 + 1 / self.dp) + o / self.dp
        else:
            total = w + g + o / (self.dp if self.zero >= 1 and self.dp > 1 else 1)
        return total / DTYPE_BYTES[dtype]

    def padding_bytes(self, param_bytes: Any, training: Training, dtype: str) -> Any:
        """The optimizer-state bytes the fullest replica holds beyond an even share of a stage's
        ``param_bytes`` (a float or an array of them), from stage 1 on: a whole number of elements.

        At stage 1 the executor lays a rank's N parameter elements end to end and cuts them into dp
        ranges of ceil(N/dp) (``planner.execute.train.flat_ranges``, as Megatron-LM's distributed
        optimizer and DeepSpeed ZeRO 1 partition a flat buffer), so the fullest holds
        ceil(N/dp) - N/dp < 1 element's state more than N/dp; a rank of several stages holds no more
        than the sum of theirs (ceil(a + b) <= ceil(a) + ceil(b)). At stages 2 and 3 FSDP2 cuts
        every tensor's rows into dp chunks of ceil(rows/dp) (``fully_shard``'s dim-0 sharding): the
        first replica holds a whole number of elements, at least N/dp, so at least ceil(N/dp): the
        same term, which stage 2's own padding only adds to."""
        if not (self.zero >= 1 and self.dp > 1):
            return 0.0 * param_bytes
        n = param_bytes / DTYPE_BYTES[dtype]
        return (np.ceil(n / self.dp) - n / self.dp) * state_bytes(training, dtype)[2]

    def step_coeffs(self) -> tuple[float, float]:
        """The collectives of a step outside its actions, as (seconds per gradient byte, fixed
        seconds), one all-reduce's volume at every stage: stage 0 all-reduces; stage 1
        reduce-scatters and all-gathers the updated shards (ZeRO section 7.2.1; the executor reduces
        each range's pieces to its owner and broadcasts them back, the same bytes in more calls:
        ``planner.execute.train.ShardedOptimizer``); stages 2 and 3
        reduce-scatter once after the last backward (the engine's REDUCE_GRAD) and all-gather at
        the next step's UNSHARD, before its first forward: between two steps that is where stage
        1's all-gather is, so it is priced here too."""
        return self.per_byte, self.fixed

    def step_s(self, param_bytes: float) -> float:
        a, c = self.step_coeffs()
        return a * param_bytes + c if param_bytes > 0 and self.dp > 1 else 0.0

    def per_microbatch(self, param_bytes: float) -> tuple[float, float, float]:
        """Seconds each micro-batch's (forward, input gradient, weight gradient) adds: at stage 3
        the all-gather that follows every forward (class doc), priced at the forward's end (the
        rank's next action waits for it, as on the engine; the forward's output is sent after it,
        which the engine does not wait for: a little late, never early). Nothing at stage 2."""
        if not self.regathers or param_bytes <= 0:
            return 0.0, 0.0, 0.0
        return 0.5 * (self.per_byte * param_bytes + self.fixed), 0.0, 0.0

    def per_microbatch_per_byte(self) -> float:
        """Seconds per parameter byte of one micro-batch's collectives (a lower bound: no latency)."""
        return 0.5 * self.per_byte if self.regathers else 0.0

    def gather_buffer(self, param_bytes: float) -> float:
        """Bytes beside the in-step state while stage 3 gathers with micro-batches in flight: the
        all-gather's flat output (``_fsdp_collectives.foreach_all_gather``; the input is its own
        chunk of it), dropped once copied into the weights (``foreach_all_gather_copy_out``), but
        freed only when the collective's work releases it too: gloo's worker thread marks the work
        done, which wakes the waiting rank, and drops its reference after
        (``ProcessGroupGloo::runLoop``), so on a busy machine the buffer was seen alive in the
        backward that followed the gather (NCCL's work likewise keeps its tensors until its watchdog
        sees it complete). Priced beside the action's own transient, not instead of it
        (``CostTable.transient_bytes``). Stage 2 gathers only at the step's start,
        before any gradient exists: its flat buffer takes the place of the whole gradients (as
        large as the weights) in the state counted, and so do the reduce-scatter's input and
        output after the last backward, the gathered weights being freed first."""
        return param_bytes if self.regathers else 0.0

    def optimizer_share(self) -> float:
        """The share of the optimizer step a device runs, its time and its temporaries: its shard
        from stage 1 on. At stage 1 no tensor a replica steps is more than ceil(n/dp) of a tensor of
        n elements (``planner.execute.train.ShardedOptimizer``), as FSDP's shards at stages 2 and 3,
        so an optimizer stepping one tensor at a time (a CPU) makes 1/dp of a whole tensor's
        temporaries too (``CostTable.optimizer_transient_bytes``); the rounding, a fraction of an
        element per tensor, is not priced, at any stage."""
        return 1 / self.dp if self.zero >= 1 and self.dp > 1 else 1.0


def p2p_time(nbytes: float, link: Link) -> float:
    """Point-to-point transfer: latency + bytes / bandwidth (Hockney's alpha-beta model, 1994)."""
    return link.latency_s + nbytes / link.bandwidth_bytes_per_s


def ring_allreduce_time(nbytes: float, n: int, link: Link) -> float:
    """Ring all-reduce of ``nbytes`` over ``n`` devices."""
    if nbytes <= 0:
        return 0.0
    per_byte, fixed = ring_allreduce_coeffs(n, link)
    return per_byte * nbytes + fixed


def ring_allreduce_coeffs(n: int, link: Link) -> tuple[float, float]:
    """Ring all-reduce time as (seconds per byte, fixed seconds): 2(n-1)/n * bytes / bandwidth
    plus 2(n-1) latencies (Patarasuk and Yuan, JPDC 2009; Thakur et al., IJHPCA 2005)."""
    if n <= 1:
        return 0.0, 0.0
    return 2 * (n - 1) / n / link.bandwidth_bytes_per_s, 2 * (n - 1) * link.latency_s


@dataclass(frozen=True)
class Segment:
    """A stage's layers ``[start, stop)`` and its recomputation choice."""

    start: int
    stop: int
    recompute: Recompute = "none"
    recompute_layers: tuple[int, ...] = field(default=())  # for "selective"

    def recomputed(self) -> tuple[int, ...]:
        if self.recompute == "full":
            return tuple(range(self.start, self.stop))
        if self.recompute == "selective":
            return self.recompute_layers
        return ()


class CostTable:
    """One micro-batch size of a profile, priced per layer and per segment.

    Times are scaled by the profile's calibration, so that the layer sum matches the whole model
    measured at once; a stage on a device of relative speed x takes them divided by x.
    """

    def __init__(self, profile: Profile, mbs: int, graph: LayerGraph | None = None, *, tp: int = 1,
                 tp_link: Link | None = None, sequence_parallel: bool = False):
        key = str(mbs)
        if key not in profile.layers[0].by_mbs:
            raise InputError(f"micro-batch size {mbs} was not profiled "
                             f"(profiled: {', '.join(map(str, profile.mbs_sizes))})")
        self.profile = profile
        self.graph = graph or LayerGraph(profile)
        self.mbs = mbs
        self.n = len(profile.layers)
        self.tp = tp
        self.sequence_parallel = sequence_parallel and tp > 1
        whole = profile.whole.get(key)
        self.scale = t = whole.scale if whole else 1.0
        costs = [layer.by_mbs[key] for layer in profile.layers]

        self.fwd = np.array([c.fwd_s for c in costs]) * t
        self.bwd = np.array([c.bwd_s for c in costs]) * t
        # The split backward (zero-bubble schedules) as measured with the engine's own functions:
        # input and weight parts together usually cost more than one whole backward.
        self.bwd_input = np.array([_split(c)[0] for c in costs]) * t
        self.bwd_weight = np.array([_split(c)[1] for c in costs]) * t
        self.act = np.array([c.act_bytes for c in costs], dtype=float)
        self.peak = np.array([c.peak_bytes for c in costs], dtype=float)
        self.wgrad = np.array([c.wgrad_bytes for c in costs], dtype=float)
        self.params = np.array([layer.param_bytes for layer in profile.layers], dtype=float)
        self.opt_share = np.ones(self.n)  # the share of a layer's optimizer temporaries one device has
        self._opt_peaks: dict[str, np.ndarray] = {}
        self._opt_matrix: dict[str, np.ndarray] = {}
        self._at_speed: dict[tuple[str, float], np.ndarray] = {}
        self.cut = np.array(self.graph.cut_bytes_per_sample(), dtype=float) * mbs  # (n + 1,)
        self.in_bytes = np.array(self.graph.input_bytes_per_sample(), dtype=float) * mbs
        # the whole model's optimizer step, shared by parameter byte of the whole (unsharded) model
        self.optimizer_s = (whole.optimizer_s * t) if whole else 0.0
        self.param_total = float(self._prefix(self.params)[-1]) or 1.0
        self.optimizer_per_byte = self.optimizer_s / self.param_total
        self._tied = [(sorted(self.graph.index[n] for n in g.layers), float(g.param_bytes)) for g in profile.tied]
        self.tensor_scale = 1.0  # the share of an inter-layer tensor one device holds
        self.tp_comm = np.zeros(self.n)  # per layer: the tensor-parallel collectives in fwd, bwd and bwd_input
        self.tp_measured = np.zeros(self.n, dtype=bool)  # per layer: costs measured at tp (Layer.tp_costs)
        self.grad_extra = np.zeros(self.n)  # per layer: gradient bytes held beyond its share (_shard)
        self.gather_flat = np.zeros(self.n)  # per layer: an all-gather's flat buffer beside its transient (_shard)
        if tp > 1:
            if tp_link is None:
                raise InputError(f"tp {tp} needs the link its devices all-reduce over")
            self._shard(tp, tp_link)
        if profile.loss is not None:  # the loss runs on the last stage, after its last layer
            loss = profile.loss.by_mbs[key]
            self.fwd[-1] += loss.fwd_s * t
            self.bwd[-1] += loss.bwd_s * t
            self.bwd_input[-1] += loss.bwd_s * t  # the loss has no weights
            self.act[-1] += loss.act_bytes
            self.peak[-1] = max(self.peak[-1], loss.peak_bytes)
        self.peak = self.peak + self.gather_flat  # the output layer's beside the loss's too

        self.workspace = profile.device.workspace_bytes
        self.input_batch = profile.batch.input_bytes_per_sample * mbs
        self.target_batch = profile.batch.target_bytes_per_sample * mbs

    def _shard(self, tp: int, link: Link) -> None:
        """The layers at tensor-parallel degree tp, per device (Megatron-LM: Shoeybi et al., 2019,
        section 3; Narayanan et al., 2021, section 3). Compute: the matrix products divided by tp.
        Communication: each all-reduce of the block's activation size, 2(tp-1)/tp * bytes /
        bandwidth on the link between the tp devices, serial with the compute. Memory: a sharded
        layer's weights (so its gradients and optimizer state) and saved activations divided by tp,
        bar the replicated activations (``replicated_act_bytes``; with sequence parallelism every
        other activation and inter-layer tensor is split along the sequence: Korthikanti et al.,
        2022, section 4.2); a sharded layer's transient divided as well, bar an embedding's
        (``vocab_layers``), whose backward makes its tables' gradients whole, and which holds
        its gradient whole (``grad_extra``): DTensor's ``embedding_dense_backward`` has no
        row-split strategy (torch/distributed/tensor/_ops/_embedding_ops.py), so the gradient is
        computed whole (``Replicate``) and kept so as ``.grad``, 1 MiB beside a 0.5 MiB shard in
        the bundled GPT at tp 2. Beside a layer's transient, the flat output buffer of one of its
        all-gathers, which the collective's work may hold past the copy out of it as ZeRO 3's
        gather (``DataParallel.gather_buffer``): a block's gathered input with sequence
        parallelism, the output layer's gathered logits (``gather_flat``). On planner's executor
        one run in three held the output layer's 4 MiB so through the loss (rank 1 +4.4 MiB), and
        one a block's 256 KiB on rank 0."""
        frac = tp_shardable(self.profile)
        whole = self.params.copy()
        reduces = tp_allreduces(self.profile, frac)
        blocks = block_range([layer.name for layer in self.profile.layers])
        hidden = np.full(self.n, float(np.median(self.in_bytes[blocks[0]:blocks[1]]))) if blocks else self.in_bytes
        hidden = np.where(reduces >= 2, self.in_bytes, hidden)  # a block all-reduces its own input's size
        per_byte, fixed = ring_allreduce_coeffs(tp, link)
        comm = reduces * (per_byte * hidden + fixed)
        self.tp_comm = comm
        div = 1 - frac + frac / tp
        self.fwd = self.fwd * div + comm
        self.bwd = self.bwd * div + comm
        self.bwd_input = self.bwd_input * div + comm  # the input gradient is what is all-reduced
        self.bwd_weight = self.bwd_weight * div
        self.params = self.params * div
        self.opt_share = div
        self.wgrad = self.wgrad * div
        # a row-split embedding's backward: the gradient of its output arrives whole (gathered with
        # sequence parallelism) and each table's gradient is made whole before its rows are kept
        # (DTensor's embedding_dense_backward has no row-split strategy: torch/distributed/tensor/
        # _ops/_embedding_ops.py), so its transient is the tp-1 one plus its tables' whole bytes
        # (every table of the layer: its largest is not recorded, so a bound)
        emb, out_layer = vocab_layers(frac, blocks)
        self.peak = np.where(emb, self.peak + whole, self.peak * div)
        out_whole = np.array([layer.by_mbs[str(self.mbs)].out_bytes for layer in self.profile.layers], dtype=float)
        self.gather_flat = np.where(out_layer, out_whole,
                                    np.where((reduces >= 2) & self.sequence_parallel, self.in_bytes, 0.0))
        rep = replicated_act_bytes(self.act, self.in_bytes, reduces, self.profile.dtype, self.sequence_parallel, emb)
        inside = np.minimum(rep, self.act)  # a gathered input beyond the layer's own saved bytes adds to them
        self.act = rep + (self.act - inside) / tp
        if self.sequence_parallel:
            self.tensor_scale = 1 / tp
            self.cut = self.cut / tp
            self.in_bytes = self.in_bytes / tp
        self._use_measured(tp)
        # an embedding's gradient stays whole: its backward makes each table's gradient whole
        # (Replicate) and torch's AccumulateGrad keeps it as it comes, not as the weight's row split
        self.grad_extra = np.where(emb, np.maximum(whole - self.params, 0.0), 0.0)
        self._tied = [(members, nbytes * self.opt_share[members[0]]) for members, nbytes in self._tied]

    def _use_measured(self, tp: int) -> None:
        """Where the profile holds a layer measured at this tp, with this sequence parallelism and at
        this micro-batch size (``planner profile --tp``), its measured times (collectives included,
        scaled by the calibration as the tp-1 times are) and its per-device parameter and saved
        bytes where measured replace the derived ones. The collectives' record keeps the model's
        estimate, capped at the measured time it lies inside."""
        key = str(self.mbs)
        self.tp_measured = np.zeros(self.n, dtype=bool)
        for i, layer in enumerate(self.profile.layers):
            found = measured_tp_cost(layer, tp, self.sequence_parallel, key)
            if found is None:
                continue
            costs, c = found
            bi, bw = _split(c)
            self.fwd[i], self.bwd[i] = c.fwd_s * self.scale, c.bwd_s * self.scale
            self.bwd_input[i], self.bwd_weight[i] = bi * self.scale, bw * self.scale
            self.tp_comm[i] = min(self.tp_comm[i], self.fwd[i], self.bwd_input[i])
            if costs.param_bytes is not None:
                whole = self.profile.layers[i].param_bytes
                self.opt_share[i] = costs.param_bytes / whole if whole else 1.0
                self.params[i] = costs.param_bytes
            if c.act_bytes is not None:
                self.act[i] = c.act_bytes
            self.tp_measured[i] = True

    # ----------------------------------------------------------------------- prefix sums

    @staticmethod
    def _prefix(a: np.ndarray) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(a)])

    @cached_property
    def F(self) -> np.ndarray:
        return self._prefix(self.fwd)

    @cached_property
    def B(self) -> np.ndarray:
        return self._prefix(self.bwd)

    @cached_property
    def BI(self) -> np.ndarray:
        return self._prefix(self.bwd_input)

    @cached_property
    def BW(self) -> np.ndarray:
        return self._prefix(self.bwd_weight)

    @cached_property
    def TPC(self) -> np.ndarray:
        return self._prefix(self.tp_comm)

    @cached_property
    def BMIN(self) -> np.ndarray:
        """Prefix of the cheaper of the whole and the split backward: for bounds that hold
        under every schedule."""
        return self._prefix(np.minimum(self.bwd, self.bwd_input + self.bwd_weight))

    @cached_property
    def ACT(self) -> np.ndarray:
        return self._prefix(self.act)

    @cached_property
    def WGRAD(self) -> np.ndarray:
        return self._prefix(self.wgrad)

    @cached_property
    def PARAMS(self) -> np.ndarray:
        return self._prefix(self.params)

    @cached_property
    def GRAD_EXTRA(self) -> np.ndarray:
        return self._prefix(self.grad_extra)

    @cached_property
    def PRODUCED(self) -> np.ndarray:
        """Prefix over producers of the bytes of every tensor they produce (per micro-batch)."""
        per_layer = np.zeros(self.n)
        for t in self.graph.tensors:
            if t.producer >= 0:
                per_layer[t.producer] += t.bytes_per_sample * self.mbs * self.tensor_scale
        return self._prefix(per_layer)

    # ---------------------------------------------------------------- segment matrices

    @cached_property
    def held_extra(self) -> np.ndarray:
        """(n+1, n+1): tensors produced inside [i, j) that the stage must hold per micro-batch
        beyond its layers' own saved bytes: those kept for backward by someone, and those the
        engine keeps as stage outputs (alive after j)."""
        n = self.n
        diff = np.zeros((n + 2, n + 2))  # 2-D difference array: one rectangle per tensor
        for t in self.graph.tensors:
            p = t.producer
            if p < 0:
                continue  # the batch and received inputs sit in receive buffers
            b = t.bytes_per_sample * self.mbs * self.tensor_scale
            # held for segments [i, j) with i <= p < j and (saved or last_consumer >= j)
            j_hi = n if t.saved else min(t.last_consumer, n)
            if p + 1 <= j_hi:
                diff[0, p + 1] += b
                diff[0, j_hi + 1] -= b
                diff[p + 1, p + 1] -= b
                diff[p + 1, j_hi + 1] += b
        return np.cumsum(np.cumsum(diff, axis=0), axis=1)[: n + 1, : n + 1]

    @cached_property
    def peak_max(self) -> np.ndarray:
        """(n+1, n+1): max over layers of [i, j) of transient bytes (none / selective base)."""
        return _range_max(self.peak)

    @cached_property
    def recompute_peak_max(self) -> np.ndarray:
        """(n+1, n+1): max over layers of [i, j) of act + transient, the peak while one layer is
        recomputed inside backward."""
        return _range_max(self.act + self.peak)

    @cached_property
    def shared_held(self) -> tuple[np.ndarray, np.ndarray]:
        """(n+1, n+1) twice: the bytes of the tied groups that have two or more members in [i, j)
        (a contiguous run holds two members when it holds two consecutive ones), and the latest
        such member (-1: none)."""
        n = self.n
        held, last = np.zeros((n + 1, n + 1)), np.full((n + 1, n + 1), -1)
        starts, stops = np.arange(n + 1)[:, None], np.arange(n + 1)[None, :]
        for members, nbytes in self._tied:
            inside = np.zeros((n + 1, n + 1), dtype=bool)
            for a, c in zip(members, members[1:], strict=False):
                inside |= (starts <= a) & (stops > c)
                last = np.where((starts <= a) & (stops > c), np.maximum(last, c), last)
            held += np.where(inside, nbytes, 0.0)
        return held, last

    @cached_property
    def shared_grad(self) -> np.ndarray:
        """(n+1, n+1): what the gradient sums of weights that several layers of [i, j) use add to
        the stage's transient, its layers' activations all kept (none recomputed).

        The engine sums a leaf's gradient contributions in the input buffer of its accumulator
        before adding them into ``.grad`` (torch/csrc/autograd/input_buffer.cpp,
        ``InputBuffer::add``, out of place): from the first contribution (the backward of the
        weight's last use L in the stage) to the last (its first use) a buffer of the weight's
        size is held, beside the transient each layer's own backward measured. By then the
        backward of the layers from L to the stage's end has freed their saved tensors, which the
        simulator still counts (a micro-batch holds its activations until its backward ends), so
        only the buffer beyond them is extra: max(0, buffer - ACT[L, j)). With several tied
        groups the buffers start at different layers: their sum, without that credit."""
        held, last = self.shared_held
        if len(self._tied) != 1:
            return held
        credit = self.ACT[None, :] - self.ACT[np.maximum(last, 0)]
        return np.where(last >= 0, np.maximum(held - credit, 0.0), 0.0)

    def shared_grad_bytes(self, seg: Segment) -> float:
        """``shared_grad`` of the stage: a recomputed layer keeps no saved tensors to free (its
        inputs only), so the credit is the saved bytes of the layers from L on that are not
        recomputed."""
        i, j = seg.start, seg.stop
        held, last = self.shared_held
        if seg.recompute == "none" or held[i, j] == 0 or len(self._tied) != 1:
            return float(self.shared_grad[i, j] if seg.recompute == "none" else held[i, j])
        L = int(last[i, j])
        kept = [k for k in range(L, j) if k not in set(seg.recomputed())]
        return float(max(held[i, j] - sum(self.act[k] for k in kept), 0.0))

    def tied_dedup(self, i: int, j: int) -> float:
        """Parameter bytes counted twice because tied layers share a stage."""
        total = 0.0
        for members, nbytes in self._tied:
            inside = sum(1 for m in members if i <= m < j)
            if inside > 1:
                total += (inside - 1) * nbytes
        return total

    def tied_split(self, bounds: list[int]) -> list[tuple[list[int], float]]:
        """For each tied group spread over several stages: the stages and the bytes to reduce."""
        out: list[tuple[list[int], float]] = []
        for members, nbytes in self._tied:
            stages = sorted({_stage_of(bounds, m) for m in members})
            if len(stages) > 1:
                out.append((stages, nbytes))
        return out

    # ------------------------------------------------------------------------ one stage

    def param_bytes(self, seg: Segment) -> float:
        return float(self.PARAMS[seg.stop] - self.PARAMS[seg.start] - self.tied_dedup(seg.start, seg.stop))

    def times(self, seg: Segment, speed: float = 1.0) -> tuple[float, float, float, float]:
        """(fwd, bwd_input, bwd_weight, bwd) seconds per micro-batch on a device of relative
        ``speed``: bwd is the whole backward, bwd_input and bwd_weight its split parts.
        Recomputation repeats the forward of the recomputed layers before their backward (Chen et
        al., 2016). The compute is divided by the speed, the tensor-parallel collectives inside
        (``tp_comm_times``) are not: they run at the link's."""
        i, j = seg.start, seg.stop
        again = sum(self.fwd[layer] for layer in seg.recomputed())
        comm_f, comm_b = self.tp_comm_times(seg)
        f = (self.F[j] - self.F[i] - comm_f) / speed + comm_f
        bi = (self.BI[j] - self.BI[i] + again - comm_b) / speed + comm_b
        bw = (self.BW[j] - self.BW[i]) / speed
        b = (self.B[j] - self.B[i] + again - comm_b) / speed + comm_b
        return float(f), float(bi), float(bw), float(b)

    def tp_comm_times(self, seg: Segment) -> tuple[float, float]:
        """(forward, backward) seconds per micro-batch of the tensor-parallel collectives inside
        ``times``: each layer's all-reduces run once in its forward and once in its input gradient
        (so in the whole backward too, not in the weight gradient), and a recomputed layer's
        forward repeats its own. The link's seconds, whatever the device's speed."""
        i, j = seg.start, seg.stop
        comm = float(self.TPC[j] - self.TPC[i])
        again = sum(float(self.tp_comm[layer]) for layer in seg.recomputed())
        return comm, comm + again

    def prefix_at(self, name: str, speed: float) -> np.ndarray:
        """The prefix sum ``name`` (F, B, BI, BW or BMIN) on a device of relative ``speed``, as
        ``times`` prices it: compute divided by the speed, the tensor-parallel collectives in F, B,
        BI and BMIN (one per layer in each: ``_shard``) at the link's seconds. What the solver's
        bounds read for a stage's window [i, j): ``P[j] - P[i]``."""
        key = (name, speed)
        if key not in self._at_speed:
            comm = 0.0 if name == "BW" else self.TPC
            self._at_speed[key] = (getattr(self, name) - comm) / speed + comm
        return self._at_speed[key]

    def held_bytes(self, seg: Segment) -> float:
        """Bytes held per micro-batch in flight (from its forward until its backward frees it)."""
        i, j = seg.start, seg.stop
        if seg.recompute == "full":
            # each layer keeps only its inputs: every tensor produced in the stage, once
            return float(self.PRODUCED[j] - self.PRODUCED[i])
        held = self.ACT[j] - self.ACT[i] + self.held_extra[i, j]
        for layer in seg.recomputed():  # selective: drop the layer's saved bytes, keep its inputs
            held += self.in_bytes[layer] - self.act[layer]
        return float(held)

    def transient_bytes(self, seg: Segment, gather: float = 0.0) -> float:
        """The largest one-layer workspace, the input gradient being sent back, and the runtime's
        workspace; with ZeRO 3, plus the all-gather buffer of the gather before the action, which
        may still be alive while it computes (``DataParallel.gather_buffer``)."""
        i, j = seg.start, seg.stop
        base = self.peak_max[i, j]
        if seg.recompute == "full":
            base = self.recompute_peak_max[i, j]
        elif seg.recompute == "selective" and seg.recompute_layers:
            base = max(base, max(self.act[k] + self.peak[k] for k in seg.recompute_layers))
        # plus the sums of reused weights' gradients, the input gradient being sent back, ZeRO 3's
        # gather buffer and the runtime's workspace
        return float(base + self.shared_grad_bytes(seg) + self.cut[i] + gather + self.workspace)

    def buffer_bytes(self, seg: Segment, m: int) -> float:
        """Receive buffers the engine allocates per micro-batch for activations (from the previous
        stage) and for gradients (from the next): torch.distributed.pipelining's PipelineStage
        keeps one of each per micro-batch for the whole step."""
        return float(m * (self.cut[seg.start] + self.cut[seg.stop]))

    def batch_bytes(self, seg: Segment, m: int) -> float:
        """The first stage holds every micro-batch's inputs, the last every target."""
        out = 0.0
        if seg.start == 0:
            out += m * self.input_batch
        if seg.stop == self.n:
            out += m * self.target_batch
        return out

    def stage_cost(self, seg: Segment, m: int, training: Training, *, speed: float = 1.0,
                   allreduce_s: float = 0.0, weight_versions: int = 1,
                   data_parallel: DataParallel | None = None, split_backward: bool = False) -> StageCost:
        """``allreduce_s``: what the stage adds to its data-parallel step (tied weights);
        ``data_parallel`` adds the replicas' ZeRO sharding and collectives; ``split_backward``: the
        schedule runs I and W as separate actions."""
        dp = data_parallel or DataParallel()
        f, bi, bw, b = self.times(seg, speed)
        if split_backward and seg.recomputed():
            # torch's checkpoint would recompute in I and again in every W pass, so a stage that
            # recomputes runs its backward whole in I (planner.execute.runtime.recomputes) and its W
            # does nothing. Priced as the two parts' sum, which the solver's bounds assume (and which
            # is usually above one whole backward: a time over- rather than under-estimate). Memory
            # is left as the split prices it: activations held to W, weight-gradient inputs from I
            # to W; both are freed at I, so that over-estimates as well.
            bi, bw = bi + bw, 0.0
        params = self.param_bytes(seg)
        gather_f, gather_i, scatter_w = dp.per_microbatch(params)
        static = params * dp.state_factor(training, self.profile.dtype)
        static += dp.padding_bytes(params, training, self.profile.dtype)
        static += (weight_versions - 1) * params  # stashed weight versions (PipeDream)
        static += float(self.GRAD_EXTRA[seg.stop] - self.GRAD_EXTRA[seg.start])  # whole gradients at tp
        static += self.buffer_bytes(seg, m)
        return StageCost.model_construct(  # the solver builds thousands: skip re-validation
            fwd_s=f + gather_f, bwd_input_s=bi + gather_i, bwd_weight_s=bw + scatter_w,
            bwd_s=b + gather_i + scatter_w,
            send_bytes=int(self.cut[seg.stop]),
            act_bytes=int(round(self.held_bytes(seg))),
            wgrad_bytes=int(round(self.WGRAD[seg.stop] - self.WGRAD[seg.start])),
            grad_in_bytes=int(self.cut[seg.start]),
            static_bytes=int(round(static)),
            transient_bytes=int(round(self.transient_bytes(seg, dp.gather_buffer(params)))),
            optimizer_transient_bytes=int(round(self.optimizer_transient_bytes(seg, training.optimizer)
                                                * dp.optimizer_share())),
            param_bytes=int(round(params)),
            batch_bytes=int(round(self.batch_bytes(seg, m))),
            optimizer_s=self.optimizer_s * params / self.param_total * dp.optimizer_share() / speed,
            allreduce_s=allreduce_s + dp.step_s(params),
            tp_comm=_collectives(*self.tp_comm_times(seg), 0.0),
            zero_comm=_collectives(gather_f, gather_i, scatter_w),
        )

    def optimizer_transient_bytes(self, seg: Segment, optimizer: str) -> float:
        """The temporaries of the optimizer's step over the stage's parameters, from each layer's
        measured step (``Layer.optimizer_peak_bytes``). torch's default implementation on a GPU
        steps every parameter at once (foreach), so the layers' temporaries add up; on a CPU it steps
        one parameter at a time, so the largest layer's is the stage's (torch/optim/optimizer.py,
        ``_default_to_fused_or_foreach``)."""
        return float(self.optimizer_transient_matrix(optimizer)[seg.start, seg.stop])

    def optimizer_transient_matrix(self, optimizer: str) -> np.ndarray:
        """(n+1, n+1): ``optimizer_transient_bytes`` of every segment [i, j): the layers' summed
        (GPU) or their largest (CPU)."""
        if optimizer not in self._opt_matrix:
            peaks = self._optimizer_peaks(optimizer)
            if self.profile.device.type == "cuda":
                prefix = self._prefix(peaks)
                self._opt_matrix[optimizer] = np.maximum(prefix[None, :] - prefix[:, None], 0.0)
            else:
                self._opt_matrix[optimizer] = _range_max(peaks)
        return self._opt_matrix[optimizer]

    def _optimizer_peaks(self, optimizer: str) -> np.ndarray:
        if optimizer not in self._opt_peaks:
            peaks = [layer.optimizer_peak_bytes.get(optimizer, 0) for layer in self.profile.layers]  # type: ignore[call-overload]
            self._opt_peaks[optimizer] = np.array(peaks, dtype=float) * self.opt_share
        return self._opt_peaks[optimizer]


_NO_COLLECTIVES = Collectives()


def _collectives(fwd_s: float, bwd_input_s: float, bwd_weight_s: float) -> Collectives:
    """The record of a stage's collectives, shared while there are none (the solver builds thousands)."""
    if not (fwd_s or bwd_input_s or bwd_weight_s):
        return _NO_COLLECTIVES
    return Collectives.model_construct(fwd_s=fwd_s, bwd_input_s=bwd_input_s, bwd_weight_s=bwd_weight_s)


def _split(c: LayerCost | TpLayerCost) -> tuple[float, float]:
    """Input- and weight-gradient seconds: as measured, else the whole backward halved (the two
    matrix products of a linear layer's backward)."""
    if c.bwd_input_s is None or c.bwd_weight_s is None:
        return c.bwd_s / 2, c.bwd_s / 2
    return c.bwd_input_s, c.bwd_weight_s


def _range_max(a: np.ndarray) -> np.ndarray:
    """(n+1, n+1) matrix M[i, j] = max(a[i:j]), 0 where empty."""
    n = len(a)
    out = np.zeros((n + 1, n + 1))
    for i in range(n):
        out[i, i + 1:] = np.maximum.accumulate(a[i:])
    return out


def _stage_of(bounds: list[int], layer: int) -> int:
    """Stage index of ``layer`` given stage start positions ``bounds`` (bounds[0] == 0)."""
    s = 0
    while s + 1 < len(bounds) and bounds[s + 1] <= layer:
        s += 1
    return s
