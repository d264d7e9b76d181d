"""Single-device mode: every stage of the plan in this process, driven by the engine on one
rank (adjacent stages hand tensors over directly), checked against a single-process run of the
whole model. This proves the plan is correct; its speed says nothing about the plan's devices."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from planner.errors import ExecutionError, PlannerError
from planner.execute.reports import error_text
from planner.execute.runtime import engine_actions, make_runtime
from planner.execute.stages import build_model, build_stages
from planner.execute.train import batch_seed, optimizer_for, stage_parameters
from planner.execute.verify import (
    GradCheck,
    Reference,
    checked_step,
    compare_grads,
    inject_grad_fault,
    reference_note,
    roundoff,
)
from planner.execute.worker import RETURN_NOTHING
from planner.formats import Plan
from planner.plan import plan_schedule
from planner.profile import DTYPES, make_batch
from planner.profile.measure import Timer


@dataclass
class SingleResult:
    loss: float
    reference_loss: float
    loss_tolerance: float
    loss_message: str  # empty: the loss matched
    grad: GradCheck
    reference_note: str
    step_s: float  # median, all stages on one device
    steps: int

    @property
    def grad_message(self) -> str:  # empty: every gradient matched
        return self.grad.message

    @property
    def max_grad_error(self) -> float:
        return self.grad.worst


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_rank_group() -> bool:
    """A process group of one, for the engine; False if one already exists."""
    if dist.is_initialized():
        return False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    return True


@contextmanager
def _failures(what: str, device: torch.device):
    """Errors of the model or the engine in ``what`` become an ExecutionError carrying their cause."""
    try:
        yield
    except (PlannerError, KeyboardInterrupt):
        raise
    except torch.cuda.OutOfMemoryError as e:
        raise ExecutionError(f"single-device mode ran out of memory: the whole model does not fit on "
                             f"{device} ({str(e).splitlines()[0]})") from None
    except Exception as e:
        raise ExecutionError(f"single device: {what} failed: {_root(e).__name__}: {error_text(e)}") from None


def _root(e: BaseException) -> type:
    """The innermost cause's type: the engine re-raises a stage's error as a RuntimeError."""
    while e.__cause__ is not None:
        e = e.__cause__
    return type(e)


def _engine_step(runtime, inputs: tuple, target, losses: list, device: torch.device) -> None:
    with _failures("the engine's step", device):
        runtime.step(*inputs, target=target, losses=losses, **RETURN_NOTHING)


def _train_step(runtime, opt, inputs: tuple, target, device: torch.device) -> None:
    _engine_step(runtime, inputs, target, [], device)
    opt.step()


def run_single(plan: Plan, device: torch.device, steps: int = 3, warmup: int = 1, progress=None) -> SingleResult:
    dtype = DTYPES[plan.dtype]
    torch.manual_seed(0)
    spec = build_model(plan, device=device, dtype=dtype)
    schedule = plan_schedule(plan)
    m, size = plan.microbatch.count, plan.microbatch.size
    inputs, target = make_batch(spec, size * m, batch_seed(0, 0, 1), device, dtype)
    reference = Reference.of(spec.model, spec.layers, m, plan.dtype)
    one = tuple(x[:size] if torch.is_tensor(x) else x for x in inputs)
    built = build_stages(plan, spec, one)
    modules = dict(enumerate(built.modules))
    owned = _one_rank_group()
    try:
        runtime = make_runtime(modules, len(plan.stages), device, engine_actions(schedule, single=True),
                               m, built.loss)
        named = stage_parameters(modules, spec.model)
        opt = optimizer_for(plan, list(named.values()))
        with _failures("the single-process reference run", device):
            reference.run(spec, inputs, target)
        losses: list = []
        with checked_step(list(modules.values())):
            _engine_step(runtime, inputs, target, losses, device)
            u = roundoff(plan.dtype, device)
        loss = float(sum(float(x.detach()) for x in losses))
        inject_grad_fault(named, 0)
        grad = compare_grads(named, reference, u)
        loss_tolerance, loss_message = reference.loss_check(loss, u)
        opt.step()
        timer = Timer(device)
        times = []
        for step in range(1, warmup + steps + 1):
            if progress:
                progress(f"single device: step {step}/{warmup + steps}", step, warmup + steps)
            opt.zero_grad(set_to_none=True)
            inputs, target = make_batch(spec, size * m, batch_seed(step, 0, 1), device, dtype)
            seconds, _ = timer(partial(_train_step, runtime, opt, inputs, target, device))
            if step > warmup:
                times.append(seconds)
    finally:
        if owned:
            dist.destroy_process_group()
    times.sort()
    return SingleResult(loss=loss, reference_loss=reference.loss, loss_tolerance=loss_tolerance,
                        loss_message=loss_message, grad=grad, reference_note=reference_note(reference),
                        step_s=times[len(times) // 2] if times else float("nan"), steps=len(times))
