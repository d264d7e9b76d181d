"""One worker of a distributed run, started by torchrun: ``python -m planner.execute.worker``.

Pipeline rank r, data-parallel replica d and tensor-parallel rank t run as global rank
``(r * dp + d) * tp + t`` (the plan's placement, one DeviceMesh over (pp, dp, tp): see
``parallel``). The worker builds the whole model with the same seed as every other worker, keeps
its stages (split over its tp ranks, sharded over its replicas with ZeRO 2 or 3), runs the plan's
action list on the engine, sums tied-weight gradients across the ranks that share them, averages
gradients across replicas (FSDP does it inside the step), steps the optimizer, and writes what
it measured (or why it failed) to ``<run-dir>/rank<R>.json`` (a ``WorkerReport``). At the end every
worker gathers every rank's report, so each node holds the whole run's (a node without the last
stage still sees the loss). It always destroys its process group, and it exits by itself when its
launcher or the planner process that started the run is gone.

The steps, in order: step 0 is checked against the single-process reference (``verify``: the same
micro-batches in float64, Dropout modules off for that step in both); steps 0 and 1 are
the memory steps (live tensors counted on a CPU; the CUDA peak is taken from step 1 on, once the
optimizer's state exists); the steps after the warm-up are timed.
"""

from __future__ import annotations

import argparse
import inspect
import os
import resource
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.pipelining.schedules import _PipelineScheduleRuntime

from planner.execute import load_runnable
from planner.execute.launch import PARENT_ENV, alive
from planner.execute.parallel import local, make_mesh, shard_stage, tensor_parallel
from planner.execute.reports import Failure, Measured, WorkerReport, coordinates, error_text
from planner.execute.runtime import engine_actions, make_runtime
from planner.execute.stages import build_model, build_stages, canonical_params, tied_groups
from planner.execute.train import ShardedOptimizer, batch_seed, optimizer_for, stage_parameters
from planner.execute.verify import (
    Reference,
    checked_step,
    compare_grads,
    inject_grad_fault,
    reference_note,
    roundoff,
)
from planner.formats import Plan
from planner.model import ModelSpec
from planner.plan import plan_schedule
from planner.profile import DTYPES, make_batch
from planner.profile.measure import LiveTensors, Timer, tensors

__all__ = ["RETURN_NOTHING", "error_text", "main"]

# Without this the last stage keeps every micro-batch's output for the step's return value.
RETURN_NOTHING: dict[str, Any] = {"return_outputs": False} if "return_outputs" in inspect.signature(
    _PipelineScheduleRuntime.step).parameters else {}
# testing aid: "raise@R", "kill@R", "oom@R" or "hang@R" makes global rank R fail; "grad@R" perturbs
# its step-0 gradients (verify.inject_grad_fault), which the check must catch
FAULT = "PLANNER_FAULT"
ORPHANED = 3  # exit code of a worker whose launcher or planner went away

Batch = tuple[tuple, Any]  # (inputs, target)


class OutOfMemory(RuntimeError):
    pass


def write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # several workers may write one report
    tmp.write_text(text)
    tmp.replace(path)


def watch_parents(interval_s: float = 0.5) -> None:
    """Exit when the launcher (the parent) or the planner process that started the run is gone:
    a killed launcher must not leave its workers waiting on their peers for minutes."""
    launcher = os.getppid()
    planner = int(os.environ.get(PARENT_ENV, "0") or 0)

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != launcher or (planner and not alive(planner)):
                os._exit(ORPHANED)

    threading.Thread(target=watch, name="planner-watchdog", daemon=True).start()


@contextmanager
def process_group(device: torch.device, rank: int, world: int, timeout_s: float) -> Iterator[None]:
    """The workers' default group (NCCL on GPUs, gloo on CPUs), torn down however the body ends."""
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def inject(rank: int) -> None:
    fault = os.environ.get(FAULT, "")
    if "@" not in fault:
        return
    kind, where = fault.split("@", 1)
    if int(where) != rank:
        return
    if kind == "raise":
        raise RuntimeError("injected failure (PLANNER_FAULT)")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "oom":
        raise OutOfMemory("injected out-of-memory (PLANNER_FAULT)")
    if kind == "hang":
        time.sleep(3600)


