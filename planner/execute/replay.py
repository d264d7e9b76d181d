"""Per-device replay: one pipeline rank's action list, alone on the local device, with its real
stage modules and real tensor shapes, to measure what that rank would hold at peak and how long
its actions take. One GPU can check the memory of a plan written for eight.

The model is built on the meta device; only the replayed rank's stages get real (random)
weights. Inputs from the previous rank and gradients from the next are random tensors of the
shapes that cross those cuts, kept like the engine keeps them: one receive buffer per
micro-batch for activations and one for gradients, for the whole step. Two steps run (the
optimizer's state exists from the first on, as in training); the second is measured.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from planner.errors import ExecutionError
from planner.execute.reports import error_text
from planner.execute.stages import build_model, build_stages
from planner.execute.train import batch_seed, optimizer_for, stage_parameters
from planner.formats import Plan, StageCost
from planner.plan import plan_schedule
from planner.profile import DTYPES, make_batch
from planner.profile.measure import MemoryProbe, Timer
from planner.split import keep_ties


@dataclass
class RankReplay:
    rank: int
    stages: list[int]
    peak_bytes: int  # CUDA: allocated; CPU: live tensor bytes
    reserved_bytes: int | None
    action_s: dict[tuple[int, str], float]  # (stage, kind) -> median seconds


def _materialise(module: nn.Module, device: torch.device) -> None:
    keep_ties(module, lambda m: m.to_empty(device=device))
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.normal_(0.0, 0.02)
        for b in module.buffers():
            b.zero_()


def replay_rank(plan: Plan, rank: int, device: torch.device, repeats: int = 2) -> RankReplay:
    dtype = DTYPES[plan.dtype]
    m, size = plan.microbatch.count, plan.microbatch.size
    schedule = plan_schedule(plan)
    mine = schedule.stages_of(rank)
    spec = build_model(plan, device=torch.device("meta"), dtype=dtype)
    inputs, target = make_batch(spec, size, batch_seed(0, 0, 1), torch.device("cpu"), dtype)
    meta_inputs = tuple(t.to("meta") if torch.is_tensor(t) else t for t in inputs)
    built = build_stages(plan, spec, meta_inputs)
    cut_values = built.lm.layer_inputs(meta_inputs)  # meta tensors entering each layer
    modules = {s: built.modules[s] for s in mine}
    n = built.lm.n_layers
    S = len(plan.stages)
    reserved = None
    timings: dict[tuple[int, str], list[float]] = {}
    cuda = device.type == "cuda"
    probe = MemoryProbe(device)
    with probe:  # on a CPU the probe counts live tensors, which slows every operation
        _materialise(nn.ModuleList(modules.values()), device)  # at once: weights tied across stages stay one
        params = list(stage_parameters(modules).values())
        opt = optimizer_for(plan, params, shard_of=0)
        buffers = _buffers(built, mine, cut_values, m, n, device)
        first_inputs = tuple(t.to(device) if torch.is_tensor(t) else t for t in inputs)
        target = target.to(device) if torch.is_tensor(target) else target

        def step(times) -> None:
            _run_actions(schedule.ranks[rank], modules, buffers, first_inputs, target, built.loss, m, S,
                         device, times)
            opt.step()
            opt.zero_grad(set_to_none=False)

        for rep in range(repeats):  # the optimizer's state exists from the first step on
            if rep == repeats - 1 and cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            step(timings if cuda and rep == repeats - 1 else None)
    # the probe's peak: what this replay added to what the process held before it
    if cuda:
        reserved = torch.cuda.max_memory_reserved(device)
    else:
        step(timings)  # timed once more, without the live-tensor count
    medians = {k: sorted(v)[len(v) // 2] for k, v in timings.items()}
    return RankReplay(rank, mine, int(probe.peak), reserved, medians)


def _buffers(built, mine, cut_values, m, n, device) -> dict:
    """The engine's receive buffers for this rank's stages, one per micro-batch: activations in,
    gradients of outputs."""
    def make(t):
        return torch.randn(t.shape, dtype=t.dtype, device=device) if t.is_floating_point() \
            else torch.zeros(t.shape, dtype=t.dtype, device=device)

    out = {}
    for s in mine:
        a, b = built.bounds[s]
        ins = [] if a == 0 else cut_values[a]
        outs = [] if b == n else cut_values[b]
        out[s] = ([[make(t) for t in ins] for _ in range(m)],
                  [[make(t) if t.is_floating_point() else None for t in outs] for _ in range(m)])
    return out


def _run_actions(actions, modules, buffers, first_inputs, target, loss_fn, m, S, device, timings) -> None:
    from planner.execute.runtime import WeightWork, backward_input, backward_weight, recomputes

    saved: dict[tuple[int, int], tuple] = {}
    groups: dict[tuple[int, int], WeightWork] = {}
    local_out: dict[tuple[int, int], tuple] = {}

    timer = Timer(device)

    def timed(key, fn, *args):
        if timings is None:
            return fn(*args)
        seconds, result = timer(functools.partial(fn, *args))
        timings.setdefault(key, []).append(seconds)
        return result

    for a in actions:
        s, k = a.stage, a.mb
        mod = modules[s]
        if a.kind == "F":
            if s == 0:
                xs = first_inputs
            elif (s - 1, k) in local_out:  # the previous stage is on this rank
                xs = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in local_out.pop((s - 1, k)))
            else:
                xs = tuple(t.requires_grad_(t.is_floating_point()) for t in buffers[s][0][k])
            out = timed((s, "F"), mod, *xs)
            kept = out  # the engine keeps a stage's outputs until its backward, the last stage's too
            if s == S - 1:
                out = (loss_fn(out, target) / m,)
            elif not isinstance(out, tuple):
                out = (out,)
            saved[(s, k)] = (xs, out, kept)
            if s + 1 in modules:
                local_out[(s, k)] = out
            continue
        if a.kind == "W":
            timed((s, "W"), backward_weight, groups.pop((s, k)))
            saved.pop((s, k), None)
            continue
        xs, out, _ = saved[(s, k)]
        grads = None if s == S - 1 else [g for g in buffers[s][1][k]]
        outs = [o for o in out if o.requires_grad]
        grads = None if grads is None else [g for o, g in zip(out, grads, strict=True) if o.requires_grad]
        if a.kind == "B":
            timed((s, "B"), torch.autograd.backward, outs, grads)
            saved.pop((s, k))
        elif recomputes(mod):  # I runs the whole backward, W nothing (as the engine's stages do)
            timed((s, "I"), torch.autograd.backward, outs, grads)
            groups[(s, k)] = WeightWork([])
        else:
            params = [p for p in mod.parameters() if p.requires_grad]
            ins = [x for x in xs if torch.is_tensor(x) and x.requires_grad]
            _, pg = timed((s, "I"), backward_input, outs, grads, ins, iter(params))
            groups[(s, k)] = pg


def measured_costs(plan: Plan, replays: list[RankReplay]) -> list[StageCost]:
    """The plan's stage costs with the replayed action times in place of the predicted ones."""
    costs = []
    by_stage = {}
    for r in replays:
        for (s, kind), t in r.action_s.items():
            by_stage[(s, kind)] = t
    for st in plan.stages:
        c = st.cost
        f = by_stage.get((st.index, "F"), c.fwd_s)
        if (st.index, "B") in by_stage:
            total = by_stage[(st.index, "B")]
            share = c.bwd_input_s / (c.bwd_input_s + c.bwd_weight_s) if c.bwd_input_s + c.bwd_weight_s else 0.5
            bi, bw = total * share, total * (1 - share)
        else:
            bi = by_stage.get((st.index, "I"), c.bwd_input_s)
            bw = by_stage.get((st.index, "W"), c.bwd_weight_s)
        costs.append(c.model_copy(update={"fwd_s": f, "bwd_input_s": bi, "bwd_weight_s": bw}))
    return costs


def replay_all(plan: Plan, device: torch.device, ranks: list[int] | None = None,
               progress=None) -> list[RankReplay]:
    """Replay each rank in turn (on a CPU, with the threads the caller set: ``execute`` sets one
    per process, as each distributed worker runs)."""
    out = []
    todo = list(ranks if ranks is not None else range(plan.parallel.pp))
    for done, r in enumerate(todo):
        if progress:
            progress(f"replay: rank {r} ({done}/{len(todo)} done)", done, len(todo))
        try:
            out.append(replay_rank(plan, r, device))
        except torch.cuda.OutOfMemoryError as e:
            from planner.units import fmt_bytes

            st = next(s for s in plan.stages if s.rank == r)
            raise ExecutionError(f"replay of rank {r} (stage {st.index}) ran out of memory: predicted "
                                 f"{fmt_bytes(st.predicted.peak_memory_bytes)}, device has "
                                 f"{fmt_bytes(torch.cuda.get_device_properties(device).total_memory)}, "
                                 f"measured peak before failure {fmt_bytes(torch.cuda.max_memory_allocated(device))} "
                                 f"({error_text(e)})") from None
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out
