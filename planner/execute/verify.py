"""Step 0 checked against a single-process reference that computes what the pipeline computes.

The reference runs the plan's micro-batches, split as the engine splits them (``tensor_split`` along
dimension 0), one after the other, each loss divided by their number and its gradients accumulated:
BatchNorm sees each micro-batch's own statistics, exactly as in the pipeline. Dropout modules are
switched off (``eval()``) for the checked step in both the pipeline and the reference; the reference
also checks that its forward draws no other random numbers (functional dropout), which no
comparison could match.

The reference runs twice, in float64 (the value the pipeline approximates) and in the plan's dtype
(to measure this model's own rounding); the tolerance rule is ``tolerance`` below. TF32 is off for
the checked step on a GPU, in both.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from planner.model import ModelSpec, describe

__all__ = ["GradCheck", "Reference", "checked_step", "dropout_off", "inject_grad_fault", "roundoff"]

FAULT = "PLANNER_FAULT"  # "grad@R": global rank R's step-0 gradients are perturbed (a testing aid)
GRAD_FAULT = 1e-3  # the injected fault: this fraction of a gradient's largest element, added to one element

# Unit roundoff u = 2^-(mantissa bits + 1) (Higham 2002, "Accuracy and Stability of Numerical
# Algorithms", section 2.1). TF32, which cuDNN convolutions (and matmuls, when allowed) use for
# float32 on NVIDIA GPUs by default, keeps 10 mantissa bits.
UNIT_ROUNDOFF = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}
TF32 = 2.0 ** -11
HEADROOM = 8  # C in the rule: kernels of another device or order round differently, by a small factor
ROUNDING = 10  # a difference within this many tolerances is called rounding, beyond it a real fault


def roundoff(dtype: str, device: torch.device) -> float:
    """The unit roundoff the computation on ``device`` in ``dtype`` has: TF32's on a GPU that allows it."""
    u = UNIT_ROUNDOFF[dtype]
    if dtype == "float32" and device.type == "cuda" and (
            torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32):
        return TF32
    return u


def tolerance(noise: float, scale: float, global_scale: float, m: int, u: float, u_ref: float) -> float:
    """The largest difference accepted between a pipeline value and its float64 reference:

        tau = C * (nu * u / u_ref + u * sqrt(m) * s) + u * sqrt(m) * S

    * ``s``: the value's own size (the largest |element| of one parameter's reference gradient, or
      |loss|); ``S``: the largest of the whole model's reference gradients, a floor for values that
      are zero in exact arithmetic (the bias before a normalisation) and pure rounding in floats.
    * ``u * sqrt(m) * s``: accumulating m micro-batch gradients in a format of unit roundoff u has
      an error that grows like sqrt(m) u (the probabilistic bound of Higham & Mary 2019, "A New
      Approach to Probabilistic Rounding Error Analysis", theorem 3.1).
    * ``nu``: the difference between the reference run in the plan's dtype (unit roundoff
      ``u_ref``) and in float64, the same micro-batches: the rounding this model and batch amplify
      (normalisation over a micro-batch of one, cancellation in a conv before a norm), measured
      rather than guessed. First-order rounding errors are proportional to u, so it is scaled by
      u / u_ref when the pipeline computes with another unit roundoff (TF32 on a GPU).
    * ``C`` = HEADROOM: the pipeline's kernels (another device, a split backward) round in
      another order than the reference's, so by a small factor more or less.
    """
    root_m = math.sqrt(m)
    return HEADROOM * (noise * u / u_ref + u * root_m * scale) + u * root_m * global_scale


# ----------------------------------------------------------------------------- dropout


def _dropouts(modules: list[nn.Module]) -> list[nn.Module]:
    return [sub for mod in modules for sub in mod.modules() if isinstance(sub, nn.modules.dropout._DropoutNd)]


@contextmanager
def dropout_off(modules: list[nn.Module]) -> Iterator[int]:
    """Every Dropout module inside ``modules`` in eval mode (their other layers, BatchNorm among
    them, keep training); yields how many there are. Their modes are restored afterwards."""
    found = _dropouts(modules)
    before = [d.training for d in found]
    for d in found:
        d.eval()
    try:
        yield len(found)
    finally:
        for d, mode in zip(found, before, strict=True):
            d.train(mode)


@contextmanager
def no_tf32() -> Iterator[None]:
    """float32 computed as float32 on a GPU: TF32's 2^-11 roundoff would widen the tolerance
    8192-fold. Restored afterwards."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


@contextmanager
def checked_step(modules: list[nn.Module]) -> Iterator[None]:
    """The checked step's settings, in the pipeline as in the reference: Dropout modules off, no TF32."""
    with no_tf32(), dropout_off(modules):
        yield


# ----------------------------------------------------------------------------- micro-batches


