"""Profiling real models: what is measured adds up, the model is left as it was, and bad models
are refused with one line."""

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from planner.cli import app
from planner.errors import ModelError
from planner.model import ModelSpec, build_spec, parse_args
from planner.profile import Options, profile_model
from planner.split import choose_layers, layered

runner = CliRunner()
FAST = Options(mbs=(1, 2), repeats=2, warmup=1, threads=1)


class WithBatchNorm(nn.Module):
    """Buffers that a training-mode forward would change."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)) for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def bn_spec():
    def batch(n, g):
        return (torch.randn(n + 1, 8, generator=g),), torch.randint(0, 2, (n + 1,), generator=g)
    return ModelSpec(model=WithBatchNorm(), batch=batch, loss=nn.functional.cross_entropy, name="bn")


def test_profiling_leaves_the_model_as_it_was():
    spec = bn_spec()
    spec.model.eval()
    spec.model.blocks[1].train()
    before = {k: v.clone() for k, v in spec.model.state_dict().items()}
    modes = {n: m.training for n, m in spec.model.named_modules()}
    profile_model(spec, "bn", {}, FAST)
    after = spec.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert modes == {n: m.training for n, m in spec.model.named_modules()}
    assert all(p.grad is None for p in spec.model.parameters())


def test_gpt_profile_adds_up():
    spec = build_spec("models/gpt.py:build",
                      {"n_layer": 2, "d_model": 32, "n_head": 2, "vocab": 64, "seq": 16, "tied": True})
    prof = profile_model(spec, "models/gpt.py:build", {}, FAST)
    assert [layer.name for layer in prof.layers] == ["transformer.emb", "transformer.h.0", "transformer.h.1",
                                                     "transformer.ln_f", "lm_head"]
    assert [g.layers for g in prof.tied] == [["transformer.emb", "lm_head"]]
    for key, w in prof.whole.items():
        layers = sum(layer.by_mbs[key].fwd_s + layer.by_mbs[key].bwd_s for layer in prof.layers)
        loss = prof.loss.by_mbs[key].fwd_s + prof.loss.by_mbs[key].bwd_s
        # the calibration makes the layer sum equal the whole model measured at once
        assert (layers + loss) * w.scale == pytest.approx(w.fwd_s + w.bwd_s, rel=1e-9)
    block = prof.layers[1].by_mbs["2"]
    assert block.act_bytes > 0 and block.bwd_input_s is not None and block.bwd_weight_s is not None
    # every block hands its (mbs, seq, d) output to the next: 16 * 32 * 4 bytes per sample
    edge = next(e for e in prof.edges if e.src == "transformer.h.0")
    assert edge.dst == "transformer.h.1" and edge.bytes_per_sample == 16 * 32 * 4


def test_depth_and_explicit_layers():
    spec = build_spec("models/gpt.py:build", {"n_layer": 2, "d_model": 32, "n_head": 2, "vocab": 64, "seq": 16})
    assert "transformer.h.0.attn" in choose_layers(spec.model, depth=4)
    (x,), _ = spec.batch(1, torch.Generator().manual_seed(0))
    explicit = layered(spec.model, (x,), ["transformer.emb", "transformer.h.0", "transformer.h.1",
                                          "transformer.ln_f", "lm_head"])
    assert explicit.mode == "explicit" and explicit.n_layers == 5


def test_untraceable_model_points_to_explicit_layers():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                x = self.layers[0](x)
            return self.layers[1](x)

    with pytest.raises(ModelError, match="does not trace with torch.fx.*describe its layers explicitly"):
        layered(Branchy(), (torch.randn(2, 4),))


def test_parse_args():
    assert parse_args(["n_layer=24", "tied=true", "name=gpt", "lr=0.5"]) == {"n_layer": 24, "tied": True,
                                                                              "name": "gpt", "lr": 0.5}
    with pytest.raises(ModelError, match="write NAME=VALUE"):
        parse_args(["n_layer"])


@pytest.mark.parametrize("model,args,match", [
    ("nope/missing.py:build", [], "missing.py: no such file"),
    ("models/gpt.py:buld", [], "has no function 'buld'"),
    ("models/gpt.py:build", ["--arg", "n_head=5"], "factory models/gpt.py:build raised AssertionError"),
    ("models/gpt.py:build", ["--arg", "depth=3"], "has no argument 'depth'"),
    ("models/gpt.py:build", ["--arg", "n_layer=many"], "expects int for n_layer"),
    ("models/gpt.py:build", ["--arg", "tied=maybe"], "expects bool for tied"),
    ("models/gpt.py:build", ["--mbs", "0"], "--mbs '0': give at least one positive number"),
])
def test_bad_models_exit_2_with_one_line(tmp_path, model, args, match):
    out = tmp_path / "p.json"
    r = runner.invoke(app, ["profile", model, "-o", str(out), *args])
    assert r.exit_code == 2, r.output
    assert match in r.output and r.output.count("\n") <= 2 and "Traceback" not in r.output
    assert not out.exists()
