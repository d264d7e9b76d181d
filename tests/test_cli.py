"""The command line as users meet it: output, files written or not, exit codes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def test_check_names_the_schedule_with_its_virtual_stages_as_simulate_does(tmp_path, profile):
    out = tmp_path / "v2.json"
    r = runner.invoke(app, ["solve", str(profile), "--cluster", "h100x4", "--global-batch", "32", "--pp", "2",
                            "--schedule", "zb-h1", "--virtual-stages", "2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "zb-h1 (v=2)" in runner.invoke(app, ["simulate", str(out)]).output
    r = runner.invoke(app, ["check", str(out)])
    assert r.exit_code == 0 and "zb-h1 (v=2), step" in r.output, r.output


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


# ------------------------------------------------------------------ bad input found by hand

REPO = Path(__file__).resolve().parents[1]
GPT_PLAN = str(REPO / "plans" / "gpt.cpu2-pp2.json")
GPT_PROFILE = str(REPO / "profiles" / "gpt.cpu.json")
GPT_MODEL = str(REPO / "models" / "gpt.py")


def refused(args: list[str], message: str, code: int = 2):
    """The command fails with one line on stderr naming the problem, and the exit code of its class."""
    r = runner.invoke(app, args)
    assert r.exit_code == code, (args, r.output, r.exception)
    assert r.stdout == "" and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), (args, r.output)
    assert "Traceback" not in r.output and "internal error" not in r.output
    assert message in r.stderr, (args, r.stderr)
    return r


@pytest.mark.parametrize("args,message", [
    # numbers no run could use: were an OverflowError (profile --memory) or a worker failing (exit 5)
    (["solve", GPT_PROFILE, "--cluster", "cpu2", "--time-limit", "inf"], "'--time-limit'"),
    (["profile", f"{GPT_MODEL}:build", "-o", "p.json", "--memory", "inf"], "'--memory'"),
    (["profile", f"{GPT_MODEL}:build", "-o", "p.json", "--memory", "1e300"], "'--memory'"),
    (["execute", GPT_PLAN, "--timeout", "inf"], "'--timeout'"),
    (["execute", GPT_PLAN, "--master-addr", ""], "--master-addr is empty"),
    # counts with no end in sight: a profile measured for ever (it has no timeout)
    (["profile", f"{GPT_MODEL}:build", "-o", "p.json", "--repeats", "1000000000"], "'--repeats'"),
    (["execute", GPT_PLAN, "--steps", "1000000000"], "'--steps'"),
    # a micro-batch size a profile cannot hold: the profile was built, then failed validation
    (["profile", f"{GPT_MODEL}:build", "-o", "p.json", "--mbs", "1,1000000", "--estimate", "h100"],
     "--mbs 1000000: at most 999,999"),
])
def test_flags_no_run_could_use_are_refused_in_one_line(tmp_path, args, message):
    # as a process: a value out of an option's range is the command line's error, which main() renders
    done = subprocess.run([sys.executable, "-m", "planner", *args], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == "", (done.returncode, done.stdout, done.stderr)
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and message in done.stderr, done.stderr
    assert not (tmp_path / "p.json").exists()


def test_profile_refuses_to_write_over_its_model(tmp_path):
    model = tmp_path / "gpt.py"
    model.write_text(Path(GPT_MODEL).read_text())
    before = model.read_bytes()
    refused(["profile", f"{model}:build", "-o", str(model), "--estimate", "h100"], "is also an input")
    assert model.read_bytes() == before  # was replaced by the profile's JSON


def test_a_run_folder_that_is_a_file_is_bad_input(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("x")
    refused(["execute", GPT_PLAN, "--run-dir", str(taken)], "is a file, not a folder")  # was FileExistsError
    refused(["execute", GPT_PLAN, "--run-dir", str(taken / "sub")], f"is inside {taken}")


def test_calibrating_another_models_profile_is_refused_before_the_run(tmp_path):
    # was: the whole run, then the gpt run's times written into the cnn's profile, with a warning
    cnn = str(REPO / "profiles" / "cnn.h200.json")
    refused(["execute", GPT_PLAN, "--calibrate", str(tmp_path / "c.json"), "--profile", cnn],
            "is of model cnn")
    assert not (tmp_path / "c.json").exists()


def test_demo_into_a_file_is_bad_input(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("x")
    refused(["demo", "--out", str(taken), "--device", "cpu"], "is a file")  # was FileExistsError
    refused(["demo", "--out", str(taken / "sub"), "--device", "cpu"], "cannot make the folder")
    assert taken.read_text() == "x"


@pytest.mark.parametrize("text,message", [
    ("1" * 400, "(top level): 1111"),  # said "found _Refused"
    ("[1, 2]", "expected a JSON object (a planner plan), found an array"),
    ("null", "found null"),
    ("true", "found a boolean"),
], ids=["huge number", "array", "null", "boolean"])
def test_a_file_that_is_no_object_says_what_it_holds(tmp_path, text, message):
    path = tmp_path / "plan.json"
    path.write_text(text)
    refused(["simulate", str(path)], message)


def test_a_boolean_is_no_zero_stage(tmp_path):
    data = json.loads(Path(GPT_PLAN).read_text())
    data["parallel"]["zero"] = True  # was read as ZeRO stage 1 (True == 1)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    refused(["simulate", str(path)], "field parallel.zero: Input should be an integer, not true")


def test_a_profile_of_no_time_is_bad_input(tmp_path):
    data = json.loads(Path(GPT_PROFILE).read_text())
    costs = [c for layer in data["layers"] for c in layer["by_mbs"].values()] + list(data["loss"]["by_mbs"].values())
    for cost in costs:
        cost.update(fwd_s=0.0, bwd_s=0.0, bwd_input_s=0.0, bwd_weight_s=0.0)
    path = tmp_path / "prof.json"
    path.write_text(json.dumps(data))
    # --objective memory divided by the step time: ZeroDivisionError
    refused(["solve", str(path), "--cluster", "h100x8", "--objective", "memory"], "every layer takes 0 s")


@pytest.mark.parametrize("args,message", [
    # int() and float() read other scripts' digits: these ran as 2xh100x8, cut at layer 5, 10%, ...
    (["solve", GPT_PROFILE, "--cluster", "\uff12xh100x8"], "cluster '\uff12xh100x8': write the counts with the digits"),
    (["solve", GPT_PROFILE, "--cluster", "cpu\u0662"], "write the counts with the digits 0-9"),
    (["solve", GPT_PROFILE, "--cluster", "cpu2", "--fix-cuts", "\uff15"], "write layer indices with the digits 0-9"),
    # '²' passed str.isdigit() and then failed int(): an internal error
    (["solve", GPT_PROFILE, "--cluster", "cpu2", "--fix-cuts", "\u00b2"], "write layer indices with the digits 0-9"),
    (["check", GPT_PLAN, "--tolerance", "\uff11\uff10%"], "or a fraction like 0.1 with the digits 0-9"),
    (["check", GPT_PLAN, "--tolerance", "1_0%"], "--tolerance '1_0%': write a percentage"),
    (["profile", f"{GPT_MODEL}:build", "-o", "p.json", "--mbs", "1,\u0662"], "write whole numbers with the digits 0-9"),
    (["profile", f"{GPT_MODEL}:build", "-o", "p.json", "--mbs", "1_0"], "--mbs '1_0': write whole numbers separated"),
    (["profile", f"{GPT_MODEL}:build", "-o", "p.json", "--tp", "\uff12"], "--tp '\uff12': write whole numbers with"),
    (["profile", f"{GPT_MODEL}:build", "-o", "p.json", "--arg", "n_layer=\u0663", "--estimate", "h100"],
     "--arg 'n_layer=\u0663': write numbers with the digits 0-9"),
], ids=["cluster nodes", "cluster count", "fix-cuts", "fix-cuts superscript", "tolerance", "tolerance underscore",
        "mbs", "mbs underscore", "tp", "arg"])
def test_numbers_take_only_the_digits_0_to_9(tmp_path, args, message):
    refused([str(tmp_path / a) if a == "p.json" else a for a in args], message)
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("command", [["execute", GPT_PLAN], ["check", GPT_PLAN]], ids=["execute", "check"])
def test_a_tolerance_above_1_is_refused_unless_written_as_a_percentage(command):
    # '--tolerance 5' read as a fraction was 500%: execute reported "within tolerance (500%)" and exited 0
    refused(command + ["--tolerance", "5"], "--tolerance '5' would be 500%: give a fraction, e.g. 0.1 for 10%")
    if command[0] == "check":  # an explicit percentage above 100% is what it says; a fraction up to 1 too
        for value in ("150%", "1", "0.05"):
            r = runner.invoke(app, command + ["--tolerance", value])
            assert r.exit_code == 0, (value, r.output)


def test_a_layer_index_still_pins_a_cut(tmp_path):
    out = tmp_path / "plan.json"
    r = runner.invoke(app, ["solve", GPT_PROFILE, "--cluster", "cpu2", "--fix-cuts", "7", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["stages"][1]["layers"][0] == json.loads(Path(GPT_PROFILE).read_text())[
        "layers"][7]["name"]


@pytest.mark.parametrize("columns", ["abc", "0", "-5", "\uff18\uff10"])
def test_a_terminal_width_that_is_no_width_is_ignored(columns):
    # COLUMNS=abc was a ValueError traceback on importing the command line; COLUMNS=0 printed nothing
    done = subprocess.run([sys.executable, "-m", "planner", "schedules"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "COLUMNS": columns})
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "1f1b" in done.stdout and max(len(line) for line in done.stdout.splitlines()) == 120


def test_threads_and_processes_past_the_cores_are_refused_before_anything_starts(tmp_path):
    from planner.host import cores

    n = cores() + 1
    # --threads 100000: execute's workers failed (exit 5), profile segfaulted; --jobs forks that many
    refused(["execute", GPT_PLAN, "--threads", str(n)], f"--threads {n}: this machine lets planner use {n - 1} CPU")
    refused(["execute", GPT_PLAN, "--threads", "100000"], f"give at most {n - 1} threads per process")
    out = str(tmp_path / "p.json")
    refused(["profile", f"{GPT_MODEL}:build", "-o", out, "--threads", str(n)], f"give at most {n - 1} threads")
    refused(["profile", f"{GPT_MODEL}:build", "-o", out, "--device", "cpu", "--tp", str(n)],
            f"--tp {n}: this machine lets planner use {n - 1} CPU")
    refused(["solve", GPT_PROFILE, "--cluster", "cpu2", "--jobs", str(n), "-o", out],
            f"give at most {n - 1} worker processes")
    assert not (tmp_path / "p.json").exists()


# ---------------------------------------------------------------- stopped from outside

LONG_SOLVE = ["solve", str(REPO / "profiles" / "llama2-70b.h100-estimate.json"), "--cluster", "8xh100x8",
              "--time-limit", "120"]


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _start(args: list[str], tmp_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "planner", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for(check, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("sig,code,message", [
    (signal.SIGTERM, 143, "error: stopped by SIGTERM"),
    (signal.SIGHUP, 129, "error: stopped by SIGHUP"),
    (signal.SIGINT, 130, "error: interrupted by SIGINT (Ctrl-C)"),
])
def test_a_stopped_solve_leaves_no_worker_and_its_output_untouched(tmp_path, sig, code, message):
    out = tmp_path / "plan.json"
    out.write_text("kept\n")
    proc = _start([*LONG_SOLVE, "--jobs", "2", "-o", str(out)], tmp_path)
    try:
        _wait_for(lambda: len(_children(proc.pid)) >= 2, 120)
        workers = _children(proc.pid)
        time.sleep(1)  # into the search
        if sig == signal.SIGINT:  # Ctrl-C reaches the whole process group
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        # SIGTERM to planner alone left its idle workers waiting on their queue for ever
        _wait_for(lambda: not any(_alive(w) for w in workers), 10)
    finally:
        if _alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code and err == message + "\n", (proc.returncode, err)
    assert out.read_text() == "kept\n" and sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


@pytest.mark.slow
def test_ctrl_c_says_so_in_any_command(tmp_path):
    proc = _start([*LONG_SOLVE, "--jobs", "1"], tmp_path)
    time.sleep(6)  # typer turned a Ctrl-C no command handled into exit 130 and printed nothing
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "error: interrupted by SIGINT (Ctrl-C)\n", (proc.returncode, err)


def test_a_file_being_written_when_stopped_is_complete_or_untouched(tmp_path):
    """SIGTERM while the temporary file is written: before, the process died there, leaving the
    temporary file beside the untouched output; now the signal waits for the rename."""
    code = f"""
import os, signal
from planner import formats
real = os.fsync
def fsync(fd):
    os.kill(os.getpid(), signal.SIGTERM)
    real(fd)
formats.os.fsync = fsync
formats.write_atomic({str(tmp_path / 'out.json')!r}, "new\\n")
print("not reached")
"""
    (tmp_path / "out.json").write_text("old\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == -signal.SIGTERM and "not reached" not in done.stdout, done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"] and (tmp_path / "out.json").read_text() == "new\n"
