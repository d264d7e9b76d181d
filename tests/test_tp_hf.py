"""Tensor parallelism of the Hugging Face models (models/hf.py), whose stages are cut from their
exported graph (planner/execute/graph_tp.py): the collectives, the fused q|k|v layout, the checks
before workers start, and four gloo processes against the single-process reference."""

import pytest
import torch

from planner.clusters import from_spec
from planner.errors import InputError
from planner.execute import Options, execute
from planner.execute.graph_tp import TP_ORDER, _order, model_order
from planner.execute.parallel import check_tp, module_styles
from planner.formats import dump
from planner.model import build_spec
from planner.profile import Options as ProfileOptions
from planner.profile import profile_model
from planner.solve import Settings, solve
from planner.solve.plan import make_plan

pytest.importorskip("transformers")

FACTORY = "models/hf.py:build"
TINY = dict(n_layer=2, d_model=64, n_head=4, vocab=128, seq=16)
# large enough that the profile's memory model holds to a few percent at tp 1 (at d_model 64
# GPT-2's last stage is over-predicted by 11.5% at tp 1 already, and by 11.8% at tp 2)
SMALL = dict(n_layer=4, d_model=128, n_head=4, vocab=256, seq=32)


def test_gpt2_and_llama_carry_a_tp_plan_naming_their_modules_and_others_none():
    for model_type in ("gpt2", "llama"):
        spec = build_spec(FACTORY, {**TINY, "model_type": model_type})
        assert spec.tp_plan is not None
        styles = module_styles(spec.model, spec.tp_plan)
        matched = {k for k in spec.tp_plan for path in styles if path == k or path.endswith("." + k)}
        assert matched == set(spec.tp_plan), set(spec.tp_plan) - matched  # no key names nothing
    assert build_spec(FACTORY, {**TINY, "model_type": "bert"}).tp_plan is None
    assert build_spec(FACTORY, {**TINY, "model_type": "gpt2", "task": "classification"}).tp_plan is None


def test_a_piecewise_layout_holds_each_ranks_share_of_every_piece():
    # 12 features in 3 pieces (q|k|v of 4), tp 2: rank 0 holds q0 q1 k4 k5 v8 v9, rank 1 the rest
    order = _order(12, pieces=3, tp=2)
    assert order.tolist() == [0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10, 11]
    p = torch.nn.Parameter(torch.zeros(12))
    setattr(p, TP_ORDER, (0, order))
    assert model_order(p, torch.arange(12.0)[order]).tolist() == list(range(12))


def test_a_tp_that_splits_a_head_is_refused_before_workers_start():
    spec = build_spec(FACTORY, {**TINY, "model_type": "llama"})
    check_tp(spec.model, spec.tp_plan, 4)
    inside = ("tp 8 splits model.layers.0.self_attn.q_proj inside a head: its 64 outputs are 4 heads' worth of "
              "head_dim 16")
    with pytest.raises(InputError, match=inside):
        check_tp(spec.model, spec.tp_plan, 8)
    spec = build_spec(FACTORY, {**TINY, "model_type": "gpt2"})
    with pytest.raises(InputError, match=r"transformer.wte \(rowwise\) splits 128 rows, not a multiple of tp 3"):
        check_tp(spec.model, spec.tp_plan, 3)
    with pytest.raises(InputError, match=r"its 192 outputs are 3 projections \(fused, as q, k and v\) of the "
                                         "attention's 4 heads of head_dim 16, and 4 is not a multiple of tp 8"):
        check_tp(spec.model, spec.tp_plan, 8)
    # GPT-2's fused q|k|v of 4 heads: its 12 heads' worth of outputs divide by 3, the heads do not
    spec = build_spec(FACTORY, {**TINY, "d_model": 96, "vocab": 96, "seq": 30, "model_type": "gpt2"})
    with pytest.raises(InputError, match="of the attention's 4 heads of head_dim 24, and 4 is not a multiple of tp 3"):
        check_tp(spec.model, spec.tp_plan, 3)


def _name(op) -> str:
    return str(op).rpartition(".")[2]  # c10d_functional.all_reduce -> all_reduce


