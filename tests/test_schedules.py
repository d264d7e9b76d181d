import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.errors import ScheduleError
from planner.schedules import (
    SCHEDULES,
    build,
    canonical,
    inflight_peaks,
    to_engine_csv,
    validate,
)


@given(pp=st.integers(1, 6), m=st.integers(1, 12))
@settings(max_examples=60, deadline=None)
def test_one_chunk_schedules_are_valid(pp, m):
    for name in ("gpipe", "1f1b", "zb-h1", "zb-h2", "pipedream", "pipedream-2bw"):
        validate(build(name, pp, m))


@given(pp=st.integers(2, 5), rounds=st.integers(1, 3), v=st.integers(2, 3))
@settings(max_examples=30, deadline=None)
def test_interleaved_schedules_are_valid(pp, rounds, v):
    for name in ("interleaved-1f1b", "zb-h1"):
        validate(build(name, pp, pp * rounds, v))


@given(pp=st.integers(1, 6), m=st.integers(1, 12))
@settings(max_examples=40, deadline=None)
def test_v_schedules_are_valid(pp, m):
    for name in ("zb-v", "dualpipe-v"):
        s = build(name, pp, m, 2)
        validate(s)
        assert s.stage_rank == tuple(range(pp)) + tuple(reversed(range(pp)))


def test_one_f_one_b_holds_p_minus_i_in_flight():
    # Narayanan et al. 2021: stage i of p keeps p - i micro-batches
    assert inflight_peaks(build("1f1b", 4, 8)) == [4, 3, 2, 1]


def _awaiting_input_gradient(schedule) -> list[int]:
    """Per stage, the most micro-batches whose forward has run and whose I (or B) has not."""
    peak = [0] * schedule.n_stages
    for actions in schedule.ranks:
        held = [0] * schedule.n_stages
        for a in actions:
            held[a.stage] += 1 if a.kind == "F" else -1 if a.kind in ("B", "I") else 0
            peak[a.stage] = max(peak[a.stage], held[a.stage])
    return peak


@pytest.mark.parametrize("p,m", [(4, 8), (8, 24), (3, 3), (5, 2)])
def test_zb_h1_memory_is_1f1b_peak_on_every_rank(p, m):
    # Qi et al. 2024, section 2.1: every stage has the same number of micro-batches in flight
    # (counted until their W), 1F1B's peak min(p, m); those still waiting for their input
    # gradient stay at 1F1B's min(p - r, m) on rank r
    one = inflight_peaks(build("1f1b", p, m))
    zb = build("zb-h1", p, m)
    assert inflight_peaks(zb) == [max(one)] * p
    assert _awaiting_input_gradient(zb) == one


@pytest.mark.parametrize("p,m", [(4, 8), (8, 24), (4, 12), (3, 3)])
def test_zb_h2_warms_up_deeper_and_holds_2p_minus_1(p, m):
    # Qi et al. 2024, section 2.2: 2(p - r) - 1 forwards before the first input gradient, and
    # a peak of (2p - 1) micro-batches' activations
    s = build("zb-h2", p, m)
    for r, acts in enumerate(s.ranks):
        assert [a.kind for a in acts].index("I") == min(2 * (p - r) - 1, m)
    assert inflight_peaks(s) == [min(2 * p - 1, m)] * p


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (8, 24), (3, 7)])
def test_dualpipe_v_holds_2p_plus_1_chunk_activations(p, m):
    # deepseek-ai/DualPipe README: DualPipeV keeps PP + 1 activations per device, PP = 2p stages
    from planner.simulate import memory_states

    held = [int(x[:, 1:3].sum(axis=1).max()) for x in memory_states(build("dualpipe-v", p, m, 2))]
    assert held == [2 * p + 1] * p


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (8, 24), (3, 7)])
def test_zb_v_holds_1f1b_memory(p, m):
    # Qi et al. 2024: ZB-V's peak is 1F1B's, p whole micro-batches, 2p chunk activations
    from planner.simulate import memory_states

    held = [int(x[:, 1:3].sum(axis=1).max()) for x in memory_states(build("zb-v", p, m, 2))]
    assert held == [2 * p] * p


def test_zb_v_order_by_hand():
    # pp=2, m=4 on rank 1 (stages 1 and 2): 2(pp - r) - 1 = 1 chunk-0 forward, one F1 F0 pair,
    # one F1 B1, the steady F0 B0 F1 B1 rounds, then I first with W deferred
    s = build("zb-v", 2, 4, 2)
    assert " ".join(map(str, s.ranks[1])) == ("1F0 2F0 1F1 2F1 2I0 2W0 "
                                              "1F2 1I0 1W0 2F2 2I1 2W1 1F3 1I1 1W1 2F3 2I2 2W2 "
                                              "1I2 2I3 1I3 1W2 2W3 1W3")


