"""``planner export``: a plan in the terms of the training stack a team already uses."""

from __future__ import annotations

import json
import re

from planner.errors import InputError
from planner.formats import Plan

FORMATS = ("megatron", "deepspeed", "torchtitan", "torch")

# torch.distributed.pipelining schedule classes for planner's schedules
TORCH_CLASSES = {
    "naive": "ScheduleGPipe", "gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B",
    "interleaved-1f1b": "ScheduleInterleaved1F1B", "zb-h1": "ScheduleInterleavedZeroBubble",
    "zb-h2": "ScheduleInterleavedZeroBubble", "zb-auto": "ScheduleInterleavedZeroBubble",
    "zb-v": "ScheduleZBVZeroBubble", "dualpipe-v": "ScheduleDualPipeV",
}


def export(plan: Plan, fmt: str) -> str:
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return {"megatron": _megatron, "deepspeed": _deepspeed, "torchtitan": _torchtitan, "torch": _torch}[fmt](plan)


def _kind(name: str, first: bool, last: bool, blocks: set[str]) -> str:
    """Megatron layout letters: E embedding, t transformer layer, L final norm / head / loss."""
    if name in blocks:
        return "t"
    return "E" if first else "L" if last else "t"


def _blocks(plan: Plan) -> set[str]:
    """Transformer layers: names that differ from another one only by a trailing index ('h.0',
    'h.1', ...; an encoder's and a decoder's layers alike)."""
    names = [n for st in plan.stages for n in st.layers]
    keys = [m.group(1) if (m := re.fullmatch(r"(.*?)\d+", n)) else None for n in names]
    return {n for n, k in zip(names, keys, strict=True) if k is not None and keys.count(k) > 1}


def _megatron(plan: Plan) -> str:
    """Megatron-LM: pipeline and virtual-pipeline sizes, and the per-stage layout string
    (--pipeline-model-parallel-layout), which also expresses uneven splits. Everything before
    the first transformer block is the embedding (E), everything after the last is the final
    norm, output layer and loss (L)."""
    blocks = _blocks(plan)
    names = [n for st in plan.stages for n in st.layers]
    first_block = next((i for i, n in enumerate(names) if n in blocks), 0)
    last_block = max((i for i, n in enumerate(names) if n in blocks), default=len(names) - 1)
    stage_letters, pos = [], 0
    for st in plan.stages:
        letters = []
        for n in st.layers:
            letters.append(_kind(n, pos < first_block, pos > last_block, blocks))
            pos += 1
        stage_letters.append(letters)
    notes = _one_embedding_and_loss(stage_letters)
    parts = ["".join(_compress([x for k, x in enumerate(letters) if x == "t" or k == 0 or letters[k - 1] != x]))
             for letters in stage_letters]
    lines = [f"--pipeline-model-parallel-size {plan.parallel.pp}"] + _megatron_sharding(plan)
    if plan.schedule.virtual_stages > 1 and plan.schedule.name in ("interleaved-1f1b", "zb-h1"):
        lines.append(f"--virtual-pipeline-model-parallel-size {plan.schedule.virtual_stages}")
    lines += notes
    lines.append(f"--pipeline-model-parallel-layout \"{'|'.join(parts)}\"")
    lines.append(f"--micro-batch-size {plan.microbatch.size} --global-batch-size {plan.microbatch.global_batch}")
    if plan.schedule.name not in ("1f1b", "interleaved-1f1b"):
        lines.append(f"# Megatron-LM runs 1F1B (interleaved with virtual stages); this plan uses {plan.schedule.name}")
    recomputed = [s for s, st in enumerate(plan.stages) if st.recompute != "none"]
    if recomputed:
        # Megatron-LM recomputes the first N transformer layers of every stage (method block)
        most = max(stage_letters[s].count("t") for s in recomputed)
        if len(recomputed) < len(plan.stages) or any(stage_letters[s].count("t") != most for s in recomputed):
            lines.append(f"# planner recomputes stages {recomputed} only; Megatron-LM applies this to every "
                         "stage (less memory, more time than predicted)")
        lines.append(f"--recompute-granularity full --recompute-method block --recompute-num-layers {most}")
    return "\n".join(lines) + "\n"


