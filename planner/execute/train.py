"""One training step of a plan's stages in this process: the batch, the engine's step, gradient
synchronisation, the optimizer, and the checks against a single-process reference."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from planner.errors import InputError
from planner.formats import Plan
from planner.model import ModelSpec

# assert_close tolerances for gradients against the single-process reference. The pipeline sums
# the same micro-batch gradients in another order, so float32 agrees to rounding.
TOLERANCE = {"float32": (1e-4, 1e-6), "bfloat16": (2e-2, 1e-3), "float16": (2e-2, 1e-3)}


def optimizer_for(plan: Plan, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    t = plan.training
    if t.precision == "mixed":
        raise InputError("plans with --precision mixed (fp32 master weights) are modelled but not executed; "
                         "solve with --precision param to run one")
    if not params:
        params = [nn.Parameter(torch.zeros(1))]  # a stage without weights still steps
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=1e-4)
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9 if t.optimizer == "sgd-momentum" else 0.0)


def batch_seed(step: int, dp_rank: int, dp: int) -> int:
    return 1000 + step * dp + dp_rank


@dataclass
class Reference:
    """The whole model in one process, same weights, for the same batch."""

    model: nn.Module
    layers: list[str] | None = None
    loss: float = float("nan")
    grads: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module, layers: list[str] | None = None) -> Reference:
        return cls(copy.deepcopy(model), layers)

    def run(self, spec: ModelSpec, inputs: tuple, target) -> None:
        from planner.split import run_whole

        for p in self.model.parameters():
            p.grad = None
        out = run_whole(self.model, self.layers, inputs)
        loss = spec.loss(out, target)
        loss.backward()
        self.loss = float(loss.detach())
        by_id: dict[int, torch.nn.Parameter] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), p)
            grad = by_id[id(p)].grad
            if grad is not None:  # a parameter the loss does not reach has none
                self.grads[name] = grad


def compare_grads(named: dict[str, nn.Parameter], ref: Reference, dtype: str) -> tuple[float, str]:
    """Largest absolute gradient difference against the reference, and a failure message
    (empty when every gradient matches within tolerance)."""
    rtol, atol = TOLERANCE[dtype]
    worst, message = 0.0, ""
    compared = 0
    for name, p in named.items():
        want = ref.grads.get(name)
        if want is None or p.grad is None:
            continue
        compared += 1
        got = p.grad.detach().to(want.device, want.dtype)
        worst = max(worst, float((got - want).abs().max()))
        if not message:
            try:
                torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
            except AssertionError as e:
                message = f"gradient of {name} differs from the single-process reference: " + \
                          str(e).splitlines()[0]
    if named and not compared:
        message = "no gradient of these stages could be matched with the reference's parameters"
    return worst, message


def stage_parameters(modules: dict[int, nn.Module], model: nn.Module | None = None) -> dict[str, nn.Parameter]:
    """Parameters of this process's stages, each once, under the model's own names when the model
    is given (explicit stages and checkpoint wrappers rename them)."""
    names = {id(p): n for n, p in reversed(list(model.named_parameters(remove_duplicate=False)))} if model else {}
    out: dict[str, nn.Parameter] = {}
    seen = set()
    for mod in modules.values():
        for name, p in mod.named_parameters(remove_duplicate=False):
            if id(p) not in seen:
                seen.add(id(p))
                out[names.get(id(p), name.replace("inner.", ""))] = p
    return out
