"""``planner profile --tp``: each distinct layer measured split over tp processes, written into
the profile as ``Layer.tp_costs``.

The measurement runs in tp worker processes (``planner.profile.tp_worker``) started through
torchrun's launcher, as ``planner execute`` starts its workers: gloo on the CPU, NCCL on GPUs (one
a rank). The launcher runs in a session of its own under a deadline; a failure, a hang, Ctrl-C,
SIGTERM or SIGHUP stops it and every worker (``execute.launch.stop``), and each worker exits by
itself when the launcher or this process is gone. The run folder (job, logs) is removed unless a
worker crashed, hung or was stopped: then the message names the log kept there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from planner.errors import ExecutionError, InputError, Interrupted, ModelError
from planner.formats import Profile, TpCosts, TpLayerCost

__all__ = ["TpJob", "measure_tp", "with_tp_costs"]

_POLL_S = 0.2
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TpJob:
    """What every tp worker measures, written to the run folder as JSON."""

    factory: str
    args: dict[str, Any]
    depth: int | None
    dtype: str
    device: str  # "cpu" or "cuda"
    no_meta: bool
    mbs: tuple[int, ...]
    seed: int
    repeats: int
    warmup: int
    threads: int | None
    sequence_parallel: bool
    names: tuple[str, ...]  # every layer of the profile, in order
    measure: tuple[str, ...]  # the layers to measure (the distinct ones)
    timeout_s: float
    progress_path: str

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @staticmethod
    def read(path: Path) -> TpJob:
        data = json.loads(path.read_text())
        for key in ("mbs", "names", "measure"):
            data[key] = tuple(data[key])
        return TpJob(**data)


def with_tp_costs(profile: Profile, tp: int, sequence_parallel: bool, measured: dict[str, Any]) -> Profile:
    """The profile with ``measured`` (a layer's name -> its numbers from the workers) as each
    layer's costs at ``tp``; a layer identical to another (``same_as``) shares that one's."""
    layers = []
    for layer in profile.layers:
        found = measured[layer.same_as or layer.name]
        costs = TpCosts(sequence_parallel=sequence_parallel, param_bytes=found["param_bytes"],
                        by_mbs={b: TpLayerCost(**c) for b, c in found["by_mbs"].items()})
        layers.append(layer.model_copy(update={"tp_costs": {**layer.tp_costs, str(tp): costs}}))
    return profile.model_copy(update={"layers": layers})


def measure_tp(profile: Profile, job: TpJob, degrees: list[int], progress: Progress | None = None) -> Profile:
    """``profile`` with each degree's measured costs added (one run of workers per degree)."""
    from planner.signals import signals_as_errors

    run_dir = Path(tempfile.mkdtemp(prefix="planner-tp-"))
    try:
        with signals_as_errors():
            for tp in degrees:
                profile = with_tp_costs(profile, tp, job.sequence_parallel, _run(job, tp, run_dir, progress))
                shutil.rmtree(run_dir / f"tp{tp}", ignore_errors=True)  # measured: nothing there to look at
    except InputError:  # a rank's own error, whole in its message: the folder holds nothing more
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    except BaseException:  # a crash, a hang, a signal: kept for the post-mortem, the message names its log
        if not any(run_dir.iterdir()):
            run_dir.rmdir()
        raise
    shutil.rmtree(run_dir, ignore_errors=True)
    return profile


def _command(job_path: Path, run_dir: Path, tp: int, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(tp),
            "--master-addr", "127.0.0.1", "--master-port", str(port), "--max-restarts", "0",
            "-m", "planner.profile.tp_worker", "--job", str(job_path), "--run-dir", str(run_dir)]


def _run(job: TpJob, tp: int, run_dir: Path, progress: Progress | None) -> dict[str, Any]:
    """One degree measured by tp workers; their merged numbers."""
    from planner.execute.launch import PARENT_ENV, stop
    from planner.execute.single import free_port

    folder = run_dir / f"tp{tp}"
    folder.mkdir()
    job = TpJob(**{**asdict(job), "progress_path": str(folder / "progress.json")})
    job.write(folder / "job.json")
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{PARENT_ENV: str(os.getpid())})
    if job.device == "cpu":
        env["OMP_NUM_THREADS"] = str(job.threads or 1)
    log_path = folder / "launcher.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_command(folder / "job.json", folder, tp, free_port()), stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = _wait(proc, job, tp, folder, progress)
        except KeyboardInterrupt:
            raise _stopped(proc, folder, "interrupted by SIGINT (Ctrl-C)", signal.SIGINT) from None
        except Interrupted as e:
            raise _stopped(proc, folder, str(e), e.signum) from None
        finally:
            stop(proc, folder)
    if code is None:
        raise ExecutionError(f"the tp {tp} measurement did not finish within {job.timeout_s:.0f} s and was "
                             f"stopped (log: {log_path})")
    if code != 0 or not (folder / "result.json").exists():
        raise _failure(folder, tp, code, log_path)
    result: dict[str, Any] = json.loads((folder / "result.json").read_text())
    return result


def _wait(proc: subprocess.Popen, job: TpJob, tp: int, folder: Path, progress: Progress | None) -> int | None:
    """The launcher's exit code, or None at the deadline; progress per layer started."""
    deadline = time.monotonic() + job.timeout_s
    total = len(job.measure)
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            return code
        if progress:
            try:
                done, name = json.loads(Path(job.progress_path).read_text())
                progress(f"tp {tp}: layer {done + 1}/{total} {name} on {tp} processes", done, total)
            except (OSError, ValueError):
                progress(f"tp {tp}: starting {tp} processes", 0, total)
        time.sleep(_POLL_S)
    return None


def _stopped(proc: subprocess.Popen, folder: Path, what: str, signum: int) -> Interrupted:
    from planner.execute.launch import stop

    running = stop(proc, folder)
    return Interrupted(f"{what}: stopped the tp measurement ({running} processes were running; "
                       f"log: {folder / 'launcher.log'})", signum)


_KNOCK_ON = ("connection", "timed out", "timeout", "broken pipe", "closed", "peer", "socket", "gloo", "nccl")


def _failure(folder: Path, tp: int, code: int, log_path: Path) -> Exception:
    """The first rank's own error (not one that only says a peer went away), as planner's error
    of its kind."""
    errors = [(p.name.removeprefix("rank").removesuffix(".error"), p.read_text())
              for p in sorted(folder.glob("rank*.error"))]
    own = [e for e in errors if not any(k in e[1].lower() for k in _KNOCK_ON)] or errors
    if not own:
        return ExecutionError(f"the tp {tp} measurement failed (launcher exit code {code}) without a rank saying "
                              f"why (log: {log_path})")
    rank, text = own[0]
    kind, _, message = text.partition(": ")
    where = f"measuring at tp {tp}, rank {rank}"
    if kind in ("InputError", "ModelError"):
        return (InputError if kind == "InputError" else ModelError)(f"{where}: {message}")
    return ExecutionError(f"{where} failed: {text} (log: {log_path})")
