"""When nothing fits, the message says what binds (the least memory the allowed configurations
need on their fullest device against what it has usable) and only ways out that change it."""

import re
from pathlib import Path

import pytest

from planner.clusters import from_spec
from planner.errors import InfeasibleError
from planner.formats import load_profile
from planner.solve import Settings, solve

MiB = 2**20
GPT = load_profile(Path(__file__).parents[1] / "profiles" / "gpt.cpu.json")  # 15 layers, mbs 1, 2, 4
UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
SIZE = r"(-?[\d.]+ (?:B|KiB|MiB|GiB))"


def nbytes(text: str) -> float:
    value, unit = text.split()
    return float(value) * UNITS[unit]


def message(memory_mib: float, **pins) -> str:
    with pytest.raises(InfeasibleError) as e:
        solve(GPT, from_spec("cpu2", memory_bytes=int(memory_mib * MiB)), Settings(global_batch=16, **pins))
    return str(e.value)


def need_usable_short(text: str) -> tuple[float, float, float]:
    m = re.search(rf"needs (?:is )?{SIZE} on its fullest device.*?it has {SIZE} usable, {SIZE} short", text)
    assert m, text
    return nbytes(m[1]), nbytes(m[2]), nbytes(m[3])


# The model's weights, gradients and Adam state take 44.6 MiB: from 22.3 MiB per device they fit
# the two devices in all, and what binds is the fullest device.
@pytest.mark.parametrize("memory_mib", [23, 24, 26])
def test_the_shortfall_is_what_the_fullest_device_lacks(memory_mib):
    # interleaved plans hold several stages per device: one stage's memory is not the device's
    text = message(memory_mib)
    need, usable, short = need_usable_short(text)
    assert usable == memory_mib * MiB and short > 0
    assert need - usable == pytest.approx(short, rel=0.01, abs=0.1 * MiB)


def test_recompute_none_is_respected_and_auto_is_offered():
    text = message(24, recompute="none")
    assert "no recomputation" in text and "full recomputation" not in text
    assert "--recompute auto (needs" in text and "--recompute full" not in text


@pytest.mark.parametrize("recompute", ["auto", "full"])
def test_recomputation_is_not_offered_where_it_is_already_allowed(recompute):
    text = message(24, recompute=recompute)
    assert "full recomputation" in text and "--recompute" not in text


def test_the_users_split_is_the_one_explained():
    # 4 layers on the first device, 11 on the second: the split without the pin fits in 32 MiB
    text = message(32, fix_cuts=(4,))
    assert "with your --fix-cuts split" in text and "transformer.h.3..lm_head" in text
    need, usable, _ = need_usable_short(text)
    assert need > usable == 32 * MiB
    assert re.search(rf"drop --fix-cuts \(needs {SIZE}, fits\)", text)


def test_no_smaller_micro_batch_is_offered_where_it_is_already_the_smallest():
    text = message(24, mbs=1)
    assert "--mbs" not in text and "micro-batch" not in text


def test_a_smaller_pinned_micro_batch_is_offered():
    assert "--mbs 1 (needs" in message(24, mbs=4)


def test_a_model_whose_state_exceeds_the_whole_cluster_says_so_in_one_line():
    # 11.14 MiB of float32 weights: 2.92 M parameters x 16 bytes (Adam) = 44.6 MiB, two devices of 20 MiB
    text = message(20)
    assert text == ("nothing fits on cpu2 in all: 2.92 M parameters x 16 bytes (adam, param precision: weights, "
                    "gradients and optimizer state) need 44.6 MiB, the cluster's 2 devices have 40.0 MiB usable "
                    "in all: no split of any kind fits; use more devices")


def test_a_reserve_larger_than_memory_is_named():
    with pytest.raises(InfeasibleError, match=r"no usable memory \(1.0 MiB each at most, 1.00 GiB reserved"):
        solve(GPT, from_spec("h100x2", memory_bytes=MiB), Settings(global_batch=16))


def test_the_time_limit_is_not_blamed_where_it_does_not_bind(monkeypatch):
    # without the fluid program's bound (as loose as it is on models it cannot decide), interleaved
    # configurations with 4 stages per device stay open at their simulation budget; a one-minute
    # limit is far more than those take (with the program every configuration here is decided)
    from planner.solve import fluid

    monkeypatch.setattr(fluid.Program, "bound", lambda self, floor, reach=0.0: floor)
    text = message(26, time_limit_s=60.0)
    assert "raising --time-limit does not help" in text and "raise --time-limit" not in text
    _, usable, short = need_usable_short(text)
    assert usable == 26 * MiB and short > 0


def test_several_stages_per_device_are_counted_together():
    # interleaved with 2 stages per device: the device's memory is both stages', priced by the
    # simulator, not the larger stage's alone (which fits in 24 MiB)
    text = message(24, schedules=("interleaved-1f1b",), virtual_stages=2)
    assert "the lightest plan found needs" in text and re.search(r"rank \d holding \S+ and \S+\)", text)
    need, usable, short = need_usable_short(text)
    assert need > usable == 24 * MiB and short > 0
    assert "--schedule 1f1b (needs" in text  # one stage per device needs less


def test_the_time_limit_is_blamed_where_it_binds():
    with pytest.raises(InfeasibleError, match=r"no plan found within the time limit .*; raise --time-limit"):
        solve(GPT, from_spec("cpu2"), Settings(global_batch=16, time_limit_s=1e-9))


def test_a_way_out_that_barely_moves_the_need_is_not_offered():
    # GPipe holds every micro-batch: with the global batch fixed, a smaller micro-batch holds the
    # same activations in all, so "--mbs 1" would need the same 8.5 GiB
    with pytest.raises(InfeasibleError) as e:
        solve(GPT, from_spec("cpu2"), Settings(global_batch=8192, pp=2, mbs=2, schedules=["gpipe"]))
    text = str(e.value)
    assert "--mbs" not in text and "--schedule 1f1b" in text, text
