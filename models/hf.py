"""Hugging Face ``transformers`` models as they are, built from a configuration with random
weights (nothing is downloaded): ``AutoModelFor...`` of the task, no adapter. planner finds the
layers through ``torch.export`` (``ModelSpec(trace="export")``): the model's repeated blocks
(``transformer.h.3``, ``model.layers.3``, ``bert.encoder.layer.3``, ``decoder.block.3``,
``vit.layers.3``) and the modules beside them; masks, positions and the encoder's output cross
stages as tensors.

Needs transformers (``pip install -e '.[hf]'``). Small by default so that it profiles on a CPU in
seconds; ``n_layer``, ``d_model``, ``n_head``, ``vocab`` and ``seq`` set the configuration's
standard sizes (the feed-forward width, key-value heads and head size follow unless given), and
any other configuration field passes as is:

    planner profile models/hf.py:build --arg model_type=llama --arg n_layer=16 \\
        --arg d_model=2048 --arg n_head=32 --arg num_key_value_heads=8 --arg vocab=32000 --arg seq=2048
    planner profile models/hf.py:build --arg model_type=t5 --arg task=seq2seq
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from planner.model import ModelSpec

_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
_AUTO = {"causal-lm": "AutoModelForCausalLM", "masked-lm": "AutoModelForMaskedLM",
         "classification": "AutoModelForSequenceClassification", "seq2seq": "AutoModelForSeq2SeqLM",
         "image-classification": "AutoModelForImageClassification"}
_DEFAULT_TASK = {"bert": "masked-lm", "roberta": "masked-lm", "t5": "seq2seq", "bart": "seq2seq",
                 "vit": "image-classification"}
# Fields that follow from the standard sizes where a configuration has them: (n_layer, d_model, n_head) -> value.
_DERIVED = {"intermediate_size": lambda n, d, h: 4 * d, "d_ff": lambda n, d, h: 4 * d,
            "num_key_value_heads": lambda n, d, h: h, "head_dim": lambda n, d, h: d // h,
            "d_kv": lambda n, d, h: d // h, "num_decoder_layers": lambda n, d, h: n}


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def token_loss(out, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every position's logits (positions with target -100 left out)."""
    logits = _logits(out)  # (mb, seq, vocab) or (mb, classes)
    return F.cross_entropy(logits.flatten(0, -2), target.flatten(), ignore_index=-100)


# ----------------------------------------------------------------------------- the batches
# Every sample of a batch weighs the same in its loss (a fixed number of predicted positions per
# sample), so the mean over a batch is the mean of its micro-batches' means, as the pipeline computes.


def _causal(size, gen, vocab, seq, _cfg):
    tokens = torch.randint(0, vocab, (size, seq + 1), generator=gen)
    return (tokens[:, :-1],), tokens[:, 1:]