def _sync(params: list[torch.nn.Parameter], group, average: int = 0) -> None:
    """All-reduce gradients in place, one tensor at a time: no flat copy to account for."""
    for p in params:
        if p.grad is None:
            continue
        grad = local(p.grad)  # a DTensor's shard: the ranks of a group hold the same slice
        dist.all_reduce(grad, group=group)
        if average:
            grad /= average


# ----------------------------------------------------------------------------- one rank, built


@dataclass
class _Rank:
    """One worker's part of the run: its stages on the engine and what trains them."""

    plan: Plan
    rank: int
    dp_rank: int
    device: torch.device
    spec: ModelSpec
    runtime: _PipelineScheduleRuntime
    modules: list[torch.nn.Module]  # this rank's stage modules
    named: dict[str, torch.nn.Parameter]  # this rank's parameters under the model's names
    tied: list[tuple[list[torch.nn.Parameter], Any]]  # (shared weights held here, their group)
    dp_group: Any
    opt: torch.optim.Optimizer | ShardedOptimizer
    reduced: bool  # FSDP (ZeRO 2, 3) averages the gradients over the replicas inside the step
    reference: Reference | None
    first: bool  # holds the first stage: feeds the inputs
    last: bool  # holds the last stage: computes the loss

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return list(self.named.values())

    def batch(self, step: int) -> Batch:
        return _batch(self.plan, self.spec, step, self.dp_rank)

    def on_device(self, batch: Batch) -> Batch:
        """This rank's part of the batch on its device: the inputs where the first stage runs, the
        target where the last does (the others never read them, and the plan does not count them:
        ``CostTable.batch_bytes``)."""
        inputs, target = batch
        inputs = tuple(x.to(self.device) if torch.is_tensor(x) else x for x in inputs) if self.first else ()
        return inputs, (target.to(self.device) if torch.is_tensor(target) else target) if self.last else None

    def backward(self, batch: Batch) -> list:
        """Forward and backward of every micro-batch; the losses on the last stage's rank."""
        inputs, target = batch
        losses: list = []
        self.runtime.step(*(inputs if self.first else ()), target=target if self.last else None,
                          losses=losses if self.last else None, **RETURN_NOTHING)
        for params, group in self.tied:
            _sync(params, group)
        return losses

    def update(self) -> None:
        dp = self.plan.parallel.dp
        # FSDP averages inside the step, ZeRO 1's optimizer reduces each range to its owner
        if dp > 1 and not self.reduced and not isinstance(self.opt, ShardedOptimizer):
            _sync(self.params, self.dp_group, average=dp)
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)

    def train_step(self, batch: Batch) -> None:
        self.backward(batch)
        self.update()


def _batch(plan: Plan, spec: ModelSpec, step: int, dp_rank: int) -> Batch:
    """The step's batch of this replica, on the CPU: every rank of the replica makes the same."""
    m, size = plan.microbatch.count, plan.microbatch.size
    return make_batch(spec, size * m, batch_seed(step, dp_rank, plan.parallel.dp), torch.device("cpu"),
                      DTYPES[plan.dtype])


def reference_batch(plan: Plan, spec: ModelSpec, batch: Batch, reduced: bool) -> Batch:
    """What the reference runs: this replica's batch, or, where the replicas' gradients are
    averaged inside the step (FSDP), every replica's, one after the other: their m * dp
    micro-batches, each loss divided by their number, are the replicas' average."""
    if not reduced:
        return batch
    parts = [_batch(plan, spec, 0, d) for d in range(plan.parallel.dp)]

    def cat(xs: list) -> Any:
        return torch.cat(xs) if torch.is_tensor(xs[0]) else xs[0]

    inputs = tuple(cat([p[0][k] for p in parts]) for k in range(len(batch[0])))
    return inputs, cat([p[1] for p in parts])


