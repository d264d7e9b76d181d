"""Human-readable output: rich tables (numbers worded by units.py). Nothing here computes a cost."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from planner.formats import Collectives, Plan, Profile, Stage
from planner.simulate import SimResult
from planner.units import fmt_bytes, fmt_time, layer_span


def device_grid(plan: Plan, stage: Stage) -> list[list[int]]:
    """The devices of a stage's pipeline rank by coordinates: ``grid[d][k]`` runs data-parallel
    replica d's tensor-parallel shard k (a replica's tp devices follow its first)."""
    return [[first + k for k in range(plan.parallel.tp)] for first in stage.devices]


def device_ranges(devices: list[int]) -> str:
    """'0-7', '0-3, 8-11', '5': sorted device indices with consecutive runs joined."""
    runs: list[list[int]] = []
    for d in sorted(devices):
        if runs and d == runs[-1][1] + 1:
            runs[-1][1] = d
        else:
            runs.append([d, d])
    return ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def step_comm_s(comm: Collectives, microbatches: int) -> float:
    """A stage's collectives over one step: every micro-batch runs one forward and one backward,
    whole or as its input- and weight-gradient parts."""
    return microbatches * (comm.fwd_s + comm.bwd_input_s + comm.bwd_weight_s)


def simulation_summary(plan: Plan, sim: SimResult) -> dict[str, Any]:
    """The prediction of a plan as plain data (``planner simulate --json``)."""
    stages = []
    m = plan.microbatch.count
    for st in plan.stages:
        r = st.rank
        grid = device_grid(plan, st)
        cap = plan.cluster.usable_bytes([d for row in grid for d in row])
        stages.append({
            "index": st.index, "rank": r, "devices": grid, "layers": st.layers, "recompute": st.recompute,
            "compute_s": sim.stage_compute_s[st.index],
            "tp_comm_s": step_comm_s(st.cost.tp_comm, m), "zero_comm_s": step_comm_s(st.cost.zero_comm, m),
            "utilization": sim.stage_compute_s[st.index] / sim.step_time_s if sim.step_time_s else 0.0,
            "rank_compute_s": sim.compute_s[r], "rank_idle_s": sim.idle_s[r],
            "peak_memory_bytes": sim.peak_memory_bytes[r], "capacity_bytes": cap,
        })
    par = plan.parallel
    return {
        "parallel": {"pp": par.pp, "dp": par.dp, "tp": par.tp, "zero": par.zero,
                     "sequence_parallel": par.sequence_parallel},
        "step_time_s": sim.step_time_s,
        "throughput_samples_per_s": plan.microbatch.global_batch / sim.step_time_s if sim.step_time_s else 0.0,
        "bubble_fraction": sim.bubble_fraction,
        "peak_memory_bytes": max(sim.peak_memory_bytes),
        "bottleneck_rank": sim.bottleneck_rank,
        "stages": stages,
    }


def parallel_text(plan: Plan) -> str:
    """'pp=2 dp=4 tp=8 (sequence parallel) zero=1': every degree, and ZeRO's stage."""
    par = plan.parallel
    sp = " (sequence parallel)" if par.sequence_parallel else ""
    return f"pp={par.pp} dp={par.dp} tp={par.tp}{sp} zero={par.zero}"


def schedule_text(plan: Plan) -> str:
    """'zb-h1', or 'zb-h1 (v=2)' with virtual stages: the schedule as simulate and check name it."""
    v = plan.schedule.virtual_stages
    return plan.schedule.name + (f" (v={v})" if v > 1 else "")