def _collectives(model_type: str) -> tuple[dict, dict]:
    """The collectives of one forward and one backward of the whole model split over two ranks of a
    fake process group (shapes and sharding run, no data moves)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from planner.execute.graph_tp import tensor_parallel_graph
    from planner.split import layered

    spec = build_spec(FACTORY, {**TINY, "model_type": model_type})
    inputs, _ = spec.batch(2, torch.Generator().manual_seed(0))
    lm = layered(spec.model, inputs, None, None, "export")
    stage, _ = lm.for_engine(lm.stage(0, lm.n_layers), spec.loss)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        tensor_parallel_graph(stage, spec.model, spec.tp_plan, init_device_mesh("cpu", (2,)), False)
        comm = CommDebugMode()
        with comm:
            out = stage(*inputs)
            forward = {_name(k): v for k, v in comm.get_comm_counts().items()}
            out.float().square().mean().backward()
            total = {_name(k): v for k, v in comm.get_comm_counts().items()}
    finally:
        dist.destroy_process_group()
    backward = {k: v - forward.get(k, 0) for k, v in total.items() if v - forward.get(k, 0)}
    return forward, backward


@pytest.mark.parametrize("model_type, embeddings", [("llama", 1), ("gpt2", 2)])
def test_the_collectives_are_megatrons(model_type, embeddings):
    # forward: each embedding's all-reduce, one after attention and one after the MLP in each of the
    # 2 blocks, the logits gathered; backward: the mirror (the blocks' inputs and the head's input
    # all-reduced), and no weight is ever gathered
    forward, backward = _collectives(model_type)
    assert forward == {"all_reduce": embeddings + 2 * 2, "all_gather_into_tensor": 1}
    assert backward == {"all_reduce": 2 * 2 + 1}


# ----------------------------------------------------------------------------- four gloo processes


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def profiled(request):
    args = {**SMALL, "model_type": request.param}
    spec = build_spec(FACTORY, args)
    return profile_model(spec, FACTORY, args, ProfileOptions(mbs=(1, 2), repeats=2, warmup=1, threads=1))


def _run(profile, tmp_path, pp: int, tp: int, recompute: str = "auto"):
    # solve's defaults otherwise: sequence parallelism asked for, and left out since the tp_plan runs none
    settings = Settings(global_batch=8, pp=pp, dp=1, tp=tp, schedules=("1f1b",), time_limit_s=5, recompute=recompute)
    cluster = from_spec("cpu4")
    plan = make_plan(profile, cluster, solve(profile, cluster, settings), settings)
    assert (plan.parallel.tp, plan.parallel.sequence_parallel) == (tp, False)
    path = tmp_path / "plan.json"
    dump(plan, path)
    return execute(path, Options(steps=1, warmup=1, run_dir=str(tmp_path / "run"), tolerance=1000.0, timeout_s=300))


def _memory_errors(ver):
    return {r.what: r.error for r in ver.rows if "peak memory" in r.what}


@pytest.mark.slow
def test_pp2_tp2_matches_the_reference_and_the_predicted_memory(profiled, tmp_path):
    assert (profiled.model.tensor_parallel, profiled.model.sequence_parallel) == (True, False)  # tp searched
    ver = _run(profiled, tmp_path, pp=2, tp=2)
    assert ver.mode == "distributed"
    assert all(ok for _, ok, _ in ver.checks), ver.checks
    errors = _memory_errors(ver)
    assert sorted(errors) == [f"rank {r} tp {t} peak memory" for r in (0, 1) for t in (0, 1)]
    assert all(abs(e) <= 0.10 for e in errors.values()), errors


@pytest.mark.slow
def test_pp1_tp2_matches_the_reference(profiled, tmp_path):
    if profiled.model.name != "hf-llama":
        pytest.skip("one model is enough for pp 1")
    ver = _run(profiled, tmp_path, pp=1, tp=2)
    assert all(ok for _, ok, _ in ver.checks), ver.checks
    errors = _memory_errors(ver)
    assert sorted(errors) == ["rank 0 tp 0 peak memory", "rank 0 tp 1 peak memory"]
    assert all(abs(e) <= 0.10 for e in errors.values()), errors


@pytest.mark.slow
def test_recomputed_stages_match_the_reference(profiled, tmp_path):
    # a recomputed layer sits in a wrapper (its path gains an ``inner``): the plan still names it,
    # and GPT-2's tied embedding and head stay split alike on the two pipeline ranks
    if profiled.model.name != "hf-gpt2":
        pytest.skip("GPT-2 has the tied weight")
    ver = _run(profiled, tmp_path, pp=2, tp=2, recompute="full")
    assert all(ok for _, ok, _ in ver.checks), ver.checks


@pytest.mark.slow
def test_profile_tp_measures_the_layers_split_as_execute_splits_them():
    # Llama's block at d_model 64: its weight matrices halve, its two norms (64 + 64 float32) stay whole
    args = {**TINY, "model_type": "llama"}
    opts = ProfileOptions(mbs=(1,), repeats=1, warmup=1, threads=1, tp=(2,))  # sequence parallelism asked for
    prof = profile_model(build_spec(FACTORY, args), FACTORY, args, opts)
    block = next(layer for layer in prof.layers if layer.name == "model.layers.0")
    costs = block.tp_costs["2"]
    assert not costs.sequence_parallel  # left out: the tp_plan runs none
    assert costs.param_bytes == (block.param_bytes - 2 * 64 * 4) // 2 + 2 * 64 * 4
    head = next(layer for layer in prof.layers if layer.name == "lm_head")
    assert head.tp_costs["2"].param_bytes == head.param_bytes // 2
