"""What `planner simulate` and the timeline show of tensor parallelism and ZeRO: the collectives'
seconds each stage records, checked against the ring formula by hand, the columns and notes of the
table, the devices of each pipeline rank by (dp, tp) coordinates, and the tails of the timeline's
boxes."""

import json

import pytest
from typer.testing import CliRunner

from planner.check import price_on
from planner.cli import app
from planner.clusters import from_spec
from planner.cost import CostTable
from planner.evaluate import Config, evaluate, segments_from_bounds, tp_link
from planner.formats import Collectives, Link, load_plan, load_profile, to_json
from planner.plan import plan_schedule, replay_plan, to_plan
from planner.report import device_ranges
from planner.synthetic import chain_profile
from planner.timeline import MIN_TAIL_PX, TP_LEGEND, ZERO_LEGEND, layout
from planner.units import fmt_time, layer_span

MiB = 2**20
runner = CliRunner()

# h100x8's NVLink: 450 GB/s, 10 us. A ring all-reduce over tp 2 of B bytes takes
# 2 (2-1)/2 B / 450e9 + 2 (2-1) 10 us = B / 450e9 + 20 us.
RING_MIB = MiB / 450e9 + 20e-6  # 22.33 us


def _plan(tp=2, zero=1, sp=False, dp=2, link=None):
    """emb, two blocks h.0 and h.1 and a head, each 1 ms forward, 64 MiB of weights and 1 MiB
    outputs, in two stages [emb, h.0] and [h.1, head], 4 micro-batches of 1 on h100x8."""
    prof = chain_profile([1e-3] * 4, param_bytes=64 * MiB, out_bytes_per_sample=MiB,
                         names=["emb", "h.0", "h.1", "head"])
    cluster = from_spec("h100x8")
    cfg = Config(pp=2, dp=dp, mbs=1, m=4, schedule="1f1b", tp=tp, zero=zero, sp=sp)
    table = CostTable(prof, 1, tp=tp, tp_link=link or tp_link(cluster, tp, 8), sequence_parallel=sp)
    return to_plan(prof, cluster, evaluate(table, cluster, cfg, segments_from_bounds([0, 2], 4)))


def test_a_stage_records_its_tp_all_reduces_as_the_ring_formula_prices_them():
    # stage 0: the embedding all-reduces its 1 MiB output once, block h.0 twice: 3 rings each way;
    # stage 1: h.1 twice, the head once (its input gradient): 3 as well
    plan = _plan()
    for st in plan.stages:
        assert st.cost.tp_comm.fwd_s == pytest.approx(3 * RING_MIB)
        assert st.cost.tp_comm.bwd_input_s == pytest.approx(3 * RING_MIB)  # the input gradient's
        assert st.cost.tp_comm.bwd_weight_s == 0
        assert st.cost.zero_comm == Collectives()  # ZeRO-1 collects once a step, not per micro-batch


def test_recording_the_collectives_changes_no_priced_number():
    # the same plan with free communication: every time is less by exactly the recorded seconds
    free = _plan(link=Link(bandwidth_bytes_per_s=1e30, latency_s=0.0))
    for priced, alone in zip(_plan().stages, free.stages, strict=True):
        c, a = priced.cost, alone.cost
        assert c.fwd_s - a.fwd_s == pytest.approx(c.tp_comm.fwd_s, rel=1e-9)
        assert c.bwd_input_s - a.bwd_input_s == pytest.approx(c.tp_comm.bwd_input_s, rel=1e-9)
        assert c.bwd_s - a.bwd_s == pytest.approx(c.tp_comm.bwd_input_s + c.tp_comm.bwd_weight_s, rel=1e-9)
        assert c.bwd_weight_s == a.bwd_weight_s