def simulation_table(plan: Plan, sim: SimResult) -> Table:
    summary = simulation_summary(plan, sim)
    sched = schedule_text(plan)
    title = (f"{plan.model.name}: {sched}, {parallel_text(plan)}, "
             f"{plan.microbatch.count} x {plan.microbatch.size} per replica")
    table = Table(title=title, title_justify="left")
    comm = _comm_columns(plan)
    with_rank = any(st.rank != st.index for st in plan.stages)  # else the stage's index is its rank's
    for col in ("stage", *(["rank"] if with_rank else []), "devices", "layers", "recompute", "compute", *comm,
                "util.", "peak mem.", "of device"):
        table.add_column(col, justify="right" if col not in ("devices", "layers", "recompute") else "left")
    bottleneck = summary["bottleneck_rank"]
    for st in summary["stages"]:
        style = "bold red" if st["rank"] == bottleneck else None
        over = st["peak_memory_bytes"] > st["capacity_bytes"]
        shown = [fmt_time(st[key]) if recorded else "-" for key, recorded in comm.values()]
        table.add_row(str(st["index"]), *([str(st["rank"])] if with_rank else []),
                      device_ranges([d for row in st["devices"] for d in row]),
                      layer_span(st["layers"]), st["recompute"], fmt_time(st["compute_s"]), *shown,
                      f"{st['utilization']:.0%}", ("[red]" if over else "") + fmt_bytes(st["peak_memory_bytes"]),
                      fmt_bytes(st["capacity_bytes"]), style=style)
    table.caption = "\n".join([
        f"step {fmt_time(summary['step_time_s'])}, {summary['throughput_samples_per_s']:.1f} samples/s, "
        f"bubble {summary['bubble_fraction']:.1%}, peak {fmt_bytes(summary['peak_memory_bytes'])}; "
        f"bottleneck: rank {bottleneck}",
        "times per step, memory per device" + ("" if with_rank or plan.parallel.pp == 1 else
                                               "; stage s runs on pipeline rank s"), *collective_notes(plan)])
    if plan.provenance.costs_estimated:
        table.caption += f"\n{estimated_note(plan.provenance.costs_estimated)}"
    table.caption_justify = "left"
    return table


def _comm_columns(plan: Plan) -> dict[str, tuple[str, bool]]:
    """The collectives' columns the plan has, each as (summary key, whether the plan records them:
    plans solved before they were recorded carry zeros). ZeRO comm only at ZeRO 3, the one stage
    with collectives per micro-batch (``DataParallel.per_microbatch``); ZeRO 1 and 2 collect once a
    step, in the dp step note."""
    par = plan.parallel
    out = {}
    if par.tp > 1:
        out["TP comm"] = ("tp_comm_s", any(st.cost.tp_comm != Collectives() for st in plan.stages))
    if par.zero >= 3 and par.dp > 1:
        out["ZeRO comm"] = ("zero_comm_s", any(st.cost.zero_comm != Collectives() for st in plan.stages))
    return out


def collective_notes(plan: Plan) -> list[str]:
    """What the devices column and the collectives' columns show: one line each."""
    notes = [coordinates_note(plan)] if plan.parallel.dp * plan.parallel.tp > 1 else []
    recorded = {name: ok for name, (_, ok) in _comm_columns(plan).items()}
    if "TP comm" in recorded:
        notes.append(tp_note(plan) if recorded["TP comm"] else _unrecorded("TP comm"))
    if "ZeRO comm" in recorded:
        notes.append(zero_note(plan) if recorded["ZeRO comm"] else _unrecorded("ZeRO comm"))
    if plan.parallel.dp > 1:
        notes.append(dp_step_note(plan))
    return notes


def _unrecorded(column: str) -> str:
    return (f"{column}: not recorded in this plan (solved before planner recorded its collectives); "
            "re-solve to see them")


def coordinates_note(plan: Plan) -> str:
    """How a pipeline rank's devices map to (dp, tp) coordinates, and why one peak stands for all."""
    par = plan.parallel
    n = par.dp * par.tp
    coords = " and ".join(part for part in (f"replica d (dp 0-{par.dp - 1})" if par.dp > 1 else "",
                                            f"shard k (tp 0-{par.tp - 1})" if par.tp > 1 else "") if part)
    regular = all(st.devices == [(st.rank * par.dp + d) * par.tp for d in range(par.dp)] for st in plan.stages)
    if regular:
        terms = [f"{n}r" if par.pp > 1 else "", f"{par.tp}d" if par.dp > 1 and par.tp > 1 else
                 ("d" if par.dp > 1 else ""), "k" if par.tp > 1 else ""]
        where = f"on device {' + '.join(t for t in terms if t)} (Megatron-LM's order: tp, dp, pp)"
    else:
        where = "on the stage's d-th listed device + k"
    rank = "pipeline rank r's" if par.pp > 1 else "the"
    return (f"devices: {rank} dp {par.dp} x tp {par.tp} = {n} devices, {coords} {where}; the cost model gives "
            "them all the same shapes (even tensor shards, identical or evenly sharded replicas), so the "
            "peak shown is each one's")


