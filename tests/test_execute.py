"""Running plans on PyTorch's pipeline engine: correctness against a plain run, and failures that
end cleanly with the rank, stage and cause named. Multi-process tests use gloo on the CPU."""

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as hst

from planner.clusters import from_spec
from planner.errors import CheckFailed, ExecutionError
from planner.execute import Options, execute, raise_on_failure
from planner.execute.single import run_single
from planner.formats import dump, load_plan
from planner.model import build_spec
from planner.profile import Options as ProfileOptions
from planner.profile import profile_model
from planner.solve import Settings, solve
from planner.solve.plan import make_plan

TINY = {"n_layer": 3, "d_model": 32, "n_head": 2, "vocab": 64, "seq": 16, "tied": True}


@pytest.fixture(scope="module")
def tiny_profile():
    spec = build_spec("models/gpt.py:build", TINY)
    return profile_model(spec, "models/gpt.py:build", TINY, ProfileOptions(mbs=(1, 2), repeats=2, warmup=1, threads=1))


def plan_for(profile, tmp_path, schedule, pp=2, dp=1, gb=8, name="plan.json"):
    settings = Settings(global_batch=gb, pp=pp, dp=dp, tp=1, zero=0, schedules=(schedule,), time_limit_s=5)
    result = solve(profile, from_spec("cpu2"), settings)
    plan = make_plan(profile, from_spec("cpu2"), result, settings)
    path = tmp_path / name
    dump(plan, path)
    return path


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v", "dualpipe-v"])
def test_single_device_runs_every_schedule_with_matching_gradients(tiny_profile, tmp_path, schedule):
    plan = load_plan(plan_for(tiny_profile, tmp_path, schedule))
    r = run_single(plan, torch.device("cpu"), steps=1, warmup=0)
    assert r.grad_message == ""
    assert r.loss == pytest.approx(r.reference_loss, rel=1e-5)


def test_recomputation_keeps_gradients(tiny_profile, tmp_path):
    path = plan_for(tiny_profile, tmp_path, "1f1b")
    data = json.loads(path.read_text())
    for st in data["stages"]:
        st["recompute"] = "full"
    path.write_text(json.dumps(data))
    r = run_single(load_plan(path), torch.device("cpu"), steps=1, warmup=0)
    assert r.grad_message == ""


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_two_gloo_processes_match_the_reference(tiny_profile, tmp_path, schedule):
    path = plan_for(tiny_profile, tmp_path, schedule)
    ver = execute(path, Options(steps=2, warmup=1, run_dir=str(tmp_path / "run"), tolerance=1000.0))
    assert ver.mode == "distributed"
    assert all(ok for _, ok, _ in ver.checks), ver.checks
    raise_on_failure(ver)


@pytest.mark.slow
def test_data_parallel_replicas(tiny_profile, tmp_path):
    path = plan_for(tiny_profile, tmp_path, "gpipe", pp=1, dp=2)
    ver = execute(path, Options(steps=1, warmup=1, run_dir=str(tmp_path / "run"), tolerance=1000.0))
    assert all(ok for _, ok, _ in ver.checks), ver.checks


@pytest.mark.slow
@pytest.mark.parametrize("fault,match", [
    ("raise@1", r"rank 1 \(stage 1\) failed: RuntimeError: injected failure"),
    ("kill@1", r"rank 1 \(stage 1\) was killed by signal 9"),
    ("oom@0", r"rank 0 \(stage 0\) ran out of memory: predicted .* device has 4.00 GiB"),
])
def test_failing_workers_end_every_worker_and_say_why(tiny_profile, tmp_path, monkeypatch, fault, match):
    path = plan_for(tiny_profile, tmp_path, "1f1b")
    monkeypatch.setenv("PLANNER_FAULT", fault)
    with pytest.raises(ExecutionError, match=match):
        execute(path, Options(steps=1, warmup=1, run_dir=str(tmp_path / "run"), timeout_s=120))


TORCHRUN_SUMMARY = """
Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 31174)  (SIGTERM)
-------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 31175)  (SIGKILL)
"""


def test_a_dead_worker_is_named_from_the_launchers_root_cause(tiny_profile, tmp_path):
    from pathlib import Path

    from planner.execute.launch import _diagnose

    plan = load_plan(plan_for(tiny_profile, tmp_path, "1f1b"))
    # neither rank reported; torchrun lists the peer it stopped with SIGTERM before the root cause
    text = _diagnose(plan, [], TORCHRUN_SUMMARY, 1, Path("launcher.log"))
    assert text.startswith("rank 1 (stage 1) was killed by signal 9 before reporting")