def test_zero_3_records_the_gather_after_every_forward():
    # as the pipeline engine runs FSDP: ZeRO 3 gathers the stage's weights again after every
    # forward, half a ring all-reduce over dp 2 of its 2 x 64 / 2 MiB shard-sized weights at tp 2:
    # 0.5 * (64 MiB / 450e9 + 20 us); the one reduce-scatter per step is not per micro-batch, and
    # ZeRO 2 gathers only at the step's start
    half = 0.5 * (64 * MiB / 450e9 + 20e-6)
    c = _plan(zero=3).stages[0].cost.zero_comm
    assert (c.fwd_s, c.bwd_input_s, c.bwd_weight_s) == pytest.approx((half, 0, 0))
    c = _plan(zero=2).stages[0].cost.zero_comm
    assert (c.fwd_s, c.bwd_input_s, c.bwd_weight_s) == (0, 0, 0)


def test_the_committed_tp_plan_carries_the_collectives_its_profile_prices():
    plan = load_plan("plans/gpt3-175b.16xh100x8.json")
    ev = price_on(plan, load_profile("profiles/gpt3-175b.h100-estimate.json"))
    assert ev.costs == [st.cost for st in plan.stages]
    assert all(st.cost.tp_comm.fwd_s > 0 for st in plan.stages)


def _simulate(tmp_path, plan, *args):
    path = tmp_path / "plan.json"
    path.write_text(to_json(plan) if not isinstance(plan, str) else plan)
    r = runner.invoke(app, ["simulate", str(path), *args])
    assert r.exit_code == 0, r.output
    return r.output


def test_simulate_shows_tp_comm_per_step_and_each_ranks_devices(tmp_path):
    out = _simulate(tmp_path, _plan())
    text = " ".join(out.split())
    header = next(line for line in out.splitlines() if "stage" in line and "layers" in line)
    assert "TP comm" in header and "devices" in header and "ZeRO comm" not in header
    per_step = fmt_time(4 * 2 * 3 * RING_MIB)  # 4 micro-batches x (forward + input gradient) x 3 rings
    rows = [line for line in out.splitlines() if "emb .. h.0" in line or "h.1 .. head" in line]
    assert len(rows) == 2 and all(per_step in row for row in rows)
    assert "0-3" in rows[0] and "4-7" in rows[1]  # rank r holds dp 2 x tp 2 = 4 devices from 4r
    assert "replica d (dp 0-1) and shard k (tp 0-1) on device 4r + 2d + k" in text
    assert "so the peak shown is each one's" in text
    assert "TP comm, inside compute: an all-reduce of the hidden state twice a block" in text
    assert "over tp 2 within a node (450 GB/s, 10 us)" in text
    assert "reduce-scatters its gradients and all-gathers the updated shards (ZeRO-1) over dp 2" in text


def test_simulate_names_reduce_scatter_and_all_gather_with_sequence_parallelism(tmp_path):
    text = " ".join(_simulate(tmp_path, _plan(sp=True)).split())
    assert "a reduce-scatter + all-gather pair (sequence parallelism) of the hidden state" in text


def test_simulate_shows_zero_comm_at_zero_3(tmp_path):
    out = _simulate(tmp_path, _plan(zero=3))
    assert "ZeRO comm" in out
    half = 0.5 * (64 * MiB / 450e9 + 20e-6)
    assert fmt_time(4 * half) in out  # one gather after each of the 4 forwards
    assert "ZeRO-3 all-gathers the stage's weights again after every forward" in " ".join(out.split())


def test_simulate_shows_no_zero_comm_column_at_zero_2_which_collects_once_a_step(tmp_path):
    plan = _plan(zero=2)
    assert all(st.cost.zero_comm == Collectives() for st in plan.stages)
    out = _simulate(tmp_path, plan)
    text = " ".join(out.split())
    assert "ZeRO comm" not in out and "not recorded" not in text
    assert "reduce-scatters its gradients once and all-gathers its weights at the next step's start (ZeRO-2)" in text


