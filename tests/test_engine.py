"""The engine side of execution: planner's split backward (I, then W) on stages that are not a
plain chain, every executable schedule on every bundled model in single mode against a plain run,
and the runs on two gloo processes that the schedules were failing."""

import pytest
import torch
from torch import nn

from planner.clusters import from_spec
from planner.errors import ExecutionError
from planner.execute import Options, execute, raise_on_failure
from planner.execute.runtime import backward_input, backward_weight
from planner.execute.single import run_single
from planner.execute.worker import error_text
from planner.formats import dump, load_plan
from planner.model import build_spec
from planner.profile import Options as ProfileOptions
from planner.profile import profile_model
from planner.solve import Settings, solve
from planner.solve.plan import make_plan

# --------------------------------------------------------------------- the split backward


def _full_grads(build, params):
    """Reference: the loss's gradients by one ordinary backward."""
    loss, inputs = build()
    return torch.autograd.grad(loss, [*inputs, *params])


def _split_grads(build, params):
    """The same gradients by I (inputs) and then W (weights, into .grad)."""
    for p in params:
        p.grad = None
    loss, inputs = build()
    dinputs, work = backward_input((loss,), None, list(inputs), iter(params))
    backward_weight(work)
    return (*dinputs, *(p.grad for p in params))


def _assert_split_equals_full(build, params):
    for got, want in zip(_split_grads(build, params), _full_grads(build, params), strict=True):
        torch.testing.assert_close(got, want)


def test_a_linear_layer_splits_into_the_two_textbook_gradients():
    # y = w x, loss = sum(y): dL/dx = w^T 1, dL/dw = 1 x^T, checkable by hand
    w = nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    x = torch.tensor([[1.0], [-1.0]], requires_grad=True)
    dinputs, work = backward_input(((w @ x).sum(),), None, [x], iter([w]))
    assert dinputs[0].flatten().tolist() == [4.0, 6.0]
    assert w.grad is None  # I leaves the weights to W
    backward_weight(work)
    assert w.grad.tolist() == [[1.0, -1.0], [1.0, -1.0]]


def test_a_first_stage_leaves_the_whole_weight_backward_to_w():
    # token ids need no gradient: I computes nothing, W is the full backward; unused weights stay None
    w, unused = nn.Parameter(torch.tensor([2.0, 3.0])), nn.Parameter(torch.zeros(2))
    tokens = torch.tensor([5.0, 7.0])
    dinputs, work = backward_input(((w * tokens).sum(),), None, [tokens], iter([w, unused]))
    assert dinputs == (None,) and w.grad is None
    backward_weight(work)
    assert w.grad.tolist() == [5.0, 7.0] and unused.grad is None


def test_an_output_that_is_a_view_of_the_input_passes_through():
    # a skip connection crossing the stage untouched: the stage returns a view of its input
    w = nn.Parameter(torch.randn(3, 3))
    x = torch.randn(2, 3, requires_grad=True)
    outs = (x.view_as(x), x @ w)
    grads = (torch.ones(2, 3), torch.full((2, 3), 2.0))
    dinputs, work = backward_input(outs, grads, [x], iter([w]))
    backward_weight(work)
    torch.testing.assert_close(dinputs[0], torch.ones(2, 3) + torch.full((2, 3), 2.0) @ w.T)
    torch.testing.assert_close(w.grad, x.T @ torch.full((2, 3), 2.0))


def test_a_weight_path_joining_the_input_path_deep_in_the_stage():
    # as a decoder fed by target tokens: h needs no input gradient (tokens -> a), and meets the
    # input's path twice, in the product with memory and in the residual add after d. W for a
    # runs back through d's layer; d's own W must still find that layer's graph.
    a, b, c, d = (nn.Parameter(torch.randn(4, 4)) for _ in range(4))
    tokens = torch.randn(2, 4)  # needs no gradient
    memory = torch.randn(2, 4, requires_grad=True)

    def build():
        h = torch.tanh(tokens @ a)
        att = (h @ b) * (memory @ c)
        out = h + att @ d
        return (out * out).sum(), (memory,)

    _assert_split_equals_full(build, [a, b, c, d])


