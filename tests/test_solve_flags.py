"""Solver settings are checked where they are made: a pin that cannot hold is refused, not
silently widened or changed."""

import pytest

from planner.clusters import from_spec
from planner.errors import InputError
from planner.solve import Settings, solve
from planner.synthetic import chain_profile

GiB = 2**30


@pytest.mark.parametrize("name", ["zb-v", "dualpipe-v", "ZB_V"])
def test_v_schedules_refuse_another_virtual_stage_count(name):
    with pytest.raises(InputError, match="runs exactly 2 stages per device .* --virtual-stages 3"):
        Settings(schedules=(name,), virtual_stages=3)
    Settings(schedules=(name,), virtual_stages=2)  # the count it runs is fine


def test_unpinned_v_schedules_are_left_out_where_another_count_is_pinned():
    prof = chain_profile([1e-3] * 8, act_bytes=2**20, param_bytes=2**20)
    from planner.solve.search import configurations

    configs = list(configurations(prof, from_spec("h100x4"), Settings(global_batch=16, virtual_stages=4)))
    assert configs and {c.v for c in configs} == {4}


def test_an_empty_schedule_list_is_refused():
    with pytest.raises(InputError, match="--schedule names no schedule"):
        Settings(schedules=())


def test_recompute_and_objective_are_checked():
    with pytest.raises(InputError, match="--objective 'bogus'"):
        Settings(objective="bogus")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="--recompute 'bogus'"):
        Settings(recompute="bogus")  # type: ignore[arg-type]


def test_selective_recomputation_reports_progress():
    # GPipe holds all four micro-batches: each ILP round shows on the progress bar
    prof = chain_profile([1.0] * 4, act_bytes=[2**30, 2**28, 2**30, 2**28], param_bytes=2**20)
    seen = []
    solve(prof, from_spec("h100x4", memory_bytes=5 * GiB + 2**30),
          Settings(microbatches=4, pp=1, dp=1, schedules=("gpipe",), recompute="selective"),
          progress=lambda label, done, total: seen.append((label, done, total)))
    assert any(label.startswith("selective recompute: pp=1") for label, _, _ in seen)


@pytest.mark.parametrize("args,needle", [(["--schedule", ","], "--schedule names no schedule"),
                                         (["--schedule", "zb-v", "--virtual-stages", "3"], "--virtual-stages 3"),
                                         (["--recompute", "bogus"], "--recompute 'bogus'")])
def test_the_command_refuses_with_one_line(tmp_path, args, needle):
    from typer.testing import CliRunner

    from planner.cli import app
    from planner.formats import dump

    p = tmp_path / "prof.json"
    dump(chain_profile([1e-3] * 8, act_bytes=2**20, param_bytes=2**20), p)
    r = CliRunner().invoke(app, ["solve", str(p), "--cluster", "h100x4", *args])
    assert r.exit_code == 2 and r.output.startswith("error:") and needle in r.output
    assert r.output.count("\n") == 1, r.output


def test_settings_round_trip_through_a_plans_record():
    from planner.formats import SolverSettings, Training
    from planner.solve import Settings

    s = Settings(global_batch=32, pp=2, schedules=("1f1b", "zb-h1"), fix_cuts=(4,), zero=1, jobs=3)
    saved = s.record()
    assert "training" not in type(saved).model_fields and "jobs" not in type(saved).model_fields
    assert saved.schedules == ("1f1b", "zb-h1")
    back = Settings.from_record(saved, Training(), 32)
    assert back == Settings(global_batch=32, pp=2, schedules=("1f1b", "zb-h1"), fix_cuts=(4,), zero=1)
    # a plan made before tp and ZeRO were searched re-solves at tp 1, ZeRO 0
    old = Settings.from_record(SolverSettings(pp=2, unknown_later_field=1), Training(), 16)  # type: ignore[call-arg]
    assert (old.tp, old.zero, old.global_batch) == (1, 0, 16)


@pytest.mark.parametrize("zero", [1, 3])
def test_a_zero_stage_pinned_over_one_replica_is_noted(zero):
    # --zero 1 --pp 4 on cpu4 recorded zero=1 at dp=1 without a word; over one replica it shards nothing
    prof = chain_profile([1e-3] * 8, act_bytes=2**20, param_bytes=2**20)
    one = solve(prof, from_spec("cpu4"), Settings(global_batch=16, pp=4, zero=zero, schedules=("1f1b",),
                                                  time_limit_s=5))
    assert one.best.config.dp == 1 and one.best.config.zero == zero  # kept as pinned: the record reproduces it
    assert any(n.startswith(f"ZeRO stage {zero} over one replica (dp=1) shards nothing") for n in one.notes)
    two = solve(prof, from_spec("cpu4"), Settings(global_batch=16, pp=2, dp=2, zero=zero, schedules=("1f1b",),
                                                  time_limit_s=5))
    assert not any("over one replica" in n for n in two.notes)
    free = solve(prof, from_spec("cpu4"), Settings(global_batch=16, pp=4, schedules=("1f1b",), time_limit_s=5))
    assert free.best.config.zero == 0 and not any("over one replica" in n for n in free.notes)