def _tied(plan: Plan, ties: list[tuple[list[int], list[str]]], model: torch.nn.Module,
          named: dict[str, torch.nn.Parameter], rank: int) -> list:
    """For each weight shared by stages on several ranks (``ties``: found before the stages are
    split, while every layer holds the model's own parameters): the copies held here and the group
    of the ranks (in this replica and tp rank) that hold them. Every process creates every group."""
    dp, tp = plan.parallel.dp, plan.parallel.tp
    pp_rank, dp_rank, tp_rank = coordinates(rank, dp, tp)
    by_name = canonical_params(model)
    own = {id(p) for p in named.values()}
    out = []
    for stages, names in ties:
        ranks = sorted({plan.stages[s].rank for s in stages})
        if len(ranks) < 2:
            continue
        groups = [dist.new_group([(r * dp + d) * tp + t for r in ranks]) for d in range(dp) for t in range(tp)]
        if pp_rank in ranks:
            held = [by_name[n] for n in names if n in by_name and id(by_name[n]) in own]
            out.append((held, groups[dp_rank * tp + tp_rank]))
    return out


def _build(plan: Plan, rank: int, device: torch.device, verify: bool) -> _Rank:
    """This rank's stages on the engine (the first micro-batch of step 0 gives the engine its
    shapes; the steps make their batches again, so that none is held beyond its step)."""
    par = plan.parallel
    pp_rank, dp_rank, _ = coordinates(rank, par.dp, par.tp)
    mine = [st.index for st in plan.stages if st.rank == pp_rank]
    dtype = DTYPES[plan.dtype]
    m, size = plan.microbatch.count, plan.microbatch.size
    mesh = make_mesh(plan, device)
    reduced = par.zero >= 2 and par.dp > 1
    torch.manual_seed(0)
    spec = build_model(plan, device=torch.device("cpu"), dtype=dtype)
    batch = _batch(plan, spec, 0, dp_rank)
    reference = Reference.of(spec.model, spec.layers, m * (par.dp if reduced else 1), plan.dtype) if verify else None
    one = tuple(x[:size] if torch.is_tensor(x) else x for x in batch[0])
    built = build_stages(plan, spec, one, stages=mine)
    ties = tied_groups(plan, built.lm, spec.model)
    modules = {s: _parallel(plan, module.to(device), spec, mesh) for s, module in zip(mine, built.modules, strict=True)}
    named = stage_parameters(modules, spec.model)
    tied = _tied(plan, ties, spec.model, named, rank)
    schedule = plan_schedule(plan)
    runtime = make_runtime(modules, len(plan.stages), device, engine_actions(schedule), m, built.loss,
                           group=mesh.get_group("pp"))
    dp_group = mesh.get_group("dp")
    state = _Rank(plan=plan, rank=rank, dp_rank=dp_rank, device=device, spec=spec, runtime=runtime,
                  modules=list(modules.values()), named=named, tied=tied, dp_group=dp_group,
                  opt=optimizer_for(plan, list(named.values()), dp_group=dp_group), reduced=reduced,
                  reference=reference, first=0 in mine, last=len(plan.stages) - 1 in mine)
    return state


def _parallel(plan: Plan, module: torch.nn.Module, spec: ModelSpec, mesh) -> torch.nn.Module:
    """A stage split over its tp ranks by the model's tp_plan, then sharded over its replicas
    with ZeRO 2 or 3."""
    par = plan.parallel
    if par.tp > 1:
        tensor_parallel(module, spec.tp_plan, mesh["tp"], par.sequence_parallel, spec.model)
    if par.zero >= 2 and par.dp > 1:
        shard_stage(module, mesh["dp"], par.zero)
    return module


# ----------------------------------------------------------------------------- the steps


