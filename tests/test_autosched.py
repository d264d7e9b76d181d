import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from planner.autosched import Policy, _fuse, build_auto, list_schedule, policies, rows
from planner.errors import ScheduleError
from planner.formats import StageCost
from planner.schedules import build, from_order, validate
from planner.simulate import CutLink, peak_memory, step_time


def stage(f=1.0, i=1.0, w=1.0, act=10, wgrad=1, static=0):
    return StageCost(fwd_s=f, bwd_input_s=i, bwd_weight_s=w, send_bytes=0, act_bytes=act, wgrad_bytes=wgrad,
                     static_bytes=static, transient_bytes=0, param_bytes=0)


@st.composite
def instances(draw):
    pp, m = draw(st.integers(1, 5)), draw(st.integers(1, 10))
    times = st.floats(0.2, 3.0)
    costs = [stage(draw(times), draw(times), draw(times), draw(st.integers(1, 100)), draw(st.integers(0, 60)),
                   draw(st.integers(0, 500))) for _ in range(pp)]
    cuts = [CutLink(busy_s=draw(st.floats(0, 0.5)), latency_s=draw(st.floats(0, 0.3))) for _ in range(pp - 1)]
    return pp, m, costs, cuts


@given(instances(), st.sampled_from(["zb-h1", "zb-h2", "1f1b"]))
@settings(max_examples=60, deadline=None)
def test_zb_auto_is_never_slower_than_a_published_order_at_its_memory(inst, name):
    # random unequal stage costs with communication; the budget is the published order's own peak
    pp, m, costs, cuts = inst
    published = build(name, pp, m)
    budget = peak_memory(published, costs)
    auto = build_auto(costs, cuts, m, budget)
    assert auto is not None
    assert auto.step_time_s <= step_time(published, costs, cuts) * (1 + 1e-12)
    assert all(p <= b for p, b in zip(peak_memory(auto.schedule, costs), budget, strict=True))
    assert auto.step_time_s == pytest.approx(step_time(auto.schedule, costs, cuts), rel=1e-12)


@given(instances())
@settings(max_examples=25, deadline=None)
def test_every_list_schedule_is_a_valid_order(inst):
    pp, m, costs, cuts = inst
    for policy in policies(pp, m)[:12]:
        try:
            validate(list_schedule(costs, cuts, m, policy))
        except ScheduleError as e:
            assert "deadlocked" in str(e)


def test_list_scheduler_finds_zb_h1_on_equal_passes():
    # F = I = W = 1, pp 4, m 8, no communication: ZB-H1's m(F + I + W) + (pp - 1)(F + I - W) = 24 + 3
    # (Qi et al. 2024, section 2's table), with ZB-H1's warm-up pp - r and pp in flight on every rank
    costs = [stage()] * 4
    s = list_schedule(costs, [CutLink()] * 3, 8, Policy((4, 3, 2, 1), (4, 4, 4, 4), 1.0, True))
    assert step_time(s, costs, [CutLink()] * 3) == pytest.approx(27.0)


def test_zb_auto_beats_zb_h1_at_its_memory_on_unequal_stages_with_latency():
    # ZB-H1's order runs 51.5 here; the list scheduler, in ZB-H1's memory, fills the gaps the
    # unequal stages leave with weight gradients and runs 48.5
    costs = [stage(0.5, 1.5, 1.0), stage(1.5, 0.5, 0.5), stage(1.5, 2.0, 0.5), stage(1.5, 2.0, 1.5)]
    cuts = [CutLink(latency_s=1.0)] * 3
    zb = build("zb-h1", 4, 8)
    assert step_time(zb, costs, cuts) == pytest.approx(51.5)
    auto = build_auto(costs, cuts, 8, peak_memory(zb, costs))
    assert auto is not None and auto.step_time_s == pytest.approx(48.5)
    assert auto.source.startswith("list scheduler")


def test_zb_auto_respects_a_tight_budget_and_refuses_an_impossible_one():
    costs = [stage(act=100, static=1000)] * 3
    one = build("1f1b", 3, 6)
    tight = peak_memory(one, costs)
    auto = build_auto(costs, None, 6, tight)
    assert auto is not None and all(p <= b for p, b in zip(auto.peak_memory_bytes, tight, strict=True))
    assert build_auto(costs, None, 6, [1000] * 3) is None  # not even one micro-batch's activations fit


