"""Tensor parallelism and ZeRO in the cost model, the search and the exports: numbers checkable by
hand, the bounds against the simulator, the search against brute force, and a Llama-2-70B-shaped
model on 64 and on 8 H100s."""

import json

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from planner.cli import app
from planner.clusters import from_spec
from planner.cost import CostTable, DataParallel, Segment
from planner.errors import InfeasibleError
from planner.evaluate import Config, evaluate, rank_devices, segments_from_bounds, tp_link
from planner.export import export
from planner.formats import Link, Training, to_json
from planner.plan import to_plan
from planner.schedules import build
from planner.solve import Settings, solve
from planner.solve.bounds import Policy, StageBounds
from planner.solve.brute import all_partitions, brute_force
from planner.solve.exact import solve_inner
from planner.solve.search import Search
from planner.synthetic import chain_profile

MiB, GiB = 2**20, 2**30
FAST = Link(bandwidth_bytes_per_s=1e30, latency_s=0.0)  # communication for free: compute alone
GBS = Link(bandwidth_bytes_per_s=1e9, latency_s=0.0)
runner = CliRunner()


# ------------------------------------------------------------------------------ cost model


def test_a_matmul_layers_compute_halves_at_tp_2():
    # two layers with weights (not a run of blocks: one all-reduce each way, free on FAST)
    prof = chain_profile([1e-3, 3e-3], param_bytes=[64 * MiB, 32 * MiB], names=["embed", "head"])
    one, two = CostTable(prof, 1), CostTable(prof, 1, tp=2, tp_link=FAST)
    assert two.fwd == pytest.approx(one.fwd / 2)
    assert two.bwd == pytest.approx(one.bwd / 2)
    assert two.params == pytest.approx([32 * MiB, 16 * MiB])


def test_a_norm_and_a_parameter_free_layer_are_replicated():
    # a norm's 16 KiB is under 1% of the block's 64 MiB: tensor parallelism leaves it whole
    prof = chain_profile([1e-3, 1e-3, 1e-3], param_bytes=[64 * MiB, 16 * 1024, 0], names=["mlp", "norm", "act"])
    two = CostTable(prof, 1, tp=2, tp_link=FAST)
    assert list(two.fwd) == pytest.approx([0.5e-3, 1e-3, 1e-3])
    assert list(two.params) == [32 * MiB, 16 * 1024, 0]


def test_a_block_all_reduces_its_activation_twice_each_way():
    # blocks layers.0..3 of 1 ms forward, inputs of 1 MiB (layer 0 reads the 8-byte batch);
    # ring all-reduce over 4 devices at 1 GB/s: 2 * 3/4 * 1 MiB / 1e9 = 1.572864 ms, twice
    prof = chain_profile([1e-3] * 4, param_bytes=64 * MiB, out_bytes_per_sample=MiB)
    t = CostTable(prof, 1, tp=4, tp_link=GBS)
    ar = 2 * 3 / 4 * MiB / 1e9
    assert t.fwd[1] == pytest.approx(1e-3 / 4 + 2 * ar)
    assert t.bwd[1] == pytest.approx(2e-3 / 4 + 2 * ar)
    assert t.bwd_input[1] == pytest.approx(1e-3 / 4 + 2 * ar)  # the input gradient is all-reduced
    assert t.bwd_weight[1] == pytest.approx(1e-3 / 4)
    assert t.fwd[0] == pytest.approx(1e-3 / 4 + 2 * 2 * 3 / 4 * 8 / 1e9)  # its input is the batch


def test_activations_at_tp_with_and_without_sequence_parallelism():
    # a block saving 34 MiB with 1 MiB (float32) inputs: without sequence parallelism three inputs
    # (3 MiB: the block's own, the first norm's, crosses from the layer before) and two one-byte
    # masks (2 x 0.25 MiB) stay whole, the rest is halved: 3.5 + 30.5 / 2 = 18.75 MiB; with it
    # the all-gathered inputs of the QKV and the first MLP matmul, which torch's ColwiseParallel
    # saves whole, stay whole (2 MiB) and the rest is halved: 2 + 32 / 2 = 18 MiB; the
    # inter-layer tensors are halved
    prof = chain_profile([1e-3] * 3, param_bytes=64 * MiB, act_bytes=34 * MiB, out_bytes_per_sample=MiB)
    plain = CostTable(prof, 1, tp=2, tp_link=FAST)
    sp = CostTable(prof, 1, tp=2, tp_link=FAST, sequence_parallel=True)
    assert plain.act[1] == pytest.approx(18.75 * MiB)
    assert sp.act[1] == pytest.approx(18 * MiB)
    assert sp.cut[1] == plain.cut[1] / 2 == MiB / 2