def tp_note(plan: Plan) -> str:
    """Which tensor-parallel collectives TP comm/step counts, on which link, priced how."""
    from planner.clusters import describe_link
    from planner.evaluate import tp_link

    par = plan.parallel
    link = tp_link(plan.cluster, par.tp, par.pp * par.dp * par.tp)
    where = "within a node" if link == plan.cluster.intra_node else "between nodes"
    what = ("a reduce-scatter + all-gather pair (sequence parallelism)" if par.sequence_parallel
            else "an all-reduce")
    return (f"TP comm, inside compute: {what} of the hidden state twice a block in each forward and each "
            "input gradient (once in the embedding and the output layer; recomputed forwards repeat theirs), "
            f"over tp {par.tp} {where} ({describe_link(link)}), as a ring: 2(tp-1)/tp x bytes / bandwidth "
            "+ 2(tp-1) latencies, serial with the compute")


def _dp_links(plan: Plan) -> str:
    """The links the stages' data-parallel rings run over."""
    from planner.clusters import describe_link

    links = {describe_link(plan.cluster.link(st.devices[0], st.devices[-1])) for st in plan.stages}
    return "; ".join(sorted(links))


def zero_note(plan: Plan) -> str:
    """ZeRO 3's collective inside compute (``DataParallel.per_microbatch``)."""
    par = plan.parallel
    return (f"ZeRO comm, inside compute: ZeRO-3 all-gathers the stage's weights again after every forward "
            f"over dp {par.dp} ({_dp_links(plan)}), half a ring all-reduce, as the pipeline engine runs FSDP")


def dp_step_note(plan: Plan) -> str:
    """The data-parallel collective once a step, after the last backward (not in compute/step)."""
    par = plan.parallel
    what = {0: "all-reduces its gradients", 1: "reduce-scatters its gradients and all-gathers the updated "
            "shards (ZeRO-1)", 2: "reduce-scatters its gradients once and all-gathers its weights at the next "
            "step's start (ZeRO-2)", 3: "reduce-scatters its gradients once and all-gathers its weights at the "
            "next step's start (ZeRO-3)"}[par.zero]
    most = max(st.cost.allreduce_s for st in plan.stages)
    return (f"dp step, after compute (the timeline's purple tail): each rank {what} over dp {par.dp} "
            f"({_dp_links(plan)}), up to {fmt_time(most)} a stage, then steps its optimizer")


def estimated_note(how: str) -> str:
    """The warning beside every number priced on estimated, not measured, costs."""
    return (f"[yellow]note:[/] costs are estimated, not measured ({how}); profile on the device "
            "and re-solve before relying on the times")