def microbatches(inputs: tuple, target, m: int) -> list[tuple[tuple, object]]:
    """The batch as the engine splits it: tensors by ``tensor_split`` along dimension 0, anything
    else given to every micro-batch."""
    def split(x) -> list:
        return list(torch.tensor_split(x, m)) if torch.is_tensor(x) else [x] * m

    columns = [split(x) for x in inputs]
    targets = split(target)
    return [(tuple(col[k] for col in columns), targets[k]) for k in range(m)]


def _as(x, dtype: torch.dtype):
    if torch.is_tensor(x):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_as(v, dtype) for v in x)
    return x


def _accumulate(model: nn.Module, layers: list[str] | None, spec: ModelSpec,
                chunks: list[tuple[tuple, object]]) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss summed over micro-batches (each divided by their number, as the pipeline's) and
    the accumulated gradients under every name a parameter goes by."""
    from planner.split import run_whole

    for p in model.parameters():
        p.grad = None
    m, total = len(chunks), 0.0
    for inputs, target in chunks:
        loss = spec.loss(run_whole(model, layers, inputs), target) / m
        loss.backward()
        total += float(loss.detach())
    grads = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.grad is not None:
            grads[name] = p.grad.detach()
    return total, grads


def _draws_random(model: nn.Module, layers: list[str] | None, inputs: tuple) -> bool:
    """Whether the forward gives another output under another seed (the global generator is
    restored afterwards)."""
    from planner.split import run_whole

    device = next((t.device for t in tree_leaves(inputs) if torch.is_tensor(t)), torch.device("cpu"))
    outs = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        for seed in (1, 2):
            torch.manual_seed(seed)
            outs.append([t for t in tree_leaves(run_whole(model, layers, inputs)) if torch.is_tensor(t)])
    return any(not torch.equal(a, b) for a, b in zip(*outs, strict=True))


# ----------------------------------------------------------------------------- the reference


@dataclass
class Reference:
    """The whole model in one process with the pipeline's weights, for the same micro-batches:
    float64 gradients and loss, and how far the same run in the plan's dtype is from them."""

    model: nn.Module | None  # a copy in the plan's dtype; dropped after the run
    layers: list[str] | None
    m: int
    dtype: str
    loss: float = float("nan")  # float64 (the plan's dtype where float64 could not run)
    loss_noise: float = 0.0
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    noise: dict[str, float] = field(default_factory=dict)  # name -> max |g_dtype - g_float64|
    u_ref: float = 0.0  # unit roundoff of the plan-dtype run
    float64: bool = True
    random: bool = False  # the forward draws random numbers with Dropout modules off
    batchnorm: bool = False
    dropouts: int = 0
    note: str = ""  # why the float64 run was not made

    @classmethod
    def of(cls, model: nn.Module, layers: list[str] | None, m: int, dtype: str) -> Reference:
        return cls(copy.deepcopy(model), layers, m, dtype,
                   batchnorm=any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in model.modules()))

    @property
    def largest(self) -> float:
        return max((float(g.abs().max()) for g in self.grads.values() if g.numel()), default=0.0)

    def run(self, spec: ModelSpec, inputs: tuple, target) -> None:
        assert self.model is not None, "a reference runs once"
        model, self.model = self.model, None
        chunks = microbatches(inputs, target, self.m)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with no_tf32(), dropout_off([model]) as self.dropouts:
            self.u_ref = roundoff(self.dtype, device)
            loss, grads = _accumulate(model, self.layers, spec, chunks)
            wide, wide_chunks = copy.deepcopy(model).to(torch.float64), [_as(c, torch.float64) for c in chunks]
            try:
                self.loss, self.grads = _accumulate(wide, self.layers, spec, wide_chunks)
            except Exception as e:  # a model that builds float32 tensors of its own cannot run in float64
                self.float64, self.note = False, f"the float64 reference failed ({describe(e)})"
                self.loss, self.grads, wide, wide_chunks = loss, grads, model, chunks
            self.random = _draws_random(wide, self.layers, wide_chunks[0][0])
        self.loss_noise = abs(loss - self.loss)
        self.noise = {n: float((g.double() - self.grads[n].double()).abs().max()) if g.numel() else 0.0
                      for n, g in grads.items() if n in self.grads}

    def loss_check(self, loss: float, u: float) -> tuple[float, str]:
        """The loss's tolerance, and a failure message (empty: it matches)."""
        tau = tolerance(self.loss_noise, abs(self.loss), 0.0, self.m, u, self.u_ref)
        diff = abs(loss - self.loss)
        if math.isfinite(loss) and diff <= tau:
            return tau, ""
        return tau, (f"the loss differs from the reference by {diff:.2e} (tolerance {tau:.2e}): likely cause: "
                     + self.cause(diff, tau, abs(self.loss)))

    def cause(self, diff: float, tau: float, scale: float) -> str:
        """The likely cause of a difference ``diff`` beyond ``tau`` in a value of size ``scale``."""
        if self.random:
            return ("the forward draws random numbers even with its Dropout modules off (F.dropout or another "
                    "random operation outside a Dropout module): no reference can match it; use nn.Dropout")
        bn = "BatchNorm statistics are per micro-batch in both runs" if self.batchnorm else ""
        off = f"its {self.dropouts} Dropout module{'s' * (self.dropouts != 1)} are off in both" if self.dropouts else ""
        ruled_out = "; ".join(x for x in (bn, off) if x)
        if diff <= ROUNDING * tau and diff <= 1e-3 * max(scale, 1e-30):
            amplified = " (BatchNorm over small micro-batches amplifies it)" if self.batchnorm else ""
            return (f"rounding{amplified}: the difference is within {ROUNDING}x the tolerance for {self.dtype} over "
                    f"{self.m} micro-batches, so tolerance, not a fault" + (f" ({ruled_out})" if ruled_out else ""))
        share = diff / scale if scale else math.inf
        return (f"a real fault: the difference is {share:.2%} of its size, far beyond rounding"
                + (f" ({ruled_out}, so neither explains it)" if ruled_out else ""))


