"""One worker of a distributed run, started by torchrun: ``python -m planner.execute.worker``.

Pipeline rank r and data-parallel replica d run as global rank ``r * dp + d`` (the plan's
placement). The worker builds the whole model with the same seed as every other worker, keeps
its stages, runs the plan's action list on the engine, sums tied-weight gradients across the
ranks that share them, averages gradients across replicas, steps the optimizer, and writes what
it measured (or why it failed) to ``<run-dir>/rank<R>.json``. At the end every worker gathers every
rank's report, so each node holds the whole run's (a node without the last stage still sees the
loss). It always destroys its process group, and it exits by itself when its launcher or the
planner process that started the run is gone.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.pipelining.schedules import _PipelineScheduleRuntime

from planner.execute import load_runnable
from planner.execute.launch import PARENT_ENV, alive
from planner.execute.runtime import engine_actions, make_runtime
from planner.execute.stages import build_model, build_stages, canonical_params, tied_groups
from planner.execute.train import (
    Reference, batch_seed, compare_grads, optimizer_for, stage_parameters,
)
from planner.profile import DTYPES, make_batch
from planner.profile.measure import LiveTensors, Timer
from planner.schedules import build

# Without this the last stage keeps every micro-batch's output for the step's return value.
RETURN_NOTHING = {"return_outputs": False} if "return_outputs" in inspect.signature(
    _PipelineScheduleRuntime.step).parameters else {}
FAULT = "PLANNER_FAULT"  # testing aid: "raise@R", "kill@R", "oom@R" or "hang@R" makes global rank R fail
ORPHANED = 3  # exit code of a worker whose launcher or planner went away


class OutOfMemory(RuntimeError):
    pass


def _write(path: Path, data: dict | str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # several workers may write one report
    tmp.write_text(data if isinstance(data, str) else json.dumps(data, indent=1))
    tmp.replace(path)


def _watch_parents(interval_s: float = 0.5) -> None:
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


def error_text(e: BaseException) -> str:
    """One line that says what went wrong: the exception's first non-empty line, else where it
    was raised (some engine errors carry no message, or start with a newline). The engine re-raises
    a stage's error under a header and a dump of shapes: the innermost cause says what happened."""
    while e.__cause__ is not None:
        e = e.__cause__
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()
    frames = traceback.extract_tb(e.__traceback__)
    if frames:
        f = frames[-1]
        return f"raised without a message at {Path(f.filename).name}:{f.lineno} ({f.name})"
    return "raised without a message"


def _inject(rank: int) -> None:
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
        dist.all_reduce(p.grad, group=group)
        if average:
            p.grad /= average


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m planner.execute.worker")
    ap.add_argument("--plan", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--verify", action="store_true")
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args(argv)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    run_dir = Path(args.run_dir)
    out = run_dir / f"rank{rank}.json"
    _watch_parents()
    _write(run_dir / f"rank{rank}.pid", str(os.getpid()))
    plan = load_runnable(Path(args.plan))
    pp_rank, dp_rank = divmod(rank, plan.parallel.dp)
    mine = [st.index for st in plan.stages if st.rank == pp_rank]
    report: dict = {"rank": rank, "pp_rank": pp_rank, "dp_rank": dp_rank, "stages": mine}
    use_cuda = plan.cluster.devices[0].type == "cuda" and torch.cuda.is_available()
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    report["device"] = str(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=args.timeout))
    try:
        report.update(_run(plan, args, rank, pp_rank, dp_rank, mine, device))
        _write(out, report)
        everyone: list = [None] * world
        dist.all_gather_object(everyone, report)
        if local == 0:  # this node holds every rank's report, whichever node ran it
            for other in everyone:
                if other["rank"] != rank:
                    _write(run_dir / f"rank{other['rank']}.json", other)
        return 0
    except BaseException as e:  # report why, then fail so torchrun stops the others
        oom = isinstance(e, (OutOfMemory, torch.cuda.OutOfMemoryError))
        report.update(error=type(e).__name__, message=error_text(e),
                      oom=oom, traceback=traceback.format_exc(limit=6),
                      peak_before_failure=torch.cuda.max_memory_allocated(device) if use_cuda else None)
        _write(out, report)
        raise
    finally:
        dist.destroy_process_group()


