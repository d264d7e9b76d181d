"""``planner execute``: run a plan with PyTorch's pipeline engine and compare with its prediction.

Three ways to run, one entry point:

* distributed: pp x dp x tp workers through torchrun (NCCL on GPUs, gloo on CPU processes), with
  tensor parallelism and ZeRO 2/3 on torch's DTensor (``parallel``);
* single: every stage in this process on one device, checked against a plain run;
* replay: each pipeline rank's action list alone on the local device, to measure its memory and
  action times; the simulator composes the measured times into a measured-basis step time.

``auto`` runs distributed when the devices exist, else single plus replay.
"""

from __future__ import annotations

import math
import shutil
import signal
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

from planner.errors import ExecutionError, InputError, Interrupted, PlannerError
from planner.execute.reports import Measured, WorkerReport, error_text, world_size
from planner.formats import Plan, load_plan
from planner.host import check_per_core

__all__ = ["Mode", "Options", "Verification", "execute", "refuse_without_tp_plan"]

# distributed: pp x dp workers; single: every stage in this process; replay: each rank's actions
# alone; auto: distributed where the devices exist, else single then replay
Mode = Literal["auto", "distributed", "single", "replay", "single+replay"]
MODES: tuple[Mode, ...] = get_args(Mode)


@dataclass
class Options:
    mode: Mode = "auto"
    steps: int = 5
    warmup: int = 2
    tolerance: float = 0.10
    verify: bool = True
    timeout_s: float = 600.0
    device: str = "auto"
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    run_dir: str | None = None  # None: a temporary folder, removed after a run that passed
    threads: int | None = None  # CPU threads per process; None: one, as each distributed worker has


@dataclass
class Row:
    what: str
    predicted: float
    measured: float
    unit: str  # "s" or "bytes"
    note: str = ""
    checked: bool = True  # counts against the tolerance

    @property
    def error(self) -> float:
        return (self.measured - self.predicted) / self.predicted if self.predicted else math.inf


@dataclass
class Verification:
    mode: Mode
    device: str
    rows: list[Row] = field(default_factory=list)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)  # (name, ok, detail)
    notes: list[str] = field(default_factory=list)
    tolerance: float = 0.10
    run_dir: str | None = None

    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.checks) and self.within()

    def worst(self) -> Row | None:
        rows = [r for r in self.rows if r.checked]
        return max(rows, key=lambda r: abs(r.error), default=None)

    def within(self) -> bool:
        w = self.worst()
        return w is None or abs(w.error) <= self.tolerance

    def to_json(self) -> dict:
        data = asdict(self)
        data["rows"] = [dict(asdict(r), relative_error=r.error) for r in self.rows]
        data["within_tolerance"] = self.within()
        return data


def _device(name: str, plan: Plan):
    import torch

    from planner.profile import resolve_device

    if name == "auto":
        want_cuda = plan.cluster.devices[0].type == "cuda"
        return torch.device("cuda" if want_cuda and torch.cuda.is_available() else "cpu")
    return resolve_device(name)


def _choose_mode(plan: Plan, opts: Options) -> Mode:
    import torch

    if opts.mode != "auto":
        return opts.mode
    world = world_size(plan)
    if plan.cluster.devices[0].type == "cpu":
        return "distributed" if world > 1 else "single"
    if torch.cuda.is_available() and torch.cuda.device_count() * opts.nnodes >= world:
        return "distributed"
    return "single" if _sharded(plan) else "single+replay"


def _sharded(plan: Plan) -> bool:
    """Tensor parallelism or ZeRO 2/3: a rank's memory is that of its shards, which only a
    distributed run has."""
    return plan.parallel.tp > 1 or (plan.parallel.zero >= 2 and plan.parallel.dp > 1)


def check_options(opts: Options) -> None:
    """Refuse impossible options before anything is built or started."""
    if opts.mode not in MODES:
        raise InputError(f"--mode {opts.mode!r}: choose auto, distributed, single or replay")
    if opts.steps < 1:
        raise InputError("--steps must be at least 1")
    if opts.nnodes < 1:
        raise InputError("--nnodes must be at least 1")
    if not 0 <= opts.node_rank < opts.nnodes:
        raise InputError(f"--node-rank {opts.node_rank}: with --nnodes {opts.nnodes} it is 0 to {opts.nnodes - 1}")
    if not opts.master_addr.strip():
        raise InputError("--master-addr is empty: give the rendezvous host (127.0.0.1 on one node)")
    if opts.master_port is not None and not 1 <= opts.master_port <= 65535:
        raise InputError(f"--master-port {opts.master_port}: a TCP port is 1 to 65535")
    if opts.nnodes > 1 and opts.master_port is None:
        raise InputError(f"--nnodes {opts.nnodes} needs --master-port: the same free port on every node "
                         "(each node would pick a different one)")
    if opts.nnodes > 1 and opts.mode not in ("auto", "distributed"):
        raise InputError(f"--nnodes {opts.nnodes} runs distributed; --mode {opts.mode} runs in this process only")
    check_per_core(opts.threads, "--threads", "threads per process")
    if not opts.timeout_s > 0:
        raise InputError("--timeout must be positive")


