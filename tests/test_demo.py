"""`planner demo` end to end on this machine: it profiles, solves, draws and executes the bundled
GPT, and leaves the files it names."""

import json

import pytest
from typer.testing import CliRunner

from planner.cli import app


@pytest.mark.slow
def test_demo_runs_the_whole_path_and_leaves_its_files(tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    for step in ("1. profile", "2. solve", "3. simulate", "4. execute"):
        assert step in r.output
    assert "loss equals the single-process reference" in r.output and "gradients equal the reference" in r.output
    plan = json.loads((out / "gpt.plan.json").read_text())
    assert plan["kind"] == "plan" and plan["parallel"]["pp"] == 2
    assert json.loads((out / "gpt.profile.json").read_text())["kind"] == "profile"
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_solve_message_names_what_is_pinned():
    # the free plan was already pp=2 dp=1 zb-h2, and the message said "pinning pp=2": the schedule was pinned
    from planner.demo import pinned_message
    from planner.evaluate import Config

    zb = pinned_message(Config(pp=2, dp=1, mbs=1, m=16, schedule="zb-h2"), 50.2)
    assert zb.endswith("(50.2 samples/s); pinning the schedule to 1F1B or GPipe to show a classic two-stage pipeline:")
    assert "pp=2 to" not in zb
    wide = pinned_message(Config(pp=1, dp=2, mbs=1, m=8, schedule="1f1b"), 40.0)
    assert "; pinning pp=2 and dp=1 to show" in wide
    same = pinned_message(Config(pp=2, dp=1, mbs=2, m=8, schedule="gpipe"), 30.0)
    assert "pinning" not in same and "already a classic two-stage pipeline" in same
