"""Costs measured at tensor-parallel degrees above 1 (``Layer.tp_costs``): the format, the cost
model using them in place of the derived ones, and ``planner profile --tp`` end to end."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from planner.cli import app
from planner.cost import CostTable, Segment, tp_costs_note
from planner.formats import Link, Profile, TpCosts, TpLayerCost, Training, load_profile, parse, to_json
from planner.plan import profile_fingerprint
from planner.synthetic import chain_profile

MiB = 2**20
GBS = Link(bandwidth_bytes_per_s=1e9, latency_s=0.0)
runner = CliRunner()


def _measured(prof: Profile, layers: dict[int, TpCosts], tp: int = 2) -> Profile:
    """``prof`` with ``layers[i]`` as layer i's costs measured at ``tp``."""
    new = [layer.model_copy(update={"tp_costs": {str(tp): layers[i]}}) if i in layers else layer
           for i, layer in enumerate(prof.layers)]
    return prof.model_copy(update={"layers": new})


def _costs(fwd_s: float, bwd_s: float, *, sp: bool = True, params: int | None = None,
           act: int | None = None) -> TpCosts:
    return TpCosts(sequence_parallel=sp, param_bytes=params,
                   by_mbs={"1": TpLayerCost(fwd_s=fwd_s, bwd_s=bwd_s, act_bytes=act)})


# ---------------------------------------------------------------------------------- format


def test_a_profile_without_tp_costs_dumps_and_fingerprints_as_before():
    prof = chain_profile([1e-3, 2e-3], param_bytes=MiB)
    data = json.loads(to_json(prof))
    for layer in data["layers"]:
        del layer["tp_costs"]  # a profile written before the field existed
    old = parse(data, Profile, "p.json")
    assert old == prof and all(layer.tp_costs == {} for layer in old.layers)
    assert profile_fingerprint(old) == profile_fingerprint(prof)
    assert "tp_costs" not in prof.model_dump_json(exclude_defaults=True)  # what the fingerprint hashes
    measured = _measured(prof, {0: _costs(6e-4, 1.2e-3)})
    assert profile_fingerprint(measured) != profile_fingerprint(prof)