def load_runnable(plan_path: Path) -> Plan:
    """The plan, its model factory found next to the plan file when not under the current folder."""
    from planner.model import with_factory_found

    plan = load_plan(plan_path)
    problem = unexecuted(plan)
    if problem:
        raise InputError(f"{plan_path}: {problem}")
    return with_factory_found(plan, plan_path)


def unexecuted(plan: Plan) -> str | None:
    """What of the plan's parallelism planner execute does not run, with the knob to turn (None:
    all of it runs). Which models have a tp_plan is checked when the model is built."""
    from planner.schedules import SCHEDULES

    par = plan.parallel
    if par.zero >= 2 and par.dp > 1 and SCHEDULES[plan.schedule.name].split_backward:
        return (f"ZeRO stage {par.zero} runs with schedules whose backward is one action (gpipe, 1f1b, "
                f"interleaved-1f1b); {plan.schedule.name} splits it, which FSDP's gradient reduction does not "
                "follow: solve with --schedule 1f1b, or --zero 1")
    return None


def execute(plan_path: Path, opts: Options, progress=None) -> Verification:
    """Run the plan and compare with its prediction. However it ends (an error, Ctrl-C, SIGTERM,
    SIGHUP), no process it started is left running."""
    from planner.signals import signals_as_errors

    check_options(opts)
    with signals_as_errors():
        try:
            return _execute(plan_path, opts, progress)
        except KeyboardInterrupt:
            raise Interrupted("interrupted by SIGINT (Ctrl-C)", signal.SIGINT) from None


def _execute(plan_path: Path, opts: Options, progress) -> Verification:
    from planner.schedules import SCHEDULES

    plan = load_runnable(plan_path)
    if not SCHEDULES[plan.schedule.name].executable:
        raise InputError(f"{plan.schedule.name} is modelled only: PyTorch's pipeline engine has no "
                         "asynchronous PipeDream schedules (no weight stashing); solve without it")
    from planner.errors import CheckFailed
    from planner.plan import check_fingerprint, rebuilt_fingerprint

    # on the meta device: no memory, nothing started yet
    stale = check_fingerprint(plan, rebuilt_fingerprint(plan), f"{plan.model.factory} built now")
    if stale:
        raise CheckFailed(stale[0])
    if plan.parallel.tp > 1:
        refuse_without_tp_plan(plan)
    mode = _choose_mode(plan, opts)
    device = _device(opts.device, plan)
    ver = Verification(mode=mode, device=str(device), tolerance=opts.tolerance)
    threads = opts.threads or 1
    if "distributed" in mode:
        if plan.cluster.devices[0].type == "cpu":
            ver.notes.append(f"CPU: {threads} thread{'s' * (threads > 1)} per worker process "
                             "(--threads to change; profile with the same to compare)")
        _distributed(plan, plan_path, opts, ver, progress)
    if "replay" in mode and _sharded(plan):
        raise InputError("--mode replay runs one rank alone, without its tensor-parallel peers or its FSDP shards: "
                         "run the plan distributed, or --mode single to check its stages")
    in_process = [m for m in ("single", "replay") if m in mode]
    for m in in_process:
        _refuse_what_cannot_fit(plan, m, device)
    if in_process:
        if device.type == "cpu":
            ver.notes.append(f"CPU: {threads} thread{'s' * (threads > 1)} in this process, as each distributed "
                             "worker runs (--threads to change)")
        with _cpu_threads(device, threads):
            if "single" in mode:
                _guarded("single device", _single, plan, device, opts, ver, progress)
            if "replay" in mode:
                _guarded("replay", _replay, plan, device, ver, progress)
    return ver


