import pytest

from planner.clusters import from_spec
from planner.cost import CostTable, Segment, bytes_per_param, p2p_time, ring_allreduce_time
from planner.formats import Link, Training
from planner.graph import LayerGraph
from planner.synthetic import chain_profile


def test_bytes_per_parameter():
    assert bytes_per_param(Training(optimizer="adam"), "float32") == 16  # w, g, m, v
    assert bytes_per_param(Training(optimizer="sgd"), "float32") == 8
    assert bytes_per_param(Training(optimizer="sgd-momentum"), "float32") == 12
    # ZeRO section 3.1: 2 + 2 + 12 bytes for mixed-precision Adam
    assert bytes_per_param(Training(optimizer="adam", precision="mixed"), "bfloat16") == 16


def test_transfer_formulas():
    link = Link(bandwidth_bytes_per_s=1e9, latency_s=1e-5)
    assert p2p_time(1e6, link) == pytest.approx(1e-5 + 1e-3)
    # ring: 2 (n-1)/n bytes / bw + 2 (n-1) latency; n = 4 -> 1.5 ms + 60 us
    assert ring_allreduce_time(1e6, 4, link) == pytest.approx(1.5e-3 + 6e-5)
    assert ring_allreduce_time(1e6, 1, link) == 0.0


def test_skip_connection_counts_in_every_cut_it_spans():
    prof = chain_profile([1.0] * 12, out_bytes_per_sample=100, skips=[(2, 9, 7)])
    cuts = LayerGraph(prof).cut_bytes_per_sample()
    for k in range(1, 12):
        assert cuts[k] == 100 + (7 if 3 <= k <= 9 else 0), k
    assert cuts[0] == cuts[12] == 0


def test_tensors_of_a_skip_connection():
    g = LayerGraph(chain_profile([1.0] * 12, out_bytes_per_sample=100, skips=[(2, 9, 7)]))
    from_2 = {t.index: t for t in g.tensors if t.producer == 2}
    assert (from_2[1].bytes_per_sample, from_2[1].consumers) == (7, (9,))  # the skip
    assert (from_2[0].bytes_per_sample, from_2[0].consumers) == (100, (3,))  # the chain
    assert sum(9 in t.consumers for t in g.tensors) == 2  # layer 9 reads two tensors


def test_stage_times_and_recomputation():
    prof = chain_profile([1.0, 2.0, 3.0], bwd_input_fraction=0.5)
    t = CostTable(prof, 1)
    assert t.times(Segment(0, 2)) == pytest.approx((3.0, 3.0, 3.0, 6.0))  # bwd = 2 x fwd, split in half
    # the forward runs again before the backward
    assert t.times(Segment(0, 2, "full")) == pytest.approx((3.0, 6.0, 3.0, 9.0))
    assert t.times(Segment(1, 3), speed=2.0) == pytest.approx((2.5, 2.5, 2.5, 5.0))


def test_held_bytes_chain():
    # layers save 10 bytes each; outputs of 100 bytes are held only where they leave the stage
    prof = chain_profile([1.0] * 4, act_bytes=10, out_bytes_per_sample=100)
    t = CostTable(prof, 1)
    assert t.held_bytes(Segment(0, 2)) == 20 + 100  # two layers' saves + the output sent on
    assert t.held_bytes(Segment(0, 4)) == 40 + 100  # the last output goes to the loss
    assert t.held_bytes(Segment(0, 2, "full")) == 200  # checkpoints: every output made


def test_static_memory_of_a_stage():
    prof = chain_profile([1.0] * 2, param_bytes=1000, tied=[([0, 1], 1000)])
    t = CostTable(prof, 1)
    c = t.stage_cost(Segment(0, 2), m=2, training=Training(optimizer="adam"))
    assert c.param_bytes == 1000  # the tied copy counted once on one stage
    assert c.static_bytes == 4 * 1000  # weights, gradients, two Adam states
    assert t.tied_split([0, 1]) == [([0, 1], 1000)]


def test_cluster_presets():
    c = from_spec("2xh100x8")
    assert len(c.devices) == 16 and len(c.nodes) == 2 and c.inter_node is not None
    mixed = from_spec("a100-80gbx4+a100-40gbx4")
    assert [d.memory_bytes for d in mixed.devices][3:5] == [81920 * 2**20, 40960 * 2**20]
    assert len(from_spec("cpu2").devices) == 2


def _zero_static(dp: int, zero: int = 1) -> int:
    from planner.cost import DataParallel

    prof = chain_profile([1.0, 1.0], param_bytes=[1000, 400])
    t = CostTable(prof, 1)
    seg = Segment(0, 2)
    cost = t.stage_cost(seg, 1, Training(optimizer="adam"), data_parallel=DataParallel(dp, zero))
    return cost.static_bytes - t.buffer_bytes(seg, 1)  # weights, gradients, optimizer state


def test_zero_1_prices_the_fullest_replicas_whole_elements():
    # float32 Adam: 4 + 4 bytes of weights and gradients, 8 of state per element. 1400 bytes are
    # 350 elements: over 2 replicas 175 each, (4 + 4) * 350 + 8 * 175 = 4200 bytes
    assert _zero_static(dp=2) == 4200
    # over 3, ranges of ceil(350 / 3) = 117 elements (the last 116): 2800 + 8 * 117 = 3736, 8/3
    # bytes above an even share (planner.execute.train.flat_ranges)
    assert _zero_static(dp=3) == 2800 + 8 * 117
    # FSDP's first replica holds at least as many whole elements: stage 2 adds the same, beside
    # its (w + g) / dp
    assert _zero_static(dp=3, zero=2) == 2800 + 8 * 117 + round(2800 / 3)
    assert _zero_static(dp=1) == 1400 * 4  # one replica: no sharding


def test_zero_optimizer_share_is_even_from_stage_1_on():
    from planner.cost import DataParallel

    assert DataParallel(4, 1).optimizer_share() == DataParallel(4, 2).optimizer_share() == 0.25
    assert DataParallel(4, 0).optimizer_share() == DataParallel(1, 1).optimizer_share() == 1.0
