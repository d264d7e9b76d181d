"""What trains a plan's stages in this process: the optimizer, the batch seeds, and the stages'
parameters under the model's names (the checks against a reference are in ``verify``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from planner.errors import InputError
from planner.formats import Plan


def optimizer_for(plan: Plan, params: list[nn.Parameter], dp_group=None,
                  shard_of: int | None = None) -> torch.optim.Optimizer | ShardedOptimizer:
    """The plan's optimizer over these parameters. With ZeRO stage 1 and several replicas, its state
    is sharded over the replicas: in a distributed run by torch's ZeroRedundancyOptimizer over the
    replica group ``dp_group`` (each replica steps its shard, then broadcasts it); a rank replayed
    alone keeps replica ``shard_of``'s shard, so that its memory is that of the run. With ZeRO 2 and
    3 the parameters are FSDP's shards already (``parallel.shard_stage``)."""
    t = plan.training
    if t.precision == "mixed":
        raise InputError("plans with --precision mixed (fp32 master weights) are modelled but not executed; "
                         "solve with --precision param to run one")
    if not params:
        params = [nn.Parameter(torch.zeros(1))]  # a stage without weights still steps
    kind, options = torch_optimizer(t.optimizer)
    dp = plan.parallel.dp
    if plan.parallel.zero >= 2 and dp_group is not None:
        return kind(params, **options)  # FSDP's sharded parameters: each replica steps its shard
    if plan.parallel.zero >= 1 and dp > 1:
        if dp_group is not None and any(_is_dtensor(p) for p in params):
            return ShardedOptimizer(params, kind, options, dp_group)
        if dp_group is not None:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            return ZeroRedundancyOptimizer(params, optimizer_class=kind, process_group=dp_group, **options)
        if shard_of is not None:
            params = zero_shard(params, dp)[shard_of] or [nn.Parameter(torch.zeros(1))]
    return kind(params, **options)


def torch_optimizer(name: str) -> tuple[type[torch.optim.Optimizer], dict]:
    """The torch optimizer class and options that train a plan whose ``training.optimizer`` is
    ``name`` (the profiler weighs the same one's step)."""
    if name == "adam":
        return torch.optim.Adam, {"lr": 1e-4}
    return torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9 if name == "sgd-momentum" else 0.0}


def _is_dtensor(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


class ShardedOptimizer:
    """ZeRO stage 1 over tensor-parallel (DTensor) parameters, which torch's
    ZeroRedundancyOptimizer does not take: each replica holds the optimizer state of its share of
    whole tensors, steps it on the averaged gradients, then every tensor's owner broadcasts its
    updated local shard to the other replicas (ZeRO section 5.1: P_os, whose all-gather of the
    updated parameters this is). The share is ``zero_shard`` of the local shards' sizes, the bytes
    this device holds, so that the cost model's bound on the fullest replica holds in them
    (``planner.cost.DataParallel.uneven_state_bytes``); the replicas of one tp rank hold shards of
    the same sizes, so they agree on it (another tp rank's group may partition otherwise: each
    steps only its own shards)."""

    def __init__(self, params: list[nn.Parameter], kind: type[torch.optim.Optimizer], options: dict,
                 group) -> None:
        import torch.distributed as dist

        from planner.execute.parallel import local

        self.params, self.group = params, group
        shards = zero_shard(params, dist.get_world_size(group), size=lambda p: local(p).numel())
        self.owners = [(p, dist.get_global_rank(group, k)) for k, shard in enumerate(shards) for p in shard]
        mine = shards[dist.get_rank(group)]
        self.inner = kind(mine or [nn.Parameter(torch.zeros(1))], **options)

    def step(self) -> None:
        import torch.distributed as dist

        from planner.execute.parallel import local

        self.inner.step()
        with torch.no_grad():
            for p, owner in self.owners:
                dist.broadcast(local(p), src=owner, group=self.group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()


def zero_shard(params: list[nn.Parameter], dp: int,
               size: Callable[[nn.Parameter], int] = torch.Tensor.numel) -> list[list[nn.Parameter]]:
    """Parameters per replica as ZeroRedundancyOptimizer partitions them
    (torch/distributed/optim/zero_redundancy_optimizer.py, ``_partition_parameters``): largest
    ``size`` first, each to the replica holding the fewest elements so far (whole tensors, so
    shards are close to, not exactly, 1/dp of the state)."""
    shards: list[list[nn.Parameter]] = [[] for _ in range(dp)]
    sizes = [0] * dp
    for p in sorted(params, key=size, reverse=True):
        k = sizes.index(min(sizes))
        shards[k].append(p)
        sizes[k] += size(p)
    return shards


def batch_seed(step: int, dp_rank: int, dp: int) -> int:
    return 1000 + step * dp + dp_rank


def stage_parameters(modules: dict[int, nn.Module], model: nn.Module | None = None) -> dict[str, nn.Parameter]:
    """Parameters of this process's stages, each once, under the model's own names when the model
    is given (explicit stages and checkpoint wrappers rename them)."""
    names = {id(p): n for n, p in reversed(list(model.named_parameters(remove_duplicate=False)))} if model else {}
    out: dict[str, nn.Parameter] = {}
    seen = set()
    for mod in modules.values():
        for name, p in mod.named_parameters(remove_duplicate=False):
            if id(p) not in seen:
                seen.add(id(p))
                out[names.get(id(p), name.replace("inner.", ""))] = p
    return out
