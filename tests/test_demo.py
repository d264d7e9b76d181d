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
