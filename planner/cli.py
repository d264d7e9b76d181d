"""The ``planner`` command. Each command parses, calls one library function, and prints.

Library errors (``PlannerError``) become one red line and the exit code of their class; nothing
here computes. Heavy modules (torch above all) are imported inside the commands that need them,
so ``planner solve|simulate|check|schema`` start fast and run without torch.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from planner.errors import PlannerError, one_line

MAX_GIB = 2**20  # --memory: 1 PiB, the most a file may say a device has (formats.MAX_MEASURED_BYTES)
MAX_SECONDS = 1e6  # --time-limit, --timeout: 11.6 days (formats.MAX_MEASURED_S)
MAX_REPEATS = 10_000  # --repeats, --steps, --warmup: more than any measurement needs, never a run without end
MAX_MBS = 999_999  # --mbs: the largest micro-batch size a profile may hold (formats.Profile's by_mbs keys)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Exact pipeline-parallel planning for PyTorch models: profile, solve, "
                       "simulate, execute, check.")
_COLUMNS = os.environ.get("COLUMNS", "")  # a width the terminal sets; anything but a positive number is ignored
_WIDTH = None if sys.stdout.isatty() else int(_COLUMNS) if _COLUMNS.isascii() and _COLUMNS.isdigit() \
    and int(_COLUMNS) > 0 else 120
out = Console(highlight=False, width=_WIDTH)
err = Console(stderr=True, highlight=False)


_SHOWN: list[PlannerError] = []  # the error a command printed (main then prints nothing more)


def _fail(e: PlannerError) -> None:
    err.print(f"[bold red]error:[/] {escape(one_line(str(e)))}", soft_wrap=True)
    _SHOWN.append(e)
    raise typer.Exit(e.exit_code)


@app.command()
def schema(kind: str = typer.Argument(..., help="profile, cluster or plan")) -> None:
    """Print the JSON Schema of a file format."""
    from importlib.resources import files

    from planner.errors import InputError
    from planner.formats import KINDS

    if kind not in KINDS:
        _fail(InputError(f"unknown format {kind!r}: choose one of {', '.join(KINDS)}"))
    sys.stdout.write(files("planner").joinpath("schemas", f"{kind}.schema.json").read_text())


@app.command()
def schedules() -> None:
    """List the schedules: what each does, its source, its published bubble and memory."""
    from planner.report import schedules_table

    out.print(schedules_table())


@app.command()
def clusters() -> None:
    """List the device kinds and cluster presets, with memory and links, and the --cluster syntax."""
    from rich.table import Table

    from planner.clusters import MAX_DEVICES, MAX_DEVICES_PER_NODE, PRESETS, describe_link, from_spec, kinds
    from planner.units import fmt_bytes

    table = Table(title="device kinds (DEVICE in --cluster)", title_justify="left")
    for col in ("DEVICE", "device", "memory", "usable", "speed", "within a node", "between nodes"):
        table.add_column(col, justify="right" if col in ("memory", "usable", "speed") else "left")
    for names, kind in kinds():
        dev = kind.device
        table.add_row(", ".join(names), dev.name, fmt_bytes(dev.memory_bytes),
                      fmt_bytes(dev.memory_bytes - kind.reserved_bytes), f"{dev.speed:g}x",
                      describe_link(kind.intra), describe_link(kind.inter))
    out.print(table)
    presets = Table(title="presets", title_justify="left")
    for col in ("cluster", "what", "devices", "memory in all"):
        presets.add_column(col, justify="right" if col in ("devices", "memory in all") else "left")
    for name, text in PRESETS.items():
        devices = from_spec(name).devices
        presets.add_row(name, text, str(len(devices)), fmt_bytes(sum(d.memory_bytes for d in devices)))
    out.print(presets)
    out.print("speed: relative to the device the profile was measured on (the profile's times are used "
              "as they are); usable: memory less what the runtime reserves; links: bandwidth per "
              "direction per device, latency per message (+ CPU time per message on gloo).")
    out.print(f"Any [bold][NODESx]DEVICExCOUNT[/] (at most {MAX_DEVICES_PER_NODE} devices a node, "
              f"{MAX_DEVICES:,} in all), joined with '+' for mixed nodes (a100-80gbx4+a100-40gbx4); "
              "or a cluster JSON file (planner schema cluster).", soft_wrap=True)


@app.command()
def simulate(
    plan_file: Path = typer.Argument(..., metavar="PLAN", help="plan JSON written by planner solve"),
    as_json: bool = typer.Option(False, "--json", help="print the prediction as JSON"),
    timeline: Path | None = typer.Option(None, "--timeline", help="draw the schedule (.png, .svg, .html)"),
) -> None:
    """Predict a plan's step time, bubble and memory, and draw its timeline."""
    from planner import report
    from planner.formats import check_output, load_plan
    from planner.plan import plan_schedule, replay_plan

    try:
        if timeline is not None:
            check_output(timeline, inputs=(plan_file,), flag="--timeline")
        plan = load_plan(plan_file)
        sim = replay_plan(plan, timeline=timeline is not None)
        if timeline is not None:
            from planner import timeline as tl

            tl.write(timeline, plan_schedule(plan), sim, f"{plan.model.name} on {plan.cluster.name}",
                     [st.cost for st in plan.stages])
    except PlannerError as e:
        _fail(e)
    if as_json:
        sys.stdout.write(json.dumps(report.simulation_summary(plan, sim), indent=1) + "\n")
    else:
        out.print(report.simulation_table(plan, sim))
    if timeline is not None and not as_json:
        out.print(f"timeline written to {timeline}")


