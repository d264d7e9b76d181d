"""The command line as users meet it: output, files written or not, exit codes."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from planner.cli import app
from planner.formats import dump
from planner.synthetic import chain_profile

runner = CliRunner()


@pytest.fixture
def profile(tmp_path):
    p = tmp_path / "prof.json"
    names = ["emb"] + [f"h.{i}" for i in range(8)] + ["head"]
    dump(chain_profile([1e-3] + [2e-3] * 8 + [6e-3], names=names, act_bytes=2**20, param_bytes=2**22,
                       mbs=(1, 2, 4)), p)
    return p


@pytest.fixture
def plan(tmp_path, profile):
    out = tmp_path / "plan.json"
    r = runner.invoke(app, ["solve", str(profile), "--cluster", "h100x4", "--global-batch", "32", "--pp", "4",
                            "-o", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_solve_prints_candidates_plan_and_baselines(tmp_path, profile):
    out = tmp_path / "p.json"
    r = runner.invoke(app, ["solve", str(profile), "--cluster", "h100x4", "--global-batch", "32", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "top configurations" in r.output and "against today's splits" in r.output
    data = json.loads(out.read_text())
    assert data["kind"] == "plan" and len(data["baselines"]) == 4
    assert data["baselines"][-1]["name"] == "Megatron-LM's usual: tp 4 x pp 1, equal layers"


def test_solve_json_to_stdout(profile):
    r = runner.invoke(app, ["solve", str(profile), "--cluster", "h100x4", "--global-batch", "32", "--json"])
    assert r.exit_code == 0
    assert json.loads(r.stdout)["parallel"]["pp"] >= 1


def test_simulate_table_json_and_timeline(tmp_path, plan):
    r = runner.invoke(app, ["simulate", str(plan)])
    assert r.exit_code == 0 and "bottleneck" in r.output
    r = runner.invoke(app, ["simulate", str(plan), "--json"])
    assert json.loads(r.stdout)["step_time_s"] > 0
    for suffix in ("png", "svg", "html"):
        pic = tmp_path / f"t.{suffix}"
        r = runner.invoke(app, ["simulate", str(plan), "--timeline", str(pic)])
        assert r.exit_code == 0 and pic.stat().st_size > 500


def test_bad_input_exits_2_with_one_line(tmp_path, plan):
    bad = tmp_path / "bad.json"
    bad.write_text(plan.read_text()[:300])
    for args in (["simulate", str(bad)], ["simulate", str(tmp_path / "none.json")],
                 ["solve", str(plan), "--cluster", "h100x4"],  # a plan is not a profile
                 ["simulate", str(plan), "--timeline", str(tmp_path / "t.gif")]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert r.output.count("\n") == 1 and "Traceback" not in r.output


def test_more_stages_than_devices_is_bad_input(profile):
    for args in (["--pp", "5"], ["--pp", "2", "--dp", "4"]):
        r = runner.invoke(app, ["solve", str(profile), "--cluster", "h100x4", *args])
        assert r.exit_code == 2 and r.output.startswith("error: --pp") and r.output.count("\n") == 1, r.output


def test_written_files_are_readable_like_any_new_file(tmp_path, profile):
    import os
    import stat

    out = tmp_path / "plan.json"
    mask = os.umask(0o022)
    try:
        r = runner.invoke(app, ["solve", str(profile), "--cluster", "h100x4", "--global-batch", "32", "-o", str(out)])
    finally:
        os.umask(mask)
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_unknown_cluster_is_bad_input(profile):
    r = runner.invoke(app, ["solve", str(profile), "--cluster", "tpu9000"])
    assert r.exit_code == 2 and "unknown cluster 'tpu9000'" in r.output


def test_infeasible_exits_3(tmp_path):
    p = tmp_path / "big.json"
    dump(chain_profile([1.0] * 4, param_bytes=2**34, mbs=(1,)), p)
    out = tmp_path / "never.json"
    r = runner.invoke(app, ["solve", str(p), "--cluster", "rtx4090x4", "-o", str(out)])
    assert r.exit_code == 3 and "nothing fits" in r.output
    assert not out.exists()


def test_output_folder_must_exist(tmp_path, profile):
    r = runner.invoke(app, ["solve", str(profile), "--cluster", "h100x4", "-o", str(tmp_path / "no" / "p.json")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_check_passes_then_fails_on_memory_and_truncation(tmp_path, plan):
    r = runner.invoke(app, ["check", str(plan)])
    assert r.exit_code == 0 and r.output.startswith("ok")
    data = json.loads(plan.read_text())
    data["stages"][2]["cost"]["act_bytes"] = 200 * 2**30  # edited by hand
    over = tmp_path / "over.json"
    over.write_text(json.dumps(data))
    r = runner.invoke(app, ["check", str(plan), str(over)])
    assert r.exit_code == 1 and "stage 2" in r.output and "needs" in r.output
    cut = tmp_path / "cut.json"
    cut.write_text(plan.read_text()[:-40])
    r = runner.invoke(app, ["check", str(plan), str(cut), str(over)])
    assert r.exit_code == 2 and "not valid JSON" in r.output


def test_check_resolve_finds_a_better_plan(tmp_path, profile):
    slow = tmp_path / "slow.json"
    r = runner.invoke(app, ["solve", str(profile), "--cluster", "h100x4", "--global-batch", "32", "--pp", "4",
                            "--fix-cuts", "1,2,3", "-o", str(slow)])
    assert r.exit_code == 0, r.output
    data = json.loads(slow.read_text())
    data["provenance"]["solver"]["settings"]["fix_cuts"] = None  # as if the user dropped the pin
    slow.write_text(json.dumps(data))
    r = runner.invoke(app, ["check", str(slow), "--profile", str(profile), "--resolve"])
    assert r.exit_code == 1 and "a better plan exists" in r.output


def test_objective_memory_needs_no_more_memory_than_the_fastest_plan(tmp_path, profile):
    paths = {}
    for objective in ("time", "memory"):
        paths[objective] = tmp_path / f"{objective}.json"
        r = runner.invoke(app, ["solve", str(profile), "--cluster", "h100x4", "--global-batch", "32", "--pp", "4",
                                "--schedule", "1f1b", "--objective", objective, "-o", str(paths[objective])])
        assert r.exit_code == 0, r.output
    fast, lean = (json.loads(paths[k].read_text())["predicted"] for k in ("time", "memory"))
    assert lean["peak_memory_bytes"] <= fast["peak_memory_bytes"]
    assert lean["step_time_s"] >= fast["step_time_s"] * (1 - 1e-12)
    r = runner.invoke(app, ["check", str(paths["memory"]), "--profile", str(profile), "--resolve"])
    assert r.exit_code == 0, r.output  # checked again under its own objective
    r = runner.invoke(app, ["solve", str(profile), "--cluster", "h100x4", "--objective", "speed"])
    assert r.exit_code == 2 and "--objective 'speed'" in r.output


@pytest.mark.parametrize("fmt,needle", [("megatron", "--pipeline-model-parallel-layout"), ("deepspeed", '"parts"'),
                                        ("torchtitan", "module_names_per_model_chunk"), ("torch", "split_spec")])
def test_export_formats(plan, fmt, needle):
    r = runner.invoke(app, ["export", str(plan), "--format", fmt])
    assert r.exit_code == 0 and needle in r.stdout


def test_megatron_layout_counts_encoder_and_decoder_layers_alike(tmp_path, plan):
    # the same plan with h.0-3 renamed enc.0-3 and h.4-7 dec.0-3: the layout must not change
    data = json.loads(plan.read_text())
    rename = {f"h.{i}": f"enc.{i}" if i < 4 else f"dec.{i - 4}" for i in range(8)}
    for st in data["stages"]:
        st["layers"] = [rename.get(n, n) for n in st["layers"]]
    data["layers"] = [rename.get(n, n) for n in data["layers"]]  # the model's own list, renamed alike
    renamed = tmp_path / "encdec.json"
    renamed.write_text(json.dumps(data))

    def layout(path):
        r = runner.invoke(app, ["export", str(path), "--format", "megatron"])
        assert r.exit_code == 0, r.output
        return next(line for line in r.stdout.splitlines() if "layout" in line)
    assert layout(renamed) == layout(plan)
    assert layout(plan).count("E") == 1 and layout(plan).count("L") == 1


def test_megatron_export_is_accepted_as_megatron_reads_it(tmp_path, plan):
    # a final norm on stage 2 and the head on stage 3, and recomputation on stage 0 only:
    # Megatron-LM names the loss once and needs a layer count for block recomputation
    data = json.loads(plan.read_text())
    data["stages"][2]["layers"].append("ln_f")
    data["layers"].insert(data["layers"].index(data["stages"][3]["layers"][0]), "ln_f")  # the model has it
    data["stages"][0]["recompute"] = "full"
    path = tmp_path / "split.json"
    path.write_text(json.dumps(data))
    r = runner.invoke(app, ["export", str(path), "--format", "megatron"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    layout = next(line for line in lines if line.startswith("--pipeline-model-parallel-layout"))
    assert layout.count("L") == 1 and layout.endswith('|L"')
    assert any(line.startswith("--recompute-granularity full --recompute-method block --recompute-num-layers ")
               for line in lines)
    assert all(line.startswith(("--", "#")) for line in lines)  # comments on lines of their own


def test_schema_prints_json_schema():
    r = runner.invoke(app, ["schema", "plan"])
    assert r.exit_code == 0 and json.loads(r.stdout)["title"] == "Plan"


def test_solve_simulate_check_schema_never_import_torch(tmp_path, plan, profile):
    code = f"""