def test_zb_auto_order_round_trips_through_its_stored_rows():
    costs = [stage(1.0, 1.5, 0.7)] * 3
    auto = build_auto(costs, None, 5, [10**6] * 3)
    assert auto is not None
    again = from_order("zb-auto", 3, 5, rows(auto.schedule.ranks))
    assert again is auto.schedule or again.ranks == auto.schedule.ranks
    assert build("zb-auto", 3, 5, order=rows(auto.schedule.ranks)).ranks == auto.schedule.ranks


def test_zb_auto_needs_its_order_and_one_limit_per_rank():
    with pytest.raises(ScheduleError, match="needs its stored action order"):
        build("zb-auto", 2, 4)
    with pytest.raises(ScheduleError, match="one memory limit per rank"):
        build_auto([stage()] * 2, None, 4, [10**6])
    with pytest.raises(ScheduleError, match="not an action"):
        from_order("zb-auto", 1, 1, ("0F0,0X0",))
    with pytest.raises(ScheduleError, match="before"):
        from_order("zb-auto", 1, 1, ("0I0,0F0,0W0",))


# ---------------------------------------------------------------------------- the solver and plans


def _profile():
    from planner.synthetic import chain_profile

    return chain_profile([1e-3, 2e-3, 1e-3, 3e-3, 1e-3, 2e-3, 1.5e-3, 1e-3], act_bytes=2**26, param_bytes=2**26)


def test_solver_builds_zb_auto_when_asked_and_the_plan_replays_it():
    from planner.clusters import from_spec
    from planner.formats import Plan
    from planner.plan import plan_schedule, replay_plan
    from planner.solve import Settings, solve
    from planner.solve.plan import make_plan

    settings = Settings(global_batch=32, schedules=("zb-auto",), jobs=1)
    result = solve(_profile(), from_spec("h100x4"), settings)
    assert {c.config.schedule for c in result.ranked} == {"zb-auto"}
    assert not result.proven and any("zb-auto's order is built" in n for n in result.notes)
    plan = make_plan(_profile(), from_spec("h100x4"), result, settings)
    again = Plan.model_validate_json(plan.model_dump_json())
    assert again.schedule.order == plan.schedule.order is not None
    assert plan_schedule(again).ranks == result.best.evaluation.schedule.ranks
    assert replay_plan(again).step_time_s == pytest.approx(plan.predicted.step_time_s, rel=1e-12)


def test_zb_auto_never_loses_to_the_published_orders_in_the_solver():
    from planner.clusters import from_spec
    from planner.solve import Settings, solve

    published = solve(_profile(), from_spec("h100x4"), Settings(global_batch=32, schedules=("zb-h1", "zb-h2", "1f1b"),
                                                                    jobs=1))
    auto = solve(_profile(), from_spec("h100x4"), Settings(global_batch=32, schedules=("zb-auto",), jobs=1))
    assert auto.best.inner.step_time_s <= published.best.inner.step_time_s * (1 + 1e-12)


@given(st.fixed_dictionaries({"seed": st.integers(0, 10**6), "n": st.integers(3, 7), "pp": st.sampled_from([1, 2, 4]),
                              "m": st.sampled_from([2, 4, 8])}))