def test_an_embeddings_backward_holds_its_whole_table_gradient_at_tp():
    # a 64 MiB embedding before two blocks, each layer's backward workspace 8 MiB at tp 1: a
    # block's halves at tp 2, the embedding's keeps its own 8 MiB (its output's gradient arrives
    # whole) plus its tables' gradients made whole (64 MiB: the profile does not say which table
    # is the largest, so all of them); with sequence parallelism a block's also holds the flat
    # buffer of its input's all-gather (1 KiB)
    prof = chain_profile([1e-3] * 3, param_bytes=64 * MiB, names=["emb", "h.0", "h.1"])
    layers = [layer.model_copy(update={
        "by_mbs": {k: c.model_copy(update={"peak_bytes": 8 * MiB}) for k, c in layer.by_mbs.items()}})
        for layer in prof.layers]
    prof = prof.model_copy(update={"layers": layers})
    for sp in (False, True):
        t = CostTable(prof, 1, tp=2, tp_link=FAST, sequence_parallel=sp)
        assert list(t.peak) == pytest.approx([72 * MiB] + [4 * MiB + (1024 if sp else 0)] * 2)
        assert list(t.grad_extra) == [32 * MiB, 0, 0]  # the embedding's gradient, whole beside its shard
    assert list(CostTable(prof, 1).peak) == pytest.approx([8 * MiB] * 3)


def test_the_output_layers_gathered_logits_buffer_is_priced_beside_its_transient():
    # two blocks and a head whose logits are 8 MiB a sample: at tp 2 the logits are all-gathered
    # for the loss, and the collective's flat 8 MiB buffer may outlive the copy out of it (as
    # ZeRO 3's gather), so it is priced beside the head's (and the loss's) transient
    prof = chain_profile([1e-3] * 3, param_bytes=64 * MiB, out_bytes_per_sample=[MiB, MiB, 8 * MiB],
                         names=["h.0", "h.1", "head"])
    one = CostTable(prof, 1)
    for sp in (False, True):
        t = CostTable(prof, 1, tp=2, tp_link=FAST, sequence_parallel=sp)
        assert t.gather_flat[2] == 8 * MiB
        assert t.peak[2] == pytest.approx(one.peak[2] / 2 + 8 * MiB)
    assert not one.gather_flat.any()


def test_zero_stages_as_the_pipeline_engine_holds_them():
    # mixed-precision Adam in bf16: 2 + 2 + 12 bytes per parameter, 8 per parameter byte; over 4
    # replicas stage 1 shards the 12; stages 2 and 3 keep gathered weights and whole gradients
    # through the step beside their shards: (2 + 2) * (1 + 1/4) + 12/4 = 8 bytes a parameter
    mixed = Training(precision="mixed")
    factors = [DataParallel(4, z).state_factor(mixed, "bfloat16") for z in range(4)]
    assert factors == [16 / 2, (2 + 2 + 3) / 2, (5 + 3) / 2, (5 + 3) / 2]
    assert DataParallel(1, 3).state_factor(mixed, "bfloat16") == 8  # one replica: nothing to shard


def test_zero_traffic_is_one_allreduce_a_step_and_a_gather_after_every_forward_at_stage_3():
    # all-reduce of B bytes: a * B + c. Stages 0-2: one all-reduce's volume a step (stage 2: the
    # reduce-scatter after the last backward and the gather opening the next step); stage 3 also
    # gathers after every forward, half an all-reduce each
    a, c, nbytes = 1e-9, 1e-5, 1e9
    allreduce = a * nbytes + c
    for z in range(4):
        assert DataParallel(4, z, a, c).step_s(nbytes) == pytest.approx(allreduce), z
    assert DataParallel(4, 2, a, c).per_microbatch(nbytes) == (0.0, 0.0, 0.0)
    assert DataParallel(4, 3, a, c).per_microbatch(nbytes) == (pytest.approx(allreduce / 2), 0.0, 0.0)
    assert DataParallel(1, 3, a, c).per_microbatch(nbytes) == (0.0, 0.0, 0.0)
    assert DataParallel(4, 1, a, c).optimizer_share() == 0.25