def test_an_output_also_saved_by_a_later_layer_of_the_stage():
    # a U-Net skip: the stage sends s on and also multiplies with it, saving it for backward
    w, v = nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(3, 3))
    x = torch.randn(2, 3, requires_grad=True)
    s = torch.relu(x @ w)
    y = (s @ v) * s
    grads = (torch.ones(2, 3), torch.randn(2, 3))
    want = torch.autograd.grad((s, y), (x, w, v), grads, retain_graph=True)
    dinputs, work = backward_input((s, y), grads, [x], iter([w, v]))
    backward_weight(work)
    for got, expect in zip((dinputs[0], w.grad, v.grad), want, strict=True):
        torch.testing.assert_close(got, expect)


def test_a_weight_used_twice_is_counted_once():
    w = nn.Parameter(torch.tensor(3.0))
    x = torch.tensor(2.0, requires_grad=True)
    # loss = w * x + w * w * x: dL/dw = x + 2 w x = 14, dL/dx = w + w^2 = 12
    dinputs, work = backward_input((w * x + w * w * x,), None, [x], iter([w]))
    backward_weight(work)
    assert (float(dinputs[0]), float(w.grad)) == (12.0, 14.0)


def test_the_engines_failure_is_named_by_its_cause():
    try:
        try:
            raise RuntimeError("Can't detach views in-place. Use detach() instead.")
        except RuntimeError as inner:
            raise RuntimeError("\n        Failed to run stage backward input:\n        Stage output: ...") from inner
    except RuntimeError as e:
        assert error_text(e) == "Can't detach views in-place. Use detach() instead."


# ------------------------------------------------------- every schedule on every bundled model

MODELS = {
    "gpt": ("models/gpt.py:build", {"n_layer": 3, "d_model": 32, "n_head": 2, "vocab": 64, "seq": 16}),
    "tied-gpt": ("models/gpt.py:build", {"n_layer": 3, "d_model": 32, "n_head": 2, "vocab": 64, "seq": 16,
                                         "tied": True}),
    "cnn": ("models/cnn.py:build", {"depth": 4, "width": 4, "image": 8}),
    "unet": ("models/unet.py:build", {"levels": 2, "width": 4, "image": 8}),
    "encdec": ("models/encdec.py:build", {"n_enc": 2, "n_dec": 2, "d_model": 16, "n_head": 2, "vocab": 32,
                                          "src_seq": 8, "tgt_seq": 6}),
    # Hugging Face models as they are, through torch.export
    "hf-gpt2": ("models/hf.py:build", {"model_type": "gpt2", "n_layer": 2, "d_model": 32, "n_head": 2, "vocab": 64,
                                       "seq": 8}),
    "hf-llama": ("models/hf.py:build", {"model_type": "llama", "n_layer": 2, "d_model": 32, "n_head": 2,
                                        "vocab": 64, "seq": 8}),
}
SCHEDULES = [("gpipe", None), ("1f1b", None), ("interleaved-1f1b", 2), ("zb-h1", None), ("zb-h1", 2),
             ("zb-v", 2), ("dualpipe-v", 2)]
_PROFILES: dict = {}


def tiny_profile(model: str):
    if model not in _PROFILES:
        factory, args = MODELS[model]
        _PROFILES[model] = profile_model(build_spec(factory, args), factory, args,
                                         ProfileOptions(mbs=(1, 2), repeats=1, warmup=0, threads=1))
    return _PROFILES[model]


def plan_path(tmp_path, model: str, schedule: str, v: int | None, cuts: tuple[int, ...] | None = None):
    settings = Settings(global_batch=4, pp=2, dp=1, mbs=1 if cuts else None, schedules=(schedule,),
                        virtual_stages=v, fix_cuts=cuts, time_limit_s=5, jobs=1)
    prof = tiny_profile(model)
    result = solve(prof, from_spec("cpu2"), settings)
    path = tmp_path / f"{model}-{schedule}.json"
    dump(make_plan(prof, from_spec("cpu2"), result, settings), path)
    return path


def assert_single_matches(path):
    r = run_single(load_plan(path), torch.device("cpu"), steps=1, warmup=0)
    assert r.grad_message == ""
    assert r.loss == pytest.approx(r.reference_loss, rel=1e-5)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("schedule,v", SCHEDULES, ids=[f"{s}-v{v or 1}" for s, v in SCHEDULES])