@settings(max_examples=25, deadline=None)
def test_the_configuration_bound_never_exceeds_zb_auto(d):
    # the bound that orders and prunes configurations, for zb-auto orders built on every partition
    # of a random chain (all-reduce over dp = 8 / pp included), stays below their simulation
    import numpy as np

    from planner.clusters import from_spec
    from planner.evaluate import Config, evaluate, segments_from_bounds
    from planner.solve import Settings
    from planner.solve.brute import all_partitions
    from planner.solve.search import Search
    from planner.synthetic import chain_profile

    rng = np.random.default_rng(d["seed"])
    n, pp = d["n"], d["pp"]
    assume(pp <= n)
    prof = chain_profile(list(rng.uniform(1e-4, 3e-3, n)), act_bytes=2**20,
                         param_bytes=[int(x) for x in rng.integers(1, 400, n) * 2**20])
    search = Search(prof, from_spec("h100x8"), Settings())
    seed = Config(pp=pp, dp=8 // pp, mbs=1, m=d["m"], schedule="zb-h1")
    for starts in all_partitions(n, pp):
        ev = evaluate(search.table(1), search.cluster, seed, segments_from_bounds(starts, n), detail=False)
        auto = build_auto(ev.costs, ev.cuts, seed.m, [10**15] * pp, max_candidates=12)
        assert auto is not None
        cfg = Config(pp=pp, dp=8 // pp, mbs=1, m=d["m"], schedule="zb-auto", order=rows(auto.schedule.ranks))
        priced = evaluate(search.table(1), search.cluster, cfg, ev.segments, detail=False)
        assert priced.step_time_s == pytest.approx(auto.step_time_s, rel=1e-12)
        assert search.quick_bound(cfg) <= priced.step_time_s * (1 + 1e-9)


def test_a_schedule_too_large_to_list_schedule_keeps_its_published_order(monkeypatch):
    from planner.clusters import from_spec
    from planner.solve import Settings, search, solve

    monkeypatch.setattr(search, "AUTO_ACTIONS", 10)
    result = solve(_profile(), from_spec("h100x4"), Settings(global_batch=32, pp=2, schedules=("zb-auto",), jobs=1))
    assert result.best.config.schedule == "zb-auto"
    assert any("not list-scheduled" in n and "keep the published order" in n for n in result.notes)
    seed = solve(_profile(), from_spec("h100x4"), Settings(global_batch=32, pp=2, schedules=("zb-h1", "zb-h2", "1f1b"),
                                                           virtual_stages=1, jobs=1))
    assert result.best.inner.step_time_s == pytest.approx(seed.best.inner.step_time_s, rel=1e-12)


def test_a_plan_names_its_order_only_for_zb_auto():
    from planner.clusters import from_spec
    from planner.formats import Plan
    from planner.solve import Settings, solve
    from planner.solve.plan import make_plan

    settings = Settings(global_batch=32, pp=2, schedules=("zb-auto",), jobs=1)
    plan = make_plan(_profile(), from_spec("h100x4"), solve(_profile(), from_spec("h100x4"), settings), settings)
    data = plan.model_dump(mode="json")
    data["schedule"].pop("order")
    with pytest.raises(ValueError, match="zb-auto needs schedule.order"):
        Plan.model_validate(data)
    data["schedule"] = {"name": "zb-h1", "virtual_stages": 1, "order": plan.schedule.order}
    with pytest.raises(ValueError, match="schedule.order is for zb-auto only"):
        Plan.model_validate(data)
    data["schedule"] = {"name": "zb-auto", "virtual_stages": 1, "order": ["0F0,0I0,0W0", "1F0"]}
    with pytest.raises(ValueError, match="schedule: "):
        Plan.model_validate(data)


# ---------------------------------------------------------------------------- execution


def test_zb_auto_plan_runs_on_the_engine_with_matching_gradients(tmp_path):
    # gpt, pp 2, single mode: the plan's own zb-auto order, then a list-scheduler order with
    # deferred weight gradients in its place; both match a plain run
    torch = pytest.importorskip("torch")
    from planner.execute.single import run_single
    from planner.formats import load_plan
    from planner.model import build_spec
    from planner.profile import Options as ProfileOptions
    from planner.profile import profile_model
    from tests.test_execute import TINY, plan_for

    spec = build_spec("models/gpt.py:build", TINY)
    profile = profile_model(spec, "models/gpt.py:build", TINY, ProfileOptions(mbs=(1,), repeats=1, warmup=0, threads=1))
    plan = load_plan(plan_for(profile, tmp_path, "zb-auto"))
    assert plan.schedule.name == "zb-auto" and plan.parallel.pp == 2
    m = plan.microbatch.count
    deferred = list_schedule([stage()] * 2, None, m, Policy((2, 1), (3, 3), float("inf"), True)).ranks
    assert any(a.kind == "W" and acts[i - 1].kind != "I" for acts in deferred for i, a in enumerate(acts))
    # ZB-H1 with rank 0's I W pairs run as whole backwards, beside rank 1's split ones
    mixed = _fuse(build("zb-h1", 2, m).ranks, [stage().model_copy(update={"bwd_s": 1.5})] * 2)
    assert {a.kind for acts in mixed for a in acts} == {"F", "B", "I", "W"}
    others = [plan.model_copy(update={"schedule": plan.schedule.model_copy(update={"order": list(rows(order))})})
              for order in (deferred, mixed)]
    for p in (plan, *others):
        r = run_single(p, torch.device("cpu"), steps=1, warmup=0)
        assert r.grad_message == ""
        assert r.loss == pytest.approx(r.reference_loss, rel=1e-5)


def test_the_timeline_draws_zb_auto_with_the_passes_it_runs():
    from planner.simulate import simulate
    from planner.timeline import NAMES, layout

    costs = [stage(0.5, 1.5, 1.0), stage(1.5, 0.5, 0.5), stage(1.5, 2.0, 0.5), stage(1.5, 2.0, 1.5)]
    cuts = [CutLink(latency_s=1.0)] * 3
    auto = build_auto(costs, cuts, 8, peak_memory(build("zb-h1", 4, 8), costs))
    assert auto is not None
    sim = simulate(auto.schedule, costs, cuts)
    lay = layout(auto.schedule, sim, "example")
    assert sum(1 for b in lay.boxes if "micro-batch" in b.tip) == 4 * 8 * 3  # one box per F, I and W
    legend = {t.text for t in lay.texts}
    assert {NAMES["F"], NAMES["I"], NAMES["W"]} <= legend and NAMES["B"] not in legend
    assert any(t.text.startswith("zb-auto   step 48.50 s") for t in lay.texts)


@pytest.mark.slow
def test_a_zb_auto_order_with_deferred_weight_gradients_runs_on_two_gloo_processes(tmp_path):
    pytest.importorskip("torch")
    from planner.execute import Options, execute, raise_on_failure
    from planner.formats import dump, load_plan
    from planner.model import build_spec
    from planner.profile import Options as ProfileOptions
    from planner.profile import profile_model
    from tests.test_execute import TINY, plan_for

    spec = build_spec("models/gpt.py:build", TINY)
    profile = profile_model(spec, "models/gpt.py:build", TINY, ProfileOptions(mbs=(1,), repeats=1, warmup=0, threads=1))
    plan = load_plan(plan_for(profile, tmp_path, "zb-auto"))
    order = list_schedule([stage()] * 2, None, plan.microbatch.count, Policy((2, 1), (3, 3), float("inf"), True))
    plan = plan.model_copy(update={"schedule": plan.schedule.model_copy(update={"order": list(rows(order.ranks))})})
    dump(plan, tmp_path / "auto.json")
    ver = execute(tmp_path / "auto.json", Options(steps=2, warmup=1, run_dir=str(tmp_path / "run"), tolerance=1000.0))
    assert ver.mode == "distributed"
    assert all(ok for _, ok, _ in ver.checks), ver.checks
    raise_on_failure(ver)


def test_zb_auto_by_memory_needs_no_more_than_the_published_orders():
    from planner.clusters import from_spec
    from planner.solve import Settings, solve

    def run(schedules):
        return solve(_profile(), from_spec("h100x4"), Settings(global_batch=32, pp=2, schedules=schedules,
                                                               virtual_stages=1, objective="memory", jobs=1))

    auto, published = run(("zb-auto",)), run(("zb-h1", "zb-h2", "1f1b"))
    assert auto.best.config.schedule == "zb-auto"
    assert max(auto.best.evaluation.peak_memory_bytes) <= max(published.best.evaluation.peak_memory_bytes)


# ---------------------------------------------------------------------------- the ILP over the order


def _ilp_instance():
    # three uneven stages with links, five micro-batches: small enough for CBC to finish
    costs = [stage(1.2, 0.8, 0.6, act=40, wgrad=10), stage(0.7, 2.1, 0.4, act=60, wgrad=20),
             stage(1.6, 1.0, 1.3, act=30, wgrad=5)]
    return costs, [CutLink(busy_s=0.3, latency_s=0.1), CutLink(busy_s=0.2, latency_s=0.2)], 5


def test_the_ilp_never_returns_a_slower_order_or_one_that_does_not_fit():
    pytest.importorskip("pulp")
    from planner.autosched_ilp import refine_by_ilp

    costs, cuts, m = _ilp_instance()
    for name in ("zb-h1", "1f1b"):
        budget = peak_memory(build(name, 3, m), costs)
        start = build_auto(costs, cuts, m, budget)
        assert start is not None
        got = refine_by_ilp(start, costs, cuts, budget, time_limit_s=5)
        assert got.step_time_s <= start.step_time_s
        assert all(p <= b for p, b in zip(peak_memory(got.schedule, costs), budget, strict=True))
        assert got.step_time_s == pytest.approx(step_time(got.schedule, costs, cuts), rel=1e-12)
        validate(got.schedule)


def test_solve_with_ilp_reorders_zb_auto_at_least_as_well():
    pytest.importorskip("pulp")
    from planner.clusters import from_spec
    from planner.solve import Settings, solve

    def run(ilp):
        return solve(_profile(), from_spec("h100x4"), Settings(global_batch=8, pp=2, mbs=1, schedules=("zb-auto",),
                                                               ilp=ilp, jobs=1))

    plain, ilp = run(False), run(True)
    assert ilp.best.inner.step_time_s <= plain.best.inner.step_time_s * (1 + 1e-12)


def test_the_ilp_improves_on_the_list_scheduler_where_it_can():
    # in ZB-H1's memory the best of the list scheduler and the published orders runs 30.0;
    # the ILP reorders it to 29.5 (CBC proves this small program within the limit)
    pytest.importorskip("pulp")
    from planner.autosched_ilp import refine_by_ilp

    costs = [stage(0.5, 2.0, 1.5, act=40, wgrad=5), stage(2.0, 2.0, 1.0, act=10, wgrad=5),
             stage(2.0, 0.5, 0.5, act=10, wgrad=0)]
    cuts = [CutLink(latency_s=0.5)] * 2
    budget = peak_memory(build("zb-h1", 3, 5), costs)
    start = build_auto(costs, cuts, 5, budget)
    assert start is not None and start.step_time_s == pytest.approx(30.0)
    got = refine_by_ilp(start, costs, cuts, budget, time_limit_s=10)
    assert got.step_time_s == pytest.approx(29.5)
    assert got.source.endswith("reordered by the ILP")


def test_the_any_order_bound_by_hand():
    # two ranks, two micro-batches, F = I = W = 1 s, the cut busy 0.5 s with 0.25 s latency:
    # rank 1 starts after 1 + 0.5 + 0.25 s and then computes 2 x (1 + 2) s
    from planner.autosched import any_order_bound

    costs = [stage(), stage()]
    assert any_order_bound(costs, [CutLink(busy_s=0.5, latency_s=0.25)], 2) == 7.75
    # with a gradient all-reduce of 2 s on rank 0 it ends last: 6 + 2 s
    costs[0] = costs[0].model_copy(update={"allreduce_s": 2.0})
    assert any_order_bound(costs, [CutLink(busy_s=0.5, latency_s=0.25)], 2) == 8.0


@given(instances(), st.sampled_from(["zb-h1", "zb-h2", "1f1b"]))
@settings(max_examples=60, deadline=None)
def test_no_order_beats_the_any_order_bound(inst, name):
    # the bound that lets the search skip zb-auto where no order could change its answer stays
    # at or below the published orders and zb-auto's own, with whole backwards cheaper or dearer
    from planner.autosched import any_order_bound

    pp, m, costs, cuts = inst
    costs = [c.model_copy(update={"bwd_s": 0.8 * (c.bwd_input_s + c.bwd_weight_s) if k % 2 else None,
                                  "overhead_s": 0.01 * k, "allreduce_s": 0.1 * k})
             for k, c in enumerate(costs)]
    bound = any_order_bound(costs, cuts, m)
    assert bound <= step_time(build(name, pp, m), costs, cuts) * (1 + 1e-12)
    auto = build_auto(costs, cuts, m, [10**15] * pp)
    assert auto is not None
    assert bound <= auto.step_time_s * (1 + 1e-12)


@pytest.mark.parametrize("schedules", [None, ("zb-auto",), ("zb-auto", "1f1b")])
@pytest.mark.parametrize("top", [1, 3])
def test_skipping_zb_auto_by_its_bound_changes_no_answer(monkeypatch, schedules, top):
    # the search with and without the skip (Search.auto_cannot_help) finds the same plans
    from planner.clusters import from_spec
    from planner.solve import Settings, solve
    from planner.solve.search import Search

    settings_ = Settings(global_batch=64, schedules=schedules, top=top, jobs=1)
    cluster = from_spec("h100x8")
    calls: list[bool] = []
    real = Search.auto_cannot_help

    def counted(self, *args):
        calls.append(real(self, *args))
        return calls[-1]
    monkeypatch.setattr(Search, "auto_cannot_help", counted)
    pruned = solve(_profile(), cluster, settings_)
    monkeypatch.setattr(Search, "auto_cannot_help", lambda self, *args: False)
    full = solve(_profile(), cluster, settings_)
    assert _answer(pruned) == _answer(full)
    if schedules is None:
        assert any(calls)  # the skip was taken at least once here


def _answer(result):
    ranked = [(c.config, c.evaluation.segments, c.evaluation.step_time_s) for c in result.ranked]
    return ranked, result.proven, result.notes