@dataclass
class _Checks:  # the verification fields of Measured
    loss: float | None = None
    reference_loss: float | None = None
    loss_tolerance: float | None = None
    loss_message: str = ""
    max_grad_error: float | None = None
    grad_ratio: float | None = None
    grad_detail: str = ""
    grad_message: str = ""
    reference_note: str = ""


def _reference_step(r: _Rank, tracker: LiveTensors | None) -> _Checks:
    """Step 0, Dropout modules off, its loss and gradients compared with the single-process
    reference (run already) before the optimizer steps; no check without a reference. The
    comparison's temporaries are not training memory: ``tracker`` does not count them."""
    batch = _held_batch(r, 0, tracker)
    dist.barrier()
    with checked_step(r.modules):
        losses = r.backward(batch)
        u = roundoff(r.plan.dtype, r.device)
    del batch
    with tracker.uncounted() if tracker is not None else nullcontext():
        checks = _compare(r, losses, u)
    r.update()
    return checks


def _compare(r: _Rank, losses: list, u: float) -> _Checks:
    checks = _Checks()
    ref = r.reference
    if ref is not None:
        inject_grad_fault(r.named, r.rank)
        grad = compare_grads(r.named, ref, u)
        checks = _Checks(reference_loss=ref.loss, max_grad_error=grad.worst, grad_ratio=grad.ratio,
                         grad_detail=grad.detail(), grad_message=grad.message, reference_note=reference_note(ref))
        if r.last:
            checks.loss = _replica_loss(r, losses)
            checks.loss_tolerance, checks.loss_message = ref.loss_check(checks.loss, u)
    return checks


def _replica_loss(r: _Rank, losses: list) -> float:
    """The step's loss on this replica, or, where the reference ran every replica's batch, the
    replicas' average (the ranks of the last stage all compute it)."""
    loss = torch.tensor(float(sum(float(x.detach()) for x in losses)), dtype=torch.float64)
    if r.reduced:
        dist.all_reduce(loss, group=r.dp_group)
        loss /= r.plan.parallel.dp
    return float(loss)


def _held_batch(r: _Rank, step: int, tracker: LiveTensors | None) -> Batch:
    """The step's batch as this rank holds it. Every rank makes the whole batch (the factory makes
    inputs and target together), but a rank keeps only its part (``_Rank.on_device``), as a data
    loader feeding only the ranks that read it would: the rest is made uncounted, and what is kept
    is counted from here on."""
    with tracker.uncounted() if tracker is not None else nullcontext():
        batch = r.on_device(r.batch(step))
    if tracker is not None:
        tracker.adopt(tensors(batch))
    return batch


def _timed_step(r: _Rank, timer: Timer, step: int, tracker: LiveTensors | None = None) -> float:
    batch = _held_batch(r, step, tracker)
    dist.barrier()
    seconds, _ = timer(partial(r.train_step, batch))
    return seconds


@contextmanager
def _live_tensors(r: _Rank) -> Iterator[LiveTensors | None]:
    """On a CPU, the live tensors created inside, this rank's parameters not counted (added back
    by the caller); None on a GPU, whose allocator counts."""
    if r.device.type != "cpu":
        yield None
        return
    tracker = LiveTensors(ignore=[local(p).untyped_storage().data_ptr() for p in r.params])
    with tracker:
        yield tracker
    tracker.sweep()


def _memory_steps(r: _Rank, timer: Timer, done: Callable[[int], None]) -> tuple[_Checks, int | None]:
    """Steps 0 and 1, memory counted: the checks of step 0, and the CPU's live peak in bytes
    (None on a GPU). Faults are injected at step 1, once the pipeline ran."""
    with _live_tensors(r) as tracker:
        checks = _reference_step(r, tracker)
        done(0)
        inject(r.rank)
        if r.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(r.device)
        _timed_step(r, timer, 1, tracker)
    done(1)
    if tracker is None:
        return checks, None
    return checks, tracker.peak + sum(local(p).numel() * local(p).element_size() for p in r.params)