def _zero_costs(zero: int, m: int = 4):
    prof = chain_profile([1e-3] * 2, param_bytes=[4 * GiB, 2 * GiB], act_bytes=[MiB, MiB])
    t = CostTable(prof, 1)
    cluster = from_spec("h100x4")
    dp = rank_devices(cluster, 1, 4)[0].data_parallel(cluster, zero)
    return t, dp, t.stage_cost(Segment(0, 2), m, Training(), data_parallel=dp)


def test_a_stage_under_zero_2_and_3_holds_its_weights_and_gradients_whole_beside_their_shards():
    t, _, cost = _zero_costs(3)
    # float32 Adam, 6 GiB of weights over 4 replicas: weights and gradients 6 + 6 whole and
    # 1.5 + 1.5 sharded, Adam's 12 GiB of state as 3; plus the receive buffers
    assert cost.static_bytes == (6 + 6 + 1.5 + 1.5 + 3) * GiB + t.buffer_bytes(Segment(0, 2), 4)
    assert _zero_costs(2)[2].static_bytes == cost.static_bytes
    # stage 3's gather buffer (6 GiB) with micro-batches in flight, above a layer's workspace
    assert cost.transient_bytes == 6 * GiB + t.workspace
    assert _zero_costs(2)[2].transient_bytes == _zero_costs(1)[2].transient_bytes < 6 * GiB


def test_zero_2_and_3_cost_at_least_what_zero_1_costs_in_every_term():
    one, two, three = (_zero_costs(z)[2] for z in (1, 2, 3))
    gather = _zero_costs(3)[1].per_microbatch(6 * GiB)[0]
    assert gather > 0
    # time: stage 2 is stage 1's, stage 3 adds its gather to every forward
    for f in ("bwd_input_s", "bwd_weight_s", "bwd_s", "optimizer_s", "allreduce_s"):
        assert getattr(one, f) == getattr(two, f) == getattr(three, f), f
    assert one.fwd_s == two.fwd_s == pytest.approx(three.fwd_s - gather)
    # memory: (w + g) / n more than stage 1, (6 + 6) GiB / 4 (both shard evenly)
    assert two.static_bytes - one.static_bytes == 3 * GiB
    for f in ("act_bytes", "wgrad_bytes", "grad_in_bytes", "transient_bytes", "optimizer_transient_bytes"):
        assert getattr(one, f) <= getattr(two, f) <= getattr(three, f), f


def test_the_free_search_tries_zero_1_only_and_still_prices_a_pinned_zero_2_or_3():
    prof = chain_profile([1e-3] * 4, param_bytes=[GiB] * 4)
    cluster = from_spec("h100x4")
    base = {"global_batch": 8, "pp": 2, "dp": 2, "schedules": ("1f1b",), "time_limit_s": 10}
    free = solve(prof, cluster, Settings(**base))
    assert {c.config.zero for c in free.ranked} == {1}
    pinned = {z: solve(prof, cluster, Settings(**base, zero=z)).best.evaluation for z in (1, 2, 3)}
    assert pinned[1].config == free.best.config
    assert pinned[1].step_time_s == pinned[2].step_time_s < pinned[3].step_time_s
    peaks = [max(pinned[z].peak_memory_bytes) for z in (1, 2, 3)]
    assert peaks[0] < peaks[1] <= peaks[2]


def test_tensor_parallel_groups_stay_in_a_node_unless_pinned_across():
    two = from_spec("2xh100x8")
    assert tp_link(two, 8, 16) is two.intra_node
    assert tp_link(two, 16, 16) is two.inter_node
    ranks = rank_devices(two, 2, 2, 4)  # rank r, replica d, shard k on (r * 2 + d) * 4 + k
    assert [r.devices for r in ranks] == [[0, 4], [8, 12]]


# ------------------------------------------------------------------------- bounds, search