def test_every_schedule_runs_every_bundled_model_in_single_mode(tmp_path, model, schedule, v):
    assert_single_matches(plan_path(tmp_path, model, schedule, v))


@pytest.mark.parametrize("model,schedule,v,cuts,why", [
    ("encdec", "zb-h1", None, (1,), "target embedding and decoder on a stage whose input is the encoder's"),
    ("unet", "zb-h1", 2, (1, 3, 4), "down.1's output sent on and used by mid on the same stage"),
    ("unet", "zb-h1", 2, (2, 4, 5), "skips passed through a stage untouched: outputs that are views"),
    ("encdec", "dualpipe-v", 2, (3, 5, 6), "the encoder's output passed on by the decoder's first stage"),
])
def test_partitions_that_broke_the_engines_split_backward(tmp_path, model, schedule, v, cuts, why):
    assert_single_matches(plan_path(tmp_path, model, schedule, v, cuts))


def test_replay_runs_split_backwards_on_a_model_with_skips(tmp_path):
    path = plan_path(tmp_path, "unet", "zb-h1", 2, (1, 3, 4))
    ver = execute(path, Options(mode="replay"))
    memory = [r for r in ver.rows if "peak memory" in r.what]
    assert len(memory) == 2 and all(r.measured > 0 for r in memory)


FAILS_IN_BACKWARD = '''
import os
import torch
from torch import nn
from planner.model import ModelSpec

class Boom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        if os.environ.get("BOOM") and len(grad) == 1:  # armed after profiling; micro-batches only
            raise RuntimeError("boom in the backward of layer b")
        return grad

class B(nn.Linear):
    def forward(self, x):
        return Boom.apply(super().forward(x))

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4), B(4, 4), nn.Linear(4, 2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

def build():
    torch.manual_seed(0)
    return ModelSpec(model=Net(), batch=lambda n, g: ((torch.randn(n, 4, generator=g),),
                     torch.randint(0, 2, (n,), generator=g)), loss=nn.functional.cross_entropy)
'''


def test_a_failing_model_in_single_mode_is_a_failed_execution_with_its_cause(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from planner.cli import app

    (tmp_path / "boom.py").write_text(FAILS_IN_BACKWARD)
    monkeypatch.chdir(tmp_path)
    spec = build_spec("boom.py:build", {})
    prof = profile_model(spec, "boom.py:build", {}, ProfileOptions(mbs=(1,), repeats=1, warmup=0))
    settings = Settings(global_batch=2, pp=2, dp=1, mbs=1, schedules=("zb-h1",), time_limit_s=5, jobs=1)
    path = tmp_path / "boom.plan.json"
    dump(make_plan(prof, from_spec("cpu2"), solve(prof, from_spec("cpu2"), settings), settings), path)
    monkeypatch.setenv("BOOM", "1")
    # the reference runs the same micro-batches, so it meets the error first
    with pytest.raises(ExecutionError, match="reference run failed: RuntimeError: boom in the backward of layer b"):
        run_single(load_plan(path), torch.device("cpu"), steps=1, warmup=0)
    r = CliRunner().invoke(app, ["execute", str(path), "--mode", "single", "--steps", "1", "--warmup", "1"])
    assert r.exit_code == ExecutionError.exit_code == 5
    assert "boom in the backward of layer b" in r.output


# ------------------------------------------------------------- two gloo processes (slow)


@pytest.mark.slow
@pytest.mark.parametrize("model,schedule,v", [
    ("unet", "zb-h1", 2), ("encdec", "zb-h1", None), ("cnn", "zb-v", 2), ("encdec", "dualpipe-v", 2),
])
def test_two_gloo_processes_run_the_schedules_that_failed(tmp_path, model, schedule, v):
    path = plan_path(tmp_path, model, schedule, v)
    ver = execute(path, Options(steps=1, warmup=1, run_dir=str(tmp_path / "run"), tolerance=1000.0))
    assert ver.mode == "distributed"
    assert all(ok for _, ok, _ in ver.checks), ver.checks
    raise_on_failure(ver)
