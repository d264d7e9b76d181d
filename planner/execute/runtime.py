"""Drive PyTorch's pipeline engine with planner's own action lists.

``_PipelineScheduleRuntime`` is private API of ``torch.distributed.pipelining``: it takes a
compute-only action list per rank and inserts the sends and receives itself. planner loads the
same lists the simulator timed, so what runs is what was predicted. Tested against the torch
range in pyproject.toml.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import _Action, _ComputationType, _PipelineScheduleRuntime

from planner.schedules import Kind, Schedule

_KIND = {
    Kind.FORWARD: _ComputationType.FORWARD,
    Kind.FULL_BACKWARD: _ComputationType.FULL_BACKWARD,
    Kind.BACKWARD_INPUT: _ComputationType.BACKWARD_INPUT,
    Kind.BACKWARD_WEIGHT: _ComputationType.BACKWARD_WEIGHT,
}


def engine_actions(schedule: Schedule, single: bool = False) -> dict[int, list[_Action]]:
    """The engine's per-rank action lists. ``single``: every stage on rank 0, in the order the
    simulator executes the plan's actions (a valid order of the whole pipeline)."""
    if single:
        return {0: [_Action(a.stage, _KIND[a.kind], a.mb) for a in schedule.global_order()]}
    return {r: [_Action(a.stage, _KIND[a.kind], a.mb) for a in actions]
            for r, actions in enumerate(schedule.ranks)}


def _zero_integer_placeholders() -> None:
    """The engine infers a stage's shapes by running it on tensors made from metadata, left
    uninitialised; integer inputs passed along (token ids for a later embedding) would then
    index out of range. Make such placeholders zeros. Private API: skipped where it differs."""
    try:
        from torch.distributed.pipelining._utils import _TensorMeta
    except ImportError:
        return
    original = getattr(_TensorMeta, "to_tensor", None)
    if original is None or getattr(original, "_planner", False):
        return

    def to_tensor(self, device):
        t = original(self, device)
        if not t.is_floating_point() and not t.is_complex():
            t.zero_()
        return t

    to_tensor._planner = True  # type: ignore[attr-defined]
    _TensorMeta.to_tensor = to_tensor


_zero_integer_placeholders()


def make_runtime(modules: dict[int, nn.Module], n_stages: int, device: torch.device,
                 actions: dict[int, list[_Action]], m: int, loss: Callable, group=None) -> _PipelineScheduleRuntime:
    """A runtime for this rank's stages (``modules``: stage index -> module)."""
    stages = [PipelineStage(mod, s, n_stages, device, group=group) for s, mod in sorted(modules.items())]

    def scaled(output, target):  # the mean over micro-batches, applied once per micro-batch: tied
        return loss(output, target) / m  # weights shared by two local stages are not rescaled twice

    runtime = _PipelineScheduleRuntime(stages, m, loss_fn=scaled, scale_grads=False)
    runtime.pipeline_order = actions
    runtime._prepare_schedule_with_comms(actions)
    return runtime