def _instance(d):
    rng = np.random.default_rng(d["seed"])
    n = d["n"]
    prof = chain_profile(list(rng.uniform(0.2, 3.0, n) * 1e-3), list(rng.uniform(0.2, 6.0, n) * 1e-3),
                         act_bytes=[int(x) for x in rng.integers(1, 6, n) * 2**28],
                         param_bytes=[int(x) for x in rng.integers(1, 6, n) * 2**28],
                         out_bytes_per_sample=2**24, tied=[([0, n - 1], 2**26)] if d["tied"] else [],
                         bwd_input_fraction=float(rng.uniform(0.3, 0.7)),
                         names=["emb", *(f"h.{i}" for i in range(n - 1))])  # an embedding before blocks
    name, v = d["schedule"]
    pp = 2 if v == 2 else d["pp"]
    m = max(pp, d["m"] - d["m"] % pp) if name == "interleaved-1f1b" else d["m"]
    if pp * v > n:
        return None
    cfg = Config(pp=pp, dp=d["dp"], mbs=1, m=m, schedule=name, v=v, tp=d["tp"], zero=d["zero"],
                 sp=d["sp"] and d["tp"] > 1)
    cluster = _with_speeds(from_spec("2xh100x8", memory_bytes=d["memory"] * GiB), d["speeds"], cfg.dp * cfg.tp)
    table = CostTable(prof, 1, tp=cfg.tp, tp_link=tp_link(cluster, cfg.tp, 16), sequence_parallel=cfg.sp)
    ranks = rank_devices(cluster, cfg.pp, cfg.dp, cfg.tp)
    b = StageBounds(table, cluster, cfg, build(name, pp, cfg.m, v), ranks, Policy("auto"))

    def run(segments):
        ev = evaluate(table, cluster, cfg, segments, detail=False, ranks=ranks)
        return ev.step_time_s, ev.fits, ev
    return b, run, prof, cluster, cfg