@contextmanager
def progress(console: Console):
    """A progress bar; yields a callback ``(label, done, total)``. Nothing is drawn where the
    console is not a terminal (a log or a pipe), which would keep an empty line of it."""
    if not console.is_terminal:
        yield lambda label, done, total: None
        return
    with Progress(TextColumn("{task.description:<40}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True, auto_refresh=False) as bar:
        task = bar.add_task("starting", total=1)

        def update(label: str, done: int, total: int) -> None:
            # redrawn here, not by a refresh thread: the search may fork worker processes
            bar.update(task, description=label[:40], completed=done, total=total)
            bar.refresh()

        yield update


def schedules_table() -> Table:
    """One line per schedule: its source, its published bubble and its memory in flight."""
    from planner.schedules import SCHEDULES

    table = Table(title="schedules (--schedule); p ranks, m micro-batches, v chunks, t one pass",
                  title_justify="left")
    for col in ("schedule", "source", "bubble per rank", "memory in flight (micro-batches)", "runs"):
        table.add_column(col)
    for info in SCHEDULES.values():
        table.add_row(info.name, info.reference, info.bubble, info.memory, "yes" if info.executable else "model only")
    return table


def profile_table(prof: Profile) -> Table:
    """Per-layer costs at the largest profiled micro-batch size, the heaviest highlighted."""
    size = str(prof.mbs_sizes[-1])
    whole = prof.whole.get(size)
    scale = whole.scale if whole else 1.0
    rows = [(layer.name, layer.param_bytes, layer.by_mbs[size]) for layer in prof.layers]
    heaviest = max(range(len(rows)), key=lambda i: rows[i][2].fwd_s + rows[i][2].bwd_s)
    threads = prof.measurement.threads if prof.measurement else None
    where = f"{prof.device.name}, {threads} CPU thread{'s' if threads != 1 else ''}" if threads else prof.device.name
    estimated = prof.measurement.estimated if prof.measurement else None
    table = Table(title=f"{prof.model.name} on {where} ({prof.dtype}), micro-batch {size}"
                  + (", estimated" if estimated else ""), title_justify="left")
    for col in ("layer", "params", "fwd", "bwd", "saved act.", "output"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for i, (name, pbytes, c) in enumerate(rows):
        table.add_row(name, fmt_bytes(pbytes), fmt_time(c.fwd_s * scale), fmt_time(c.bwd_s * scale),
                      fmt_bytes(c.act_bytes), fmt_bytes(c.out_bytes),
                      style="bold yellow" if i == heaviest else None)
    total_params = sum(layer.param_bytes for layer in prof.layers) - sum(g.param_bytes * (len(g.layers) - 1)
                                                                     for g in prof.tied)
    notes = [f"{len(rows)} layers, {fmt_bytes(total_params)} of parameters"]
    if whole:
        notes.append(f"layers timed one at a time add up to {1 / scale:.2f}x the whole model timed at once; "
                     "the times above are scaled to match the whole")
        if whole.launch_bound:
            notes.append("launch-bound: layers timed alone are slower than inside the model; "
                         "the calibration corrects for it")
    if prof.tied:
        notes.append("tied: " + "; ".join(" = ".join(g.layers) for g in prof.tied))
    if estimated:
        notes.append(f"costs estimated, not measured: {estimated.removeprefix('estimate: ')}")
    table.caption = "\n".join(notes)
    table.caption_justify = "left"
    return table


def solve_report(prof: Profile, cluster, result, plan: Plan) -> list:
    """What `planner solve` prints: candidates, the chosen plan per stage, the baselines."""
    from planner.plan import replay_plan

    out: list = []
    if prof.device.type != (cluster.devices[0].type if cluster.devices else prof.device.type):
        out.append(f"[yellow]note:[/] the profile was measured on {prof.device.type} ({prof.device.name}); "
                   f"{cluster.name} has {cluster.devices[0].type} devices: times are the profile's, "
                   "divided by each device's relative speed")
    cand = Table(title=f"top configurations ({result.configs_solved} of {result.configs_total} solved, "
                       f"{result.elapsed_s:.2f} s)", title_justify="left")
    for col in ("#", "pp", "dp", "tp", "zero", "mbs", "m", "schedule", "recompute", "step", "samples/s", "bubble",
                "peak mem"):
        cand.add_column(col, justify="right" if col not in ("schedule", "recompute") else "left")
    for k, c in enumerate(result.ranked, 1):
        ev = c.evaluation.detailed(timeline=False)
        cfg = c.config
        sched = cfg.schedule + (f" v={cfg.v}" if cfg.v > 1 else "")
        rec = sorted({s.recompute for s in ev.segments})
        cand.add_row(str(k), str(cfg.pp), str(cfg.dp), str(cfg.tp) + (" sp" if cfg.sp else ""), str(cfg.zero),
                     str(cfg.mbs), str(cfg.m), sched, "/".join(rec),
                     fmt_time(ev.step_time_s), f"{c.throughput:.1f}", f"{ev.sim.bubble_fraction:.1%}",
                     fmt_bytes(max(ev.peak_memory_bytes)), style="bold green" if k == 1 else None)
    out.append(cand)
    out.append(simulation_table(plan, replay_plan(plan)))
    out.append(_baseline_table(plan))
    out.extend(_verdict(result, plan))
    for note in result.notes:
        out.append(f"[yellow]note:[/] {note}")
    return out


def _pinned(plan: Plan) -> bool:
    """The plan's partition was given by the user (``--fix-cuts``), not searched."""
    saved = plan.provenance.solver.settings
    return saved is not None and bool(saved.fix_cuts)


def _by_memory(plan: Plan) -> bool:
    saved = plan.provenance.solver.settings
    return saved is not None and saved.objective == "memory"


def versus(theirs: float, mine: float, unit: str = "") -> str:
    """How a baseline compares with the plan, on step time or (``unit="memory"``) peak memory:
    "same" within half a percent, else how many times faster/slower or more/less memory."""
    if theirs <= mine * 1.005 and mine <= theirs * 1.005:
        return "same"
    if unit == "memory":
        return f"{theirs / mine:.2f}x memory" if theirs > mine else f"{mine / theirs:.2f}x less memory"
    return f"{theirs / mine:.2f}x slower" if theirs > mine else f"{mine / theirs:.2f}x faster"


def _baseline_table(plan: Plan) -> Table:
    """The plan against today's splits; the plan's row says whose split it is."""
    ours = "your split (--fix-cuts)" if _pinned(plan) else "planner"
    base = Table(title="against today's splits (one cost model; the plan's configuration, Megatron-LM's usual "
                       "in its own)", title_justify="left")
    for col in ("partition", "layers per stage", "step", "vs yours" if _pinned(plan) else "vs planner", "peak mem"):
        base.add_column(col, justify="left" if col in ("partition", "layers per stage") else "right")
    mine, least = plan.predicted.step_time_s, plan.predicted.peak_memory_bytes
    sizes = [len(st.layers) for st in plan.stages]
    base.add_row(ours, _sizes(sizes), fmt_time(mine), "1.00x", fmt_bytes(least), style="bold green")
    for b in plan.baselines:
        if not b.step_time_s:
            ratio = "does not fit"
        elif _by_memory(plan):
            ratio = versus(b.peak_memory_bytes, least, "memory")
        else:
            ratio = versus(b.step_time_s, mine)
        base.add_row(b.name, _sizes(b.layers_per_stage), fmt_time(b.step_time_s), ratio,
                     fmt_bytes(b.peak_memory_bytes))
    return base


def _verdict(result, plan: Plan) -> list[str]:
    """What was proven: optimality for a searched partition; for the user's split, only the best
    micro-batching and schedule for it, and which of today's splits beat it."""
    if not _pinned(plan):
        if result.proven and _by_memory(plan):
            return [("[green]proven least memory[/] under the cost model: no configuration or partition "
                     "searched needs less on its fullest device")]
        if result.proven:
            return [("[green]proven optimal[/] under the cost model: no configuration or partition "
                     "searched can be faster")]
        return []
    lines = []
    if result.proven_for_fixed_cuts:
        lines.append("[green]proven best for your split[/] under the cost model: no micro-batching, schedule "
                     "or recomputation searched is " + ("lighter" if _by_memory(plan) else "faster")
                     + " with these cuts")
    mine = plan.predicted.step_time_s
    faster = [(b.step_time_s, b.name) for b in plan.baselines
              if b.fits and b.step_time_s and b.step_time_s * 1.005 < mine]
    if faster and not _by_memory(plan):
        step, name = min(faster)
        lines.append(f"[yellow]today's split beats yours:[/] {name} is {mine / step:.2f}x "
                     "faster; drop --fix-cuts to search the split")
    return lines


def _sizes(sizes: list[int]) -> str:
    text = ", ".join(map(str, sizes))
    return text if len(text) <= 40 else text[:37] + "..."


def verification_table(ver):
    """Measured against predicted, with the correctness checks beneath (just the checks when
    nothing was measured against a prediction)."""
    lines = [f"{'[green]ok[/]' if ok else '[red]FAILED[/]'}  {name}: {detail}" for name, ok, detail in ver.checks]
    if not ver.rows:
        return "\n".join([f"[bold]{ver.mode} on {ver.device}[/]"] + lines + ver.notes)
    table = Table(title=f"measured against predicted ({ver.mode} on {ver.device})", title_justify="left")
    for col in ("", "predicted", "measured", "error", "note"):
        table.add_column(col, justify="left" if col in ("", "note") else "right")
    worst = ver.worst()
    for r in ver.rows:
        fmt = fmt_time if r.unit == "s" else fmt_bytes if r.unit == "bytes" else (lambda v: f"{v:.1f}")
        err_text = f"{r.error:+.1%}" if r.checked else f"({r.error:+.1%})"
        bad = r.checked and abs(r.error) > ver.tolerance
        style = "bold red" if bad else ("bold" if r is worst else None)
        table.add_row(r.what, fmt(r.predicted), fmt(r.measured), err_text, r.note, style=style)
    verdict = ("[green]within tolerance[/]" if ver.within() else "[red]outside tolerance[/]") + \
        f" ({ver.tolerance:.0%}; errors in parentheses are reported, not checked)"
    table.caption = "\n".join(lines + [verdict] + ver.notes)
    table.caption_justify = "left"
    return table