def test_a_stale_plan_is_refused_before_anything_starts(tiny_profile, tmp_path):
    path = plan_for(tiny_profile, tmp_path, "1f1b")
    data = json.loads(path.read_text())
    data["model"]["args"]["n_layer"] = 4  # the model the factory now builds differs
    path.write_text(json.dumps(data))
    with pytest.raises(CheckFailed, match="the plan is stale"):
        execute(path, Options(mode="single"))


def test_a_plan_whose_arguments_make_a_huge_model_is_refused_before_it_is_built(tiny_profile, tmp_path, monkeypatch):
    import time

    from typer.testing import CliRunner

    import planner.model
    from planner.cli import app
    from planner.split import TooManyParameters, build_on_meta

    path = plan_for(tiny_profile, tmp_path, "1f1b")
    data = json.loads(path.read_text())
    data["model"]["args"]["n_layer"] = 10**6  # was built on the meta device first: hours and GiBs
    path.write_text(json.dumps(data))
    start = time.monotonic()
    for args in (["execute", str(path)], ["check", "--rebuild", str(path)]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 1, r.output
        assert "the plan is stale: " in r.output and "(n_layer=1000000, " in r.output, r.output
        assert "builds a model of more than " in r.output and "parameters, and the plan's stages hold " in r.output
    assert time.monotonic() - start < 60
    # the meta build is not followed by one in memory (the way for a factory that computes with its weights)
    built: list[str] = []
    real = planner.model.build_spec
    monkeypatch.setattr("planner.split.build_spec", lambda *a: built.append("build") or real(*a))
    with pytest.raises(TooManyParameters, match="more than 1,000 parameters"):
        build_on_meta("models/gpt.py:build", TINY, most_parameters=1000)
    assert built == ["build"]
    assert build_on_meta("models/gpt.py:build", TINY, most_parameters=10**6).model is not None


def test_replay_measures_each_rank(tiny_profile, tmp_path):
    path = plan_for(tiny_profile, tmp_path, "1f1b")
    ver = execute(path, Options(mode="replay"))
    memory = [r for r in ver.rows if "peak memory" in r.what]
    assert len(memory) == 2 and all(r.measured > 0 for r in memory)
    step = [r for r in ver.rows if r.what.startswith("step time")]
    assert step and step[0].measured > 0


def test_model_only_schedules_are_refused(tiny_profile, tmp_path):
    settings = Settings(global_batch=8, pp=2, dp=1, schedules=("pipedream",), include_model_only=True)
    result = solve(tiny_profile, from_spec("cpu2"), settings)
    assert any("modelled only" in note for note in result.notes)  # solve says so first
    path = tmp_path / "p.json"
    dump(make_plan(tiny_profile, from_spec("cpu2"), result, settings), path)
    from planner.errors import InputError

    with pytest.raises(InputError, match="modelled only"):
        execute(path, Options())


EXPLICIT = '''
import torch
from torch import nn
from planner.model import ModelSpec

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.body = nn.ModuleDict({"a": nn.Linear(16, 16), "b": nn.Linear(16, 16)})
        self.out = nn.Linear(16, 3)

    def forward(self, x):  # not used: the layers below are called in order
        raise RuntimeError("explicit layers only")

def build():
    torch.manual_seed(0)
    return ModelSpec(model=Net(), layers=["inp", "body.a", "body.b", "out"],
                     batch=lambda n, g: ((torch.randn(n, 8, generator=g),), torch.randint(0, 3, (n,), generator=g)),
                     loss=nn.functional.cross_entropy)
'''


def test_explicit_layers_are_compared_under_the_models_names(tmp_path, monkeypatch):
    from planner.execute.train import stage_parameters
    from planner.execute.verify import Reference, compare_grads

    (tmp_path / "net.py").write_text(EXPLICIT)
    monkeypatch.chdir(tmp_path)
    spec = build_spec("net.py:build", {})
    prof = profile_model(spec, "net.py:build", {}, ProfileOptions(mbs=(2,), repeats=1, warmup=0))
    path = plan_for(prof, tmp_path, "1f1b", gb=4)
    r = run_single(load_plan(path), torch.device("cpu"), steps=1, warmup=0)
    assert r.grad_message == "" and r.loss == pytest.approx(r.reference_loss, rel=1e-6)
    # the comparison is not vacuous: stage parameters carry the model's names
    from planner.execute.stages import build_model, build_stages

    plan = load_plan(path)
    spec = build_model(plan, device=torch.device("cpu"), dtype=torch.float32)
    built = build_stages(plan, spec, (torch.randn(2, 8),))
    named = stage_parameters(dict(enumerate(built.modules)), spec.model)
    assert set(named) == {n for n, _ in spec.model.named_parameters()}
    ref = Reference.of(spec.model, spec.layers, 1, "float32")
    ref.run(spec, (torch.randn(2, 8),), torch.tensor([0, 1]))
    assert "could be matched" in compare_grads({"nope.weight": named["out.weight"]}, ref, 2.0 ** -24).message


def _raised(e: Exception) -> Exception:
    """``e`` with a traceback, as a raised exception has."""
    try:
        raise e
    except Exception as caught:  # noqa: BLE001
        return caught


def test_an_error_without_text_is_named_by_where_it_was_raised():
    from planner.execute.reports import error_text

    assert error_text(RuntimeError("\nstage 1 got a tensor of the wrong shape\nmore")) == \
        "stage 1 got a tensor of the wrong shape"
    assert error_text(_raised(RuntimeError(""))).startswith("raised without a message at test_execute.py:")
    assert error_text(RuntimeError()) == "raised without a message"


def test_an_engine_error_in_this_process_carries_its_text():
    from planner.execute import _guarded

    def fails():
        raise RuntimeError("   ")

    with pytest.raises(ExecutionError, match=r"^single device failed: RuntimeError: raised without a message "
                                             r"at test_execute.py:\d+ \(fails\)$"):
        _guarded("single device", fails)


def test_a_failed_workers_message_is_never_empty(tiny_profile, tmp_path):
    from pathlib import Path

    from planner.execute.launch import _diagnose

    plan = load_plan(plan_for(tiny_profile, tmp_path, "1f1b"))
    from planner.execute.reports import Failure, WorkerReport

    report = WorkerReport(rank=1, pp_rank=1, dp_rank=0, stages=[1], failure=Failure(error="RuntimeError", message=""))
    text = _diagnose(plan, [report], "", 1, Path("launcher.log"))
    assert text == "rank 1 (stage 1) failed: RuntimeError: no message (log: launcher.log)"


def test_a_run_whose_reports_lack_the_loss_says_so_instead_of_nan():
    from planner.execute import Verification, _record_checks
    from planner.execute.reports import Measured

    ver = Verification(mode="distributed", device="cpu")
    _record_checks(ver, "distributed", Measured(step_times_s=[], max_rss_bytes=0, reference_loss=1.5), 4, "float32")
    _, ok, detail = ver.checks[0]
    assert not ok and detail == "no worker's report carries the loss (the rank of the last stage computes it)"
    with pytest.raises(ExecutionError, match="loss equals the single-process reference failed: no worker's"):
        raise_on_failure(ver)


@pytest.mark.parametrize("opts,message", [
    (Options(nnodes=2), "--nnodes 2 needs --master-port: the same free port on every node"),
    (Options(nnodes=2, node_rank=2, master_port=29500), "--node-rank 2: with --nnodes 2 it is 0 to 1"),
    (Options(nnodes=2, master_port=29500, mode="single"), "--nnodes 2 runs distributed"),
])
def test_rendezvous_options_are_checked_before_anything_starts(opts, message):
    from planner.errors import InputError
    from planner.execute import check_options

    with pytest.raises(InputError, match=message):
        check_options(opts)


def test_a_worker_report_round_trips_and_refuses_a_misspelt_field(tmp_path):
    from pydantic import ValidationError

    from planner.execute.reports import Measured, WorkerReport, read_report

    report = WorkerReport(rank=1, pp_rank=1, dp_rank=0, stages=[1, 3], device="cpu",
                          measured=Measured(step_times_s=[0.5, 0.25], max_rss_bytes=2**30, loss=2.5))
    assert WorkerReport.from_json(report.to_json()) == report
    data = json.loads(report.to_json())
    data["measured"]["step_time_s"] = data["measured"].pop("step_times_s")
    with pytest.raises(ValidationError, match="step_times_s"):
        WorkerReport.model_validate(data)
    (tmp_path / "rank1.json").write_text('{"rank": 1')  # cut short
    assert read_report(tmp_path / "rank1.json") is None


def test_the_measured_step_time_is_the_median_of_the_slowest_rank_each_step(tiny_profile, tmp_path):
    from planner.execute import Verification, _record_times
    from planner.execute.reports import Measured

    plan = load_plan(plan_for(tiny_profile, tmp_path, "1f1b"))
    ver = Verification(mode="distributed", device="cpu")
    # slowest each step: 2, 3, 2 -> sorted 2, 2, 3 -> median 2
    _record_times(ver, plan, [Measured(step_times_s=[1.0, 3.0, 2.0], max_rss_bytes=0),
                              Measured(step_times_s=[2.0, 1.0, 2.0], max_rss_bytes=0)])
    step, throughput = ver.rows
    assert (step.what, step.measured) == ("step time", 2.0)
    assert throughput.measured == plan.microbatch.global_batch / 2.0


def test_run_folder_is_removed_after_a_timing_miss_and_kept_after_a_failed_check(tmp_path):
    from planner.execute import Row, Verification, _record_run_dir

    def verification(check_ok: bool) -> Verification:
        folder = tmp_path / f"run-{check_ok}"
        folder.mkdir()
        return Verification(mode="distributed", device="cpu", run_dir=str(folder), tolerance=0.1,
                            rows=[Row("step time", predicted=1.0, measured=2.0, unit="s")],  # +100%: a miss
                            checks=[("loss equals the reference", check_ok, "")])

    missed = verification(check_ok=True)
    folder = missed.run_dir
    _record_run_dir(missed, kept=False)
    assert not missed.passed() and missed.run_dir is None and not Path(folder).exists()
    failed = verification(check_ok=False)
    _record_run_dir(failed, kept=False)
    assert failed.run_dir is not None and Path(failed.run_dir).exists()
    assert any("a check failed" in n for n in failed.notes)


def _reports(pp, dp, tp, peak):
    from planner.execute.reports import Measured, WorkerReport, coordinates

    out = []
    for rank in range(pp * dp * tp):
        p, d, t = coordinates(rank, dp, tp)
        m = Measured(step_times_s=[1.0], max_rss_bytes=2**20, cpu_live_peak_bytes=peak(p, d, t))
        out.append(WorkerReport(rank=rank, pp_rank=p, dp_rank=d, tp_rank=t, stages=[p], measured=m))
    return out


def _memory_rows(pp, dp, tp, peak):
    from planner.execute import Verification, _record_memory

    plan = load_plan("plans/gpt.cpu2-pp2.json")  # its two stages predict the rank's peak: 100 and 200
    stages = [st.model_copy(update={"predicted": st.predicted.model_copy(update={"peak_memory_bytes": 100 * (k + 1)})})
              for k, st in enumerate(plan.stages)]
    plan = plan.model_copy(update={"stages": stages, "parallel": plan.parallel.model_copy(update={"dp": dp, "tp": tp})})
    ver = Verification(mode="distributed", device="cpu")
    _record_memory(ver, plan, _reports(pp, dp, tp, peak))
    return ver.rows


def test_every_rank_reports_its_peak_against_its_stages_prediction():
    # pp 2 x dp 2 x tp 2, 8 workers: one row each, the replicas of a stage under one prediction
    rows = _memory_rows(2, 2, 2, lambda p, d, t: 100 * (p + 1) + 10 * d + t)
    assert [(r.what, r.predicted, r.measured) for r in rows[:4]] == [
        ("rank 0 dp 0 tp 0 peak memory", 100, 100), ("rank 0 dp 0 tp 1 peak memory", 100, 101),
        ("rank 0 dp 1 tp 0 peak memory", 100, 110), ("rank 0 dp 1 tp 1 peak memory", 100, 111)]
    assert len(rows) == 8 and rows[-1].what == "rank 1 dp 1 tp 1 peak memory" and rows[-1].measured == 211


def test_a_large_world_reports_the_fullest_replica_of_each_stage_and_tp_rank():
    # pp 2 x dp 16: 32 workers, over MEMORY_ROWS: per pipeline rank the fullest replica (dp 5, +5%),
    # the note naming the emptiest (dp 0, -5%)
    rows = _memory_rows(2, 16, 1, lambda p, d, t: 100 * (p + 1) * (105 if d == 5 else 95 if d == 0 else 100) // 100)
    assert [(r.what, r.measured) for r in rows] == [("rank 0 dp 5 peak memory", 105), ("rank 1 dp 5 peak memory", 210)]
    assert rows[0].note.startswith("the fullest of 16 replicas (the emptiest, dp 0: -5.0%)")


def test_zero_1_ranges_cut_the_flat_parameters_evenly():
    from planner.execute.train import flat_ranges

    # 5 + 3 + 3 + 2 + 1 = 14 elements over 2: [0, 7) and [7, 14); the second 3 is cut 2 | 1
    assert flat_ranges([5, 3, 3, 2, 1], 2) == [[(0, 0, 5), (1, 0, 2)], [(1, 2, 3), (2, 0, 3), (3, 0, 2), (4, 0, 1)]]
    # 10 over 3: ranges of 4, the last short by the padding (2 elements)
    assert flat_ranges([10], 3) == [[(0, 0, 4)], [(0, 4, 8)], [(0, 8, 10)]]


@hsettings(max_examples=200, deadline=None)
@given(hst.lists(hst.integers(0, 1000), min_size=1, max_size=12), hst.integers(1, 5))
def test_zero_1_ranges_cover_every_element_once_and_hold_at_most_the_padded_share(sizes, dp):
    # planner.cost.DataParallel.state_factor: the fullest replica holds ceil(N / dp) elements
    from planner.execute.train import flat_ranges

    ranges = flat_ranges(sizes, dp)
    held = [sum(b - a for _, a, b in r) for r in ranges]
    assert max(held) == -(-sum(sizes) // dp) and sum(held) == sum(sizes)
    covered = sorted((i, a, b) for r in ranges for i, a, b in r)
    for i, n in enumerate(sizes):
        mine = [(a, b) for j, a, b in covered if j == i]
        assert [x for ab in mine for x in ab][1:-1:2] == [x for ab in mine for x in ab][2::2]  # contiguous
        assert (mine[0][0], mine[-1][1]) == (0, n) if n else mine == []


@pytest.mark.slow
@pytest.mark.parametrize("pp,dp,cluster", [(1, 2, "cpu2"), (2, 2, "cpux4")])
def test_zero_1_shards_the_optimizer_over_gloo_replicas(tiny_profile, tmp_path, pp, dp, cluster):
    settings = Settings(global_batch=8, pp=pp, dp=dp, tp=1, zero=1, schedules=("1f1b",), time_limit_s=5)
    result = solve(tiny_profile, from_spec(cluster), settings)
    path = tmp_path / "zero1.json"
    dump(make_plan(tiny_profile, from_spec(cluster), result, settings), path)
    assert load_plan(path).parallel.zero == 1
    ver = execute(path, Options(steps=2, warmup=1, run_dir=str(tmp_path / "run"), tolerance=1000.0))
    assert ver.mode == "distributed" and ver.checks and all(ok for _, ok, _ in ver.checks), ver.checks


def test_an_in_process_run_the_device_cannot_hold_is_refused_before_building(monkeypatch):
    import planner.execute as ex
    from planner.errors import InfeasibleError

    plan = load_plan("plans/gpt.cpu2-pp2.json")
    weights = sum(s.cost.param_bytes for s in plan.stages)
    monkeypatch.setattr(ex, "_free_bytes", lambda device: weights - 1)
    with pytest.raises(InfeasibleError, match=r"--mode single needs at least .* \(every stage's weights"):
        ex._refuse_what_cannot_fit(plan, "single", torch.device("cpu"))
    monkeypatch.setattr(ex, "_free_bytes", lambda device: weights)
    ex._refuse_what_cannot_fit(plan, "single", torch.device("cpu"))  # fits: nothing raised


def test_a_launch_that_starts_nothing_leaves_no_run_folder(tiny_profile, tmp_path, monkeypatch):
    # the temporary folder is kept after a failure for its logs; one that holds nothing is removed
    import tempfile

    import planner.execute.launch as launch_module

    def refused(*args, **kwargs):
        raise ExecutionError("no free port")

    path = plan_for(tiny_profile, tmp_path, "1f1b")
    runs = tmp_path / "tmp"
    runs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(runs))
    monkeypatch.setattr(launch_module, "launch", refused)
    with pytest.raises(ExecutionError, match="no free port"):
        execute(path, Options(mode="distributed", steps=1, warmup=0))
    assert list(runs.iterdir()) == []
