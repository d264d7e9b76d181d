"""What trains a plan's stages in this process: the optimizer, the batch seeds, and the stages'
parameters under the model's names (the checks against a reference are in ``verify``)."""

from __future__ import annotations

import torch
from torch import nn

from planner.errors import InputError
from planner.formats import Plan


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
