"""Models as users write them (tests/zoo.py): in-place operations, a module called several times,
explicit layer lists checked against the model, and tied weights through every build path."""

from __future__ import annotations

from itertools import pairwise

import pytest

torch = pytest.importorskip("torch")

from planner.model import build_spec  # noqa: E402
from planner.split import layered  # noqa: E402

ZOO = "tests/zoo.py"
RESNET = {"width": 4, "image": 32}  # 32 x 32 images reach layer4 as 1 x 1: use micro-batches of 2 or more


def staged_step(lm, bounds: list[int], inputs: tuple, target, loss_fn):
    """Forward and backward through stages [bounds[0], bounds[1]), ... as the engine runs them:
    each stage gets its inputs as fresh leaves that require grad, and its outputs' gradients from
    the next stage's inputs. Returns the loss."""
    x, kept = inputs, []
    for k, (a, b) in enumerate(pairwise(bounds)):
        if k > 0:
            x = tuple(v.detach().requires_grad_(v.is_floating_point()) for v in x)
        out = lm.stage(a, b)(*x)
        kept.append((x, out))
        x = out if isinstance(out, tuple) else (out,)
    loss = loss_fn(kept[-1][1], target)
    loss.backward()
    for k in range(len(kept) - 2, -1, -1):
        pairs = [(o, v.grad) for o, v in zip(kept[k][1], kept[k + 1][0], strict=True) if v.grad is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return loss


def whole_step(spec, inputs, target):
    loss = spec.loss(spec.model(*inputs), target)
    loss.backward()
    return loss


def grads_of(model) -> dict:
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def check_staged_training(spec, cuts: list[list[int]], size: int = 4) -> None:
    """Loss and every gradient of the staged model equal the whole model's, for each cut list."""
    inputs, target = spec.batch(size, torch.Generator().manual_seed(0))
    lm = layered(spec.model, inputs, spec.layers)
    want = whole_step(spec, inputs, target)
    reference = grads_of(spec.model)
    for inner in cuts:
        loss = staged_step(lm, [0, *inner, lm.n_layers], inputs, target, spec.loss)
        torch.testing.assert_close(loss, want)
        got = grads_of(spec.model)
        assert got.keys() == reference.keys()
        for name, g in reference.items():
            torch.testing.assert_close(got[name], g, msg=lambda m, name=name: f"{name}: {m}")


# ------------------------------------------------------------------------- in-place operations


def test_torchvision_resnet18_writes_in_place_and_stages_still_train_exactly():
    spec = build_spec(f"{ZOO}:resnet18", RESNET)
    inputs, _ = spec.batch(2, torch.Generator().manual_seed(0))
    lm = layered(spec.model, inputs)
    assert lm.names == ["conv1", "bn1", *(f"layer{i}.{j}" for i in range(1, 5) for j in range(2)), "fc"]
    # the top-level ReLU(inplace=True) runs in layer1.0 (with the max-pool) and writes into bn1's output
    assert lm.written == {((1, 0), 2)}
    ops = [n.op + ":" + str(n.target) for n in lm.stage(2, 4).graph.nodes]
    assert ops[:3] == ["placeholder:in_bn1", f"call_function:{ops[1].split(':', 1)[1]}", "call_method:clone"]
    assert "clone" not in str([n.target for n in lm.stage(3, 5).graph.nodes])  # nothing written there: no copy
    spec.model.train()  # BatchNorm on the whole batch in both: the same statistics
    check_staged_training(spec, [[2], [1, 2], [3], [2, 6, 9]])


def test_an_explicit_layer_that_writes_into_its_input_gets_a_copy():
    from torch import nn

    from planner.model import ModelSpec

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    spec = ModelSpec(model=model, layers=["0", "1", "2"], loss=nn.functional.cross_entropy,
                     batch=lambda n, g: ((torch.randn(n, 6, generator=g),), torch.randint(0, 3, (n,), generator=g)))
    inputs, _ = spec.batch(4, torch.Generator().manual_seed(0))
    assert layered(model, inputs, spec.layers).written == {((0, 0), 1)}
    check_staged_training(spec, [[1], [2], [1, 2]])


# ------------------------------------------------------------------------------- tied weights


def test_moving_to_and_from_meta_keeps_tied_weights_tied():
    from planner.split import keep_ties

    spec = build_spec(f"{ZOO}:tied_checked", {})
    model = spec.model
    assert model.lm_head.weight is model.transformer.emb.wte.weight
    n = len(list(model.named_parameters()))
    model.to("meta")  # what torch does: one new parameter per module that held the shared one
    assert model.lm_head.weight is not model.transformer.emb.wte.weight
    for move in (lambda m: m.to("meta"), lambda m: m.to_empty(device="cpu"), lambda m: m.to(torch.float64)):
        again = keep_ties(build_spec(f"{ZOO}:tied_checked", {}).model, move)
        assert again.lm_head.weight is again.transformer.emb.wte.weight
        assert len(list(again.named_parameters())) == n


def test_a_tied_lm_whose_factory_runs_the_model_is_not_stale_on_rebuild(tmp_path):
    from typer.testing import CliRunner

    from planner.cli import app
    from planner.split import build_on_meta, fingerprint

    assert fingerprint(build_on_meta(f"{ZOO}:tied_checked", {}).model) == \
        fingerprint(build_spec(f"{ZOO}:tied_checked", {}).model)
    runner = CliRunner()
    prof, plan = tmp_path / "p.json", tmp_path / "plan.json"
    r = runner.invoke(app, ["profile", f"{ZOO}:tied_checked", "--no-meta", "-o", str(prof), "--repeats", "1",
                            "--warmup", "0", "--mbs", "1"])
    assert r.exit_code == 0, r.output
    assert "tied: transformer.emb = lm_head" in r.output
    r = runner.invoke(app, ["solve", str(prof), "-c", "cpu2", "--pp", "2", "--global-batch", "4", "-o", str(plan)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["check", str(plan), "--rebuild"])
    assert r.exit_code == 0 and "model unchanged" in r.output, r.output


# ---------------------------------------------------------------------------------- weight reuse


def test_a_block_called_n_times_is_one_layer_per_call_sharing_its_weights():
    spec = build_spec(f"{ZOO}:albert", {"n_layer": 4})
    inputs, _ = spec.batch(2, torch.Generator().manual_seed(0))
    lm = layered(spec.model, inputs)
    # the block's submodules are merged back into the block: one layer per call, not per submodule
    assert lm.names == ["embed", "block@1", "block@2", "block@3", "block@4", "norm", "head"]
    assert lm.paths == ["embed", "block", "block", "block", "block", "norm", "head"]
    shared = {id(p) for p in spec.model.block.parameters()}
    for i in range(1, 5):
        assert {id(p) for p in lm.layer_params(i).values()} == shared
    check_staged_training(spec, [[2], [3], [1, 4], [2, 3, 5]])


def test_a_module_called_several_times_inside_a_container_keeps_its_own_name():
    from torch import nn

    from planner.split import merge_reused

    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Linear(4, 4)])
    model.shared = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    layers = ["blocks.0", "shared.0", "shared.1"]
    # blocks.0 twice: a container above it is never a layer; shared.* as many times each: still
    # below a container
    assert merge_reused(model, layers, ["blocks.0", "blocks.0", "shared.0", "shared.1"] * 2) == layers


