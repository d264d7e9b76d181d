"""A split pinned with --fix-cuts is the user's: priced as given, compared honestly with today's
splits, and never called optimal."""

import json

import pytest
from rich.console import Console

from planner.clusters import from_spec
from planner.formats import to_json
from planner.report import solve_report, versus
from planner.solve import Settings, solve
from planner.solve.plan import make_plan
from planner.synthetic import chain_profile


def sixteen_blocks():
    # 16 blocks of 1 ms forward and 2 ms backward: the split 1 | 1 | 1 | 13 runs the last stage
    # 13 times longer than the others, the equal split 4 | 4 | 4 | 4 evenly
    return chain_profile([1e-3] * 16, names=[f"h.{i}" for i in range(16)], act_bytes=2**20, param_bytes=2**20)


def pinned():
    prof, cluster = sixteen_blocks(), from_spec("h100x4")
    settings = Settings(global_batch=32, pp=4, dp=1, schedules=("1f1b",), fix_cuts=(1, 2, 3))
    result = solve(prof, cluster, settings)
    return prof, cluster, settings, result


def text(lines) -> str:
    console = Console(record=True, width=200)
    for line in lines:
        console.print(line)
    return console.export_text()


def test_a_pinned_split_is_not_called_optimal():
    prof, cluster, settings, r = pinned()
    assert [s.start for s in r.best.inner.segments] == [0, 1, 2, 3]
    assert r.proven is False and r.proven_for_fixed_cuts is True
    solver = make_plan(prof, cluster, r, settings).provenance.solver
    assert solver.proven_optimal is False and solver.proven_for_fixed_cuts is True


def test_a_searched_split_has_no_fixed_cuts_claim():
    r = solve(sixteen_blocks(), from_spec("h100x4"), Settings(global_batch=32, pp=4, dp=1, schedules=("1f1b",)))
    assert r.proven and r.proven_for_fixed_cuts is None
    plan = make_plan(sixteen_blocks(), from_spec("h100x4"), r, Settings(global_batch=32))
    assert plan.provenance.solver.proven_for_fixed_cuts is None
    assert json.loads(to_json(plan))["provenance"]["solver"]["proven_for_fixed_cuts"] is None


def test_the_report_names_the_users_split_and_the_faster_baselines():
    prof, cluster, settings, r = pinned()
    plan = make_plan(prof, cluster, r, settings)
    equal = next(b for b in plan.baselines if b.name.startswith("equal"))
    assert equal.layers_per_stage == [4, 4, 4, 4]
    gain = plan.predicted.step_time_s / equal.step_time_s
    assert gain > 2  # 13 blocks on one stage against 4
    out = text(solve_report(prof, cluster, r, plan))
    assert "your split (--fix-cuts)" in out and "vs yours" in out
    assert f"{gain:.2f}x faster" in out
    assert "same" not in out
    assert "proven optimal" not in out
    assert "proven best for your split" in out and "today's split beats yours" in out


def test_versus_says_faster_slower_or_same():
    assert versus(1.0, 2.0) == "2.00x faster"
    assert versus(3.0, 2.0) == "1.50x slower"
    assert versus(2.004, 2.0) == "same" and versus(1.996, 2.0) == "same"
    assert versus(4.0, 2.0, "memory") == "2.00x memory"
    assert versus(1.0, 2.0, "memory") == "2.00x less memory"


def test_baselines_are_named_fields_and_still_unpack():
    r = solve(sixteen_blocks(), from_spec("h100x4"), Settings(global_batch=32, pp=4, dp=1, schedules=("1f1b",)))
    first = r.baselines[0]
    assert first.name.startswith("equal layers") and first.starts == [0, 4, 8, 12]
    name, starts, ev = first
    assert (name, starts, ev) == (first.name, first.starts, first.evaluation)
    assert ev.step_time_s == pytest.approx(r.best.inner.step_time_s)  # on equal blocks the equal split is best