def test_simulate_json_gives_the_device_grid_and_the_comm_seconds(tmp_path):
    data = json.loads(_simulate(tmp_path, _plan(), "--json"))
    assert [st["devices"] for st in data["stages"]] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    assert data["stages"][0]["tp_comm_s"] == pytest.approx(4 * 2 * 3 * RING_MIB)
    assert data["stages"][0]["zero_comm_s"] == 0


def test_a_plan_written_before_the_collectives_were_recorded_says_so(tmp_path):
    data = json.loads(to_json(_plan()))
    for st in data["stages"]:
        del st["cost"]["tp_comm"], st["cost"]["zero_comm"]
    text = " ".join(_simulate(tmp_path, json.dumps(data)).split())
    assert "TP comm: not recorded in this plan" in text and "re-solve to see them" in text
    data = json.loads(to_json(_plan(zero=3)))
    for st in data["stages"]:
        del st["cost"]["zero_comm"]
    text = " ".join(_simulate(tmp_path, json.dumps(data)).split())
    assert "ZeRO comm: not recorded in this plan" in text and "TP comm: not recorded" not in text


def test_device_ranges_and_layer_spans_read_short():
    assert device_ranges([3, 0, 1, 2, 8, 9]) == "0-3, 8-9"
    assert device_ranges([5]) == "5"
    assert device_ranges(list(range(120, 128))) == "120-127"
    assert layer_span(["transformer.h.5", "transformer.h.10"]) == "transformer.h.5 .. h.10 (2)"
    assert layer_span(["transformer.h.89", "transformer.ln_f", "lm_head"]) == "transformer.h.89 .. lm_head (3)"


def test_the_timeline_tails_each_box_with_its_collectives():
    plan = _plan(zero=3)
    sim = replay_plan(plan, timeline=True)
    costs = [st.cost for st in plan.stages]
    lay = layout(plan_schedule(plan), sim, "t", costs)
    scale = (1200 - 80 - 20) / sim.step_time_s  # the picture's span in pixels over the step
    tp = [b for b in lay.boxes if ": tensor-parallel collectives" in b.tip]
    zero = [b for b in lay.boxes if ": ZeRO collectives" in b.tip]
    assert len(tp) == 2 * 4 * 2  # every F and B of 2 stages x 4 micro-batches
    assert len(zero) == 2 * 4  # ZeRO 3's gather after every F
    assert all(b.w == pytest.approx(3 * RING_MIB * scale) for b in tp)  # forward and backward alike
    half = costs[0].zero_comm.fwd_s
    assert {round(b.w, 6) for b in zero} == {round(half * scale, 6)}
    for b in tp:  # inside its action's box, ending where the ZeRO tail begins
        box = next(x for x in lay.boxes if "micro-batch" in x.tip and x.y == b.y and x.x <= b.x < x.x + x.w)
        assert b.x + b.w <= box.x + box.w + 1e-9
    legend = {t.text for t in lay.texts}
    assert TP_LEGEND in legend and ZERO_LEGEND in legend


def test_tails_under_a_pixel_are_not_drawn_and_the_legend_says_so():
    plan = _plan(zero=1)
    tiny = Collectives(fwd_s=1e-9, bwd_input_s=1e-9)
    costs = [st.cost.model_copy(update={"tp_comm": tiny}) for st in plan.stages]
    lay = layout(plan_schedule(plan), replay_plan(plan, timeline=True), "t", costs)
    assert not any("collectives" in b.tip and b.w < MIN_TAIL_PX for b in lay.boxes)
    assert "tensor-parallel collectives: under a pixel a box at this scale, not drawn" in {t.text for t in lay.texts}


def test_simulate_draws_the_timeline_with_its_tails(tmp_path):
    pic = tmp_path / "t.png"
    _simulate(tmp_path, _plan(), "--timeline", str(pic))
    assert pic.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = tmp_path / "t.svg"
    _simulate(tmp_path, _plan(), "--timeline", str(svg))
    assert svg.read_text().count(": tensor-parallel collectives") == 2 * 4 * 2
