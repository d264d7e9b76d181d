"""Start the workers through torchrun's launcher, and never hang, lie about how they ended, or
leave a process behind.

torchrun stops every worker once one fails. On top of that:

* the launcher runs in its own process group under a deadline, polled, so a hang, Ctrl-C,
  SIGTERM or SIGHUP stops the launcher's group and every worker (each worker records its pid
  in the run folder: torchrun starts each in a session of its own);
* every worker watches its launcher and this process, and exits when either is gone
  (``worker.watch_parents``), so even a SIGKILL of planner or of torchrun leaves nothing;
* each worker's report (or its absence) says which rank failed, on which stage, and why.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from planner.errors import ExecutionError, Interrupted
from planner.execute.reports import WorkerReport, coordinates, read_report, world_size
from planner.formats import Plan

PARENT_ENV = "PLANNER_PARENT_PID"  # the planner process whose workers these are
_POLL_S = 0.2
_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long


@dataclass
class Rendezvous:
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None


@dataclass
class DistributedResult:
    reports: list[WorkerReport]
    log: str = field(repr=False, default="")


@contextmanager
def _ignoring_signals() -> Iterator[None]:
    """While stopping the workers: a second Ctrl-C or SIGTERM must not cut the clean-up short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (not Linux): it exists
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _ours(pid: int, run_dir: Path) -> bool:
    """The pid is still a worker of this run (not a reused pid)."""
    try:
        return str(run_dir).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no /proc: trust the pid file


def worker_pids(run_dir: Path) -> list[int]:
    """Workers of this run that are still running (each wrote ``rank<R>.pid`` when it started)."""
    out = []
    for p in run_dir.glob("rank*.pid"):
        try:
            pid = int(p.read_text())
        except (OSError, ValueError):
            continue
        if alive(pid) and _ours(pid, run_dir):
            out.append(pid)
    return out


def _signal_all(proc: subprocess.Popen, pids: list[int], sig: int) -> None:
    for target in [proc.pid, *pids]:  # each worker leads its own group (torchrun's start_new_session)
        try:
            os.killpg(target, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(target, sig)
            except (ProcessLookupError, PermissionError):
                pass


def stop(proc: subprocess.Popen, run_dir: Path) -> int:
    """Stop the launcher's group and every worker of the run: SIGTERM, then SIGKILL after a grace
    period. Returns how many processes were still running."""
    with _ignoring_signals():
        pids = worker_pids(run_dir)
        running = (proc.poll() is None) + len(pids)
        if not running:
            _signal_all(proc, [], signal.SIGKILL)  # anything left in the launcher's group
            return 0
        _signal_all(proc, pids, signal.SIGTERM)
        deadline = time.monotonic() + _GRACE_S
        while time.monotonic() < deadline and (proc.poll() is None or any(alive(p) for p in pids)):
            time.sleep(0.05)
        _signal_all(proc, [p for p in pids if alive(p)], signal.SIGKILL)
        proc.wait()
        return running


def _launch_command(plan_path: Path, run_dir: Path, rdzv: Rendezvous, per_node: int, port: int, *,
                    steps: int, warmup: int, verify: bool, timeout_s: float) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(rdzv.nnodes),
           "--node-rank", str(rdzv.node_rank), "--nproc-per-node", str(per_node),
           "--master-addr", rdzv.master_addr, "--master-port", str(port), "--max-restarts", "0",
           "-m", "planner.execute.worker", "--plan", str(plan_path), "--run-dir", str(run_dir),
           "--steps", str(steps), "--warmup", str(max(warmup, 1)), "--timeout", str(timeout_s)]
    return cmd + (["--verify"] if verify else [])


def _steps_done(run_dir: Path) -> int:
    """The slowest local worker's finished steps (each writes ``rank<R>.step``)."""
    done = []
    for p in run_dir.glob("rank*.step"):
        try:
            done.append(int(p.read_text()))
        except (OSError, ValueError):
            done.append(0)
    return min(done, default=0)