def _megatron_sharding(plan: Plan) -> list[str]:
    """Tensor parallelism, sequence parallelism and the distributed optimizer (ZeRO-1: optimizer
    state sharded over dp; Megatron-LM has no flag for stages 2 and 3)."""
    par = plan.parallel
    lines = [f"--tensor-model-parallel-size {par.tp}"] if par.tp > 1 else []
    if par.sequence_parallel:
        lines.append("--sequence-parallel")
    if par.zero >= 1:
        lines.append("--use-distributed-optimizer")
    if par.zero >= 2:
        lines.append(f"# planner shards gradients{' and weights' if par.zero == 3 else ''} too (ZeRO {par.zero}); "
                     "Megatron-LM's distributed optimizer shards the optimizer state only (more memory than "
                     "predicted; Megatron-FSDP or torchtitan run the plan as made)")
    return lines


def _one_embedding_and_loss(stage_letters: list[list[str]]) -> list[str]:
    """Megatron-LM's layout names the embedding (E) and the loss (L, with the final norm and
    output layer) exactly once: where planner splits them over stages, E stays on its first
    stage and L on its last, and a comment says so."""
    notes = []
    for letter, keep in (("E", min), ("L", max)):
        holders = [s for s, letters in enumerate(stage_letters) if letter in letters]
        if len(holders) > 1:
            home = keep(holders)
            for s in holders:
                if s != home:
                    stage_letters[s][:] = [x for x in stage_letters[s] if x != letter]
            what = "embedding" if letter == "E" else "final norm, output layer and loss"
            notes.append(f"# planner splits the {what} over stages {holders}; Megatron-LM keeps them on stage {home}")
    return notes


def _compress(letters: list[str]) -> list[str]:
    out, k = [], 0
    while k < len(letters):
        j = k
        while j < len(letters) and letters[j] == letters[k]:
            j += 1
        out.append(letters[k] if j - k == 1 else f"{letters[k]}*{j - k}")
        k = j
    return out


def _deepspeed(plan: Plan) -> str:
    """DeepSpeed PipelineModule: stage boundaries as layer indices (``parts``, len num_stages + 1)."""
    parts, pos = [0], 0
    for st in plan.stages:
        pos += len(st.layers)
        parts.append(pos)
    return json.dumps({
        "num_stages": plan.parallel.pp,
        "parts": parts,
        "layers_per_stage": [len(st.layers) for st in plan.stages],
        "micro_batches": plan.microbatch.count,
        "train_micro_batch_size_per_gpu": plan.microbatch.size,
        "activation_checkpoint_stages": [st.index for st in plan.stages if st.recompute != "none"],
        "zero_optimization": {"stage": plan.parallel.zero},
        **({"tensor_parallel": {"autotp_size": plan.parallel.tp}} if plan.parallel.tp > 1 else {}),
        **({"note_zero": "DeepSpeed's PipelineModule runs ZeRO stages 0 and 1 only; run this plan with "
                         "torchtitan, or solve with --zero 1"} if plan.parallel.zero >= 2 and plan.parallel.pp > 1
           else {}),
        **({"note_schedule": f"this plan's schedule is {plan.schedule.name}; DeepSpeed's PipelineEngine runs its "
                             "own 1F1B (TrainSchedule), so its step time and memory are those of planner's 1f1b "
                             "on the same parts: solve with --schedule 1f1b to compare"}
           if plan.schedule.name not in ("1f1b", "naive") else {}),
        "note": "DeepSpeed computes parts itself from partition_method; use these boundaries by "
                "overriding PipelineModule._partition_layers to set self.parts = parts"
                + ("" if plan.schedule.virtual_stages == 1 else
                   f". This plan runs {plan.schedule.virtual_stages} chunks per rank ({plan.schedule.name}), which "
                   "DeepSpeed's one-stage-per-rank 1F1B cannot express: parts are given per chunk; solve with "
                   "--virtual-stages 1 for a plan DeepSpeed can run"),
    }, indent=1) + "\n"