def test_tp_costs_round_trip(tmp_path):
    prof = _measured(chain_profile([1e-3, 2e-3], param_bytes=MiB), {1: _costs(1e-3, 2e-3, params=MiB // 2)})
    path = tmp_path / "p.json"
    path.write_text(to_json(prof))
    back = load_profile(path)
    assert back == prof
    assert back.layers[1].tp_costs["2"].by_mbs["1"].fwd_s == 1e-3
    assert back.layers[1].tp_costs["2"].sequence_parallel


@pytest.mark.parametrize(("key", "mbs", "message"), [
    ("1", "1", "'1' is not a tensor-parallel degree above 1"),
    ("two", "1", "'two' is not a tensor-parallel degree"),
    ("2", "4", r"tp_costs\['2'\] has micro-batch sizes \['4'\] that by_mbs lacks"),
])
def test_tp_costs_keys_are_degrees_and_sizes_the_layer_has(key, mbs, message):
    data = json.loads(to_json(chain_profile([1e-3])))
    data["layers"][0]["tp_costs"] = {key: {"sequence_parallel": False, "by_mbs": {mbs: {"fwd_s": 1, "bwd_s": 1}}}}
    with pytest.raises(Exception, match=message):
        parse(data, Profile, "p.json")


def test_tp_costs_without_sizes_are_refused():
    with pytest.raises(ValidationError, match="at least 1 item"):
        TpCosts(sequence_parallel=True, by_mbs={})


# ------------------------------------------------------------------------------ cost model


def test_measured_tp_times_replace_the_derived_ones_for_their_layers_only():
    # three blocks of 1 ms forward, 2 ms backward, 64 MiB of weights, 1 MiB inputs; at tp 2 over
    # 1 GB/s each derived one is 0.5 ms + two all-reduces of 2 * 1/2 * 1 MiB / 1e9 = 1.048576 ms
    prof = chain_profile([1e-3] * 3, param_bytes=64 * MiB, out_bytes_per_sample=MiB)
    ar = 2 * 1 / 2 * MiB / 1e9
    measured = _measured(prof, {1: _costs(0.9e-3, 1.6e-3, params=40 * MiB)})
    model = CostTable(prof, 1, tp=2, tp_link=GBS, sequence_parallel=True)
    t = CostTable(measured, 1, tp=2, tp_link=GBS, sequence_parallel=True)
    assert t.fwd[1] == pytest.approx(0.9e-3)  # as measured: its all-reduces are inside
    assert t.bwd[1] == pytest.approx(1.6e-3)
    assert (t.bwd_input[1], t.bwd_weight[1]) == pytest.approx((0.8e-3, 0.8e-3))  # no split measured: halves
    assert t.params[1] == 40 * MiB and t.opt_share[1] == pytest.approx(40 / 64)
    assert t.tp_comm[1] == pytest.approx(0.8e-3)  # the model's 2 * ar, capped at the measured input gradient
    assert t.fwd[2] == model.fwd[2] == pytest.approx(0.5e-3 + 2 * ar)  # not measured: modelled
    assert list(t.tp_measured) == [False, True, False]
    seg = Segment(0, 3)
    assert t.times(seg)[0] == pytest.approx(model.times(seg)[0] - model.fwd[1] + 0.9e-3)
    cost = t.stage_cost(seg, 1, Training())
    assert cost.param_bytes == 32 * MiB + 40 * MiB + 32 * MiB


def test_measured_tp_costs_are_used_only_at_their_degree_and_sequence_parallelism():
    prof = chain_profile([1e-3] * 3, param_bytes=64 * MiB, out_bytes_per_sample=MiB)
    measured = _measured(prof, {1: _costs(0.9e-3, 1.6e-3, sp=False)})
    for tp, sp in ((2, True), (4, False)):
        modelled = CostTable(prof, 1, tp=tp, tp_link=GBS, sequence_parallel=sp)
        t = CostTable(measured, 1, tp=tp, tp_link=GBS, sequence_parallel=sp)
        assert list(t.fwd) == pytest.approx(list(modelled.fwd)) and not t.tp_measured.any()
    assert CostTable(measured, 1, tp=2, tp_link=GBS).fwd[1] == pytest.approx(0.9e-3)
    assert CostTable(measured, 1).fwd[1] == pytest.approx(1e-3)  # tp 1: the profile itself


def test_measured_tp_costs_are_scaled_by_the_calibration_and_keep_measured_act_bytes():
    from planner.formats import WholeCost

    prof = chain_profile([1e-3] * 2, param_bytes=64 * MiB, act_bytes=8 * MiB)
    prof = prof.model_copy(update={"whole": {"1": WholeCost(fwd_s=3e-3, bwd_s=6e-3, layer_sum_s=6e-3, scale=1.5)}})
    t = CostTable(_measured(prof, {0: _costs(1e-3, 2e-3, act=3 * MiB)}), 1, tp=2, tp_link=GBS,
                  sequence_parallel=True)
    assert (t.fwd[0], t.bwd[0]) == pytest.approx((1.5e-3, 3e-3))
    # measured; derived: the block's two all-gathered 1 KiB inputs whole, the rest halved
    assert t.act[0] == 3 * MiB and t.act[1] == 2048 + (8 * MiB - 2048) / 2


def test_the_note_counts_the_measured_layers_or_says_why_none_are():
    prof = chain_profile([1e-3] * 3, param_bytes=64 * MiB)
    measured = _measured(prof, {0: _costs(1e-3, 2e-3), 2: _costs(1e-3, 2e-3)})
    assert tp_costs_note(measured, 1, True, 1) is None
    assert tp_costs_note(measured, 2, True, 1) == ("tp 2 costs measured for 2 of 3 layers (with sequence "
                                                   "parallelism); the other 1 modelled")
    assert tp_costs_note(measured, 2, False, 1) == (
        "tp 2 costs modelled (matrix products divided, ring all-reduces added), not measured: the profile "
        "measured tp 2 with sequence parallelism, not tp 2 without it at micro-batch 1")
    assert tp_costs_note(prof, 4, True, 1).endswith("not measured: planner profile --tp 4 measures them")


# ----------------------------------------------------------------------------- measurement

TINY_GPT = ["models/gpt.py:build", "--arg", "n_layer=2", "--arg", "d_model=32", "--arg", "n_head=2",
            "--arg", "vocab=64", "--arg", "seq=16", "--mbs", "1", "--repeats", "1", "--warmup", "0"]
NO_TP_PLAN = """
import torch
from torch import nn
from planner.model import ModelSpec

def build():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    return ModelSpec(model=model, loss=nn.functional.cross_entropy,
                     batch=lambda n, g: ((torch.randn(n, 4, generator=g),), torch.zeros(n, dtype=torch.long)))
"""


def test_profile_tp_refuses_a_model_without_a_tp_plan_in_one_line(tmp_path):
    (tmp_path / "plain.py").write_text(NO_TP_PLAN)
    result = runner.invoke(app, ["profile", f"{tmp_path / 'plain.py'}:build", "--tp", "2", "-o",
                                 str(tmp_path / "p.json")])
    assert result.exit_code == 2, result.output
    assert "--tp 2: the model gives no tp_plan (ModelSpec.tp_plan" in result.output
    assert len(result.output.strip().splitlines()) <= 2 and not (tmp_path / "p.json").exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--tp", "1"], "give degrees of 2 or more"),
    (["--tp", "2", "--estimate", "h100"], "--estimate runs nothing: choose one"),
])
def test_profile_tp_refuses_degree_1_and_estimates(tmp_path, flags, message):
    result = runner.invoke(app, ["profile", *TINY_GPT, *flags, "-o", str(tmp_path / "p.json")])
    assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.slow
def test_profile_tp_2_measures_every_layer_and_solve_uses_it(tmp_path):
    out = tmp_path / "p.json"
    result = runner.invoke(app, ["profile", *TINY_GPT, "--tp", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "tp 2: every layer measured split over 2 processes (with sequence parallelism)" in result.output
    prof = load_profile(out)
    names = [layer.name for layer in prof.layers]
    assert names == ["transformer.emb", "transformer.h.0", "transformer.h.1", "transformer.ln_f", "lm_head"]
    for layer in prof.layers:
        costs = layer.tp_costs["2"]
        assert costs.sequence_parallel and set(costs.by_mbs) == {"1"}
        assert costs.by_mbs["1"].fwd_s > 0 and costs.by_mbs["1"].bwd_s > 0
        assert costs.by_mbs["1"].act_bytes is not None
    # float32 parameters per device: the embeddings (64 + 16) x 32 split by rows; a block's 12,704
    # less its two norms (2 x 64) and two row-parallel biases (2 x 32), replicated, split in two;
    # the final norm (64) replicated; the head's 64 x 32 split by the vocabulary
    block = 4 * ((12_704 - 192) // 2 + 192)
    assert [layer.tp_costs["2"].param_bytes for layer in prof.layers] == [80 * 32 * 2, block, block, 256, 64 * 32 * 2]
    assert prof.layers[2].tp_costs == prof.layers[1].tp_costs  # h.1 is h.0's twin (same_as)
    solved = runner.invoke(app, ["solve", str(out), "--cluster", "cpu4", "--tp", "2", "--pp", "2", "--dp", "1"])
    assert solved.exit_code == 0, solved.output
    assert "tp 2 costs measured for 5 of 5 layers (with sequence parallelism)" in solved.output


MARKER = "PLANNER_TEST_RUN"


def _ours(marker: str, what: str) -> list[str]:
    """Running processes whose environment carries ``marker`` and whose command line has ``what``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if f"{MARKER}={marker}".encode() not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z":
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if what in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "code", "message"), [
    ("raise@1", 5, "error: measuring at tp 2, rank 1 failed: RuntimeError: injected failure (PLANNER_FAULT)"),
    ("hang@1", 130, "error: interrupted by SIGINT (Ctrl-C): stopped the tp measurement"),
])
def test_a_failing_or_interrupted_tp_measurement_leaves_no_process(tmp_path, fault, code, message):
    import time
    import uuid

    from tests.test_lifecycle import wait_for

    marker = uuid.uuid4().hex
    # the measurement's run folder, kept when it fails, goes under tmp_path
    env = dict(os.environ, OMP_NUM_THREADS="1", PLANNER_FAULT=fault, TMPDIR=str(tmp_path), **{MARKER: marker})
    repo = Path(__file__).resolve().parents[1]
    with open(tmp_path / "out.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "planner", "profile", *TINY_GPT, "--tp", "2", "-o",
                                 str(tmp_path / "p.json")], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        if fault.startswith("hang"):
            wait_for(lambda: len(_ours(marker, "-u -m planner.profile.tp_worker")) == 2, 240,
                     "both tp workers starting")  # torchrun starts them with -u; its own command has none
            time.sleep(3)  # past their start: rank 0 waits on rank 1's first collective
            proc.send_signal(signal.SIGINT)
        proc.wait(timeout=240)
    finally:
        proc.kill()
        for line in _ours(marker, ""):
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
    text = (tmp_path / "out.txt").read_text()
    assert proc.returncode == code, text
    assert message in text and "Traceback" not in text, text
    assert not (tmp_path / "p.json").exists()
    assert [p.name for p in tmp_path.glob("planner-tp-*/tp2/launcher.log")] == ["launcher.log"]  # named in the error
    wait_for(lambda: not _ours(marker, "planner"), 10, "every process of the measurement ending")


@pytest.mark.slow
def test_a_tp_measurement_refused_by_the_model_keeps_no_run_folder(tmp_path):
    # 3 heads do not split over 2 ranks: the rank's own error is the whole message, and its run folder
    # (job, pids, the same error in the log) was kept in the temporary folder with nothing more in it
    args = [a.replace("n_head=2", "n_head=3").replace("d_model=32", "d_model=48") for a in TINY_GPT]
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "planner", "profile", *args, "--tp", "2", "-o",
                           str(tmp_path / "p.json")], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: measuring at tp 2, rank ") and done.stderr.count("\n") == 1, done.stderr
    assert "log:" not in done.stderr and not (tmp_path / "p.json").exists()
    assert not list(tmp_path.glob("planner-tp-*")), list(tmp_path.rglob("*"))
