"""Models larger than a device: built on the meta device, measured one layer at a time, identical
layers measured once, calibrated on what fits."""

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from planner.cli import app
from planner.clusters import device_peaks
from planner.errors import InfeasibleError, InputError, ModelError
from planner.formats import load_profile
from planner.model import ModelSpec, build_spec, user_code
from planner.profile import Options, build_meta_spec, profile_model
from planner.profile.chain import longest_fit
from planner.profile.meta import is_meta, materialise, to_meta
from planner.profile.structure import flow_bytes, layer_signature, same_as
from planner.split import fingerprint, layered

runner = CliRunner()
FAST = Options(mbs=(1, 2), repeats=2, warmup=1, threads=1)
TINY = {"n_layer": 3, "d_model": 32, "n_head": 2, "vocab": 64, "seq": 16}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_a_billion_parameter_gpt_builds_on_meta_without_memory():
    spec = build_meta_spec("models/gpt.py:build", {"n_layer": 24, "d_model": 2048})
    # 24 blocks of 12 d^2 + 13 d, the two embeddings and the head: 1.21e9 parameters
    d = 2048
    assert _params(spec.model) == 24 * (12 * d * d + 13 * d) + 2048 * d + 128 * d + 2 * d + d * 2048
    assert is_meta(spec.model) and all(p.is_meta for p in spec.model.parameters())


def test_layers_shapes_fingerprint_tied_and_edge_bytes_are_the_same_on_meta():
    args = dict(TINY, tied=True)
    real, meta = build_spec("models/gpt.py:build", args), build_meta_spec("models/gpt.py:build", args)
    (x,), _ = real.batch(2, torch.Generator().manual_seed(0))
    lm_real, lm_meta = layered(real.model, (x,)), layered(meta.model, (x.to("meta"),))
    assert lm_meta.names == lm_real.names
    assert [t.key for t in lm_meta.tensors] == [t.key for t in lm_real.tensors]
    assert fingerprint(meta.model) == fingerprint(real.model)
    assert meta.model.lm_head.weight is meta.model.transformer.emb.wte.weight
    bytes_real = flow_bytes(lm_real, lm_real.layer_inputs((x,)))
    bytes_meta = flow_bytes(lm_meta, lm_meta.layer_inputs((x.to("meta"),)))
    # every block hands the next a (2, 16, 32) float32 tensor: 4096 bytes
    assert bytes_meta == bytes_real and bytes_meta[(1, 0)] == 2 * 16 * 32 * 4


def test_identical_blocks_share_one_signature():
    spec = build_meta_spec("models/gpt.py:build", TINY)
    (x,), _ = spec.batch(1, torch.Generator().manual_seed(0))
    lm = layered(spec.model, (x.to("meta"),))
    stages = [lm.stage(i, i + 1) for i in range(lm.n_layers)]
    flows = [lm.layer_inputs(to_meta((x,)), stages)]
    modules = dict(spec.model.named_modules())
    sigs = [layer_signature(lm, i, modules[lm.names[i]], stages[i], flows) for i in range(lm.n_layers)]
    assert lm.names == ["transformer.emb", "transformer.h.0", "transformer.h.1", "transformer.h.2",
                        "transformer.ln_f", "lm_head"]
    assert same_as(sigs) == [None, None, 1, 1, None, None]


def test_same_as_names_the_first_of_each_kind():
    assert same_as(["a", "b", "b", "a", "c"]) == [None, None, 1, 0, None]


@pytest.mark.parametrize("costs,budget,chain", [
    ([5, 1, 1, 1, 5], 3, (1, 4)),  # the three small ones
    ([1, 1, 1], 10, (0, 3)),  # all of them
    ([4, 4, 4], 8, (0, 2)),  # the first of equal length
    ([9, 2, 9], 1, None),  # not even one fits
])
def test_longest_fit(costs, budget, chain):
    assert longest_fit(costs, budget) == chain


def test_materialise_makes_one_layer_real_and_leaves_the_meta_model():
    spec = build_meta_spec("models/gpt.py:build", TINY)
    block = spec.model.transformer.h[1]
    real = materialise(block, torch.device("cpu"), torch.bfloat16, "transformer.h.1")
    assert not is_meta(real) and is_meta(block)
    assert all(p.dtype == torch.bfloat16 and bool(torch.isfinite(p).all()) for p in real.parameters())
    assert _params(real) == _params(block)
    assert torch.equal(real.ln_1.weight, torch.ones(32, dtype=torch.bfloat16))  # its own reset_parameters


