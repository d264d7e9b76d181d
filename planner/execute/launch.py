"""Start the workers through torchrun's launcher, and never hang or lie about how they ended.

torchrun stops every worker once one fails. On top of that the launcher is run in its own
process group under a deadline, so a hang or Ctrl-C ends all of it, and each worker's report
(or its absence) says which rank failed, on which stage, and why.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from planner.errors import ExecutionError
from planner.formats import Plan


@dataclass
class Rendezvous:
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None


@dataclass
class DistributedResult:
    reports: list[dict]
    log: str = field(repr=False, default="")


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    except PermissionError:
        proc.kill()


def launch(plan: Plan, plan_path: Path, run_dir: Path, *, steps: int, warmup: int, verify: bool,
           timeout_s: float, rdzv: Rendezvous, use_cuda: bool) -> DistributedResult:
    from planner.execute.single import free_port

    world = plan.parallel.pp * plan.parallel.dp
    if world % rdzv.nnodes:
        raise ExecutionError(f"{world} workers cannot be split evenly over {rdzv.nnodes} nodes")
    per_node = world // rdzv.nnodes
    port = rdzv.master_port or free_port()
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in run_dir.glob("rank*.json"):
        old.unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(rdzv.nnodes),
           "--node-rank", str(rdzv.node_rank), "--nproc-per-node", str(per_node),
           "--master-addr", rdzv.master_addr, "--master-port", str(port), "--max-restarts", "0",
           "-m", "planner.execute.worker", "--plan", str(plan_path), "--run-dir", str(run_dir),
           "--steps", str(steps), "--warmup", str(max(warmup, 1)), "--timeout", str(timeout_s)]
    if verify:
        cmd.append("--verify")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not use_cuda:
        env.setdefault("OMP_NUM_THREADS", "1")
    log_path = run_dir / "launcher.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop(proc)
            raise ExecutionError(f"workers did not finish within {timeout_s:.0f} s and were stopped; "
                                 f"{_progress(run_dir, world)} (log: {log_path})") from None
        except KeyboardInterrupt:
            _stop(proc)
            raise
    text = log_path.read_text(errors="replace")
    reports = _reports(run_dir)
    if code != 0:
        raise ExecutionError(_diagnose(plan, reports, text, code, log_path))
    missing = sorted(set(range(rdzv.node_rank * per_node, (rdzv.node_rank + 1) * per_node)) - {r["rank"] for r in reports})
    if missing:
        raise ExecutionError(f"ranks {missing} ended without a report (log: {log_path})")
    return DistributedResult(reports, text)


def _reports(run_dir: Path) -> list[dict]:
    out = []
    for p in sorted(run_dir.glob("rank*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return sorted(out, key=lambda r: r["rank"])


def _progress(run_dir: Path, world: int) -> str:
    done = {r["rank"] for r in _reports(run_dir)}
    waiting = sorted(set(range(world)) - done)
    return f"ranks {waiting} never finished" if waiting else "every rank reported"


def _stage_text(plan: Plan, pp_rank: int) -> str:
    stages = [st.index for st in plan.stages if st.rank == pp_rank]
    return "stage " + ", ".join(map(str, stages)) if len(stages) == 1 else "stages " + ", ".join(map(str, stages))


def _diagnose(plan: Plan, reports: list[dict], log: str, code: int, log_path: Path) -> str:
    """One line: which rank failed first, on which stage, and why. A worker's own error wins over
    the errors its peers saw when it went away; a worker that left no report died silently."""
    failed = [r for r in reports if r.get("error")]
    real = [r for r in failed if not _is_knock_on(r)]
    if real:
        return _describe(plan, real[0], log_path)
    world = plan.parallel.pp * plan.parallel.dp
    silent = sorted(set(range(world)) - {r["rank"] for r in reports})
    # torchrun's failure summary: "rank : 1 (local_rank: 1)" then "exitcode : -9 (pid: ...)", its
    # "Root Cause" section first (the other entries are often the peers it stopped with SIGTERM)
    root = log.split("Root Cause", 1)[1] if "Root Cause" in log else ""
    entries = re.findall(r"^\s*rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)", root + "\n" + log, re.M)
    for rank, exit_code in entries:
        if not silent or int(rank) in silent:
            rank, exit_code = int(rank), int(exit_code)
            how = f"was killed by signal {-exit_code}" if exit_code < 0 else f"exited with code {exit_code}"
            return f"rank {rank} ({_stage_text(plan, rank // plan.parallel.dp)}) {how} before reporting (log: {log_path})"
    if silent:
        rank = silent[0]
        return f"rank {rank} ({_stage_text(plan, rank // plan.parallel.dp)}) died without reporting (log: {log_path})"
    if failed:
        return _describe(plan, failed[0], log_path)
    return f"the workers failed (launcher exit code {code}) without reporting why (log: {log_path})"


def _describe(plan: Plan, r: dict, log_path: Path) -> str:
    from planner.report import fmt_bytes

    where = f"rank {r['rank']} ({_stage_text(plan, r['pp_rank'])})"
    if r.get("oom"):
        st = plan.stages[r["stages"][0]]
        dev = plan.cluster.devices[st.devices[0]]
        peak = r.get("peak_before_failure")
        measured = f", measured peak before failure {fmt_bytes(peak)}" if peak else ""
        return (f"{where} ran out of memory: predicted {fmt_bytes(st.predicted.peak_memory_bytes)}, device has "
                f"{fmt_bytes(dev.memory_bytes)}{measured} ({r['message']})")
    return f"{where} failed: {r['error']}: {r['message']} (log: {log_path})"


def _is_knock_on(report: dict) -> bool:
    """Errors that only say a peer went away."""
    text = (report.get("error", "") + " " + report.get("message", "")).lower()
    return any(k in text for k in ("connection", "timed out", "timeout", "broken pipe", "closed",
                                   "peer", "socket", "gloo", "nccl"))
