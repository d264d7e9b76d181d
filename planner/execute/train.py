"""What trains a plan's stages in this process: the optimizer, the batch seeds, and the stages'
parameters under the model's names (the checks against a reference are in ``verify``)."""

from __future__ import annotations

import torch
from torch import nn

from planner.errors import InputError
from planner.formats import Plan


def optimizer_for(plan: Plan, params: list[nn.Parameter], dp_group=None,
                  shard_of: int | None = None) -> torch.optim.Optimizer | ShardedOptimizer:
    """The plan's optimizer over these parameters. With ZeRO stage 1 and several replicas, its state
    is sharded evenly over the replicas by ``ShardedOptimizer``: in a distributed run over the
    replica group ``dp_group``; a rank replayed alone keeps replica ``shard_of``'s range, so that
    its memory is that of the run. With ZeRO 2 and 3 the parameters are FSDP's shards already
    (``parallel.shard_stage``)."""
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
    if plan.parallel.zero == 1 and dp > 1 and (dp_group is not None or shard_of is not None):
        return ShardedOptimizer(params, kind, options, dp_group, replica=(dp, shard_of or 0))
    return kind(params, **options)


def torch_optimizer(name: str) -> tuple[type[torch.optim.Optimizer], dict]:
    """The torch optimizer class and options that train a plan whose ``training.optimizer`` is
    ``name`` (the profiler weighs the same one's step). Each updates every element from that
    element's gradient and state alone, so stepping a tensor's pieces apart is stepping it whole
    (``ShardedOptimizer``); one with per-tensor norms (LAMB, LARS) would not be."""
    if name == "adam":
        return torch.optim.Adam, {"lr": 1e-4}
    if name in ("sgd", "sgd-momentum"):
        return torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9 if name == "sgd-momentum" else 0.0}
    raise InputError(f"optimizer {name!r} is not executed: ZeRO 1 steps pieces of tensors, which only "
                     "per-element optimizers (adam, sgd, sgd-momentum) allow")


Piece = tuple[int, int, int]  # (parameter index, first element, end element) of its flattened local tensor


def flat_ranges(sizes: list[int], dp: int) -> list[list[Piece]]:
    """Per replica, the pieces of its range: the tensors (of ``sizes`` elements) laid end to end in
    order and cut into dp ranges of ceil(N / dp) elements, the last short by the padding, a tensor
    cut where a range ends (Megatron-LM's distributed optimizer, megatron/core/optimizer/
    distrib_optimizer.py, ``_build_model_gbuf_param_range_map``; DeepSpeed ZeRO 1's flat
    partitions). No replica holds more than ceil(N / dp) elements."""
    total = sum(sizes)
    width = -(-total // dp) if total else 0
    out: list[list[Piece]] = [[] for _ in range(dp)]
    offset = 0
    for i, n in enumerate(sizes):
        a = offset
        while a < offset + n:
            k = a // width
            b = min(offset + n, (k + 1) * width)
            out[k].append((i, a - offset, b - offset))
            a = b
        offset += n
    return out


class ShardedOptimizer:
    """ZeRO stage 1 (Rajbhandari et al., SC'20, section 5.1: P_os) with even shares: this device's
    parameters (each tensor's local shard at tp > 1, so that the replicas of one tp rank cut the
    same sizes alike) are laid end to end and split into dp equal ranges (``flat_ranges``). Each
    replica keeps the optimizer state of its range only, on leaf views of the parameters' pieces
    (no copy of the weights), each piece cut further at every ceil(n / dp) elements of its tensor,
    so that no leaf is larger than a 1/dp shard of its tensor (FSDP's, ZeRO 2's): an optimizer
    that steps one tensor at a time (torch's on a CPU) makes no larger temporaries than ZeRO 2's.

    A step reduces each piece's gradient to the replica owning it (``dist.reduce``, in place in the
    gradient), which averages it, steps its leaves, and broadcasts each updated piece into the
    other replicas' weights (in place): the reduce-scatter and all-gather of the flat ranges, piece
    by piece (issued together, then awaited), with no flat buffer beside the gradients or weights (DeepSpeed ZeRO's
    ``average_tensor`` reduces a bucket's partition pieces to their owners so). Each replica
    receives the (dp - 1) ranges it does not own once each way, the bytes of a reduce-scatter and
    an all-gather (``planner.cost.DataParallel.step_coeffs``).

    ``group`` None: the replica ``replica = (dp, k)`` alone (a replayed rank), no collectives."""

    def __init__(self, params: list[nn.Parameter], kind: type[torch.optim.Optimizer], options: dict,
                 group=None, replica: tuple[int, int] = (1, 0)) -> None:
        import torch.distributed as dist

        from planner.execute.parallel import local

        dp, me = (dist.get_world_size(group), dist.get_rank(group)) if group is not None else replica
        self.params, self.group, self.dp = params, group, dp
        flats = [_flat(local(p).detach()) for p in params]
        ranges = flat_ranges([f.numel() for f in flats], dp)
        owner = (lambda k: dist.get_global_rank(group, k)) if group is not None else (lambda k: k)
        # every piece of every range, in one order on all replicas: (piece, its owner, owned here)
        self.layout = [(piece, owner(k), k == me) for k, pieces in enumerate(ranges) for piece in pieces]
        self.leaves = [(i, a, b, flats[i][a:b]) for i, lo, hi in ranges[me]
                       for a, b in _cuts(lo, hi, -(-flats[i].numel() // dp))]
        self.inner = kind([leaf for *_, leaf in self.leaves] or [nn.Parameter(torch.zeros(1))], **options)

    def step(self) -> None:
        import torch.distributed as dist

        from planner.execute.parallel import local

        with torch.no_grad():
            grads = [None if p.grad is None else _flat(local(p.grad)) for p in self.params]
            present = [(piece, owner, owned) for piece, owner, owned in self.layout if grads[piece[0]] is not None]
            if self.group is not None:  # the summed gradients, each on its owner only; issued together
                _wait([dist.reduce(grads[i][a:b], dst=owner, group=self.group, async_op=True)  # type: ignore[index]
                       for (i, a, b), owner, _ in present])
            for (i, a, b), _, owned in present:
                if owned:
                    grads[i][a:b].div_(self.dp)  # type: ignore[index]
            for i, a, b, leaf in self.leaves:
                g = grads[i]
                leaf.grad = None if g is None else g[a:b]
            self.inner.step()
            if self.group is not None:
                _wait([dist.broadcast(_flat(local(self.params[i]).detach())[a:b], src=owner, group=self.group,
                                      async_op=True) for (i, a, b), owner, _ in present])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for *_, leaf in self.leaves:
            leaf.grad = None  # views of the parameters' gradients
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()


def _wait(works: list) -> None:
    for work in works:
        work.wait()


def _cuts(lo: int, hi: int, width: int) -> list[tuple[int, int]]:
    """[lo, hi) cut at every multiple of ``width``."""
    edges = [lo, *range((lo // width + 1) * width, hi, width), hi]
    return list(zip(edges[:-1], edges[1:], strict=False))


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A tensor's elements as one flat view of its storage (not a copy)."""
    if not t.is_contiguous():
        raise InputError(f"ZeRO 1 shards flat views of the parameters and their gradients; a tensor of shape "
                         f"{tuple(t.shape)} is not contiguous")
    return t.view(-1)


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
