"""The bundled example models (models/*.py) cut into layers as intended, and stages built from
those layers compute exactly what the whole model computes."""

from __future__ import annotations

import sys
from itertools import pairwise
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from planner.model import build_spec  # noqa: E402
from planner.split import INPUT, layered  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "models"

# Small sizes: each model builds, cuts and runs in well under a second.
TINY = {
    "gpt": ("gpt", dict(n_layer=3, d_model=32, n_head=2, vocab=64, seq=16)),
    "gpt-tied": ("gpt", dict(n_layer=3, d_model=32, n_head=2, vocab=64, seq=16, tied=True)),
    "cnn": ("cnn", dict(depth=4, width=8, image=16, classes=5)),
    "unet": ("unet", dict(levels=3, width=8, image=16, classes=3)),
    "encdec": ("encdec", dict(n_enc=2, n_dec=3, d_model=32, n_head=2, vocab=64, src_seq=12,
                              tgt_seq=10)),
}
HF_TINY = dict(n_layer=2, d_model=32, n_head=2, vocab=64, seq=16)


def spec_of(file: str, args: dict):
    return build_spec(f"{MODELS / file}.py:build", args)


def cut(spec):
    """The spec's model in eval mode, one batch, and the model cut into layers."""
    spec.model.eval()
    inputs, target = spec.batch(2, torch.Generator().manual_seed(0))
    return inputs, target, layered(spec.model, inputs, spec.layers)


def run_stages(lm, bounds: list[int], inputs: tuple):
    """Run stages [bounds[0], bounds[1]), [bounds[1], bounds[2]), ... one after the other."""
    x = inputs
    for a, b in pairwise(bounds):
        x = lm.stage(a, b)(*x)
    return x


def check_stages_reproduce(spec) -> None:
    inputs, target, lm = cut(spec)
    n = lm.n_layers
    assert n >= 4
    with torch.no_grad():
        full = spec.model(*inputs)
        assert isinstance(full, torch.Tensor)
        assert spec.loss(full, target).ndim == 0
        for k in (1, n // 2 + 1):
            torch.testing.assert_close(run_stages(lm, [0, k, n], inputs), full, rtol=0, atol=0)
        torch.testing.assert_close(run_stages(lm, [0, 1, n // 2 + 1, n], inputs), full, rtol=0, atol=0)


@pytest.mark.parametrize("key", list(TINY))
def test_stages_reproduce_the_model(key):
    file, args = TINY[key]
    check_stages_reproduce(spec_of(file, args))


@pytest.mark.parametrize("key", list(TINY))
def test_batch_is_deterministic(key):
    file, args = TINY[key]
    spec = spec_of(file, args)
    (a, ta), (b, tb) = (spec.batch(3, torch.Generator().manual_seed(7)) for _ in range(2))
    assert isinstance(a, tuple) and len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(ta, tb, rtol=0, atol=0)


def test_gpt_tied_head_shares_the_embedding():
    _, _, lm = cut(spec_of(*TINY["gpt-tied"]))
    first = set(map(id, lm.layer_params(0).values()))
    last = set(map(id, lm.layer_params(lm.n_layers - 1).values()))
    assert first & last


def test_cnn_layers():
    _, _, lm = cut(spec_of(*TINY["cnn"]))
    assert lm.names == ["stem", *(f"blocks.{i}" for i in range(4)), "head"]


def test_unet_skip_connections_span_the_bottleneck():
    file, args = TINY["unet"]
    _, _, lm = cut(spec_of(file, args))
    levels = args["levels"]
    assert lm.names == [*(f"down.{i}" for i in range(levels)), "mid",
                        *(f"up.{i}" for i in range(levels)), "head"]
    assert any(t.producer != INPUT and t.last - t.producer > 2 for t in lm.tensors)
    index = {name: i for i, name in enumerate(lm.names)}
    for level in range(levels):  # encoder level i feeds the decoder block at its resolution
        skip = next(t for t in lm.tensors if t.producer == index[f"down.{level}"])
        assert index[f"up.{levels - 1 - level}"] in skip.consumers
    # every encoder output crosses the cut before the bottleneck
    crossing = {t.producer for t in lm.crossing(index["mid"])}
    assert crossing == {index[f"down.{i}"] for i in range(levels)}


def test_encdec_memory_reaches_every_decoder_layer():
    file, args = TINY["encdec"]
    _, _, lm = cut(spec_of(file, args))
    index = {name: i for i, name in enumerate(lm.names)}
    decoders = {index[f"decoder.{i}"] for i in range(args["n_dec"])}
    memory = [t for t in lm.tensors if t.producer == index[f"encoder.{args['n_enc'] - 1}"]]
    assert len(memory) == 1 and decoders <= set(memory[0].consumers)
    # the target tokens are a model input first used by the decoder's embedding
    assert lm.n_inputs == 2
    tgt = next(t for t in lm.tensors if t.key == (INPUT, 1))
    assert tgt.consumers == (index["tgt_emb"],)
    assert index["tgt_emb"] > index[f"encoder.{args['n_enc'] - 1}"]


def test_hf_without_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(Exception, match=r"pip install -e '.\[hf\]'"):
        spec_of("hf", HF_TINY)