def _padding_mask(size, gen, seq):
    """1 for tokens, 0 for padding after a random length of at least half the sequence."""
    lengths = torch.randint(seq // 2 + 1, seq + 1, (size, 1), generator=gen)
    return (torch.arange(seq).unsqueeze(0) < lengths).long()  # (size, seq)


def _masked(size, gen, vocab, seq, _cfg):
    ids = torch.randint(0, vocab - 1, (size, seq), generator=gen)
    mask = _padding_mask(size, gen, seq)
    k = max(1, seq // 2 * 15 // 100)  # BERT's 15%, among the positions that are never padding
    where = torch.rand(size, seq // 2 + 1, generator=gen).argsort(dim=1)[:, :k]
    target = torch.full_like(ids, -100).scatter(1, where, ids.gather(1, where))
    return (ids.scatter(1, where, vocab - 1), mask), target  # the last token id stands for [MASK]


def _classes(size, gen, vocab, seq, cfg):
    ids = torch.randint(0, vocab, (size, seq), generator=gen)
    return (ids, _padding_mask(size, gen, seq)), torch.randint(0, cfg.num_labels, (size,), generator=gen)


def _seq2seq(size, gen, vocab, seq, cfg):
    ids = torch.randint(0, vocab, (size, seq), generator=gen)
    labels = torch.randint(0, vocab, (size, max(seq // 2, 1)), generator=gen)
    start = torch.full((size, 1), getattr(cfg, "decoder_start_token_id", None) or 0, dtype=labels.dtype)
    return (ids, _padding_mask(size, gen, seq), torch.cat([start, labels[:, :-1]], dim=1)), labels


def _images(size, gen, vocab, seq, cfg):
    pixels = torch.randn(size, cfg.num_channels, cfg.image_size, cfg.image_size, generator=gen)
    return (pixels,), torch.randint(0, cfg.num_labels, (size,), generator=gen)


_BATCH = {"causal-lm": _causal, "masked-lm": _masked, "classification": _classes, "seq2seq": _seq2seq,
          "image-classification": _images}


# ---------------------------------------------------------------------------- the configuration


def _config_fields(defaults, model_type: str, n_layer: int, d_model: int, n_head: int, vocab: int,
                   seq: int, overrides: dict) -> dict:
    """The configuration's fields: the standard sizes, derived widths, no dropout, no special
    token outside the vocabulary, then the overrides (under the model's own names or the standard)."""
    fields = dict(num_hidden_layers=n_layer, hidden_size=d_model, num_attention_heads=n_head,
                  vocab_size=vocab, max_position_embeddings=seq)
    stored = defaults.to_dict()  # settable fields (some configurations derive head_dim, say)
    for name, derive in _DERIVED.items():
        if stored.get(name) is not None:
            fields[name] = derive(n_layer, d_model, n_head)
    for name, value in stored.items():  # no dropout: runs must be comparable with a plain one
        if ("dropout" in name or name.endswith("pdrop")) and isinstance(value, float):
            fields[name] = 0.0
    for name in _TOKEN_IDS:  # special tokens of the real vocabulary may not exist in a small one
        token = getattr(defaults, name, None)
        if isinstance(token, int) and token >= vocab:
            fields[name] = None
    unknown = [k for k in overrides if k not in stored and not hasattr(defaults, k)]
    if unknown:  # a typo, or a legacy name the configuration still converts: say so, go on
        warnings.warn(f"model_type={model_type!r}: {', '.join(map(repr, unknown))} is not a field of "
                      "its configuration; passed on as is", stacklevel=3)
    aliases = {own: std for std, own in getattr(defaults, "attribute_map", {}).items()}
    for name in overrides:  # an override under the model's own name (n_embd) beats the standard one
        fields.pop(aliases.get(name, name), None)
    fields.update(overrides)
    return fields


def _config(model_type: str, fields: dict):
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as e:
        raise ValueError(f"model_type={model_type!r}: the configuration refuses these settings "
                         f"({type(e).__name__}: {str(e).strip().splitlines()[-1]})") from None


def build(model_type: str = "gpt2", task: str | None = None, n_layer: int = 4, d_model: int = 128,
          n_head: int = 4, vocab: int = 1000, seq: int = 64, seed: int = 0, **overrides) -> ModelSpec:
    """``model_type`` is any key of transformers' ``AutoConfig`` (gpt2, llama, mistral, qwen2, bert,
    t5, vit, ...); ``task`` one of causal-lm, masked-lm, classification, seq2seq,
    image-classification (default: the model type's usual one, else causal-lm)."""
    try:
        import transformers
        from transformers import AutoConfig
    except ImportError:
        raise ImportError("models/hf.py needs Hugging Face transformers: pip install -e '.[hf]'") from None
    task = task or _DEFAULT_TASK.get(model_type, "causal-lm")
    if task not in _AUTO:
        raise ValueError(f"task={task!r}: choose one of {', '.join(_AUTO)}")
    if n_layer < 1 or d_model < 1 or n_head < 1 or seq < 1 or vocab < 2:
        raise ValueError("n_layer, d_model, n_head and seq must be at least 1 and vocab at least 2")
    if d_model % n_head:
        raise ValueError(f"d_model={d_model} must be a multiple of n_head={n_head}")
    try:
        defaults = AutoConfig.for_model(model_type)
    except (ValueError, KeyError) as e:
        raise ValueError(f"model_type={model_type!r}: {e}") from None
    if task == "image-classification":
        overrides = {"image_size": 32, "patch_size": 8, "num_labels": 10, **overrides}
    config = _config(model_type, dict(_config_fields(defaults, model_type, n_layer, d_model, n_head, vocab, seq,
                                                     overrides), use_cache=False))
    torch.manual_seed(seed)
    try:
        model = getattr(transformers, _AUTO[task]).from_config(config)
    except ValueError as e:  # no model of this task for this type
        raise ValueError(f"model_type={model_type!r} task={task!r}: {str(e).strip().splitlines()[0]}") from None
    model.train()
    vocab = getattr(config, "vocab_size", vocab)
    make = _BATCH[task]
    return ModelSpec(model=model, batch=lambda size, gen: make(size, gen, vocab, seq, config), loss=token_loss,
                     name=f"hf-{model_type}", trace="export")
