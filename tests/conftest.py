import importlib.util
import os

import pytest
from hypothesis import settings

from planner.clusters import from_spec
from planner.cost import CostTable
from planner.evaluate import Config, evaluate, rank_devices
from planner.formats import StageCost
from planner.schedules import build
from planner.solve.bounds import Policy, StageBounds

# Property tests draw the same examples on every run, so a submission fails only on what it changed;
# counterexamples found while exploring are kept as @example lines. To explore new examples:
#     HYPOTHESIS_PROFILE=explore python3 -m pytest -q tests/test_solve.py
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", max_examples=1000, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA = False
if importlib.util.find_spec("torch") is not None:
    import torch

    HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


def stage_cost(f=1.0, bi=1.0, bw=1.0, act=0, static=0, transient=0, allreduce=0.0) -> StageCost:
    return StageCost(fwd_s=f, bwd_input_s=bi, bwd_weight_s=bw, send_bytes=0, act_bytes=act,
                     static_bytes=static, transient_bytes=transient, param_bytes=0,
                     allreduce_s=allreduce)


def setup(profile, cluster: str, cfg: Config, policy: str = "auto", memory_bytes=None):
    """StageBounds and an evaluator for one configuration of a profile."""
    cl = from_spec(cluster, memory_bytes=memory_bytes)
    table = CostTable(profile, cfg.mbs)
    b = StageBounds(table, cl, cfg, build(cfg.schedule, cfg.pp, cfg.m, cfg.v),
                    rank_devices(cl, cfg.pp, cfg.dp), Policy(policy))

    def run(segments):
        ev = evaluate(table, cl, cfg, segments, detail=False)
        return ev.step_time_s, ev.fits, ev
    return b, run