def test_dualpipe_v_order_by_hand():
    # pp=2, m=4 on rank 1 (stages 1 and 2): DualPipeV's step 2 (two F0 F1 pairs), step 4
    # (m - 2pp + 2 = two F0 B1 F1 B0 rounds), step 6 (two backward pairs, W deferred in the
    # second: rank 1 is odd) and step 8 (the deferred W)
    s = build("dualpipe-v", 2, 4, 2)
    assert " ".join(map(str, s.ranks[1])) == ("1F0 2F0 1F1 2F1 "
                                              "1F2 2I0 2W0 2F2 1I0 1W0 1F3 2I1 2W1 2F3 1I1 1W1 "
                                              "2I2 2W2 1I2 1W2 2I3 1I3 "
                                              "2W3 1W3")


def test_zb_h1_order_by_hand():
    # pp=2, m=3: rank 0 (1F1B warm-up of 2) runs each W at once; rank 1 runs W one I late,
    # so it sends its second input gradient before its first W
    s = build("zb-h1", 2, 3)
    assert " ".join(map(str, s.ranks[0])) == "0F0 0F1 0I0 0W0 0F2 0I1 0W1 0I2 0W2"
    assert " ".join(map(str, s.ranks[1])) == "1F0 1I0 1F1 1I1 1W0 1F2 1I2 1W1 1W2"


def test_zb_h2_order_by_hand():
    # pp=2, m=4: rank 0 warms up with 3 forwards; rank 1 with 1, and defers W until a fourth
    # forward would hold more than 2pp - 1 = 3 micro-batches; the drain runs one W per I
    s = build("zb-h2", 2, 4)
    assert " ".join(map(str, s.ranks[0])) == "0F0 0F1 0F2 0I0 0W0 0F3 0I1 0W1 0I2 0W2 0I3 0W3"
    assert " ".join(map(str, s.ranks[1])) == "1F0 1I0 1F1 1I1 1F2 1I2 1W0 1F3 1I3 1W1 1W2 1W3"


def test_gpipe_holds_every_micro_batch():
    assert inflight_peaks(build("gpipe", 3, 5)) == [5, 5, 5]


def test_first_ranks_of_1f1b_by_hand():
    s = build("1f1b", 2, 3)
    assert [str(a) for a in s.ranks[0]] == ["0F0", "0F1", "0B0", "0F2", "0B1", "0B2"]
    assert [str(a) for a in s.ranks[1]] == ["1F0", "1B0", "1F1", "1B1", "1F2", "1B2"]


def test_engine_csv_has_one_row_per_rank():
    csv = to_engine_csv(build("gpipe", 2, 2))
    assert csv == "0F0,0F1,0B0,0B1\n1F0,1F1,1B0,1B1\n"


@pytest.mark.parametrize("name,pp,m,v,match", [
    ("naive", 2, 4, 1, "micro-batches must be 1"),
    ("interleaved-1f1b", 4, 2, 2, "multiple of pp"),
    ("interleaved-1f1b", 4, 6, 2, "multiple of pp"),
    ("interleaved-1f1b", 4, 8, 1, "at least 2 virtual stages"),
    ("zb-v", 4, 8, 3, "virtual stages must be 2"),
    ("gpipe", 4, 8, 2, "virtual stages must be 1"),
    ("zb-h2", 4, 8, 2, "virtual stages must be 1"),
])
def test_invalid_combinations_are_refused(name, pp, m, v, match):
    with pytest.raises(ScheduleError, match=match):
        build(name, pp, m, v)


def test_names_and_aliases():
    assert canonical("PipeDream-Flush") == "1f1b"
    assert canonical("zbv") == "zb-v"
    assert canonical("ZB2P") == "zb-h2"
    assert set(SCHEDULES) >= {"naive", "gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v",
                              "dualpipe-v", "pipedream", "pipedream-2bw"}
    with pytest.raises(ScheduleError, match="unknown schedule 'ring'"):
        canonical("ring")


def test_model_only_schedules_are_flagged():
    assert not SCHEDULES["pipedream"].executable and not SCHEDULES["pipedream-2bw"].executable
    assert all(SCHEDULES[n].executable for n in ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v",
                                                 "dualpipe-v"))


def test_action_kinds_are_an_enum_printing_as_the_engine_does():
    from planner.schedules import Action, Kind

    assert [str(k) for k in Kind] == ["F", "B", "I", "W"] and [k.slot for k in Kind] == [0, 1, 2, 3]
    assert str(Action(Kind.BACKWARD_INPUT, 2, 0)) == "2I0"
    for name in ("gpipe", "1f1b", "zb-h1", "zb-h2", "interleaved-1f1b", "zb-v", "dualpipe-v"):
        s = build(name, 2, 4, 2 if name in ("interleaved-1f1b", "zb-v", "dualpipe-v") else 1)
        assert all(type(a.kind) is Kind for acts in s.ranks for a in acts), name


