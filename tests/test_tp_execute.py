"""Tensor parallelism and ZeRO 2/3 executed: four gloo processes on the CPU, losses and gradients
checked against the single-process float64 reference, memory against the prediction."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from planner.clusters import from_spec
from planner.errors import ExecutionError, InputError, ModelError
from planner.execute import Options, execute, raise_on_failure, unexecuted
from planner.execute.parallel import check_tp, module_styles
from planner.execute.reports import coordinates
from planner.formats import dump, load_plan
from planner.model import build_spec, check_tp_plan
from planner.profile import Options as ProfileOptions
from planner.profile import profile_model
from planner.solve import Settings, solve
from planner.solve.plan import make_plan

TINY = {"n_layer": 3, "d_model": 32, "n_head": 2, "vocab": 64, "seq": 16}


@pytest.fixture(scope="module")
def tiny_profile():
    spec = build_spec("models/gpt.py:build", TINY)
    return profile_model(spec, "models/gpt.py:build", TINY, ProfileOptions(mbs=(1, 2), repeats=2, warmup=1, threads=1))


def plan_for(profile, tmp_path, *, pp=2, dp=1, tp=1, zero=0, sp=False, schedule="1f1b", name="plan.json",
             cuts=None, mbs=None):
    settings = Settings(global_batch=8, pp=pp, dp=dp, tp=tp, zero=zero, sequence_parallel=sp,
                        schedules=(schedule,), time_limit_s=5, fix_cuts=cuts, mbs=mbs)
    cluster = from_spec("cpu4")
    plan = make_plan(profile, cluster, solve(profile, cluster, settings), settings)
    path = tmp_path / name
    dump(plan, path)
    return path


def run(path, tmp_path):
    return execute(path, Options(steps=1, warmup=1, run_dir=str(tmp_path / "run"), tolerance=1000.0, timeout_s=120))


# ----------------------------------------------------------------------------- by hand


def test_global_ranks_are_pipeline_major_then_replica_then_tp():
    # pp 2 x dp 2 x tp 2: rank 5 is pipeline rank 1, replica 0, tp rank 1
    assert coordinates(5, dp=2, tp=2) == (1, 0, 1)
    assert [coordinates(r, dp=1, tp=2) for r in range(4)] == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1)]


def test_a_plan_key_names_a_path_or_its_end_and_the_longest_key_wins():
    block = nn.ModuleDict({"attn": nn.ModuleDict({"c_proj": nn.Linear(2, 2)}), "mlp": nn.ModuleDict(
        {"c_proj": nn.Linear(2, 2)})})
    model = nn.ModuleDict({"h": nn.ModuleList([block])})
    styles = module_styles(model, {"c_proj": "colwise", "attn.c_proj": "rowwise"})
    assert styles == {"h.0.attn.c_proj": "rowwise", "h.0.mlp.c_proj": "colwise"}


def test_an_unknown_tp_style_is_refused_with_the_known_ones():
    with pytest.raises(ModelError, match=r"tp_plan\['attn.qkv'\] is 'column'; styles are colwise, rowwise"):
        check_tp_plan("m.py:build", {"attn.qkv": "column"})


def test_the_bundled_gpt_splits_whole_heads():
    # the fused QKV is grouped by head: the first half of c_attn's outputs is head 0's q, k and v
    spec = build_spec("models/gpt.py:build", {"n_layer": 1, "d_model": 8, "n_head": 2, "vocab": 8, "seq": 4})
    attn = spec.model.transformer.h[0].attn
    x = torch.randn(1, 4, 8)
    full = attn(x)
    with torch.no_grad():
        attn.c_attn.weight[12:] = 0  # head 1's q, k, v: its attention averages zeros
        attn.c_attn.bias[12:] = 0
    head0 = attn(x)
    w = attn.c_proj.weight  # head 0 meets c_proj's columns 0:4
    assert not torch.allclose(full, head0)
    y = torch.nn.functional.scaled_dot_product_attention(
        *(z.transpose(1, 2) for z in attn.c_attn(x).view(1, 4, 2, 3, 4)[:, :, :1].unbind(3)), is_causal=True)
    assert torch.allclose(head0, y.transpose(1, 2).reshape(1, 4, 4) @ w[:, :4].T + attn.c_proj.bias, atol=1e-6)


def test_the_bundled_gpt_refuses_a_tp_that_does_not_divide_its_heads():
    # 4 heads of 24: c_attn's 288 outputs divide by 3, its 4 heads do not (a worker would fail to
    # view its 96 outputs as whole heads)
    spec = build_spec("models/gpt.py:build", {"n_layer": 1, "d_model": 96, "n_head": 4, "vocab": 96, "seq": 30})
    assert spec.model.transformer.h[0].attn.head_dim == 24
    with pytest.raises(InputError, match=r"tp 3 splits transformer.h.0.attn.c_attn inside a head: its 288 outputs "
                                         r"are 3 projections \(fused, as q, k and v\) of the attention's 4 heads "
                                         "of head_dim 24, and 4 is not a multiple of tp 3"):
        check_tp(spec.model, spec.tp_plan, 3)
    check_tp(spec.model, spec.tp_plan, 2)


def test_zero_2_with_a_split_backward_is_refused_with_the_schedules_that_run(tiny_profile, tmp_path):
    plan = load_plan(plan_for(tiny_profile, tmp_path, dp=2, zero=2, schedule="zb-h1"))
    assert "ZeRO stage 2 runs with schedules whose backward is one action" in unexecuted(plan)
    with pytest.raises(InputError, match="solve with --schedule 1f1b, or --zero 1"):
        execute(tmp_path / "plan.json", Options(mode="distributed"))


def test_a_model_without_a_tp_plan_is_refused_before_workers_start(tiny_profile, tmp_path):
    root = str(Path.cwd())
    (tmp_path / "plain.py").write_text(
        f"import sys\nsys.path.insert(0, {root!r})\nfrom models.gpt import build as gpt\n\n"
        "def build(**kw):\n    spec = gpt(**kw)\n    spec.tp_plan = None\n    return spec\n")
    path = plan_for(tiny_profile, tmp_path, tp=2)
    data = json.loads(path.read_text())
    data["model"]["factory"] = str(tmp_path / "plain.py") + ":build"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="gives no tp_plan .*solve with --tp 1"):
        execute(path, Options(mode="distributed"))
    # check --rebuild passes it (a plan may be meant for an export) and says execute would refuse it
    from planner.check import check_one

    out = check_one(path, profile=None, profile_path=None, rebuild=True, resolve=False, tolerance=0.1)
    assert out.code == 0 and any(line.startswith("planner execute would refuse it: the plan has tp 2, and ")
                                 for line in out.lines), out.lines


@pytest.mark.parametrize("change, sp, message", [
    ("spec.tp_plan = {k: v for k, v in spec.tp_plan.items() if v != 'sequence'}", True,
     "the plan has sequence parallelism, and .*tp_plan runs none .*solve with --no-sequence-parallel"),
    # the same weights cut into one head of 32: c_attn's 96 outputs are its q, k and v
    ("spec = gpt(**{**kw, 'n_head': 1})", False,
     r"tp 2 splits transformer.h.0.attn.c_attn inside a head: its 96 outputs are 3 projections \(fused, as q, k "
     "and v\\) of the attention's 1 head of head_dim 32, and 1 is not a multiple of tp 2"),
])
def test_a_plan_the_tp_plan_cannot_run_is_refused_before_workers_start(tiny_profile, tmp_path, change, sp, message):
    root = str(Path.cwd())
    (tmp_path / "changed.py").write_text(
        f"import sys\nsys.path.insert(0, {root!r})\nfrom models.gpt import build as gpt\n\n"
        f"def build(**kw):\n    spec = gpt(**kw)\n    {change}\n    return spec\n")
    path = plan_for(tiny_profile, tmp_path, tp=2, sp=sp)
    data = json.loads(path.read_text())
    data["model"]["factory"] = str(tmp_path / "changed.py") + ":build"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=message):
        execute(path, Options(mode="distributed"))


def test_solve_keeps_tp_at_1_for_a_model_without_a_tp_plan(tiny_profile):
    model = tiny_profile.model.model_copy(update={"tensor_parallel": False})
    profile = tiny_profile.model_copy(update={"model": model})
    settings = Settings(global_batch=8, time_limit_s=5)
    result = solve(profile, from_spec("cpu4"), settings)
    assert result.best.config.tp == 1
    assert any(n.startswith("tp 1 only: the model gives no tp_plan") for n in result.notes)


def test_solve_plans_no_sequence_parallelism_for_a_tp_plan_that_runs_none(tiny_profile):
    # the bundled GPT's plan marks its norms 'sequence'; models/hf.py's plans mark none
    assert tiny_profile.model.sequence_parallel is True
    settings = Settings(global_batch=8, pp=2, tp=2, time_limit_s=5)
    assert solve(tiny_profile, from_spec("cpu4"), settings).best.config.sp
    model = tiny_profile.model.model_copy(update={"sequence_parallel": False})
    result = solve(tiny_profile.model_copy(update={"model": model}), from_spec("cpu4"), settings)
    assert result.best.config.tp == 2 and not result.best.config.sp
    assert "sequence parallelism off: the model's tp_plan runs none (it marks no norm 'sequence')" in result.notes


def test_solve_notes_a_tp_plan_the_profile_does_not_record_and_no_sequence_note_without_one(tiny_profile):
    settings = Settings(global_batch=8, pp=2, tp=2, time_limit_s=5)
    old = tiny_profile.model.model_copy(update={"tensor_parallel": None, "sequence_parallel": None})
    notes = solve(tiny_profile.model_copy(update={"model": old}), from_spec("cpu4"), settings).notes
    assert any(n.startswith("tp 2: the profile does not record whether the model gives a tp_plan") for n in notes)
    none = tiny_profile.model.model_copy(update={"tensor_parallel": False, "sequence_parallel": False})
    notes = solve(tiny_profile.model_copy(update={"model": none}), from_spec("cpu4"), settings).notes
    assert any(n.startswith("tp 2: planned, not executed: the model gives no tp_plan") for n in notes)
    assert not any(n.startswith("sequence parallelism off") for n in notes)  # no tp_plan to run it


def test_replay_of_a_tensor_parallel_plan_is_refused(tiny_profile, tmp_path):
    path = plan_for(tiny_profile, tmp_path, tp=2)
    with pytest.raises(InputError, match="--mode replay runs one rank alone"):
        execute(path, Options(mode="replay"))


# ----------------------------------------------------------------------------- four gloo processes


def _memory_errors(ver):
    return {r.what: r.error for r in ver.rows if "peak memory" in r.what}


@pytest.mark.slow
def test_pp2_tp2_matches_the_reference_and_the_predicted_memory(tiny_profile, tmp_path):
    ver = run(plan_for(tiny_profile, tmp_path, tp=2), tmp_path)
    assert ver.mode == "distributed"
    assert all(ok for _, ok, _ in ver.checks), ver.checks
    errors = _memory_errors(ver)
    assert sorted(errors) == [f"rank {r} tp {t} peak memory" for r in (0, 1) for t in (0, 1)]
    # never under the prediction (planner.cost.CostTable._shard: the whole tensors DTensor holds
    # priced), and within 10% of it; measured -2.2% and -8.0% per pipeline rank
    assert all(-0.10 <= e <= 0.0 for e in errors.values()), errors


@pytest.mark.slow
def test_pp2_tp2_with_sequence_parallelism_matches_the_reference(tiny_profile, tmp_path):
    ver = run(plan_for(tiny_profile, tmp_path, tp=2, sp=True), tmp_path)
    assert all(ok for _, ok, _ in ver.checks), ver.checks
    # the all-gathered inputs the column-parallel linears save whole are priced: never under the
    # prediction, within 10% (measured -1.6% and -6.6%)
    assert all(-0.10 <= e <= 0.0 for e in _memory_errors(ver).values()), _memory_errors(ver)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_pp2_dp2_zero_matches_the_reference_and_the_predicted_memory(tiny_profile, tmp_path, zero):
    # split and micro-batch size pinned: the search's pick follows timings, which vary with load
    ver = run(plan_for(tiny_profile, tmp_path, dp=2, zero=zero, cuts=(3,), mbs=1), tmp_path)
    assert all(ok for _, ok, _ in ver.checks), ver.checks
    assert any("8 micro-batches" in n for n in ver.notes), ver.notes  # the reference ran both replicas' batches
    # the gathered weights and whole gradients the engine holds through the step are predicted
    # (planner.cost.DataParallel): no rank above its prediction by more than 2%
    errors = _memory_errors(ver)
    # ZeRO 3's last stage measured up to +4% here on a busy machine when its gather buffer outlived
    # the copy-out into the backward's compute (gloo's worker thread still held it): priced beside
    # the workspace since (DataParallel.gather_buffer), so both stages are held at 2%
    most = 0.02
    # one row per rank: pipeline rank and replica
    assert sorted(errors) == [f"rank {r} dp {d} peak memory" for r in (0, 1) for d in (0, 1)]
    assert all(e <= most for e in errors.values()), errors


@pytest.mark.slow
def test_dp2_tp2_zero_1_matches_the_reference(tiny_profile, tmp_path):
    # ZeRO 1 over tensor-parallel parameters: planner's ShardedOptimizer on each device's local shards
    ver = run(plan_for(tiny_profile, tmp_path, pp=1, dp=2, tp=2, zero=1), tmp_path)
    assert ver.mode == "distributed"
    assert all(ok for _, ok, _ in ver.checks), ver.checks
    # every rank against its prediction (even ranges: the fullest replica holds ceil(N / dp)
    # elements' state), never under it and within the 10% the tensor-parallel runs above are held to
    errors = _memory_errors(ver)
    assert sorted(errors) == [f"rank 0 dp {d} tp {t} peak memory" for d in (0, 1) for t in (0, 1)]
    assert all(-0.10 <= e <= 0.0 for e in errors.values()), errors


def _sharded_step(rank: int, store_path: str, out: str) -> None:
    import torch.distributed as dist

    from planner.execute.train import ShardedOptimizer

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    params = [torch.nn.Parameter(torch.full((n,), float(n))) for n in (10, 6, 3)]
    for p in params:
        p.grad = torch.full_like(p, float(rank + 1))  # replica 0: 1, replica 1: 2; averaged 1.5
    opt = ShardedOptimizer(params, torch.optim.SGD, {"lr": 1.0}, dist.group.WORLD)
    owned = [tuple(p.shape) for p in opt.inner.param_groups[0]["params"]]
    opt.step()
    torch.save({"params": [p.detach() for p in params], "owned": owned}, f"{out}.{rank}")
    dist.barrier()  # neither leaves while the other's broadcast is in flight (gloo aborts at teardown)
    dist.destroy_process_group()


def test_the_sharded_optimizer_steps_its_range_and_broadcasts_the_rest(tmp_path):
    # 10 + 6 + 3 = 19 elements over two replicas: ranges of 10 and 9, so the first holds the 10,
    # the second the 6 and the 3, each stepped in halves (no leaf above ceil(n / 2) of its tensor);
    # after the step (lr 1, averaged gradient 1.5) both hold n - 1.5
    import torch.multiprocessing as mp

    out = str(tmp_path / "result")
    mp.spawn(_sharded_step, args=(str(tmp_path / "store"), out), nprocs=2, join=True)
    results = [torch.load(f"{out}.{r}") for r in (0, 1)]
    assert [r["owned"] for r in results] == [[(5,), (5,)], [(3,), (3,), (2,), (1,)]]
    for r in results:
        assert [p.tolist() for p in r["params"]] == [[n - 1.5] * n for n in (10, 6, 3)]


def _cut_step(rank: int, store_path: str, out: str) -> None:
    import torch.distributed as dist

    from planner.execute.train import ShardedOptimizer

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    w = torch.nn.Parameter(torch.arange(12.0).reshape(3, 4))
    b = torch.nn.Parameter(torch.zeros(3))
    ref_w, ref_b = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    x = torch.arange(8.0).reshape(2, 4) + rank  # each replica's batch
    (x @ w.t() + b).square().sum().backward()
    ref = torch.optim.Adam([ref_w, ref_b], lr=0.1)  # whole tensors, both batches' average
    for k in (0, 1):
        xk = torch.arange(8.0).reshape(2, 4) + k
        ((xk @ ref_w.t() + ref_b).square().sum() / 2).backward()
    ref.step()
    opt = ShardedOptimizer([w, b], torch.optim.Adam, {"lr": 0.1}, dist.group.WORLD)
    opt.step()
    state = sum(t.numel() for s in opt.inner.state.values() for t in s.values() if t.dim())
    torch.save({"w": w.detach(), "b": b.detach(), "ref_w": ref_w.detach(), "ref_b": ref_b.detach(),
                "state": state}, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_the_sharded_optimizer_cuts_a_tensor_and_steps_adam_as_whole_tensors_do(tmp_path):
    # 12 + 3 = 15 elements: ranges of 8 and 7, the 12-element weight cut after its 8th; each
    # replica's Adam state is two moments of its range (16 and 14 elements)
    import torch.multiprocessing as mp

    out = str(tmp_path / "result")
    mp.spawn(_cut_step, args=(str(tmp_path / "store"), out), nprocs=2, join=True)
    results = [torch.load(f"{out}.{r}") for r in (0, 1)]
    assert [r["state"] for r in results] == [16, 14]
    for r in results:
        torch.testing.assert_close(r["w"], r["ref_w"])
        torch.testing.assert_close(r["b"], r["ref_b"])


@pytest.mark.slow
def test_a_wrong_gradient_on_one_tp_rank_fails_the_check(tiny_profile, tmp_path, monkeypatch):
    monkeypatch.setenv("PLANNER_FAULT", "grad@3")  # pipeline rank 1, tp rank 1
    ver = run(plan_for(tiny_profile, tmp_path, tp=2), tmp_path)
    grads = next(c for c in ver.checks if "gradients" in c[0])
    assert not grads[1] and "differs from the reference" in grads[2]
    with pytest.raises(ExecutionError, match="gradients equal the reference .* failed"):
        raise_on_failure(ver)