def _torchtitan(plan: Plan) -> str:
    """torchtitan: module names per model part (pipeline_module_split)."""
    schedule = TORCH_CLASSES.get(plan.schedule.name, plan.schedule.name).removeprefix("Schedule")
    par = plan.parallel
    return json.dumps({
        # torchtitan shards with FSDP2 over data_parallel_shard_degree (ZeRO 3; FSDP's
        # reshard_after_forward=False is closer to ZeRO 2) and replicates over the rest
        "tensor_parallel_degree": par.tp,
        "enable_sequence_parallel": par.sequence_parallel,
        "data_parallel_shard_degree": par.dp if par.zero >= 1 else 1,
        "data_parallel_replicate_degree": 1 if par.zero >= 1 else par.dp,
        # planner prices ZeRO 3 under the pipeline engine above 1 and 2 (cost.DataParallel: the
        # weights gathered again after every forward, the gathered copies held beside the state)
        **({"note_zero": f"planner priced ZeRO {par.zero}; torchtitan shards with FSDP2, which is ZeRO 3 as "
                         "planner prices it with --zero 3: under the pipeline engine that holds more memory than "
                         "this plan predicts; re-solve with --zero 3 to see its memory and step time"}
           if par.zero in (1, 2) else {}),
        "pipeline_parallel_degree": par.pp,
        "pipeline_parallel_schedule": schedule,
        "pipeline_parallel_microbatch_size": plan.microbatch.size,
        "module_names_per_model_chunk": [st.layers for st in plan.stages],
    }, indent=1) + "\n"


def _torch(plan: Plan) -> str:
    """torch.distributed.pipelining: split points for pipeline(), the schedule class, and the
    stage placement."""
    split = {st.layers[0]: "SplitPoint.BEGINNING" for st in plan.stages[1:]}
    return json.dumps({
        "split_spec": split,
        "schedule_class": TORCH_CLASSES.get(plan.schedule.name, plan.schedule.name),
        "n_microbatches": plan.microbatch.count,
        "stages_per_rank": {str(r): [st.index for st in plan.stages if st.rank == r] for r in range(plan.parallel.pp)},
        "note": "planner executes its own action list through _PipelineScheduleRuntime; the class above "
                "is the engine's nearest built-in schedule",
        **({"actions_per_rank": plan.schedule.order} if plan.schedule.order is not None else {}),
        **_torch_sharding(plan),
    }, indent=1) + "\n"


def _torch_sharding(plan: Plan) -> dict[str, object]:
    """What pipeline() does not cover: the degrees and sharding to apply inside each stage."""
    par = plan.parallel
    if par.tp == 1 and par.dp == 1:
        return {}
    return {
        "data_parallel_degree": par.dp, "tensor_parallel_degree": par.tp, "zero_stage": par.zero,
        "sequence_parallel": par.sequence_parallel and par.tp > 1,
        "note_sharding": "the split and schedule above cover the pipeline axis only: build a DeviceMesh of "
                         f"(pp {par.pp}, dp {par.dp}, tp {par.tp}), apply parallelize_module with Colwise/"
                         "RowwiseParallel to each stage over the tp axis"
                         + (", and replicate over the dp axis" if not par.zero else
                            ", and shard the optimizer state evenly over the dp axis (ZeRO 1: the stage's parameters "
                            "flattened into dp equal ranges, as Megatron-LM's distributed optimizer does; "
                            "ZeroRedundancyOptimizer's whole tensors hold more than planned)"
                            if par.zero == 1 else f", and shard over the dp axis (fully_shard, ZeRO {par.zero})"),
    }