def test_a_shared_block_profiles_as_tied_layers():
    from planner.profile import Options, profile_model

    spec = build_spec(f"{ZOO}:albert", {"n_layer": 3})
    block_bytes = sum(p.numel() * 4 for p in spec.model.block.parameters())
    prof = profile_model(spec, f"{ZOO}:albert", {"n_layer": 3}, Options(mbs=(1,), repeats=1, warmup=0))
    assert [layer.name for layer in prof.layers][1:4] == ["block@1", "block@2", "block@3"]
    assert [(g.layers, g.param_bytes) for g in prof.tied] == [(["block@1", "block@2", "block@3"], block_bytes)]
    assert prof.layers[2].same_as == "block@1"  # measured once


def test_repeated_explicit_names_are_calls_of_one_shared_module():
    spec = build_spec(f"{ZOO}:albert_explicit", {"n_layer": 3})
    inputs, _ = spec.batch(2, torch.Generator().manual_seed(0))
    lm = layered(spec.model, inputs, spec.layers)
    assert lm.names == ["embed", "block@1", "block@2", "block@3", "norm", "head"]
    check_staged_training(spec, [[2], [1, 3], [4]])


# -------------------------------------------------------------------------- explicit lists checked


def test_an_explicit_list_that_misses_a_parameterised_module_is_refused_at_once(tmp_path):
    from typer.testing import CliRunner

    from planner.cli import app

    r = CliRunner().invoke(app, ["profile", f"{ZOO}:gpt2_missing_wpe", "-o", str(tmp_path / "p.json")])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: the explicit layers leave out the parameters of wpe (512 B)"), r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "p.json").exists()