def _wait(proc: subprocess.Popen, run_dir: Path, total: int, timeout_s: float,
          progress: Callable[[str, int, int], None] | None) -> int | None:
    """The launcher's exit code, or None at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            return code
        if progress:
            done = _steps_done(run_dir)
            progress(f"distributed: step {done}/{total}" if done else "distributed: starting workers",
                     done, total)
        time.sleep(_POLL_S)
    return None


def launch(plan: Plan, plan_path: Path, run_dir: Path, *, steps: int, warmup: int, verify: bool,
           timeout_s: float, rdzv: Rendezvous, use_cuda: bool, threads: int = 1,
           progress: Callable[[str, int, int], None] | None = None) -> DistributedResult:
    from planner.execute.single import free_port

    world = world_size(plan)
    if world % rdzv.nnodes:
        raise ExecutionError(f"{world} workers cannot be split evenly over {rdzv.nnodes} nodes")
    per_node = world // rdzv.nnodes
    port = rdzv.master_port or free_port()
    run_dir.mkdir(parents=True, exist_ok=True)
    for pattern in ("rank*.json", "rank*.pid", "rank*.step"):
        for old in run_dir.glob(pattern):
            old.unlink()
    cmd = _launch_command(plan_path, run_dir, rdzv, per_node, port, steps=steps, warmup=warmup,
                          verify=verify, timeout_s=timeout_s)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{PARENT_ENV: str(os.getpid())})
    if not use_cuda:
        env["OMP_NUM_THREADS"] = str(threads)
    log_path = run_dir / "launcher.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = _wait(proc, run_dir, max(warmup, 1) + steps + 1, timeout_s, progress)
        except KeyboardInterrupt:
            raise _stopped(proc, run_dir, "interrupted by SIGINT (Ctrl-C)", signal.SIGINT) from None
        except Interrupted as e:
            raise _stopped(proc, run_dir, str(e), e.signum) from None
        finally:
            stop(proc, run_dir)  # no-op when everything ended; else whatever a dead launcher left
    if code is None:
        raise ExecutionError(f"workers did not finish within {timeout_s:.0f} s and were stopped; "
                             f"{_progress(run_dir, world)} (log: {log_path})")
    text = log_path.read_text(errors="replace")
    reports = _reports(run_dir)
    if code < 0:  # the launcher itself died by a signal: not any rank's fault
        raise _launcher_killed(-code, reports, world, log_path)
    if code != 0:
        raise ExecutionError(_diagnose(plan, reports, text, code, log_path))
    # the workers exchange their reports at the end: every node holds every rank's
    missing = sorted(set(range(world)) - {r.rank for r in reports if r.measured is not None})
    if missing:
        raise ExecutionError(f"ranks {missing} ended without a report on node {rdzv.node_rank} (log: {log_path})")
    return DistributedResult(reports, text)


def _stopped(proc: subprocess.Popen, run_dir: Path, what: str, signum: int) -> Interrupted:
    running = stop(proc, run_dir)
    return Interrupted(f"{what}: stopped the launcher and its workers ({running} processes were running); "
                       f"reports and the launcher log are kept in {run_dir}", signum)


def _launcher_killed(sig: int, reports: list[WorkerReport], world: int, log_path: Path) -> ExecutionError:
    name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
    done = len([r for r in reports if r.failure is None])
    return ExecutionError(f"the launcher (torchrun) was killed by signal {sig} ({name}) from outside planner; "
                         f"its workers were stopped ({done} of {world} ranks had finished) (log: {log_path})")


def _reports(run_dir: Path) -> list[WorkerReport]:
    found = (read_report(p) for p in run_dir.glob("rank*.json"))
    return sorted((r for r in found if r is not None), key=lambda r: r.rank)


def _progress(run_dir: Path, world: int) -> str:
    done = {r.rank for r in _reports(run_dir)}
    waiting = sorted(set(range(world)) - done)
    return f"ranks {waiting} never finished" if waiting else "every rank reported"


def _pp_rank(plan: Plan, rank: int) -> int:
    return coordinates(rank, plan.parallel.dp, plan.parallel.tp)[0]


def _stage_text(plan: Plan, pp_rank: int) -> str:
    stages = [st.index for st in plan.stages if st.rank == pp_rank]
    return "stage " + ", ".join(map(str, stages)) if len(stages) == 1 else "stages " + ", ".join(map(str, stages))


def _diagnose(plan: Plan, reports: list[WorkerReport], log: str, code: int, log_path: Path) -> str:
    """One line: which rank failed first, on which stage, and why. A worker's own error wins over
    the errors its peers saw when it went away; a worker that left no report died silently."""
    failed = [r for r in reports if r.failure is not None]
    real = [r for r in failed if not _is_knock_on(r)]
    if real:
        return _describe(plan, real[0], log_path)
    world = world_size(plan)
    silent = sorted(set(range(world)) - {r.rank for r in reports})
    # torchrun's failure summary: "rank : 1 (local_rank: 1)" then "exitcode : -9 (pid: ...)", its
    # "Root Cause" section first (the other entries are often the peers it stopped with SIGTERM)
    root = log.split("Root Cause", 1)[1] if "Root Cause" in log else ""
    entries = re.findall(r"^\s*rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)", root + "\n" + log, re.M)
    for rank, exit_code in entries:
        if not silent or int(rank) in silent:
            rank, exit_code = int(rank), int(exit_code)
            how = f"was killed by signal {-exit_code}" if exit_code < 0 else f"exited with code {exit_code}"
            stages = _stage_text(plan, _pp_rank(plan, rank))
            return f"rank {rank} ({stages}) {how} before reporting (log: {log_path})"
    if silent:
        rank = silent[0]
        return f"rank {rank} ({_stage_text(plan, _pp_rank(plan, rank))}) died without reporting (log: {log_path})"
    if failed:
        return _describe(plan, failed[0], log_path)
    return f"the workers failed (launcher exit code {code}) without reporting why (log: {log_path})"


def _describe(plan: Plan, r: WorkerReport, log_path: Path) -> str:
    from planner.units import fmt_bytes

    assert r.failure is not None
    where = f"rank {r.rank} ({_stage_text(plan, r.pp_rank)})"
    if r.failure.oom:
        st = plan.stages[r.stages[0]]
        dev = plan.cluster.devices[st.devices[0]]
        peak = r.failure.peak_before_failure_bytes
        measured = f", measured peak before failure {fmt_bytes(peak)}" if peak else ""
        return (f"{where} ran out of memory: predicted {fmt_bytes(st.predicted.peak_memory_bytes)}, device has "
                f"{fmt_bytes(dev.memory_bytes)}{measured} ({r.failure.message})")
    return f"{where} failed: {r.failure.error}: {r.failure.message or 'no message'} (log: {log_path})"


def _is_knock_on(report: WorkerReport) -> bool:
    """Errors that only say a peer went away."""
    f = report.failure
    text = f"{f.error} {f.message}".lower() if f else ""
    return any(k in text for k in ("connection", "timed out", "timeout", "broken pipe", "closed",
                                   "peer", "socket", "gloo", "nccl"))
