"""Checks that need a CUDA GPU (skipped elsewhere): timing calibration and per-device memory."""

import statistics

import pytest
import torch

from planner.execute import Options, execute
from planner.formats import Cluster, DeviceSpec, NodeSpec, dump
from planner.model import build_spec
from planner.profile import Options as ProfileOptions
from planner.profile import profile_model
from planner.profile.measure import Timer
from planner.solve import Settings, solve
from planner.solve.plan import make_plan

pytestmark = pytest.mark.cuda

GPT2 = {"n_layer": 12, "d_model": 768, "n_head": 12, "vocab": 50257, "seq": 512}


@pytest.fixture(scope="module")
def gpt_profile():
    spec = build_spec("models/gpt.py:build", GPT2)
    return profile_model(spec, "models/gpt.py:build", GPT2,
                         ProfileOptions(device="cuda", dtype="bfloat16", mbs=(1, 4)))


def local_cluster(n: int) -> Cluster:
    props = torch.cuda.get_device_properties(0)
    gpu = DeviceSpec(name=props.name, type="cuda", memory_bytes=props.total_memory)
    from planner.clusters import from_spec

    h100 = from_spec("h100x8")
    return Cluster(name=f"{n}x {props.name}", nodes=[NodeSpec(devices=[gpu] * n)], intra_node=h100.intra_node,
                   reserved_bytes=h100.reserved_bytes)


@pytest.mark.xfail(strict=False, reason="GPT-2 small is launch-bound on an H100/H200: its whole-step time "
                   "varied by +-30% between measurements on the same machine (README, Limits)")
def test_calibrated_layer_sum_matches_a_fresh_whole_model_timing(gpt_profile):
    spec = build_spec("models/gpt.py:build", GPT2)
    model = spec.model.to("cuda", torch.bfloat16).train()
    timer = Timer(torch.device("cuda"))
    for size in gpt_profile.mbs_sizes:
        (x,), y = spec.batch(size, torch.Generator().manual_seed(3))
        x, y = x.cuda(), y.cuda()

        def step(x=x, y=y):
            spec.loss(model(x), y).backward()

        for _ in range(5):
            step()
        whole = statistics.median(timer(step)[0] for _ in range(20))
        w = gpt_profile.whole[str(size)]
        predicted = w.layer_sum_s * w.scale
        assert abs(predicted - whole) / whole <= 0.05, (size, predicted, whole, w.launch_bound)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_replay_memory_within_10_percent_never_2_percent_under(gpt_profile, tmp_path, schedule):
    cluster = local_cluster(4)
    settings = Settings(global_batch=32, pp=4, dp=1, mbs=4, schedules=(schedule,))
    plan = make_plan(gpt_profile, cluster, solve(gpt_profile, cluster, settings), settings)
    path = tmp_path / "plan.json"
    dump(plan, path)
    ver = execute(path, Options(mode="replay", device="cuda"))
    rows = [r for r in ver.rows if "peak memory" in r.what]
    assert len(rows) == 4
    for r in rows:
        assert r.measured <= 1.02 * r.predicted, (r.what, r.predicted, r.measured)
        assert abs(r.error) <= 0.10, (r.what, r.predicted, r.measured)