@app.command()
def profile(
    model: str = typer.Argument(..., metavar="MODEL", help="path/to/file.py:factory or package.module:factory"),
    output: Path = typer.Option(..., "-o", "--output", help="profile JSON to write"),
    arg: list[str] = typer.Option([], "--arg", help="factory argument NAME=VALUE (repeatable)"),
    mbs: str = typer.Option("1,2", "--mbs", help="micro-batch sizes to measure, e.g. 1,2,4,8"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16"),
    depth: int | None = typer.Option(None, "--depth", help="cut at this module depth instead of the natural blocks"),
    repeats: int = typer.Option(10, "--repeats", min=1, max=MAX_REPEATS, help="timed repetitions per measurement"),
    warmup: int = typer.Option(3, "--warmup", min=0, help="untimed repetitions first"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads (default 1 on a CPU, as each "
                                       "planner execute worker runs)"),
    no_dedupe: bool = typer.Option(False, "--no-dedupe", help="measure every layer, identical ones too"),
    no_meta: bool = typer.Option(False, "--no-meta", help="build the model in memory, not on the meta device "
                                 "(for a factory that computes with its weights while building)"),
    memory: float | None = typer.Option(None, "--memory", min=0.001, max=MAX_GIB, metavar="GIB",
                                           help="memory the profiler may use, in GiB (default: what the device "
                                           "has free)"),
    estimate: str | None = typer.Option(None, "--estimate", metavar="DEVICE",
                                           help="run nothing: price each layer's FLOPs and bytes at this "
                                           "device's datasheet peaks (h100, h200, a100, a100-80gb, rtx4090)"),
    tp: str | None = typer.Option(None, "--tp", metavar="DEGREES",
                                  help="also measure each layer split over this many processes by the model's "
                                  "tp_plan, e.g. 2 or 2,4 (gloo on the CPU, NCCL on GPUs)"),
    sequence_parallel: bool = typer.Option(True, "--sequence-parallel/--no-sequence-parallel",
                                           help="with --tp, measure with sequence parallelism (as planner "
                                           "solve assumes by default)"),
) -> None:
    """Measure a model layer by layer into a profile (needs torch).

    The model is built on the meta device and each layer made real only while it is measured, so
    a model larger than the device can be profiled."""
    from planner import report
    from planner.formats import check_output, dump
    from planner.model import build_spec, model_file, parse_args

    try:
        check_output(output, inputs=(model_file(model),))
        sizes = _int_list(mbs, "--mbs", most=MAX_MBS)
        args = parse_args(arg)
        from planner.profile import Options, build_meta_spec, profile_model

        spec = build_spec(model, args) if no_meta else build_meta_spec(model, args)
        opts = Options(device=device, dtype=dtype, mbs=tuple(sizes), depth=depth, repeats=repeats,
                       warmup=warmup, threads=threads, dedupe=not no_dedupe,
                       memory_bytes=int(memory * 1024**3) if memory is not None else None, estimate=estimate,
                       tp=tuple(_int_list(tp, "--tp", most=1024)) if tp else (), sequence_parallel=sequence_parallel)
        with report.progress(err) as bar:
            prof = profile_model(spec, model, args, opts, progress=bar)
        dump(prof, output)
    except PlannerError as e:
        _fail(e)
    out.print(report.profile_table(prof))
    for t in sorted(set(opts.tp)):
        measured = prof.layers[0].tp_costs.get(str(t))  # as measured: without where the tp_plan runs none
        sp = "with" if (measured.sequence_parallel if measured else opts.sequence_parallel) else "without"
        out.print(f"tp {t}: every layer measured split over {t} processes ({sp} sequence parallelism), in "
                  "layers[].tp_costs")
    out.print(f"profile written to {output}")


@app.command()
def solve(
    profile_file: Path = typer.Argument(..., metavar="PROFILE", help="profile JSON from planner profile"),
    cluster: str = typer.Option(..., "--cluster", "-c", help="preset (h100x8, 2xh100x8, cpu2, ...) or cluster JSON"),
    output: Path | None = typer.Option(None, "-o", "--output", help="plan JSON to write"),
    as_json: bool = typer.Option(False, "--json", help="print the plan JSON to stdout"),
    global_batch: int | None = typer.Option(None, "--global-batch", min=1,
                                            help="samples per step (default 16 per device)"),
    pp: int | None = typer.Option(None, "--pp", min=1, help="pin the pipeline degree"),
    dp: int | None = typer.Option(None, "--dp", min=1, help="pin the data-parallel degree"),
    tp: int | None = typer.Option(None, "--tp", min=1, help="pin the tensor-parallel degree (default: divisors of "
                                  "the devices per node; a pinned one may cross nodes)"),
    zero: int | None = typer.Option(None, "--zero", min=0, max=3, help="pin the ZeRO stage: 0 none, 1 optimizer "
                                    "state, 2 + gradients (FSDP SHARD_GRAD_OP), 3 + weights (FSDP FULL_SHARD)"),
    sequence_parallel: bool = typer.Option(True, "--sequence-parallel/--no-sequence-parallel",
                                           help="with tp > 1, shard the activations tp replicates"),
    mbs: int | None = typer.Option(None, "--mbs", min=1, help="pin the micro-batch size"),
    microbatches: int | None = typer.Option(None, "--microbatches", min=1, help="pin the micro-batch count"),
    schedule: str | None = typer.Option(None, "--schedule",
                                           help="pin schedules, comma separated (planner schedules lists them)"),
    virtual_stages: int | None = typer.Option(None, "--virtual-stages", min=1, help="pin chunks per rank"),
    recompute: str = typer.Option("auto", "--recompute", help="none, full, auto (per stage) or selective (per layer)"),
    optimizer: str = typer.Option("adam", "--optimizer", help="sgd, sgd-momentum or adam"),
    precision: str = typer.Option("param", "--precision",
                                  help="param (states in the parameter dtype) or mixed (fp32 master)"),
    fix_cuts: str | None = typer.Option(None, "--fix-cuts",
                                        help="pin stage starts: layer indices or names, e.g. 4,10,17"),
    top: int = typer.Option(5, "--top", min=1, help="candidates to list"),
    include_model_only: bool = typer.Option(False, "--include-model-only",
                                            help="also rank PipeDream schedules the engine cannot run"),
    time_limit: float = typer.Option(10.0, "--time-limit", min=0.1, max=MAX_SECONDS,
                                     help="seconds before the search stops and reports its gap"),
    ilp: bool = typer.Option(False, "--ilp",
                             help="also bound interleaved and V configurations with the ILP (slower, tighter)"),
    jobs: int | None = typer.Option(None, "--jobs", min=1,
                                    help="worker processes (default: one per core, for large searches)"),
    objective: str = typer.Option("time", "--objective",
                                  help="time: the fastest plan; memory: the least peak memory per device "
                                       "(the fastest among those)"),
) -> None:
    """Find the fastest plan that fits (does not need torch)."""
    from planner import report
    from planner.clusters import from_spec
    from planner.errors import InputError
    from planner.formats import Training, check_output, dump, load_profile, to_json
    from planner.solve import Settings
    from planner.solve import solve as run_solve
    from planner.solve.plan import make_plan

    try:
        if output is not None:
            check_output(output, inputs=(profile_file, cluster))
        prof = load_profile(profile_file)
        clu = from_spec(cluster)
        if optimizer not in ("sgd", "sgd-momentum", "adam") or precision not in ("param", "mixed"):
            raise InputError("--optimizer must be sgd, sgd-momentum or adam; --precision param or mixed")
        names = [layer.name for layer in prof.layers]
        settings = Settings(
            global_batch=global_batch or (None if microbatches else 16 * len(clu.devices)),
            pp=pp, dp=dp, mbs=mbs, microbatches=microbatches,
            schedules=tuple(x.strip() for x in schedule.split(",") if x.strip()) if schedule is not None else None,
            virtual_stages=virtual_stages, recompute=recompute,  # type: ignore[arg-type]
            training=Training(optimizer=optimizer, precision=precision),  # type: ignore[arg-type]
            fix_cuts=_cuts(fix_cuts, names) if fix_cuts else None, top=top,
            include_model_only=include_model_only, time_limit_s=time_limit, ilp=ilp,
            jobs=jobs, objective=objective, tp=tp, zero=zero,  # type: ignore[arg-type]
            sequence_parallel=sequence_parallel)
        with report.progress(err) as bar:
            result = run_solve(prof, clu, settings, progress=bar)
        plan = make_plan(prof, clu, result, settings)
        if output is not None:
            dump(plan, output)
    except PlannerError as e:
        _fail(e)
    if as_json:
        sys.stdout.write(to_json(plan))
        return
    for line in report.solve_report(prof, clu, result, plan):
        out.print(line)
    if output is not None:
        out.print(f"plan written to {output}")


@app.command()
def execute(
    plan_file: Path = typer.Argument(..., metavar="PLAN", help="plan JSON"),
    mode: str = typer.Option("auto", "--mode", help="auto, distributed, single or replay"),
    steps: int = typer.Option(5, "--steps", min=1, max=MAX_REPEATS, help="measured steps (median reported)"),
    warmup: int = typer.Option(2, "--warmup", min=1, max=MAX_REPEATS, help="steps before measuring"),
    tolerance: str = typer.Option("10%", "--tolerance", help="allowed relative error, e.g. 10% or 0.1"),
    report_file: Path | None = typer.Option(None, "--report", help="write the verification as JSON"),
    calibrate: Path | None = typer.Option(None, "--calibrate",
                                          help="write a profile with measured costs (needs --profile)"),
    profile_file: Path | None = typer.Option(None, "--profile", help="the profile the plan was solved from"),
    no_verify: bool = typer.Option(False, "--no-verify", help="skip the single-process reference check"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (single and replay modes)"),
    timeout: float = typer.Option(600.0, "--timeout", min=1, max=MAX_SECONDS,
                                  help="seconds before workers are stopped"),
    nnodes: int = typer.Option(1, "--nnodes", min=1, help="torchrun: number of nodes"),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="torchrun: this node's rank"),
    master_addr: str = typer.Option("127.0.0.1", "--master-addr", help="torchrun: rendezvous host"),
    master_port: int | None = typer.Option(None, "--master-port", help="torchrun: rendezvous port, the same "
                                              "on every node (default on one node: a free one)"),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="where workers write their reports "
                                           "(kept; default: a temporary folder, kept only if the run fails)"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads per process (default 1: "
                                          "one per worker, as the profile measures by default)"),
) -> None:
    """Run a plan with PyTorch's pipeline engine; report measured against predicted (needs torch)."""
    from planner import report
    from planner.execute import Options, check_options, raise_on_failure
    from planner.execute import execute as run_execute
    from planner.formats import check_output

    try:
        for path, flag in ((report_file, "--report"), (calibrate, "--calibrate")):
            if path is not None:
                check_output(path, inputs=(plan_file, profile_file), flag=flag)
        tol = _fraction(tolerance, "--tolerance")
        opts = Options(mode=mode, steps=steps,  # type: ignore[arg-type] # checked by check_options
                       warmup=warmup, tolerance=tol, verify=not no_verify,
                       timeout_s=timeout, device=device, nnodes=nnodes, node_rank=node_rank,
                       master_addr=master_addr, master_port=master_port,
                       run_dir=str(run_dir) if run_dir else None, threads=threads)
        check_options(opts)
        if calibrate is not None and profile_file is None:
            from planner.errors import InputError

            raise InputError("--calibrate needs --profile (the profile the plan was solved from)")
        if calibrate is not None and profile_file is not None:
            from planner.calibrate import check_inputs

            check_inputs(profile_file, plan_file)
        if run_dir is not None:
            _check_run_dir(run_dir)
        for path, flag in ((report_file, "--report"), (calibrate, "--calibrate")):
            if path is not None:
                _check_output(path, flag, inputs=[plan_file] + ([profile_file] if profile_file else []))
        with report.progress(err) as bar:
            ver = run_execute(plan_file, opts, progress=bar)
        out.print(report.verification_table(ver))
        if report_file is not None:
            from planner.formats import write_atomic

            write_atomic(report_file, json.dumps(ver.to_json(), indent=1) + "\n")
            out.print(f"report written to {report_file}")
        if calibrate is not None and profile_file is not None:
            from planner.calibrate import calibrated_profile
            from planner.formats import dump, load_plan, load_profile

            calibration = calibrated_profile(load_profile(profile_file), load_plan(plan_file), ver)
            if calibration.warning:
                err.print(f"warning: {calibration.warning}")
            dump(calibration.profile, calibrate)
            out.print(f"calibrated profile written to {calibrate}")
        raise_on_failure(ver)
    except PlannerError as e:
        _fail(e)


@app.command()
def check(
    plans: list[Path] = typer.Argument(..., metavar="PLAN...", help="plan JSON files (e.g. plans/*.json)"),
    profile_file: Path | None = typer.Option(None, "--profile", help="compare with this profile's model"),
    rebuild: bool = typer.Option(False, "--rebuild",
                                 help="rebuild each model on the meta device and compare (needs torch)"),
    resolve: bool = typer.Option(False, "--resolve",
                                 help="search again (needs --profile); fail if a better plan exists"),
    tolerance: str = typer.Option("5%", "--tolerance", help="how much better a new plan must be to fail the check"),
) -> None:
    """CI check: each plan valid, fitting, fresh (and still best). Exit 0 ok, 1 stale/over/beaten, 2 bad input."""
    from planner.check import check_one, summary
    from planner.formats import load_profile

    try:
        tol = _fraction(tolerance, "--tolerance")
        prof = load_profile(profile_file) if profile_file else None
    except PlannerError as e:
        _fail(e)
    worst = 0
    checked = ["fits"] + (["same model as the profile"] if prof else []) + (["model unchanged"] if rebuild else []) \
        + (["still the best"] if resolve else [])
    for path in plans:
        result = check_one(path, profile=prof, profile_path=str(profile_file) if profile_file else None,
                           rebuild=rebuild, resolve=resolve, tolerance=tol)
        if result.code == 0:
            out.print(f"[green]ok[/]     {path}: {escape(summary(str(path)))} ({', '.join(checked)})", soft_wrap=True)
        else:
            tag = "[red]bad[/]   " if result.code == 2 else "[red]failed[/]"
            first = one_line(result.lines[0])
            where = "" if first.startswith(str(path)) else f"{path}: "
            out.print(f"{tag} {where}{escape(first)}", soft_wrap=True)
        for line in result.lines[1 if result.code else 0:]:
            out.print(f"         {escape(line)}")
        worst = 2 if 2 in (worst, result.code) else max(worst, result.code)
    raise typer.Exit(worst)


@app.command()
def export(
    plan_file: Path = typer.Argument(..., metavar="PLAN", help="plan JSON"),
    fmt: str = typer.Option(..., "--format", "-f", help="megatron, deepspeed, torchtitan or torch"),
    output: Path | None = typer.Option(None, "-o", "--output", help="write here instead of stdout"),
) -> None:
    """Translate a plan for Megatron-LM, DeepSpeed, torchtitan or torch.distributed.pipelining."""
    from planner.export import export as run_export
    from planner.formats import check_output, load_plan, write_atomic

    try:
        if output is not None:
            check_output(output, inputs=(plan_file,))
        text = run_export(load_plan(plan_file), fmt)
        if output is not None:
            write_atomic(output, text)
    except PlannerError as e:
        _fail(e)
    if output is None:
        sys.stdout.write(text)
    else:
        out.print(f"{fmt} export written to {output}")


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("planner-demo"), "--out", help="folder for the profile, plan and picture"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
) -> None:
    """Profile the bundled GPT, solve, compare with today's splits, draw, execute, verify."""
    from planner.demo import run_demo

    try:
        code = run_demo(out_dir, device, out, err)
    except PlannerError as e:
        _fail(e)
    raise typer.Exit(code)


def _check_output(path: Path, flag: str, inputs: list[Path]) -> None:
    """Before a long run: the file can be written, and writing it destroys no input."""
    from planner.errors import InputError

    if str(path) == "" or path.is_dir():
        raise InputError(f"{flag} {str(path)!r}: give a file name, not a folder")
    if any(path.resolve() == p.resolve() for p in inputs):
        raise InputError(f"{flag} {path}: that is an input of this command; write somewhere else")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise InputError(f"{flag} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"{flag} {path}: not writable")


def _check_run_dir(path: Path) -> None:
    """--run-dir: a folder, or a name one can be made at."""
    from planner.errors import InputError

    above = path
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        what = "is" if above == path else f"is inside {above}, which is"
        raise InputError(f"--run-dir {path}: {what} a file, not a folder; give a folder for the workers' reports")


def _fraction(text: str, flag: str) -> float:
    from planner.errors import InputError
    from planner.units import foreign_digits

    number = text.strip().rstrip("%")
    try:
        if not number.isascii() or "_" in number:  # float() takes '１０' and '1_0' too
            raise ValueError(number)
        value = float(number) / (100 if text.strip().endswith("%") else 1)
    except ValueError:
        digits = " with the digits 0-9" if foreign_digits(text) else ""
        raise InputError(f"{flag} {text!r}: write a percentage like 10% or a fraction like 0.1{digits}") from None
    if not math.isfinite(value):
        raise InputError(f"{flag} {text!r}: not a finite number; write a percentage like 10% or a fraction like 0.1")
    if value < 0:
        raise InputError(f"{flag} must not be negative")
    if value > 1 and not text.strip().endswith("%"):  # '5' read as a fraction is 500%, likely meant as 5%
        raise InputError(f"{flag} {text!r} would be {value:.0%}: give a fraction, e.g. 0.1 for 10%, "
                         f"or a percentage like {number}%")
    return value


def _cuts(text: str, names: list[str]) -> tuple[int, ...]:
    from planner.errors import InputError
    from planner.units import foreign_digits

    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        if item.isascii() and item.isdigit():  # isdigit() alone takes '５' and '²'
            k = int(item)
        elif item in names:
            k = names.index(item)
        elif foreign_digits(item):
            raise InputError(f"--fix-cuts: {item!r}: write layer indices with the digits 0-9")
        else:
            raise InputError(f"--fix-cuts: {item!r} is neither a layer index nor a layer name")
        if not 0 < k < len(names):
            raise InputError(f"--fix-cuts: {item} is not between 1 and {len(names) - 1} "
                             "(the layers a stage can start at)")
        out.append(k)
    if out != sorted(set(out)):
        raise InputError("--fix-cuts: stage starts must increase")
    return tuple(out)


def _int_list(text: str, flag: str, most: int) -> list[int]:
    from planner.errors import InputError
    from planner.units import ascii_whole, foreign_digits

    parsed = [ascii_whole(x) for x in text.replace(" ", "").split(",") if x]
    values = [v for v in parsed if v is not None]
    if len(values) < len(parsed):
        digits = " with the digits 0-9" if foreign_digits(text) else ""
        raise InputError(f"{flag} {text!r}: write whole numbers{digits} separated by commas")
    if not values or any(v < 1 for v in values):
        raise InputError(f"{flag} {text!r}: give at least one positive number")
    if max(values) > most:
        raise InputError(f"{flag} {max(values)}: at most {most:,}")
    return values


def _version(value: bool) -> None:
    if value:
        from planner import __version__

        out.print(f"planner {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Exact pipeline-parallel planning for PyTorch models: profile, solve, simulate, execute, check."""
    if not os.environ.get("PLANNER_DEBUG"):  # which line of which file warned is for debugging
        warnings.showwarning = _one_line_warning


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: object = None, line: str | None = None) -> None:
    """A Python warning (a factory's, a library's) as one ``warning:`` line on stderr."""
    text = (str(message).strip().splitlines() or [category.__name__])[0]
    err.print(f"[yellow]warning:[/] {escape(one_line(text))}", soft_wrap=True)


def _usage_error() -> type[Exception]:
    """The usage-error class of the click typer runs on (recent typer vendors its own)."""
    import importlib

    for where in ("typer._click.exceptions", "click.exceptions"):
        try:
            usage: type[Exception] = importlib.import_module(where).ClickException
        except (ImportError, AttributeError):
            continue
        return usage
    raise ImportError("typer installed without click")


def _click_message(e: Exception) -> str:
    message = getattr(e, "format_message", None)
    return str(message()) if callable(message) else str(e)


def main() -> None:
    usage = _usage_error()
    try:
        code = app(standalone_mode=False)
        if code == _CTRL_C and not _SHOWN:  # typer's own exit for a Ctrl-C no command handled
            err.print("[bold red]error:[/] interrupted by SIGINT (Ctrl-C)")
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err.print("[bold red]error:[/] interrupted by SIGINT (Ctrl-C)")
        sys.exit(_CTRL_C)
    except usage as e:  # bad command line: one line, exit 2
        if type(e).__name__ == "NoArgsIsHelpError":
            sys.exit(0)
        err.print(f"[bold red]error:[/] {escape(_click_message(e))} (see --help)", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("[bold red]error:[/] interrupted by SIGINT (Ctrl-C)")
        sys.exit(_CTRL_C)
    except PlannerError as e:  # raised outside a command's own handling
        err.print(f"[bold red]error:[/] {escape(one_line(str(e)))}", soft_wrap=True)
        sys.exit(e.exit_code)
    except ModuleNotFoundError as e:  # torch or pillow, which only the [torch] extra installs
        from planner.errors import EXTRAS, MissingExtraError

        if (e.name or "").split(".")[0] not in EXTRAS:
            _internal_error(e)
        missing = MissingExtraError(e.name or "torch", f"planner {' '.join(sys.argv[1:2])}".strip())
        err.print(f"[bold red]error:[/] {escape(str(missing))}", soft_wrap=True)
        sys.exit(missing.exit_code)
    except Exception as e:
        _internal_error(e)


_CTRL_C = 130  # 128 + SIGINT


def _internal_error(e: Exception) -> None:
    """A bug: one line, and the traceback only when asked for."""
    if os.environ.get("PLANNER_DEBUG"):
        raise e
    err.print(f"[bold red]internal error:[/] {type(e).__name__}: {escape(str(e))} "
              "(set PLANNER_DEBUG=1 for the traceback)", soft_wrap=True)
    sys.exit(70)


if __name__ == "__main__":
    main()
