"""The ``planner`` command. Each command parses, calls one library function, and prints.

Library errors (``PlannerError``) become one red line and the exit code of their class; nothing
here computes. Heavy modules (torch above all) are imported inside the commands that need them,
so ``planner solve|simulate|check|schema`` start fast and run without torch.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from planner.errors import PlannerError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Exact pipeline-parallel planning for PyTorch models: profile, solve, "
                       "simulate, execute, check.")
_WIDTH = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "120"))
out = Console(highlight=False, width=_WIDTH)
err = Console(stderr=True, highlight=False)


def _fail(e: PlannerError) -> None:
    err.print(f"[bold red]error:[/] {e}", soft_wrap=True)
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
def clusters() -> None:
    """List the cluster presets and the --cluster syntax."""
    from planner.clusters import KINDS, PRESETS

    for name, text in PRESETS.items():
        out.print(f"  [bold]{name:<14}[/] {text}")
    out.print("\nAny [bold][NODESx]DEVICExCOUNT[/], joined with '+' for mixed nodes, where DEVICE is "
              + ", ".join(sorted(set(KINDS))) + "; or a cluster JSON file (planner schema cluster).")


@app.command()
def simulate(
    plan_file: Path = typer.Argument(..., metavar="PLAN", help="plan JSON written by planner solve"),
    as_json: bool = typer.Option(False, "--json", help="print the prediction as JSON"),
    timeline: Optional[Path] = typer.Option(None, "--timeline", help="draw the schedule (.png, .svg, .html)"),
) -> None:
    """Predict a plan's step time, bubble and memory, and draw its timeline."""
    from planner import report
    from planner.evaluate import replay_plan
    from planner.formats import load_plan
    from planner.schedules import build

    try:
        plan = load_plan(plan_file)
        sim = replay_plan(plan)
        if timeline is not None:
            from planner import timeline as tl

            sched = build(plan.schedule.name, plan.parallel.pp, plan.microbatch.count,
                          plan.schedule.virtual_stages)
            tl.write(timeline, sched, sim, f"{plan.model.name} on {plan.cluster.name}")
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
    arg: List[str] = typer.Option([], "--arg", help="factory argument NAME=VALUE (repeatable)"),
    mbs: str = typer.Option("1,2", "--mbs", help="micro-batch sizes to measure, e.g. 1,2,4,8"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16"),
    depth: Optional[int] = typer.Option(None, "--depth", help="cut at this module depth instead of the natural blocks"),
    repeats: int = typer.Option(10, "--repeats", min=1, help="timed repetitions per measurement"),
    warmup: int = typer.Option(3, "--warmup", min=0, help="untimed repetitions first"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads (match how you will run)"),
) -> None:
    """Measure a model layer by layer into a profile (needs torch)."""
    from planner import report
    from planner.formats import dump
    from planner.model import build_spec, parse_args

    try:
        sizes = _int_list(mbs, "--mbs")
        args = parse_args(arg)
        spec = build_spec(model, args)
        from planner.profile import Options, profile_model

        opts = Options(device=device, dtype=dtype, mbs=tuple(sizes), depth=depth, repeats=repeats,
                       warmup=warmup, threads=threads)
        with report.progress(err) as bar:
            prof = profile_model(spec, model, args, opts, progress=bar)
        dump(prof, output)
    except PlannerError as e:
        _fail(e)
    out.print(report.profile_table(prof))
    out.print(f"profile written to {output}")


def _int_list(text: str, flag: str) -> list[int]:
    from planner.errors import InputError

    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise InputError(f"{flag} {text!r}: write whole numbers separated by commas") from None
    if not values or any(v < 1 for v in values):
        raise InputError(f"{flag} {text!r}: give at least one positive number")
    return values


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]")
        sys.exit(130)
    except PlannerError as e:  # raised outside a command's own handling
        err.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        sys.exit(e.exit_code)
    except Exception as e:  # a bug: one line, and the traceback only when asked for
        if os.environ.get("PLANNER_DEBUG"):
            raise
        err.print(f"[bold red]internal error:[/] {type(e).__name__}: {e} "
                  "(set PLANNER_DEBUG=1 for the traceback)", soft_wrap=True)
        sys.exit(70)


if __name__ == "__main__":
    main()