def _run(plan, args, rank, pp_rank, dp_rank, mine, device) -> dict:
    pp, dp = plan.parallel.pp, plan.parallel.dp
    dtype = DTYPES[plan.dtype]
    m, size = plan.microbatch.count, plan.microbatch.size
    # every process creates every group, in the same order
    pp_groups = [dist.new_group([r * dp + d for r in range(pp)]) for d in range(dp)]
    dp_groups = [dist.new_group([r * dp + d for d in range(dp)]) for r in range(pp)]
    torch.manual_seed(0)
    spec = build_model(plan, device=torch.device("cpu"), dtype=dtype)
    inputs, target = make_batch(spec, size * m, batch_seed(0, dp_rank, dp), torch.device("cpu"), dtype)
    reference = Reference.of(spec.model, spec.layers) if args.verify else None
    one = tuple(x[:size] if torch.is_tensor(x) else x for x in inputs)
    built = build_stages(plan, spec, one, stages=mine)
    tied = []
    for stages, names in tied_groups(plan, built.lm, spec.model):
        ranks = sorted({plan.stages[s].rank for s in stages})
        groups = [dist.new_group([r * dp + d for r in ranks]) for d in range(dp)] if len(ranks) > 1 else None
        if groups and pp_rank in ranks:
            tied.append((groups[dp_rank], names))
    modules = {s: module.to(device) for s, module in zip(mine, built.modules)}
    schedule = build(plan.schedule.name, pp, m, plan.schedule.virtual_stages)
    runtime = make_runtime(modules, len(plan.stages), device, engine_actions(schedule), m, spec.loss,
                           group=pp_groups[dp_rank])
    named = stage_parameters(modules, spec.model)
    params = list(named.values())
    by_name = canonical_params(spec.model)
    own = {id(p) for p in params}
    tied_params = [([by_name[n] for n in names if n in by_name and id(by_name[n]) in own], g) for g, names in tied]
    opt = optimizer_for(plan, params)
    first = 0 in mine
    last = len(plan.stages) - 1 in mine
    result: dict = {"loss": None, "reference_loss": None, "max_grad_error": None, "grad_message": ""}
    cpu_tracker = LiveTensors(ignore=[p.untyped_storage().data_ptr() for p in params]) if device.type == "cpu" else None
    timer = Timer(device)

    def train_step(step: int, inputs: tuple, target) -> None:
        losses: list = []
        step_args = inputs if first else ()
        runtime.step(*step_args, target=target if last else None, losses=losses if last else None,
                     **RETURN_NOTHING)
        for group_params, group in tied_params:
            _sync(group_params, group)
        if step == 0 and reference is not None:
            worst, message = compare_grads(named, reference, plan.dtype)
            result.update(max_grad_error=worst, grad_message=message, reference_loss=reference.loss)
            if last:
                result["loss"] = float(sum(float(x.detach()) for x in losses))
        if dp > 1:
            _sync(params, dp_groups[pp_rank], average=dp)
        opt.step()
        opt.zero_grad(set_to_none=False)

    times = []
    total = args.warmup + args.steps
    for step in range(total + 1):
        if step > 0:  # step 0's batch was made above
            inputs, target = make_batch(spec, size * m, batch_seed(step, dp_rank, dp), torch.device("cpu"), dtype)
        if step == 0 and reference is not None:  # before the tracker: its tensors are not ours
            reference.run(spec, inputs, target)
        inputs = tuple(x.to(device) if torch.is_tensor(x) else x for x in inputs)
        target = target.to(device) if torch.is_tensor(target) else target
        if step == 1:
            _inject(rank)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        if step == 0 and cpu_tracker is not None:
            cpu_tracker.__enter__()
        dist.barrier()
        elapsed, _ = timer(partial(train_step, step, inputs, target))
        if step == 1 and cpu_tracker is not None:
            cpu_tracker.__exit__(None, None, None)
            cpu_tracker.sweep()
            result["cpu_live_peak_bytes"] = cpu_tracker.peak + sum(p.numel() * p.element_size() for p in params)
            cpu_tracker = None
        if step > args.warmup:
            times.append(elapsed)
        _write(Path(args.run_dir) / f"rank{rank}.step", str(step + 1))
    result["step_times"] = times
    if device.type == "cuda":
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


if __name__ == "__main__":
    sys.exit(main())