def refuse_without_tp_plan(plan: Plan) -> None:
    """A plan with tp > 1 needs the model's tp_plan, and a tp that divides what it splits (built on
    the meta device: nothing allocated)."""
    from planner.model import runs_sequence_parallel
    from planner.split import build_on_meta

    spec = build_on_meta(plan.model.factory, dict(plan.model.args))
    if spec.tp_plan is None:
        raise InputError(f"the plan has tp {plan.parallel.tp}, and {plan.model.factory} gives no tp_plan "
                         "(ModelSpec.tp_plan: module path -> colwise, rowwise, ...): add one, or solve with --tp 1")
    if plan.parallel.sequence_parallel and not runs_sequence_parallel(spec.tp_plan):
        raise InputError(f"the plan has sequence parallelism, and {plan.model.factory}'s tp_plan runs none (it "
                         "marks no norm 'sequence'): solve with --no-sequence-parallel (or profile it again: "
                         "solve then plans without)")
    from planner.execute.parallel import check_tp

    check_tp(spec.model, spec.tp_plan, plan.parallel.tp)


def _refuse_what_cannot_fit(plan: Plan, mode: str, device) -> None:
    """Refuse, before anything is built, an in-process run this device cannot hold: single mode
    holds every stage's weights and gradients (at least the plan's summed parameter bytes, tied
    copies counted once more, which the gradients cover), replay the fullest rank's predicted peak."""
    from planner.errors import InfeasibleError
    from planner.units import fmt_bytes

    free = _free_bytes(device)
    if free is None:
        return
    if mode == "single":
        need, what = sum(s.cost.param_bytes for s in plan.stages), "every stage's weights and gradients"
    else:
        need, what = max(s.predicted.peak_memory_bytes for s in plan.stages), "its fullest rank's predicted peak"
    if need > free:
        world = plan.parallel.pp * plan.parallel.dp * plan.parallel.tp
        raise InfeasibleError(f"--mode {mode} needs at least {fmt_bytes(need)} on {device} ({what}); it has "
                              f"{fmt_bytes(free)} available: run the plan distributed on its cluster "
                              f"({plan.cluster.name}, {world} devices)"
                              + (", or --mode replay on one of its devices" if mode == "single" else ""))


