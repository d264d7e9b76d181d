"""One rank of a tensor-parallel measurement (``planner profile --tp``), started by torchrun:
``python -m planner.profile.tp_worker --job JOB --run-dir DIR``.

Every rank builds the model on the meta device, cuts it into the profile's layers, and for each
layer to measure makes it real, splits it over the tp ranks with the executor's own
``tensor_parallel`` (the model's tp_plan), and times its forward and backward as the tp-1
profile does (``time_subject``: the same Timer, warm-up and repeats), then weighs what it saves
for backward. With sequence parallelism a layer receives, as the executor's stages do, the local
part of the sequence of every tensor another layer made. The ranks' numbers are gathered and
the slowest rank's kept: rank 0 writes them to ``<run-dir>/result.json``. A rank writes why it
failed to ``rank<R>.error``, always destroys its process group, and exits by itself when its
launcher or the planner process is gone. ``PLANNER_FAULT`` (``raise@R``, ``hang@R``, ...) makes a
rank fail as it makes one of ``planner execute``'s.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from planner.errors import InputError
from planner.execute.parallel import SEQ, local, tensor_parallel
from planner.execute.worker import error_text, inject, leave, process_group, watch_parents, write
from planner.model import ModelSpec, build_spec
from planner.profile import DTYPES, build_meta_spec, make_batch
from planner.profile.collect import crossing_keys
from planner.profile.layer import Subject, Times, time_subject, weigh
from planner.profile.measure import Timer
from planner.profile.source import OnMeta
from planner.profile.tp import TpJob
from planner.split import INPUT

__all__ = ["main"]


def _local_inputs(inputs: tuple, producers: list[int], mesh: DeviceMesh, sp: bool) -> tuple:
    """With sequence parallelism, this rank's part of the sequence of each tensor a layer made
    (the model's inputs, token ids, stay whole), as the executor's stages receive them."""
    if not sp:
        return inputs
    tp, rank = mesh.size(), mesh.get_local_rank()
    out = []
    for x, producer in zip(inputs, producers, strict=True):
        if producer != INPUT and isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() > SEQ:
            if x.shape[SEQ] % tp:
                raise InputError(f"sequence parallelism splits the sequence ({x.shape[SEQ]}) over tp {tp}: "
                                 "it is not a multiple; measure without --sequence-parallel or with another --tp")
            x = x.chunk(tp, dim=SEQ)[rank].contiguous()
        out.append(x)
    return tuple(out)


def _times(t: Times, act_bytes: int) -> dict[str, Any]:
    return {"fwd_s": t.fwd.median, "bwd_s": t.bwd.median,
            "bwd_input_s": t.bwd_input.median if t.bwd_input else None,
            "bwd_weight_s": t.bwd_weight.median if t.bwd_weight else None,
            "act_bytes": act_bytes, "fwd_spread": round(t.fwd.spread, 4), "bwd_spread": round(t.bwd.spread, 4)}


def _measure_layer(job: TpJob, source: OnMeta, spec: ModelSpec, mesh: DeviceMesh, flows: dict, batches: dict,
                   i: int) -> dict[str, Any]:
    """Layer ``i`` split over the mesh, at every micro-batch size: its times, saved bytes and
    this rank's parameter bytes."""
    lm, device = source.lm, source.device
    producers = [t.producer for t in lm.crossing(i)]
    by: dict[str, Any] = {}
    with source.module(i, i + 1) as module:
        tensor_parallel(module, spec.tp_plan, mesh, job.sequence_parallel, spec.model)
        for b in job.mbs:
            gen = torch.Generator().manual_seed(job.seed + i)
            inputs = _local_inputs(source.inputs_of(flows[b], i, batches[b][0], gen), producers, mesh,
                                   job.sequence_parallel)
            subject = Subject(f"layer {lm.names[i]} at micro-batch {b} over tp {mesh.size()}", inputs, job.seed,
                              module=module)
            times = time_subject(subject, Timer(device), job.warmup, job.repeats)
            weights = weigh(subject, crossing_keys(lm, i), crossing_keys(lm, i + 1), i, device,
                            split=times.bwd_input is not None)
            by[str(b)] = _times(times, weights.act_bytes)
        params = sum(local(p).numel() * local(p).element_size() for p in module.parameters())
    return {"param_bytes": params, "by_mbs": by}


def _measure(job: TpJob, device: torch.device, mesh: DeviceMesh) -> dict[str, Any]:
    """Every layer the job names, measured on this rank."""
    dtype = DTYPES[job.dtype]
    spec = build_spec(job.factory, dict(job.args)) if job.no_meta else build_meta_spec(job.factory, dict(job.args))
    batches = {b: make_batch(spec, b, job.seed, device, dtype) for b in job.mbs}
    source = OnMeta(spec.model, batches[job.mbs[0]][0], spec.layers, job.depth, device, dtype, spec.trace)
    if source.lm.names != list(job.names):
        raise InputError("the model's layers are not the profile's (the factory builds another model here)")
    flows = {b: source.flow(batches[b][0], f"at micro-batch {b}") for b in job.mbs}
    out: dict[str, Any] = {}
    for i, name in enumerate(source.lm.names):
        if name in job.measure:
            if mesh.get_rank() == 0:
                write(Path(job.progress_path), json.dumps([len(out), name]))
            out[name] = _measure_layer(job, source, spec, mesh, flows, batches, i)
    return out


def _slowest(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per layer and size, each number the largest over the ranks: a step waits for the slowest."""
    merged = results[0]
    for other in results[1:]:
        for name, layer in other.items():
            mine = merged[name]
            mine["param_bytes"] = max(mine["param_bytes"], layer["param_bytes"])
            for b, costs in layer["by_mbs"].items():
                for k, v in costs.items():
                    old = mine["by_mbs"][b][k]
                    mine["by_mbs"][b][k] = None if v is None or old is None else max(old, v)
    return merged


def _device(job: TpJob, local_rank: int) -> torch.device:
    if job.device == "cuda":
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
        return device
    torch.set_num_threads(job.threads or 1)
    return torch.device("cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m planner.profile.tp_worker")
    parser.add_argument("--job", required=True)
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    run_dir = Path(args.run_dir)
    watch_parents()
    write(run_dir / f"rank{rank}.pid", str(os.getpid()))
    job = TpJob.read(Path(args.job))
    try:
        device = _device(job, int(os.environ.get("LOCAL_RANK", rank)))
        with process_group(device, rank, world, job.timeout_s):
            mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("tp",))
            inject(rank)  # testing aid: PLANNER_FAULT, as planner execute's workers read it
            mine = _measure(job, device, mesh)
            everyone: list[Any] = [None] * world
            dist.all_gather_object(everyone, mine)
            if rank == 0:
                write(run_dir / "result.json", json.dumps(_slowest(everyone)))
            dist.barrier()  # no rank tears its group down while another still uses it
        return 0
    except BaseException as e:
        write(run_dir / f"rank{rank}.error", f"{type(e).__name__}: {error_text(e)}")
        raise


if __name__ == "__main__":
    leave(main())
