"""Cost model: time and memory of a pipeline stage, pure arithmetic (no torch).

A stage is a contiguous run of layers ``[i, j)`` of the profile's topological order. Everything
here is per micro-batch on the stage's device unless the name says otherwise. ``CostTable`` holds
one micro-batch size's numbers as prefix sums and matrices so that the solver can price every
segment at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np

from planner.errors import InputError
from planner.formats import DTYPE_BYTES, LayerCost, Link, Profile, StageCost, Training
from planner.graph import LayerGraph

Recompute = Literal["none", "full", "selective"]

# Bytes per parameter beyond the weights themselves, as multiples of the parameter dtype size,
# or absolute fp32 bytes for the master copy and states of mixed precision.
# Mixed-precision Adam keeps fp32 master weights, momentum and variance: 12 bytes per parameter
# (Rajbhandari et al., "ZeRO", SC'20, section 3.1: K = 12).
_STATE_MULTIPLIER = {"sgd": 0, "sgd-momentum": 1, "adam": 2}


def bytes_per_param(training: Training, dtype: str) -> int:
    """Weights + gradients + optimizer state per parameter."""
    d = DTYPE_BYTES[dtype]
    states = _STATE_MULTIPLIER[training.optimizer]
    if training.precision == "param":
        return d + d + states * d
    return d + d + 4 + states * 4  # ZeRO section 3.1: 2 + 2 + K bytes for fp16/bf16 training


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

    def __init__(self, profile: Profile, mbs: int, graph: LayerGraph | None = None):
        key = str(mbs)
        if key not in profile.layers[0].by_mbs:
            raise InputError(f"micro-batch size {mbs} was not profiled "
                             f"(profiled: {', '.join(map(str, profile.mbs_sizes))})")
        self.profile = profile
        self.graph = graph or LayerGraph(profile)
        self.mbs = mbs
        self.n = len(profile.layers)
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
        if profile.loss is not None:  # the loss runs on the last stage, after its last layer
            loss = profile.loss.by_mbs[key]
            self.fwd[-1] += loss.fwd_s * t
            self.bwd[-1] += loss.bwd_s * t
            self.bwd_input[-1] += loss.bwd_s * t  # the loss has no weights
            self.act[-1] += loss.act_bytes
            self.peak[-1] = max(self.peak[-1], loss.peak_bytes)
        self.optimizer_s = (whole.optimizer_s * t) if whole else 0.0

        self.cut = np.array(self.graph.cut_bytes_per_sample(), dtype=float) * mbs  # (n + 1,)
        self.in_bytes = np.array(self.graph.input_bytes_per_sample(), dtype=float) * mbs
        self.workspace = profile.device.workspace_bytes
        self.input_batch = profile.batch.input_bytes_per_sample * mbs
        self.target_batch = profile.batch.target_bytes_per_sample * mbs
        self._tied = [(sorted(self.graph.index[n] for n in g.layers), g.param_bytes) for g in profile.tied]

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
    def PRODUCED(self) -> np.ndarray:
        """Prefix over producers of the bytes of every tensor they produce (per micro-batch)."""
        per_layer = np.zeros(self.n)
        for t in self.graph.tensors:
            if t.producer >= 0:
                per_layer[t.producer] += t.bytes_per_sample * self.mbs
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
            b = t.bytes_per_sample * self.mbs
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
        """(fwd, bwd_input, bwd_weight, bwd) seconds per micro-batch: bwd is the whole backward,
        bwd_input and bwd_weight its split parts. Recomputation repeats the forward of the
        recomputed layers before their backward (Chen et al., 2016)."""
        i, j = seg.start, seg.stop
        again = sum(self.fwd[layer] for layer in seg.recomputed())
        f = self.F[j] - self.F[i]
        bi = self.BI[j] - self.BI[i] + again
        bw = self.BW[j] - self.BW[i]
        b = self.B[j] - self.B[i] + again
        return float(f) / speed, float(bi) / speed, float(bw) / speed, float(b) / speed

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

    def transient_bytes(self, seg: Segment) -> float:
        i, j = seg.start, seg.stop
        base = self.peak_max[i, j]
        if seg.recompute == "full":
            base = self.recompute_peak_max[i, j]
        elif seg.recompute == "selective" and seg.recompute_layers:
            base = max(base, max(self.act[k] + self.peak[k] for k in seg.recompute_layers))
        # plus the input gradient being sent back, plus the runtime's workspace
        return float(base + self.cut[i] + self.workspace)

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
                   allreduce_s: float = 0.0, weight_versions: int = 1) -> StageCost:
        f, bi, bw, b = self.times(seg, speed)
        params = self.param_bytes(seg)
        n_params = params / DTYPE_BYTES[self.profile.dtype]
        static = n_params * bytes_per_param(training, self.profile.dtype)
        static += (weight_versions - 1) * params  # stashed weight versions (PipeDream)
        static += self.buffer_bytes(seg, m)
        total_params = self.PARAMS[-1] or 1.0
        return StageCost.model_construct(  # the solver builds thousands: skip re-validation
            fwd_s=f, bwd_input_s=bi, bwd_weight_s=bw, bwd_s=b,
            send_bytes=int(self.cut[seg.stop]),
            act_bytes=int(round(self.held_bytes(seg))),
            wgrad_bytes=int(round(self.WGRAD[seg.stop] - self.WGRAD[seg.start])),
            grad_in_bytes=int(self.cut[seg.start]),
            static_bytes=int(round(static)),
            transient_bytes=int(round(self.transient_bytes(seg))),
            param_bytes=int(round(params)),
            batch_bytes=int(round(self.batch_bytes(seg, m))),
            optimizer_s=self.optimizer_s * params / total_params / speed,
            allreduce_s=allreduce_s,
        )


def _split(c: LayerCost) -> tuple[float, float]:
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
