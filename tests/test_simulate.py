import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.schedules import build
from planner.simulate import CutLink, simulate
from tests.conftest import stage_cost


def uniform(schedule, f=1.0, bi=1.0, bw=1.0, **kw):
    chunks = schedule.n_stages // schedule.pp
    return [stage_cost(f / chunks, bi / chunks, bw / chunks, **kw)] * schedule.n_stages


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 4), (8, 16), (3, 7)])
def test_gpipe_and_1f1b_closed_form(p, m):
    # (m + p - 1)(tF + tB) on uniform stages (Huang et al. 2019; Narayanan et al. 2021)
    for name in ("gpipe", "1f1b"):
        s = build(name, p, m)
        assert simulate(s, uniform(s)).step_time_s == pytest.approx((m + p - 1) * 3.0)


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 8, 2), (4, 8, 4), (8, 16, 2)])
def test_interleaved_bubble(p, m, v):
    # bubble (p - 1)(tF + tB) / v (Narayanan et al. 2021, section 2.2)
    s = build("interleaved-1f1b", p, m, v)
    assert simulate(s, uniform(s)).step_time_s == pytest.approx(m * 3.0 + (p - 1) * 3.0 / v)


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (8, 16)])
def test_zero_bubble_h1_bubble(p, m):
    # ZB-H1 bubble (p - 1)(tF + tB - tW) (Qi et al. 2024), tB = tI + tW
    s = build("zb-h1", p, m)
    f, bi, bw = 1.0, 1.5, 0.5
    assert simulate(s, uniform(s, f, bi, bw)).step_time_s == pytest.approx(m * 3.0 + (p - 1) * (f + bi))


def test_uneven_1f1b_by_hand():
    # stage 0: F=B=1, stage 1: F=B=3, four micro-batches. Stage 1 is busy from t=1 to t=25
    # (four F and four B of 3), then stage 0 runs the last backward: 26.
    s = build("1f1b", 2, 4)
    costs = [stage_cost(1, 1, 0), stage_cost(3, 3, 0)]
    assert simulate(s, costs).step_time_s == pytest.approx(26)


def test_uneven_gpipe_by_hand():
    # GPipe: sum of stage times plus (m - 1)(max F + max B) = 8 + 3 * 6 = 26
    s = build("gpipe", 2, 4)
    assert simulate(s, [stage_cost(1, 1, 0), stage_cost(3, 3, 0)]).step_time_s == pytest.approx(26)


def test_latency_on_the_critical_path():
    s = build("gpipe", 2, 1)  # F0, F1, B1, B0 with two transfers between
    r = simulate(s, uniform(s), [CutLink(busy_s=0.25, latency_s=0.5)])
    assert r.step_time_s == pytest.approx(6 + 2 * 0.75)


def test_allreduce_ends_the_step():
    s = build("1f1b", 2, 2)
    costs = [stage_cost(allreduce=5.0), stage_cost()]
    r = simulate(s, costs)
    assert r.step_time_s == pytest.approx(max(3 * 3 + 5, 3 * 3))


def test_memory_peaks_follow_in_flight_counts():
    s = build("1f1b", 4, 8)
    r = simulate(s, uniform(s, act=10, static=100, transient=1))
    assert r.peak_memory_bytes == [100 + 10 * k + 1 for k in (4, 3, 2, 1)]
    g = build("gpipe", 4, 8)
    assert simulate(g, uniform(g, act=10)).peak_memory_bytes == [80] * 4


def test_pipedream_steady_state_has_no_flush():
    s = build("pipedream", 4, 8)
    costs = [stage_cost(1, 1, 0), stage_cost(2, 2, 0), stage_cost(1, 1, 0), stage_cost(1, 1, 0)]
    assert simulate(s, costs).step_time_s == pytest.approx(8 * 4)  # m x the slowest stage


@given(p=st.integers(1, 4), m=st.integers(1, 8),
       times=st.lists(st.tuples(st.floats(0.1, 5), st.floats(0.1, 5), st.floats(0, 5)), min_size=4, max_size=4),
       name=st.sampled_from(["gpipe", "1f1b", "zb-h1"]))
@settings(max_examples=80, deadline=None)
def test_step_is_at_least_every_rank_and_the_critical_path(p, m, times, name):
    s = build(name, p, m)
    costs = [stage_cost(f, bi, bw) for f, bi, bw in times[:p]]
    r = simulate(s, costs)
    per_mb = sum(c.fwd_s + c.bwd_input_s for c in costs)
    assert r.step_time_s >= max(r.compute_s) - 1e-9
    assert r.step_time_s >= per_mb - 1e-9
    assert 0 <= r.bubble_fraction <= 1
    assert sum(1 for _ in r.events) == sum(len(a) for a in s.ranks)


def test_stage_compute_is_each_stage_own_actions():
    # interleaved, pp=2 v=2: rank 0 holds stages 0 and 2, rank 1 stages 1 and 3. With F=B=1 on
    # stages 0, 1 and F=B=3 on stages 2, 3, four micro-batches: stage 0 computes 4 * (1 + 1) = 8,
    # stage 2 computes 4 * (3 + 3) = 24, and rank 0 their sum, 32
    s = build("interleaved-1f1b", 2, 4, 2)
    light, heavy = stage_cost(1.0, 1.0, 0.0), stage_cost(3.0, 3.0, 0.0)
    r = simulate(s, [light, light, heavy, heavy])
    assert r.stage_compute_s == pytest.approx([8.0, 8.0, 24.0, 24.0])
    assert r.compute_s == pytest.approx([32.0, 32.0])
    by_events = [0.0] * 4
    for e in r.events:
        by_events[e.action.stage] += e.end_s - e.start_s
    assert r.stage_compute_s == by_events
    assert simulate(s, [light, light, heavy, heavy], timeline=False).stage_compute_s == by_events