def test_global_order_of_1f1b_by_hand():
    # pp=2, m=2: rank 0 runs F0 F1 and waits for stage 1's backward of micro-batch 0; rank 1
    # then runs its whole list; rank 0 finishes with its two backwards
    order = [str(a) for a in build("1f1b", 2, 2).global_order()]
    assert order == ["0F0", "0F1", "1F0", "1B0", "1F1", "1B1", "0B0", "0B1"]


def test_global_order_refuses_a_deadlock():
    from planner.schedules import Action, Kind, Schedule

    s = Schedule("hand", 2, 1, 1, (0, 1), ((Action(Kind.FORWARD, 0, 0), Action(Kind.FULL_BACKWARD, 0, 0)),
                                          (Action(Kind.FULL_BACKWARD, 1, 0), Action(Kind.FORWARD, 1, 0))),
                 split_backward=False, executable=False)
    with pytest.raises(ScheduleError, match="deadlocks"):
        s.global_order()


@given(name=st.sampled_from(["gpipe", "1f1b", "zb-h1", "zb-h2", "interleaved-1f1b", "zb-v", "dualpipe-v"]),
       pp=st.integers(1, 4), rounds=st.integers(1, 3))
@settings(max_examples=40, deadline=None)
def test_global_order_keeps_each_rank_order_and_every_input_first(name, pp, rounds):
    from hypothesis import assume

    from planner.schedules import Kind

    assume(name != "interleaved-1f1b" or pp > 1)  # one rank has no interleaving
    v = 2 if name in ("interleaved-1f1b", "zb-v", "dualpipe-v") else 1
    s = build(name, pp, pp * rounds, v)
    order = s.global_order()
    assert sorted(order) == sorted(a for acts in s.ranks for a in acts)
    for r, acts in enumerate(s.ranks):
        assert [a for a in order if s.stage_rank[a.stage] == r] == list(acts)
    at = {a: i for i, a in enumerate(order)}
    last = s.n_stages - 1
    for a, i in at.items():
        if a.kind == Kind.FORWARD and a.stage > 0:
            assert at[(Kind.FORWARD, a.stage - 1, a.mb)] < i
        elif a.kind == Kind.BACKWARD_WEIGHT:
            assert at[(Kind.BACKWARD_INPUT, a.stage, a.mb)] < i
        elif a.kind != Kind.FORWARD and a.stage < last:
            grad = [at[(k, a.stage + 1, a.mb)] for k in (Kind.FULL_BACKWARD, Kind.BACKWARD_INPUT)
                    if (k, a.stage + 1, a.mb) in at]
            assert grad and min(grad) < i


def _readme_example() -> list[tuple[str, float, float]]:
    """The README's shared schedule example: (schedule, predicted bubble, predicted memory) rows."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = text.split("<!-- schedule-example -->")[1].split("<!-- /schedule-example -->")[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.strip().splitlines()[2:]]
    return [(r[0], float(r[2]), float(r[4])) for r in rows]


def test_readme_schedule_example_is_what_the_simulator_predicts():
    # p = 4, m = 8, tF = 1, tI = 1.5, tW = 0.5, no transfers; chunks of half a stage for v = 2.
    # Activations: 2 bytes a micro-batch on a whole stage (1 a chunk), so bytes / 2 = micro-batches
    from planner.autosched import build_auto
    from planner.formats import StageCost
    from planner.simulate import peak_memory, simulate

    p, m, work = 4, 8, 8 * (1.0 + 1.5 + 0.5)

    def costs(n: int, share: float) -> list[StageCost]:
        return [StageCost(fwd_s=share, bwd_input_s=1.5 * share, bwd_weight_s=0.5 * share, send_bytes=0,
                          act_bytes=round(2 * share), static_bytes=0, transient_bytes=0, param_bytes=0)] * n

    rows = _readme_example()
    assert len(rows) == 10
    for name, bubble, memory in rows:
        if name.startswith("zb-auto in "):
            ref = name.split()[2].removesuffix("'s")
            c = costs(p, 1.0)
            auto = build_auto(c, None, m, peak_memory(build(ref, p, m), c))
            assert auto is not None
            step, peak = auto.step_time_s, max(auto.peak_memory_bytes)
        else:
            key = name.split()[0]
            s = build(key, p, m, 2 if "v=2" in name or SCHEDULES[key].placement == "v" else 1)
            sim = simulate(s, costs(s.n_stages, 1 / s.virtual_stages))
            step, peak = sim.step_time_s, max(sim.peak_memory_bytes)
        assert step - work == pytest.approx(bubble), name
        assert peak / 2 == pytest.approx(memory), name


def test_every_schedule_names_its_source_bubble_and_memory_in_one_line():
    from planner.report import schedules_table

    assert all(i.reference and i.bubble and i.memory for i in SCHEDULES.values())
    table = schedules_table()
    assert table.row_count == len(SCHEDULES)
    assert list(table.columns[0].cells) == list(SCHEDULES)