import sys
sys.modules["torch"] = None  # importing torch now fails
from typer.testing import CliRunner
from planner.cli import app
r = CliRunner()
for args in (["--help"], ["schema", "profile"], ["simulate", {str(plan)!r}], ["check", {str(plan)!r}],
             ["solve", {str(profile)!r}, "--cluster", "h100x4", "--global-batch", "16"]):
    res = r.invoke(app, args)
    assert res.exit_code == 0, (args, res.output, res.exception)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_check_says_stale_when_the_model_changed(tmp_path, plan, profile):
    data = json.loads(profile.read_text())
    data["model"]["fingerprint"] = "sha256:" + "0" * 64  # the model's structure changed since
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(data))
    r = runner.invoke(app, ["check", str(plan), "--profile", str(changed)])
    assert r.exit_code == 1 and "stale" in r.output


def test_simulate_reports_each_stage_own_compute_as_the_plan_does():
    # an interleaved plan: each rank holds two stages of different sizes, so a stage's compute
    # is not its rank's
    plan_path = "plans/gpt-tied-50k.h200x8-pp4.json"
    plan = json.loads(open(plan_path).read())
    r = runner.invoke(app, ["simulate", plan_path, "--json"])
    assert r.exit_code == 0, r.output
    stages = json.loads(r.stdout)["stages"]
    assert [st["compute_s"] for st in stages] == [st["predicted"]["compute_s"] for st in plan["stages"]]
    assert len({st["compute_s"] for st in stages}) > len({st["rank"] for st in stages}) / 2
    for rank in {st["rank"] for st in stages}:
        mine = [st for st in stages if st["rank"] == rank]
        assert sum(st["compute_s"] for st in mine) == pytest.approx(mine[0]["rank_compute_s"])
    r = runner.invoke(app, ["simulate", plan_path])
    assert r.exit_code == 0, r.output
    from planner.units import fmt_time

    for st in plan["stages"]:
        row = next(line for line in r.output.splitlines() if line.split("│")[1:2] == [f" {st['index']:>5} "])
        assert fmt_time(st["predicted"]["compute_s"]) in row