# ----------------------------------------------------------------- profile, solve, execute on cpu2


def _planned(tmp_path, factory: str, args: dict, mbs: int = 2, gb: int = 8, **profile_options):
    """Profile (small, quick), then solve for pp 2 on cpu2 under 1F1B: the plan's path."""
    from planner.clusters import from_spec
    from planner.formats import dump
    from planner.profile import Options, profile_model
    from planner.solve import Settings, solve
    from planner.solve.plan import make_plan

    spec = build_spec(factory, args)
    prof = profile_model(spec, factory, args, Options(mbs=(mbs,), repeats=1, warmup=0, **profile_options))
    settings = Settings(global_batch=gb, pp=2, mbs=mbs, schedules=("1f1b",), time_limit_s=5)
    result = solve(prof, from_spec("cpu2"), settings)
    path = tmp_path / "plan.json"
    dump(make_plan(prof, from_spec("cpu2"), result, settings), path)
    return path


def _execute(tmp_path, path, verify: bool = True):
    from planner.execute import Options, execute, raise_on_failure

    ver = execute(path, Options(mode="distributed", steps=1, warmup=1, verify=verify,
                                run_dir=str(tmp_path / "run"), tolerance=1000.0))
    assert ver.mode == "distributed"
    raise_on_failure(ver)
    return ver


@pytest.mark.slow
def test_torchvision_resnet18_with_batchnorm_matches_the_reference_distributed(tmp_path):
    # BatchNorm normalises each micro-batch by its own statistics; the reference runs the same
    # micro-batches, so it computes the same statistics
    ver = _execute(tmp_path, _planned(tmp_path, f"{ZOO}:resnet18", RESNET))
    assert ver.checks and all(ok for _, ok, _ in ver.checks)


@pytest.mark.slow
def test_resnet18_with_group_norm_matches_the_reference_distributed(tmp_path):
    ver = _execute(tmp_path, _planned(tmp_path, f"{ZOO}:resnet18", dict(RESNET, norm="group")))
    assert ver.checks and all(ok for _, ok, _ in ver.checks)


@pytest.mark.slow
def test_a_shared_block_on_both_ranks_matches_the_reference_distributed(tmp_path):
    from planner.formats import load_plan

    path = _planned(tmp_path, f"{ZOO}:albert", {"n_layer": 4})
    ranks = {st.rank for st in load_plan(path).stages for name in st.layers if name.startswith("block@")}
    assert ranks == {0, 1}  # the block's weights live on both ranks: their gradients are summed
    ver = _execute(tmp_path, path)
    assert ver.checks and all(ok for _, ok, _ in ver.checks)


@pytest.mark.slow
def test_a_tied_lm_whose_factory_runs_the_model_executes_distributed(tmp_path):
    ver = _execute(tmp_path, _planned(tmp_path, f"{ZOO}:tied_checked", {}))
    assert ver.checks and all(ok for _, ok, _ in ver.checks)


def test_recomputing_a_shared_block_keeps_its_gradients(tmp_path):
    import json

    from planner.execute.single import run_single
    from planner.formats import load_plan

    path = _planned(tmp_path, f"{ZOO}:albert", {"n_layer": 4}, gb=4)
    data = json.loads(path.read_text())
    for st in data["stages"]:
        st["recompute"] = "full"
    path.write_text(json.dumps(data))
    r = run_single(load_plan(path), torch.device("cpu"), steps=1, warmup=0)
    assert r.grad_message == "" and r.loss == pytest.approx(r.reference_loss, rel=1e-6)


def test_a_forward_that_writes_into_its_input_leaves_the_batch_as_it_was():
    from torch import nn

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            x.mul_(2.0)  # (fx traces "x *= 2" as an out-of-place product)
            return self.b(self.a(x))

    model = Scaled()
    x = torch.randn(3, 4)
    before = x.clone()
    lm = layered(model, (x.clone(),))
    assert lm.written == {((-1, 0), 0)}
    out = lm.stage(0, 2)(x)
    torch.testing.assert_close(x, before)
    torch.testing.assert_close(out, model(before.clone()))
