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


def _zero1_static(largest, dp=2) -> tuple:
    from planner.cost import DataParallel

    prof = chain_profile([1.0, 1.0], param_bytes=[1000, 400])
    if largest is not None:
        layers = [prof.layers[0].model_copy(update={"largest_param_bytes": largest}), *prof.layers[1:]]
        prof = prof.model_copy(update={"layers": layers})
    t = CostTable(prof, 1)
    seg = Segment(0, 2)
    cost = t.stage_cost(seg, 1, Training(optimizer="adam"), data_parallel=DataParallel(dp, 1))
    return cost, cost.static_bytes - t.buffer_bytes(seg, 1)  # weights, gradients, optimizer state


def test_zero_1_prices_the_fullest_replica_of_whole_tensors():
    # float32 Adam: 4 + 4 bytes of weights and gradients, 8 of state per parameter (4 bytes).
    # Evenly over dp 2: 1400 * (4 + 4 + 8 / 2) / 4 = 4200 bytes. Whole tensors, largest first to the
    # emptier replica: the fullest ends at most 1400 / 2 + (1 - 1/2) * 600 = 1000 parameter bytes,
    # so its state is at most 1000 * 8 / 4 = 2000 bytes, not 1400: 600 more
    assert _zero1_static(largest=600)[1] == 4200 + 600
    # a profile that did not record its tensors: the layer's 1000 bytes bound its largest, 1000 more
    assert _zero1_static(largest=None)[1] == 4200 + 1000
    # one replica (no sharding): no excess
    assert _zero1_static(largest=600, dp=1)[1] == 1400 * 4


def test_zero_1_optimizer_share_of_the_fullest_replica():
    from planner.cost import DataParallel

    dp = DataParallel(4, 1)
    assert dp.optimizer_share() == 0.25  # the least it is: the solver's bounds
    assert dp.optimizer_share(1000, 100) == pytest.approx(0.25 + 0.75 * 0.1)
    assert dp.optimizer_share(1000, 1000) == 1.0  # one tensor: one replica steps it all
    assert DataParallel(4, 2).optimizer_share(1000, 1000) == 0.25  # FSDP shards every tensor