@dataclass
class GradCheck:
    """The gradients of one process's stages against the reference."""

    worst: float = 0.0  # the largest |difference| of any element
    worst_name: str = ""  # its parameter
    name: str = ""  # the parameter whose ratio to its tolerance is the largest
    ratio: float = 0.0  # difference / tolerance there (above 1: a mismatch)
    tolerance: float = 0.0
    message: str = ""  # empty: every gradient matched

    def detail(self) -> str:
        if self.message:
            return self.message
        if not self.name:
            return "no gradient to compare"
        return (f"largest difference {self.worst:.2e} in {self.worst_name}; closest to its tolerance: {self.name} "
                f"({self.ratio:.2f} of {self.tolerance:.2e})")


def compare_grads(named: dict[str, nn.Parameter], ref: Reference, u: float) -> GradCheck:
    """Every gradient of ``named`` (this process's parameters under the model's names) against
    the reference, each under ``tolerance``; ``u``: the pipeline's unit roundoff."""
    out, compared, largest = GradCheck(), 0, ref.largest
    for name, p in named.items():
        want = ref.grads.get(name)
        if want is None or p.grad is None or not want.numel():
            continue
        compared += 1
        grad = _whole(p, p.grad.detach())
        diff = float((grad.to(want.device, torch.float64) - want.double()).abs().max())
        scale = float(want.abs().max())
        tau = tolerance(ref.noise.get(name, 0.0), scale, largest, ref.m, u, ref.u_ref)
        if diff > out.worst or not out.worst_name:
            out.worst, out.worst_name = diff, name
        ratio = diff / tau if tau else (math.inf if diff else 0.0)
        if ratio > out.ratio or not out.name:
            out.name, out.ratio, out.tolerance = name, ratio, tau
            if ratio > 1:
                out.message = (f"gradient of {name} differs from the reference by {diff:.2e} (largest |gradient| "
                               f"{scale:.2e}, tolerance {tau:.2e}): likely cause: {ref.cause(diff, tau, scale)}")
    if named and not compared:
        out.message = "no gradient of these stages could be matched with the reference's parameters"
    return out


def _whole(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Parameter ``p``'s gradient as the reference has it: a DTensor's (tensor parallelism, FSDP)
    gathered from its ranks, every rank of its mesh gathering the same parameters in the same
    order, in the model's own order (``graph_tp.model_order``)."""
    from torch.distributed.tensor import DTensor

    from planner.execute.graph_tp import model_order

    return model_order(p, t.full_tensor()) if isinstance(t, DTensor) else t


def inject_grad_fault(named: dict[str, nn.Parameter], rank: int) -> str | None:
    """``PLANNER_FAULT=grad@R``: on global rank R, add GRAD_FAULT of the largest element of the
    first gradient to its first element (a fault the check must catch). The parameter's name, or
    None."""
    kind, _, where = os.environ.get(FAULT, "").partition("@")
    if kind != "grad" or not where.isdigit() or int(where) != rank:
        return None
    from torch.distributed.tensor import DTensor

    for name, p in named.items():
        grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        if grad is not None and grad.numel() and float(grad.abs().max()) > 0:
            with torch.no_grad():
                grad[(0,) * grad.dim()] += GRAD_FAULT * grad.abs().max()
            return name
    return None


def reference_note(ref: Reference) -> str:
    """How the reference ran, for the verdict."""
    how = "in float64" if ref.float64 else f"in {ref.dtype} ({ref.note})"
    bn = ", BatchNorm statistics per micro-batch as in the pipeline" if ref.batchnorm else ""
    drop = (f"; {ref.dropouts} Dropout module{'s' * (ref.dropouts != 1)} switched off for the checked step in both"
            if ref.dropouts else "")
    return f"reference: the same {ref.m} micro-batches in one process {how}{bn}{drop}"