def test_materialise_keeps_shared_parameters_shared():
    with torch.device("meta"):
        pair = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})
    pair.b.weight = pair.a.weight
    real = materialise(pair, torch.device("cpu"), torch.float32, "pair")
    assert real.b.weight is real.a.weight and len(list(real.parameters())) == 3


def test_a_meta_profile_lists_every_layer_with_the_models_parameter_bytes():
    spec = build_meta_spec("models/gpt.py:build", TINY)
    prof = profile_model(spec, "models/gpt.py:build", TINY, FAST)
    names = [layer.name for layer in prof.layers]
    assert names == ["transformer.emb", "transformer.h.0", "transformer.h.1", "transformer.h.2",
                     "transformer.ln_f", "lm_head"]
    assert sum(layer.param_bytes for layer in prof.layers) == 4 * _params(spec.model)
    assert [layer.same_as for layer in prof.layers] == [None, None, "transformer.h.0", "transformer.h.0", None, None]
    assert prof.layers[2].by_mbs == prof.layers[1].by_mbs
    assert is_meta(spec.model)  # nothing of the factory's model was made real
    assert prof.whole["2"].calibrated_on is None  # this small model fits: timed whole


def test_dedupe_changes_no_bytes_and_no_edge():
    spec = build_meta_spec("models/gpt.py:build", TINY)
    once = profile_model(spec, "m", {}, FAST)
    every = profile_model(spec, "m", {}, Options(mbs=(1, 2), repeats=2, warmup=1, threads=1, dedupe=False))
    assert all(layer.same_as is None for layer in every.layers)
    assert once.edges == every.edges
    for a, b in zip(once.layers, every.layers, strict=True):
        assert a.param_bytes == b.param_bytes
        assert {k: (c.act_bytes, c.out_bytes) for k, c in a.by_mbs.items()} == \
               {k: (c.act_bytes, c.out_bytes) for k, c in b.by_mbs.items()}


def test_a_model_too_large_to_time_whole_is_calibrated_on_a_chain():
    spec = build_meta_spec("models/gpt.py:build", TINY)
    # a block takes about 150 kB in training here (two copies of its 51 kB of parameters and what it
    # saves), the model about 520 kB and Adam's state 2 x 200 kB more: 400 kB holds a few layers
    prof = profile_model(spec, "m", {}, Options(mbs=(1,), repeats=2, warmup=1, threads=1, memory_bytes=400_000))
    chain = prof.whole["1"].calibrated_on
    assert chain is not None and chain != ["transformer.emb", "lm_head"]
    names = [layer.name for layer in prof.layers]
    a, b = names.index(chain[0]), names.index(chain[1])
    assert prof.whole["1"].layer_sum_s == pytest.approx(
        sum(layer.by_mbs["1"].fwd_s + layer.by_mbs["1"].bwd_s for layer in prof.layers[a:b + 1])
        + (prof.loss.by_mbs["1"].fwd_s + prof.loss.by_mbs["1"].bwd_s if b == len(names) - 1 else 0.0))


def test_a_layer_larger_than_the_memory_is_refused_with_its_size():
    spec = build_meta_spec("models/gpt.py:build", TINY)
    with pytest.raises(InfeasibleError,
                       match=r"layer transformer.emb needs .* KiB .*; --memory gives 1.0 KiB: cut it finer"):
        profile_model(spec, "m", {}, Options(mbs=(1,), repeats=1, warmup=0, threads=1, memory_bytes=1024))


def test_cli_layer_too_large_exits_3_with_one_line(tmp_path):
    out = tmp_path / "p.json"
    r = runner.invoke(app, ["profile", "models/gpt.py:build", "--memory", "0.001", "--mbs", "1",
                            "--repeats", "1", "--warmup", "0", "-o", str(out)])
    assert r.exit_code == 3, r.output
    assert "layer transformer.emb needs" in r.output and r.output.count("\n") <= 2 and not out.exists()


FACTORY = '''
import torch
from torch import nn
from planner.model import ModelSpec

def build():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    scale = model[0].weight.abs().max().item()  # computes with its weights while building
    return ModelSpec(model=model, batch=lambda n, g: ((torch.randn(n, 4, generator=g),), torch.zeros(n, 2)),
                     loss=lambda y, t: ((y - t) ** 2).mean() * scale)
'''