def _scaled_profile(src, dst, factor, layers=None):
    """A committed profile with its times multiplied by ``factor``: every time of ``layers``
    (all layers, the whole-model calibration and the optimizer step too, when None)."""
    data = json.loads(open(src).read())

    def scale(costs):
        for key, value in costs.items():
            if key.endswith("_s") and value is not None:
                costs[key] = value * factor
    for layer in data["layers"]:
        if layers is None or layer["name"] in layers:
            for costs in layer["by_mbs"].values():
                scale(costs)
    if layers is None:
        for costs in data["whole"].values():
            scale(costs)
    dst.write_text(json.dumps(data))
    return dst


def _rates(text):
    import re

    return [float(x) for x in re.findall(r"([0-9.]+) samples/s", " ".join(text.split()))]


CPU_PLAN, CPU_PROFILE = "plans/gpt.cpu2-pp2.json", "profiles/gpt.cpu.json"


@pytest.mark.parametrize("plan_name,profile_name", [("gpt.cpu2-pp2", "gpt.cpu"),
                                                    ("gpt-tied-50k.h200x8-pp4", "gpt-tied-50k.h200")])
def test_a_plan_priced_on_its_own_profile_is_its_prediction(plan_name, profile_name):
    from planner.check import price_on
    from planner.formats import load_plan, load_profile

    plan = load_plan(f"plans/{plan_name}.json")
    ev = price_on(plan, load_profile(f"profiles/{profile_name}.json"))
    assert ev.step_time_s == plan.predicted.step_time_s
    assert max(ev.peak_memory_bytes) == plan.predicted.peak_memory_bytes
    assert ev.costs == [st.cost for st in plan.stages]


def test_check_resolve_on_a_faster_profile_prices_the_plan_there_too(tmp_path):
    # every time halved: the plan itself runs nearly twice as fast there, so a plan found there
    # is not "97% faster" than it
    half = _scaled_profile(CPU_PROFILE, tmp_path / "half.json", 0.5)
    r = runner.invoke(app, ["check", CPU_PLAN, "--profile", str(half), "--resolve"])
    assert r.exit_code == 0, r.output
    assert "still the best" in r.output and f"on {half}, this plan runs" in " ".join(r.output.split())
    stored = json.loads(open(CPU_PLAN).read())["predicted"]["throughput_samples_per_s"]
    mine, best = _rates(r.output.split("this plan runs", 1)[1])[:2]
    assert mine > 1.8 * stored and mine <= best <= mine * 1.05


def test_check_resolve_on_a_slower_profile_finds_the_better_plan(tmp_path):
    # the first stage's blocks twice as slow: the plan's split is now unbalanced, and a plan
    # priced on the same profile beats it by more than the 5% tolerance
    slow = _scaled_profile(CPU_PROFILE, tmp_path / "slow.json", 2.0,
                           layers={f"transformer.h.{i}" for i in range(4)})
    r = runner.invoke(app, ["check", CPU_PLAN, "--profile", str(slow), "--resolve"])
    assert r.exit_code == 1, r.output
    text = " ".join(r.output.split())
    assert f"a better plan exists: on {slow}," in text and "which runs" in text
    assert "stored prediction" in text and "priced on the profile it was solved on" in text
    best, mine = _rates(text.split("a better plan exists", 1)[1])[:2]
    gain = float(text.split("samples/s, ", 1)[1].split("%")[0]) / 100
    assert best > mine * 1.05 and gain == pytest.approx(best / mine - 1, abs=2e-3)
