"""planner.plan and planner.units stay light: a CI job checking plans imports them without torch,
and the solver words its messages without the table library."""

import subprocess
import sys

import pytest

from planner.plan import check_fingerprint, profile_fingerprint
from planner.synthetic import chain_profile
from planner.units import fmt_bytes, fmt_time


@pytest.mark.parametrize("module", ["planner.plan", "planner.units", "planner.evaluate"])
def test_imports_neither_torch_nor_rich(module):
    code = (f"import sys, {module}; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'rich'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_units_by_hand():
    assert fmt_bytes(3 * 2**30) == "3.00 GiB"
    assert fmt_bytes(1536) == "1.5 KiB"
    assert fmt_time(0.0025) == "2.50 ms"
    assert fmt_time(None) == "-"


def test_profile_fingerprint_follows_the_measurements():
    a = chain_profile([1.0, 2.0], [2.0, 4.0])
    b = chain_profile([1.0, 2.5], [2.0, 4.0])
    assert profile_fingerprint(a).startswith(a.model.fingerprint + "+")
    assert profile_fingerprint(a) != profile_fingerprint(b)


def test_check_fingerprint_names_a_stale_plan():
    from pathlib import Path

    from planner.formats import load_plan

    plan = load_plan(Path(__file__).resolve().parents[1] / "plans" / "gpt.cpu2-pp2.json")
    assert check_fingerprint(plan, plan.model.fingerprint, "the profile") == []
    stale = check_fingerprint(plan, "0" * 40, "the profile")
    assert len(stale) == 1 and stale[0].startswith("the plan is stale") and "the profile has structure 0000" in stale[0]