def test_a_factory_that_cannot_build_on_meta_is_told_the_way_out(tmp_path):
    factory = tmp_path / "computes.py"
    factory.write_text(FACTORY)
    with pytest.raises(ModelError, match=r"cannot be built on the meta device .*: pass --no-meta"):
        build_meta_spec(f"{factory}:build", {})
    out = tmp_path / "p.json"
    r = runner.invoke(app, ["profile", f"{factory}:build", "--mbs", "1", "-o", str(out)])
    assert r.exit_code == 2 and "pass --no-meta" in r.output and r.output.count("\n") <= 2
    r = runner.invoke(app, ["profile", f"{factory}:build", "--no-meta", "--mbs", "1", "--repeats", "1",
                            "--warmup", "0", "--threads", "1", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert [layer["name"] for layer in json.loads(out.read_text())["layers"]] == ["0", "1"]


def test_a_batch_made_at_build_time_on_meta_is_refused():
    spec = build_meta_spec("models/gpt.py:build", TINY)
    with torch.device("meta"):
        fixed = torch.zeros(1, 16, dtype=torch.long)
    spec.batch = lambda n, g: ((fixed,), fixed)
    with pytest.raises(ModelError, match="returned meta tensors.*--no-meta"):
        profile_model(spec, "m", {}, FAST)


def test_committed_profiles_still_load():
    for name in ("gpt.cpu", "gpt.h200", "gpt-tied-50k.h200", "cnn.h200", "encdec.h200", "unet.h200"):
        prof = load_profile(f"profiles/{name}.json")
        assert all(layer.same_as is None for layer in prof.layers)
        assert all(w.calibrated_on is None for w in prof.whole.values())


def test_hf_models_build_on_meta_with_no_weights():
    pytest.importorskip("transformers")
    for model_type in ("gpt2", "llama", "t5"):
        spec = build_meta_spec("models/hf.py:build", {"model_type": model_type, "n_layer": 2})
        tensors = [*spec.model.parameters(), *spec.model.buffers()]
        assert tensors and all(t.is_meta for t in tensors), model_type
        assert spec.layers is None and spec.trace == "export"


def test_hf_model_type_without_the_task_is_refused_with_both_named():
    pytest.importorskip("transformers")
    with pytest.raises(ModelError, match="model_type='vit' task='causal-lm'"):
        build_meta_spec("models/hf.py:build", {"model_type": "vit", "task": "causal-lm", "n_layer": 2})


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(64, 256, bias=False), nn.Linear(256, 64, bias=False)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def two_linear_spec():
    with torch.device("meta"):
        model = TwoLinear()
    return ModelSpec(model=model, batch=lambda n, g: ((torch.randn(n, 64, generator=g),), torch.zeros(n, 64)),
                     loss=nn.functional.mse_loss, name="two")


def test_estimate_prices_flops_and_bytes_at_the_datasheet_peaks():
    prof = profile_model(two_linear_spec(), "m", {}, Options(mbs=(8,), estimate="h100"))
    first = prof.layers[0].by_mbs["8"]
    # forward: 2 * 8 * 64 * 256 = 262,144 FLOPs, 3.9 ns at 67 TFLOP/s; it reads 64 KiB of weights and
    # 2 KiB of input and writes 8 KiB of output, 75,776 bytes: 22.6 ns at 3.35 TB/s, the bound
    assert first.fwd_s == pytest.approx(75_776 / 3.35e12)
    # backward: twice the FLOPs; reads the weights, writes their gradient: 141,312 bytes
    assert first.bwd_s == pytest.approx(141_312 / 3.35e12)
    assert prof.device.name == "H100-80GB" and prof.whole == {}
    assert prof.measurement is not None and "H100" in prof.measurement.timer


def test_estimate_of_a_wide_block_is_bound_by_arithmetic():
    spec = build_meta_spec("models/gpt.py:build", {"n_layer": 2, "d_model": 1024, "n_head": 8, "vocab": 512,
                                                   "seq": 512})
    prof = profile_model(spec, "m", {}, Options(mbs=(8,), estimate="a100", dtype="bfloat16"))
    block = prof.layers[1].by_mbs["8"]
    # matrix products: 12 d^2 weights, 2 FLOPs each per token, 4096 tokens; attention: Q K^T and
    # its product with V, 2 * 2 * seq^2 * d per sample. 25 MB of bf16 weights take 16 us at 1.555 TB/s;
    # 1.1e11 FLOPs take 358 us at 312 TFLOP/s
    flops = 2 * 4096 * 12 * 1024**2 + 8 * 4 * 512**2 * 1024
    assert block.fwd_s == pytest.approx(flops / 312e12)


def test_estimate_needs_a_device_with_known_peaks():
    with pytest.raises(InputError, match="--estimate 'cpu': no datasheet peaks for it; choose one of .*h100"):
        device_peaks("cpu")


def test_running_out_of_memory_is_infeasible_not_an_internal_error():
    with pytest.raises(InfeasibleError, match=r"layer h.3: its forward ran out of memory \(RuntimeError: "
                                              r"DefaultCPUAllocator: can't allocate memory.*\): lower --mbs"):
        with user_code("layer h.3: its forward"):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 805306368 bytes.")


@pytest.mark.parametrize("factory", ["models/unet.py:build", "models/encdec.py:build"])
def test_meta_and_in_memory_profiles_agree_on_every_byte(factory):
    """Skip connections (U-Net) and a model input used by many layers (the decoder's tokens):
    edges, saved flags and bytes found on meta, deduplicated, are the ones measured in memory."""
    opts = Options(mbs=(2,), repeats=1, warmup=0, threads=1)
    meta = profile_model(build_meta_spec(factory, {}), factory, {}, opts)
    real = profile_model(build_spec(factory, {}), factory, {}, Options(mbs=(2,), repeats=1, warmup=0, threads=1,
                                                                      dedupe=False))
    assert meta.edges == real.edges and meta.tied == real.tied
    assert meta.model.fingerprint == real.model.fingerprint
    for a, b in zip(meta.layers, real.layers, strict=True):
        assert (a.name, a.param_bytes, a.by_mbs["2"].act_bytes, a.by_mbs["2"].out_bytes) == \
               (b.name, b.param_bytes, b.by_mbs["2"].act_bytes, b.by_mbs["2"].out_bytes)


class HalfReal(nn.Module):
    """Built on meta but for a buffer the factory made on the CPU on purpose."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.register_buffer("offset", torch.ones(8, device="cpu"))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x) + self.offset
        return x


def test_a_model_partly_real_is_profiled_from_meta():
    with torch.device("meta"):
        model = HalfReal()
    assert model.offset.device.type == "cpu" and is_meta(model)
    spec = ModelSpec(model=model, batch=lambda n, g: ((torch.randn(n, 8, generator=g),), torch.zeros(n, 8)),
                     loss=nn.functional.mse_loss)
    prof = profile_model(spec, "m", {}, Options(mbs=(2,), repeats=1, warmup=0, threads=1))
    assert [layer.name for layer in prof.layers] == ["layers.0", "layers.1"]
    assert model.offset.device.type == "cpu" and torch.equal(model.offset, torch.ones(8))


def test_solve_and_simulate_say_the_costs_are_estimated(tmp_path):
    prof = profile_model(two_linear_spec(), "m", {}, Options(mbs=(8,), estimate="h100"))
    (tmp_path / "p.json").write_text(prof.model_dump_json())
    plan = tmp_path / "plan.json"
    solved = runner.invoke(app, ["solve", str(tmp_path / "p.json"), "--cluster", "h100x8", "--global-batch", "64",
                                 "-o", str(plan)])
    assert solved.exit_code == 0, solved.output
    assert "costs are estimated, not measured (estimate: roofline" in " ".join(solved.output.split())
    assert json.loads(plan.read_text())["provenance"]["costs_estimated"].startswith("estimate: roofline")
    simulated = runner.invoke(app, ["simulate", str(plan)])
    assert simulated.exit_code == 0 and "costs are estimated" in " ".join(simulated.output.split())
    measured = runner.invoke(app, ["simulate", "plans/gpt.cpu2-pp2.json"])
    assert measured.exit_code == 0 and "estimated" not in measured.output


def test_an_estimated_profiles_table_says_it_is_estimated():
    from pathlib import Path

    from rich.console import Console

    from planner.formats import load_profile
    from planner.report import profile_table

    console = Console(width=200, record=True)
    profile = Path(__file__).parents[1] / "profiles" / "llama2-70b.h100-estimate.json"
    console.print(profile_table(load_profile(profile)))
    text = console.export_text()
    assert "micro-batch 2, estimated" in text and "costs estimated, not measured: roofline" in text