def _free_bytes(device) -> int | None:
    """Memory this process can still take on the device: CUDA's free memory, or the kernel's
    MemAvailable on a CPU (None where neither can be read)."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextmanager
def _cpu_threads(device, threads: int):
    import torch

    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _guarded(where: str, fn, *args) -> None:
    """An engine error in this process is a failed execution (exit 5) with its text, not a crash."""
    try:
        fn(*args)
    except (PlannerError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise ExecutionError(f"{where} failed: {type(e).__name__}: {error_text(e)}") from None


# ----------------------------------------------------------------------------- modes


def _single(plan: Plan, device, opts: Options, ver: Verification, progress) -> None:
    from planner.execute.single import run_single

    if progress:
        progress("single device: all stages in one process", 0, 1)
    r = run_single(plan, device, steps=opts.steps, warmup=opts.warmup, progress=progress)
    _record_checks(ver, "single device", Measured(
        step_times_s=[], max_rss_bytes=0, loss=r.loss, reference_loss=r.reference_loss, loss_tolerance=r.loss_tolerance,
        loss_message=r.loss_message, max_grad_error=r.grad.worst, grad_ratio=r.grad.ratio,
        grad_detail=r.grad.detail(), grad_message=r.grad.message, reference_note=r.reference_note),
        plan.microbatch.count, plan.dtype)
    ver.notes.append(f"single device: every stage in one process took {r.step_s * 1e3:.1f} ms per step; "
                     "this checks correctness, not the plan's speed")


def _predicted_peaks(plan: Plan) -> dict[int, int]:
    """The plan's predicted peak memory of each rank (every stage carries its rank's)."""
    return {st.rank: st.predicted.peak_memory_bytes for st in plan.stages}


def _replay(plan: Plan, device, ver: Verification, progress) -> None:
    from planner.execute.replay import measured_costs, replay_all
    from planner.plan import replay_plan

    if progress:
        progress(f"replay: {plan.parallel.pp} ranks one at a time on {device}", 0, 1)
    replays = replay_all(plan, device, progress=progress)
    predicted = _predicted_peaks(plan)
    kind = "allocated" if device.type == "cuda" else "live tensor bytes"
    for r in replays:
        pred = predicted[r.rank]
        note = "CPU: live tensor bytes counted by planner (no allocator statistics on CPU)"
        if device.type == "cuda":
            note = f"CUDA {kind}" + (f", reserved {r.reserved_bytes}" if r.reserved_bytes else "")
        ver.rows.append(Row(f"rank {r.rank} peak memory (replay)", pred, r.peak_bytes, "bytes", note,
                            checked=device.type == "cuda"))
    step = replay_plan(plan, measured_costs(plan, replays)).step_time_s
    same_kind = (device.type == plan.cluster.devices[0].type)
    ver.rows.append(Row("step time (replayed actions, simulated)", plan.predicted.step_time_s, step, "s",
                        "each rank's actions timed alone, composed by the simulator"
                        + ("" if same_kind else f"; measured on {device.type}, planned for "
                           f"{plan.cluster.devices[0].type}: not comparable"), checked=same_kind))


def _distributed(plan: Plan, plan_path: Path, opts: Options, ver: Verification, progress) -> None:
    import torch

    from planner.execute.launch import Rendezvous, launch

    world = world_size(plan)
    if world % opts.nnodes:
        raise InputError(f"the plan's {world} workers cannot be split evenly over --nnodes {opts.nnodes}")
    use_cuda = plan.cluster.devices[0].type == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ExecutionError("the plan's devices are GPUs and none is present: use --mode single or replay")
    if progress:
        progress(f"distributed: {world} workers through torchrun ({'nccl' if use_cuda else 'gloo'})", 0, 1)
    run_dir = Path(opts.run_dir) if opts.run_dir else Path(tempfile.mkdtemp(prefix="planner-run-"))
    ver.run_dir = str(run_dir)
    # on failure the folder stays for the post-mortem; every message names its launcher log
    try:
        result = launch(plan, plan_path.resolve(), run_dir, steps=opts.steps, warmup=opts.warmup,
                        verify=opts.verify, timeout_s=opts.timeout_s, use_cuda=use_cuda,
                        threads=opts.threads or 1, progress=progress,
                        rdzv=Rendezvous(opts.nnodes, opts.node_rank, opts.master_addr, opts.master_port))
    except BaseException:
        if not opts.run_dir and not any(run_dir.iterdir()):  # nothing started: no post-mortem to keep
            run_dir.rmdir()
        raise
    if opts.nnodes > 1:
        ver.notes.append(f"node {opts.node_rank} of {opts.nnodes}: the checks and times cover every rank of the "
                         "run (the workers exchange their reports at the end)")
    measured = [r.measured for r in result.reports if r.measured is not None]
    _record_times(ver, plan, measured)
    _record_memory(ver, plan, [r for r in result.reports if r.measured is not None])
    if opts.verify:
        _record_distributed_checks(ver, plan, measured)
    _record_run_dir(ver, kept=opts.run_dir is not None)


def _record_times(ver: Verification, plan: Plan, measured: list[Measured]) -> None:
    """The median over steps of the slowest rank's time in each step."""
    common = min(len(m.step_times_s) for m in measured)
    steps = sorted(max(m.step_times_s[k] for m in measured) for k in range(common))
    median = steps[len(steps) // 2]
    ver.rows.append(Row("step time", plan.predicted.step_time_s, median, "s",
                        f"median of {len(steps)} steps, slowest rank each step"))
    ver.rows.append(Row("throughput (samples/s)", plan.predicted.throughput_samples_per_s,
                        plan.microbatch.global_batch / median, "1/s", checked=False))


# Up to this many workers, one memory row each; beyond, one per (pipeline rank, tp rank): its fullest replica.
MEMORY_ROWS = 16


def _record_memory(ver: Verification, plan: Plan, reports: list[WorkerReport]) -> None:
    """Every rank's peak against its stage's prediction, named by its (pipeline rank, replica,
    tp rank). The replicas of a stage share one prediction, a bound on the fullest of them (the
    last of ZeRO 1's ranges is short by its padding: ``planner.cost.DataParallel.padding_bytes``).
    Up to ``MEMORY_ROWS`` workers each has its row; beyond, each (pipeline rank, tp rank) shows its
    fullest replica's, and its note the emptiest one's error."""
    predicted = _predicted_peaks(plan)
    peaks = sorted(((r, peak) for r in reports if (peak := _peak_bytes(r)) is not None), key=lambda rp: rp[0].rank)
    shown: list[tuple[WorkerReport, int, str]] = [(r, peak, "") for r, peak in peaks]
    if len(reports) > MEMORY_ROWS:
        groups: dict[tuple[int, int], list[tuple[WorkerReport, int]]] = {}
        for r, peak in peaks:
            groups.setdefault((r.pp_rank, r.tp_rank), []).append((r, peak))
        shown = [_fullest(replicas, predicted[key[0]]) for key, replicas in sorted(groups.items())]
    for r, peak, prefix in shown:
        assert r.measured is not None
        ver.rows.append(Row(f"{_rank_name(plan, r)} peak memory", predicted[r.pp_rank], peak, "bytes",
                            prefix + _memory_note(r), checked=r.measured.peak_allocated_bytes is not None))


def _fullest(replicas: list[tuple[WorkerReport, int]], predicted: int) -> tuple[WorkerReport, int, str]:
    """The fullest of a stage's replicas (of one tp rank), its note naming the emptiest."""
    r, peak = max(replicas, key=lambda rp: rp[1])
    low, least = min(replicas, key=lambda rp: rp[1])
    if len(replicas) == 1 or not predicted:
        return r, peak, ""
    return r, peak, (f"the fullest of {len(replicas)} replicas (the emptiest, dp {low.dp_rank}: "
                     f"{(least - predicted) / predicted:+.1%}); ")


def _rank_name(plan: Plan, r: WorkerReport) -> str:
    """``rank P`` (the pipeline rank), with ``dp D`` and ``tp T`` where the plan has them."""
    return (f"rank {r.pp_rank}" + (f" dp {r.dp_rank}" if plan.parallel.dp > 1 else "")
            + (f" tp {r.tp_rank}" if plan.parallel.tp > 1 else ""))


def _peak_bytes(r: WorkerReport) -> int | None:
    """CUDA's peak allocated bytes, or on a CPU planner's count of live tensor bytes."""
    m = r.measured
    if m is None:
        return None
    return m.peak_allocated_bytes if m.peak_allocated_bytes is not None else m.cpu_live_peak_bytes


def _memory_note(r: WorkerReport) -> str:
    m = r.measured
    assert m is not None
    if m.peak_allocated_bytes is not None:
        return f"CUDA allocated; reserved {m.peak_reserved_bytes}"
    return ("CPU: live tensor bytes counted by planner during two steps (process RSS "
            f"{m.max_rss_bytes / 2**20:.0f} MiB includes Python and torch)")


def _record_distributed_checks(ver: Verification, plan: Plan, measured: list[Measured]) -> None:
    """The loss (on the last stage's rank) and every rank's gradients against the reference: the
    rank whose worst gradient is furthest from its tolerance speaks for all."""
    holder = next((m for m in measured if m.loss is not None), None)
    worst = max(measured, key=lambda m: m.grad_ratio or 0.0)
    merged = worst.model_copy(update={
        "loss": holder.loss if holder else None,
        "reference_loss": holder.reference_loss if holder else None,
        "loss_tolerance": holder.loss_tolerance if holder else None,
        "loss_message": holder.loss_message if holder else "",
        "max_grad_error": max((m.max_grad_error or 0.0) for m in measured)})
    _record_checks(ver, "distributed", merged, plan.microbatch.count, plan.dtype)


def _record_run_dir(ver: Verification, kept: bool) -> None:
    """A temporary run folder is removed after a run whose checks passed, even where a measurement
    fell outside the tolerance (the table says all there is to say); kept (and named) after a
    failed check."""
    if ver.run_dir is None:
        return
    if kept:
        ver.notes.append(f"worker reports and the launcher log are in {ver.run_dir}")
    elif all(ok for _, ok, _ in ver.checks):
        shutil.rmtree(ver.run_dir, ignore_errors=True)
        ver.run_dir = None
    else:
        ver.notes.append(f"a check failed: worker reports and the launcher log are kept in {ver.run_dir}")


def _record_checks(ver: Verification, where: str, m: Measured, count: int, dtype: str) -> None:
    """The loss check and the gradient check of one run (``m.loss`` None: no report carried it;
    the last stage's rank computes it). The tolerance rule is ``verify.tolerance``."""
    ok = m.loss is not None and math.isfinite(m.loss) and not m.loss_message
    if m.loss is None:
        detail = "no worker's report carries the loss (the rank of the last stage computes it)"
    else:
        detail = m.loss_message or f"{m.loss:.6f} vs {m.reference_loss:.6f} (tolerance {m.loss_tolerance:.1e})"
    ver.checks.append((f"{where}: loss equals the single-process reference", ok, detail))
    ver.checks.append((f"{where}: gradients equal the reference (tolerance scaled to each gradient, {dtype}, "
                       f"{count} micro-batch{'es' * (count != 1)})", not m.grad_message, m.grad_detail))
    if m.reference_note and m.reference_note not in ver.notes:
        ver.notes.append(m.reference_note)


def raise_on_failure(ver: Verification) -> None:
    """Exit codes: a failed correctness check is a failed execution (5), a prediction outside
    tolerance is 4."""
    from planner.errors import ToleranceError

    bad = [c for c in ver.checks if not c[1]]
    if bad:
        raise ExecutionError(f"{bad[0][0]} failed: {bad[0][2]}")
    w = ver.worst()
    if w is not None and not ver.within():
        raise ToleranceError(f"{w.what} is {w.error:+.1%} off the prediction (tolerance {ver.tolerance:.0%})")