def _run(r: _Rank, steps: int, warmup: int, done: Callable[[int], None]) -> Measured:
    """Every step, ``done(step)`` after each: steps 0 to ``warmup`` untimed (at least to step 1,
    the second memory step), then ``steps`` timed steps."""
    timer = Timer(r.device)
    if r.reference is not None:  # before the memory count: the reference's tensors are not this rank's
        r.reference.run(r.spec, *reference_batch(r.plan, r.spec, r.batch(0), r.reduced))
    checks, cpu_peak = _memory_steps(r, timer, done)
    times = []
    for step in range(2, max(warmup, 1) + steps + 1):
        seconds = _timed_step(r, timer, step)
        if step > warmup:
            times.append(seconds)
        done(step)
    cuda = r.device.type == "cuda"
    return Measured(step_times_s=times, cpu_live_peak_bytes=cpu_peak,
                    peak_allocated_bytes=torch.cuda.max_memory_allocated(r.device) if cuda else None,
                    peak_reserved_bytes=torch.cuda.max_memory_reserved(r.device) if cuda else None,
                    max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **asdict(checks))


# ----------------------------------------------------------------------------- the process


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m planner.execute.worker")
    ap.add_argument("--plan", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--verify", action="store_true")
    ap.add_argument("--timeout", type=float, default=300)
    return ap.parse_args(argv)


def _device(plan: Plan, local_rank: int) -> torch.device:
    """This worker's GPU, or the CPU with the launcher's thread count."""
    if plan.cluster.devices[0].type == "cuda" and torch.cuda.is_available():
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
        return device
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    return torch.device("cpu")


def _failure(e: BaseException, device: torch.device) -> Failure:
    return Failure(error=type(e).__name__, message=error_text(e),
                   oom=isinstance(e, (OutOfMemory, torch.cuda.OutOfMemoryError)),
                   traceback=traceback.format_exc(limit=6),
                   peak_before_failure_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)


def _share(report: WorkerReport, run_dir: Path, world: int, local_rank: int) -> None:
    """Every rank's report to every node: local rank 0 writes the other ranks' reports."""
    everyone: list = [None] * world
    dist.all_gather_object(everyone, report.to_json())
    if local_rank != 0:
        return
    for text in everyone:
        other = WorkerReport.from_json(text)
        if other.rank != report.rank:
            write(run_dir / f"rank{other.rank}.json", text)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    run_dir = Path(args.run_dir)
    out = run_dir / f"rank{rank}.json"
    watch_parents()
    write(run_dir / f"rank{rank}.pid", str(os.getpid()))
    plan = load_runnable(Path(args.plan))
    pp_rank, dp_rank, tp_rank = coordinates(rank, plan.parallel.dp, plan.parallel.tp)
    device = _device(plan, local_rank)
    report = WorkerReport(rank=rank, pp_rank=pp_rank, dp_rank=dp_rank, tp_rank=tp_rank, device=str(device),
                          stages=[st.index for st in plan.stages if st.rank == pp_rank])

    def done(step: int) -> None:
        write(run_dir / f"rank{rank}.step", str(step + 1))

    try:
        with process_group(device, rank, world, args.timeout):
            state = _build(plan, rank, device, args.verify)
            report = report.model_copy(update={"measured": _run(state, args.steps, args.warmup, done)})
            write(out, report.to_json())
            _share(report, run_dir, world, local_rank)
        return 0
    except BaseException as e:  # report why (a failed rendezvous too), then fail so torchrun stops the others
        write(out, report.model_copy(update={"failure": _failure(e, device)}).to_json())
        raise


def leave(code: int) -> None:
    """End a worker that has written its report: at once, without the interpreter's teardown, in
    which torch's C++ objects were seen to abort the process (std::terminate, signal 6) after a
    run had succeeded, failing it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    leave(main())