def _with_speeds(cluster, speeds, per_rank):
    """Pipeline rank r's devices at relative speed speeds[r % 2] (devices of two kinds)."""
    devices = [dev.model_copy(update={"speed": speeds[(k // per_rank) % 2]}) for k, dev in enumerate(cluster.devices)]
    per_node = len(cluster.nodes[0].devices)
    nodes = [node.model_copy(update={"devices": devices[i * per_node:(i + 1) * per_node]})
             for i, node in enumerate(cluster.nodes)]
    return cluster.model_copy(update={"nodes": nodes})


SHARDED = st.fixed_dictionaries({
    "n": st.integers(3, 6), "seed": st.integers(0, 10**6),
    "schedule": st.sampled_from([("1f1b", 1), ("gpipe", 1), ("zb-h1", 1), ("interleaved-1f1b", 2), ("zb-v", 2)]),
    "pp": st.integers(1, 3), "m": st.sampled_from([1, 2, 4]), "dp": st.sampled_from([1, 2]),
    "tp": st.sampled_from([1, 2]), "zero": st.sampled_from([0, 1, 2, 3]), "sp": st.booleans(),
    "memory": st.sampled_from([6, 12, 40]), "tied": st.booleans(),
    "speeds": st.sampled_from([(1.0, 1.0), (0.25, 1.0), (2.0, 0.5), (3.0, 4.0)]),
})


@given(SHARDED)
@settings(max_examples=80, deadline=None)
def test_stage_bounds_with_tp_and_zero_never_exceed_the_simulation(d):
    inst = _instance(d)
    assume(inst is not None)  # an instance the drawn sizes cannot build
    b, run, *_ = inst
    for starts in all_partitions(b.n, b.S):
        segs = segments_from_bounds(starts, b.n)
        step, _, _ = run(segs)
        ends = [*starts[1:], b.n]
        bound = max(float(b.bound(s, np.array([i]), np.array([j]), 0)[0])
                    for s, (i, j) in enumerate(zip(starts, ends, strict=True)))
        assert bound <= step * (1 + 1e-9)


@given(SHARDED)
@settings(max_examples=60, deadline=None)
def test_the_configuration_bound_with_tp_and_zero_never_exceeds_the_simulation(d):
    inst = _instance(d)
    assume(inst is not None)  # an instance the drawn sizes cannot build
    _, run, prof, cluster, cfg = inst
    search = Search(prof, cluster, Settings())
    floor = search.quick_bound(cfg)
    for starts in all_partitions(len(prof.layers), cfg.n_stages):
        step, _, _ = run(segments_from_bounds(starts, len(prof.layers)))
        assert floor <= step * (1 + 1e-9)


@given(SHARDED)
@settings(max_examples=80, deadline=None)
def test_the_exact_solver_with_tp_and_zero_matches_brute_force(d):
    inst = _instance(d)
    assume(inst is not None)  # an instance the drawn sizes cannot build
    b, run, *_ = inst
    expected, _ = brute_force(b, run)
    got = solve_inner(b, run, budget=10**6, nodes=10**7)
    assert got.proven
    if np.isfinite(expected):
        assert got.step_time_s == pytest.approx(expected, rel=1e-12)
    else:
        assert got.segments is None


@given(SHARDED)
@settings(max_examples=60, deadline=None)
def test_stage_memory_of_the_bounds_is_the_simulated_peak_with_one_stage_per_rank(d):
    # StageBounds.memory is exact for one stage per rank (ZeRO 1's fullest replica included),
    # which the fit checks and the memory objective rely on
    inst = _instance(d)
    assume(inst is not None and d["schedule"][1] == 1)
    b, run, *_ = inst
    for starts in all_partitions(b.n, b.S):
        _, _, ev = run(segments_from_bounds(starts, b.n))
        ends = [*starts[1:], b.n]
        for s, (i, j) in enumerate(zip(starts, ends, strict=True)):
            need = float(b.memory(s, np.array([i]), np.array([j]), 0)[0])
            assert need == pytest.approx(ev.peak_memory_bytes[s], abs=8), (s, i, j)


@given(SHARDED)
@settings(max_examples=40, deadline=None)
def test_the_memory_aware_bound_with_tp_and_two_device_speeds_never_exceeds_a_plan_that_fits(d):
    from planner.solve.fluid import fluid_bound

    inst = _instance(d)
    assume(inst is not None)  # an instance the drawn sizes cannot build
    b, run, *_ = inst
    bound = fluid_bound(b)
    for starts in all_partitions(b.n, b.S):
        for recompute in ("none", "full"):
            step, fits, _ = run(segments_from_bounds(starts, b.n, recompute))
            if fits:
                assert bound <= step * (1 + 1e-9)


@given(SHARDED)
@settings(max_examples=25, deadline=None)
def test_the_ilp_minimises_the_dps_bound_with_tp_and_two_device_speeds(d):
    from planner.solve.exact import lb_partition
    from planner.solve.ilp import ilp_partition

    inst = _instance(d)
    assume(inst is not None and d["schedule"][1] == 1)
    b = inst[0]
    lb, stages = lb_partition(b)
    sol = ilp_partition(b, "auto")
    if stages is None:
        assert sol.segments is None
    else:
        assert sol.status == "Optimal" and sol.gap == 0
        if d["zero"] == 3 and d["dp"] > 1:  # the program leaves out ZeRO 3's gathers: a lower bound
            assert sol.objective <= lb * (1 + 1e-6)
        else:
            assert sol.objective == pytest.approx(lb, rel=1e-6, abs=1e-9)


def test_the_free_search_is_the_best_of_every_pinned_tp_and_zero():
    # 6 layers whose weights and Adam state (6 x 2 GiB x 4) need sharding on 4 devices of 20 GiB
    prof = chain_profile([1e-3, 2e-3, 1e-3, 3e-3, 1e-3, 2e-3], param_bytes=2 * GiB, act_bytes=256 * MiB,
                         out_bytes_per_sample=4 * MiB)
    cluster = from_spec("h100x4", memory_bytes=20 * GiB)
    base = {"global_batch": 8, "schedules": ("1f1b", "gpipe"), "time_limit_s": 60.0}
    free = solve(prof, cluster, Settings(**base))
    assert free.proven
    pinned = []
    for tp in (1, 2, 4):
        for zero in (0, 1, 2, 3):
            try:
                r = solve(prof, cluster, Settings(**base, tp=tp, zero=zero))
            except InfeasibleError:
                continue
            assert r.proven
            pinned.append(r.best.inner.step_time_s)
    assert free.best.inner.step_time_s == pytest.approx(min(pinned), rel=1e-12)
    assert free.best.config.tp > 1 or free.best.config.zero > 0  # sharding is what makes it fit fast


# ------------------------------------------------------------------------- exports, report


def _plan(tp: int, zero: int, sp: bool, dp: int = 2):
    prof = chain_profile([1e-3] * 4, param_bytes=64 * MiB, names=["emb", "h.0", "h.1", "head"])
    cluster = from_spec("h100x8")
    cfg = Config(pp=2, dp=dp, mbs=1, m=4, schedule="1f1b", tp=tp, zero=zero, sp=sp)
    table = CostTable(prof, 1, tp=tp, tp_link=tp_link(cluster, tp, 8), sequence_parallel=sp)
    return to_plan(prof, cluster, evaluate(table, cluster, cfg, segments_from_bounds([0, 2], 4)))


def test_exports_carry_tp_and_zero():
    plan = _plan(tp=2, zero=1, sp=True)
    assert [st.devices for st in plan.stages] == [[0, 2], [4, 6]]
    megatron = export(plan, "megatron")
    assert "--tensor-model-parallel-size 2" in megatron and "--sequence-parallel" in megatron
    assert "--use-distributed-optimizer" in megatron
    assert json.loads(export(plan, "deepspeed"))["zero_optimization"] == {"stage": 1}
    titan = json.loads(export(plan, "torchtitan"))
    assert (titan["tensor_parallel_degree"], titan["data_parallel_shard_degree"],
            titan["data_parallel_replicate_degree"]) == (2, 2, 1)
    # FSDP2 is ZeRO 3, which planner prices above ZeRO 1 and 2: the note sends the reader to --zero 3
    assert "torchtitan shards with FSDP2, which is ZeRO 3" in titan["note_zero"]
    assert "holds more memory than this plan predicts; re-solve with --zero 3" in titan["note_zero"]
    peak = {z: _plan(tp=2, zero=z, sp=True).predicted.peak_memory_bytes for z in (1, 2, 3)}
    assert peak[3] > peak[2] > peak[1]
    assert "ZeRO 2" in json.loads(export(_plan(tp=2, zero=2, sp=True), "torchtitan"))["note_zero"]
    assert "note_zero" not in json.loads(export(_plan(tp=2, zero=3, sp=True), "torchtitan"))
    plain = _plan(tp=1, zero=0, sp=False)
    assert "--tensor-model-parallel-size" not in export(plain, "megatron")
    assert "--use-distributed-optimizer" not in export(plain, "megatron")
    titan = json.loads(export(plain, "torchtitan"))
    assert (titan["data_parallel_shard_degree"], titan["data_parallel_replicate_degree"]) == (1, 2)
    torch_split = json.loads(export(plan, "torch"))  # pipeline() splits; the degrees inside a stage come beside
    assert (torch_split["tensor_parallel_degree"], torch_split["zero_stage"], torch_split["sequence_parallel"]) == \
        (2, 1, True)
    assert "DeviceMesh of (pp 2, dp 2, tp 2)" in torch_split["note_sharding"]
    assert "evenly over the dp axis" in torch_split["note_sharding"]


def test_deepspeed_export_says_it_runs_its_own_1f1b():
    prof = chain_profile([1e-3] * 4, param_bytes=64 * MiB, names=["emb", "h.0", "h.1", "head"])
    cluster = from_spec("h100x8")
    plans = {}
    for name in ("1f1b", "zb-h1"):
        cfg = Config(pp=2, dp=1, mbs=1, m=4, schedule=name)
        ev = evaluate(CostTable(prof, 1), cluster, cfg, segments_from_bounds([0, 2], 4))
        plans[name] = to_plan(prof, cluster, ev)
    assert "note_schedule" not in json.loads(export(plans["1f1b"], "deepspeed"))
    assert "schedule is zb-h1" in json.loads(export(plans["zb-h1"], "deepspeed"))["note_schedule"]


def test_simulate_and_check_show_tp_and_zero(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(to_json(_plan(tp=2, zero=3, sp=True)))
    r = runner.invoke(app, ["simulate", str(path)])
    assert r.exit_code == 0, r.output
    assert "pp=2 dp=2 tp=2 (sequence parallel) zero=3" in " ".join(r.output.split())
    r = runner.invoke(app, ["check", str(path)])
    assert r.exit_code == 0 and "pp=2 dp=2 tp=2 sp zero=3 1f1b" in r.output, r.output


def test_a_plan_without_tp_and_zero_loads_as_tp_1_zero_0():
    data = json.loads(open("plans/gpt.cpu2-pp2.json").read())
    data["parallel"] = {"pp": data["parallel"]["pp"], "dp": data["parallel"]["dp"]}  # as plans were written before
    from planner.formats import Plan, parse

    plan = parse(data, Plan, "plan")
    assert (plan.parallel.tp, plan.parallel.zero, plan.parallel.sequence_parallel) == (1, 0, False)


# ----------------------------------------------------------------------- Llama-2-70B-shaped

H, FFN, VOCAB, SEQ, KV = 8192, 28672, 32000, 4096, 1024  # K and V: 8 of 64 heads of 128
PEAK_BF16 = 989.5e12  # H100 SXM dense bf16 (planner.clusters)


def llama2_70b():
    """80 blocks (GQA attention, SwiGLU MLP), embedding and output layer, bf16, sequence 4096,
    micro-batch 1; times at the H100's bf16 peak, activations 34sbh per block (Korthikanti et
    al., 2022, with flash attention: no s^2 term)."""
    block = 2 * H * H + 2 * H * KV + 3 * H * FFN + 2 * H  # q, o; k, v; gate, up, down; two norms
    block_flops = 2 * block * SEQ + 4 * SEQ * SEQ * H  # matmuls over SEQ tokens; scores and context
    fwd = [SEQ * H * 2 / 3.35e12] + [block_flops / PEAK_BF16] * 80 + [2 * VOCAB * H * SEQ / PEAK_BF16]
    act = [SEQ * H * 2] + [34 * SEQ * H] * 80 + [SEQ * H * 2 + SEQ * VOCAB * 4]
    params = [2 * VOCAB * H] + [2 * block] * 80 + [2 * (VOCAB * H + H)]
    return chain_profile(fwd, act_bytes=act, param_bytes=params, out_bytes_per_sample=SEQ * H * 2,
                         dtype="bfloat16", names=["embed"] + [f"layers.{i}" for i in range(80)] + ["head"],
                         name="llama-2-70b-shaped")


MIXED = Training(precision="mixed")


def test_llama_70b_on_8_h100s_exits_3_with_both_totals(tmp_path):
    prof = tmp_path / "llama.json"
    prof.write_text(to_json(llama2_70b()))
    r = runner.invoke(app, ["solve", str(prof), "--cluster", "h100x8", "--precision", "mixed"])
    assert r.exit_code == 3
    line = " ".join(r.output.split())
    # 68.98e9 parameters x 16 bytes; 8 x (81,559 MiB - 1 GiB reserved)
    assert ("nothing fits on h100x8 in all: 68.98 B parameters x 16 bytes (adam, mixed precision: weights, "
            "gradients and optimizer state) need 1.10 TB, the cluster's 8 devices have 0.68 TB usable in all") in line
    assert len(r.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_llama_70b_on_64_h100s_all_free_beats_tp_1_and_megatrons_choice():
    prof, cluster = llama2_70b(), from_spec("8xh100x8")
    common = {"global_batch": 64, "training": MIXED, "time_limit_s": 15.0}
    megatron = solve(prof, cluster, Settings(**common, tp=8, pp=2, dp=4, zero=1))
    assert megatron.best.evaluation.fits
    unsharded = solve(prof, cluster, Settings(**common, tp=1, zero=0))
    free = solve(prof, cluster, Settings(**common))
    best = free.best.inner.step_time_s
    assert best <= megatron.best.inner.step_time_s
    assert best <= unsharded.best.inner.step_time_s
    usual = [b for b in free.baselines if b.name.startswith("Megatron-LM's usual")]
    assert len(usual) == 1 and usual[0].evaluation.config.tp == 8  # priced beside the winner


def test_tensor_parallel_collectives_do_not_speed_up_with_the_device():
    # two blocks of 4 ms forward, 8 ms backward, at tp 2 on a link of 1 ms latency and no
    # bandwidth cost: a ring all-reduce over 2 is 2 latencies, 2 ms, and a block runs two per pass
    # (4 ms). At speed 1 a block's forward is 4 / 2 + 4 = 6 ms; on a device twice as fast its
    # compute halves and its collectives do not: 4 / 2 / 2 + 4 = 5 ms, the stage's 10 ms, not 6
    prof = chain_profile([4e-3, 4e-3], [8e-3, 8e-3], param_bytes=1000)
    link = Link(bandwidth_bytes_per_s=1e30, latency_s=1e-3)
    t = CostTable(prof, 1, tp=2, tp_link=link)
    seg = Segment(0, 2)
    f1, bi1, bw1, b1 = t.times(seg, 1.0)
    f2, bi2, bw2, b2 = t.times(seg, 2.0)
    assert (f1, b1) == pytest.approx((12e-3, 16e-3))  # 2 x (4/2 + 4), 2 x (8/2 + 4)
    assert (f2, b2) == pytest.approx((10e-3, 12e-3))  # 2 x (4/4 + 4), 2 x (8/4 + 4)
    assert bw2 == pytest.approx(bw1 / 2)  # the weight gradient has no collective
    assert t.tp_comm_times(seg) == pytest.approx((8e-3, 8e-3))
    cost = t.stage_cost(seg, 1, Training(), speed=2.0)
    assert (cost.fwd_s, cost.tp_comm.fwd_s) == pytest.approx((10e-3, 8e-3))
    # the solver's windows read the same: F at speed 2 over [0, 2)
    assert t.prefix_at("F", 2.0)[2] - t.prefix_at("F", 2.0)[0] == pytest.approx(f2)


def test_zero_3_prices_its_gather_buffer_beside_the_next_actions_workspace():
    # 6 GiB of weights over dp 4, a layer whose backward needs 1 GiB of workspace: the flat
    # all-gather output (6 GiB) may still be held by the collective's work while that layer runs
    # (DataParallel.gather_buffer), so the stage's transient is 1 + 6 GiB, not max(1, 6)
    prof = chain_profile([1e-3] * 2, param_bytes=[4 * GiB, 2 * GiB], act_bytes=[MiB, MiB])
    costs = {k: c.model_copy(update={"peak_bytes": GiB}) for k, c in prof.layers[0].by_mbs.items()}
    prof = prof.model_copy(update={"layers": [prof.layers[0].model_copy(update={"by_mbs": costs}), prof.layers[1]]})
    t = CostTable(prof, 1)
    dp = rank_devices(from_spec("h100x4"), 1, 4)[0].data_parallel(from_spec("h100x4"), 3)
    cost = t.stage_cost(Segment(0, 2), 4, Training(), data_parallel=dp)
    assert cost.transient_bytes == GiB + 6 * GiB + t.cut[0] + t.workspace


@given(st.lists(st.integers(1, 16) | st.integers(1, 10**6), min_size=2, max_size=5), st.integers(2, 8),
       st.sampled_from(["cpu", "cuda"]),
       st.sampled_from(["adam", "sgd-momentum"]), st.integers(0, 10**6))
@settings(max_examples=60, deadline=None)
def test_zero_1_is_never_slower_nor_fuller_than_zero_2_or_3(elements, dp, device, optimizer, opt_peak):
    # planner.solve.settings.zero_stages: the free search tries stage 1 only, which holds for any
    # stage sizes (the fullest replica's padding included) and either way the optimizer steps
    prof = chain_profile([1e-3] * len(elements), param_bytes=[4 * n for n in elements], act_bytes=[MiB] * len(elements))
    layers = [layer.model_copy(update={"optimizer_peak_bytes": {optimizer: opt_peak}}) for layer in prof.layers]
    prof = prof.model_copy(update={"layers": layers,
                                   "device": prof.device.model_copy(update={"type": device})})
    t = CostTable(prof, 1)
    cluster = from_spec(f"h100x{2 * dp}")
    segs = segments_from_bounds([0, len(elements) // 2], len(elements))
    ev = {z: evaluate(t, cluster, Config(pp=2, dp=dp, mbs=1, m=4, schedule="1f1b", zero=z,
                                         training=Training(optimizer=optimizer)), segs)
          for z in (1, 2, 3)}
    assert ev[1].step_time_s <= ev[2].step_time_s <= ev[3].step_time_s
    for one, two, three in zip(*(ev[z].peak_memory_bytes for z in (1, 2, 3)), strict=True):  # per rank
        assert one <= two <= three
