"""Hugging Face ``transformers`` models as they are, built from a configuration with random
weights (nothing is downloaded): ``AutoModelFor...`` of the task, no adapter. planner finds the
layers through ``torch.export`` (``ModelSpec(trace="export")``): the model's repeated blocks
(``transformer.h.3``, ``model.layers.3``, ``bert.encoder.layer.3``, ``decoder.block.3``,
``vit.layers.3``) and the modules beside them; masks, positions and the encoder's output cross
stages as tensors.

Needs transformers (``pip install -e '.[hf]'``). Small by default so that it profiles on a CPU in
seconds; ``n_layer``, ``d_model``, ``n_head``, ``vocab`` and ``seq`` set the configuration's
standard sizes (the feed-forward width, key-value heads and head size follow unless given), and
any other configuration field passes as is. GPT-2 and Llama as causal language models carry a
``tp_plan`` (``TP_PLANS``), so ``planner execute`` runs them with tp > 1; the others run with tp 1:

    planner profile models/hf.py:build --arg model_type=llama --arg n_layer=16 \\
        --arg d_model=2048 --arg n_head=32 --arg num_key_value_heads=8 --arg vocab=32000 --arg seq=2048
    planner profile models/hf.py:build --arg model_type=t5 --arg task=seq2seq
"""

from __future__ import annotations

import difflib
import inspect
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from planner.model import ModelSpec

_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
_AUTO = {"causal-lm": "AutoModelForCausalLM", "masked-lm": "AutoModelForMaskedLM",
         "classification": "AutoModelForSequenceClassification", "seq2seq": "AutoModelForSeq2SeqLM",
         "image-classification": "AutoModelForImageClassification"}
# transformers' table of the model types each AutoModelFor... builds (model type -> class name)
_MAPPING = {"causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "masked-lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
            "classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
            "seq2seq": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
            "image-classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"}
# Fields that follow from the standard sizes where a configuration has them: (n_layer, d_model, n_head) -> value.
_DERIVED = {"intermediate_size": lambda n, d, h: 4 * d, "d_ff": lambda n, d, h: 4 * d,
            "num_key_value_heads": lambda n, d, h: h, "head_dim": lambda n, d, h: d // h,
            "d_kv": lambda n, d, h: d // h, "num_decoder_layers": lambda n, d, h: n,
            # an encoder-decoder's other half (BART, mBART, Marian, Whisper)
            "decoder_layers": lambda n, d, h: n, "decoder_attention_heads": lambda n, d, h: h,
            "encoder_ffn_dim": lambda n, d, h: 4 * d, "decoder_ffn_dim": lambda n, d, h: 4 * d,
            # GPT-Neo's attention kind of each layer: global and local in turn
            "attention_types": lambda n, d, h: [[["global", "local"], n // 2]] + ([[["global"], 1]] if n % 2 else [])}


# Tensor parallelism (Megatron-LM, Shoeybi et al., 2019, section 3) by module path: attention and
# MLP a column- then a row-parallel product, the token (and GPT-2's position) embedding by rows, the
# head by the vocabulary, its logits gathered for the loss. GPT-2's Conv1D is a Linear stored
# (in, out), and its fused c_attn is split into q, k and v on each rank (planner.execute.graph_tp).
TP_PLANS = {
    "gpt2": {"transformer.wte": "rowwise", "transformer.wpe": "rowwise", "attn.c_attn": "colwise",
             "attn.c_proj": "rowwise", "mlp.c_fc": "colwise", "mlp.c_proj": "rowwise", "lm_head": "colwise_gather"},
    "llama": {"model.embed_tokens": "rowwise", "self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise",
              "self_attn.v_proj": "colwise", "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise",
              "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise", "lm_head": "colwise_gather"},
}


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
    """Tokens other than padding, then padding: a decoder's classifier reads the last token that is
    not the padding id, an encoder's the first token."""
    pad = cfg.pad_token_id
    ids = torch.randint(0, vocab - 1 if isinstance(pad, int) else vocab, (size, seq), generator=gen)
    mask = _padding_mask(size, gen, seq)
    if isinstance(pad, int):
        ids = torch.where(ids >= pad, ids + 1, ids).masked_fill(mask == 0, pad)
    return (ids, mask), torch.randint(0, cfg.num_labels, (size,), generator=gen)


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
# what each batch passes to forward, by position
_INPUTS = {"causal-lm": ("input_ids",), "masked-lm": ("input_ids", "attention_mask"),
           "classification": ("input_ids", "attention_mask"),
           "seq2seq": ("input_ids", "attention_mask", "decoder_input_ids"), "image-classification": ("pixel_values",)}


def _passed(model, model_type: str, task: str) -> int:
    """How many of the batch's inputs the model's forward takes by position: all, or for
    classification the tokens alone where the mask is not its second parameter (GPT-2's is
    past_key_values). Padding comes last, so a decoder's causal attention never lets a token see
    it, and the classifier finds the last token by the padding id."""
    params = list(inspect.signature(model.forward).parameters)
    names = _INPUTS[task]
    n = next((i for i, name in enumerate(names) if i >= len(params) or params[i] != name), len(names))
    if n < len(names) and not (task == "classification" and n == 1):
        raise ValueError(f"model_type={model_type!r} task={task!r}: {type(model).__name__}.forward takes "
                         f"{', '.join(params[:len(names)])} first; models/hf.py passes {', '.join(names)} by position")
    return n


# ---------------------------------------------------------------------------- the configuration


def tasks_of(model_type: str) -> list[str]:
    """The tasks transformers has a model of ``model_type`` for, in the order a default is chosen:
    seq2seq first for an encoder-decoder (T5, BART), then masked-lm before causal-lm: a type with
    both is an encoder (BERT, RoBERTa), whose causal-LM class is the decoder half of an
    encoder-decoder pairing (it warns when used alone without is_decoder)."""
    from transformers import AutoConfig
    from transformers.models.auto import modeling_auto

    has = [task for task, table in _MAPPING.items() if model_type in getattr(modeling_auto, table, {})]
    first = ["seq2seq"] if getattr(AutoConfig.for_model(model_type), "is_encoder_decoder", False) else []
    order = [*first, "masked-lm", "causal-lm", "seq2seq", "classification", "image-classification"]
    return sorted(has, key=order.index)


def _task(model_type: str, task: str | None) -> str:
    """The task asked for, else the model type's own (see ``tasks_of``); one that transformers has
    no model of this type for is refused with those it has."""
    if task is not None and task not in _AUTO:
        raise ValueError(f"task={task!r}: choose one of {', '.join(_AUTO)}")
    has = tasks_of(model_type)
    if not has:
        raise ValueError(f"model_type={model_type!r}: transformers has no model of this type for any task "
                         f"models/hf.py builds ({', '.join(_AUTO)}); describe the model with a factory of your own")
    if task is not None and task not in has:
        raise ValueError(f"model_type={model_type!r} task={task!r}: transformers has no {task} model of this type; "
                         f"it has {', '.join(has)}: pass --arg task={has[0]}")
    return task or has[0]



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
    known = dict.fromkeys([*inspect.signature(build).parameters, *stored, *getattr(defaults, "attribute_map", {})])
    for name in unknown:  # close to a name build or the configuration takes: a typo (n_layers for n_layer)
        close = difflib.get_close_matches(name, [k for k in known if k != "overrides"], n=3, cutoff=0.8)
        if close:
            raise ValueError(f"model_type={model_type!r}: {name!r} is neither an argument of build nor a field of "
                             f"its configuration; did you mean {' or '.join(map(repr, close))}?")
    if unknown:  # else perhaps a legacy name the configuration still converts: say so, go on
        warnings.warn(f"model_type={model_type!r}: {', '.join(map(repr, unknown))} is not a field of "
                      "its configuration; passed on as is", stacklevel=3)
    aliases = {own: std for std, own in getattr(defaults, "attribute_map", {}).items()}
    for name in overrides:  # an override under the model's own name (n_embd) beats the standard one
        fields.pop(aliases.get(name, name), None)
    fields.update(overrides)
    return fields


def _config(model_type: str, fields: dict):
    """The configuration of these fields. One that requires a special token (Whisper's
    decoder_start_token_id) and refuses None gets the last id of the vocabulary for it instead."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as e:
        refused = f"({type(e).__name__}: {str(e).strip().splitlines()[-1].strip()})"
    last = {name: fields["vocab_size"] - 1 for name in _TOKEN_IDS if name in fields and fields[name] is None}
    if last and isinstance(fields.get("vocab_size"), int):
        try:
            return AutoConfig.for_model(model_type, **{**fields, **last})
        except Exception:
            pass
    raise ValueError(f"model_type={model_type!r}: the configuration refuses these settings {refused}")


def _model(transformers, model_type: str, task: str, config, seed: int):
    torch.manual_seed(seed)
    try:
        return getattr(transformers, _AUTO[task]).from_config(config)
    except ValueError as e:
        raise ValueError(f"model_type={model_type!r} task={task!r}: {str(e).strip().splitlines()[0]}") from None


def _check_cuttable(model: nn.Module, model_type: str, task: str) -> None:
    """A classifier that finds each sample's end-of-sequence token by a mask of the token values
    (BART's family and T5's: ``eos_mask``) is refused: torch.export fixes the count of such tokens
    at the example batch's, so no other batch runs through the exported layers."""
    if task != "classification":
        return
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return
    if "eos_mask" in source:
        others = [t for t in tasks_of(model_type) if t != task]
        instead = f"--arg task={others[0]} (this type's other task), or " if others else ""
        raise ValueError(f"model_type={model_type!r} task={task!r} is not supported: {type(model).__name__} picks "
                         "each sample's end-of-sequence token by a mask of the token values, which torch.export "
                         f"fixes at the example batch's count: use {instead}a classifier of another family "
                         "(bert, roberta, gpt2, llama)")


def _position_offset(model: nn.Module, config) -> int:
    """How many rows the position table needs beyond ``seq``. RoBERTa's family (XLM-RoBERTa,
    CamemBERT, Longformer, ...) numbers the positions of a sequence from padding_idx + 1 (padding
    tokens take padding_idx itself), so its table needs seq + padding_idx + 1 rows. Such a model is
    known by its position table: an embedding of max_position_embeddings rows whose padding row is
    the padding token's. Models that count positions from 0 (BERT, GPT-2), or offset them
    internally (BART, OPT), have none and keep seq rows."""
    pad, rows = getattr(config, "pad_token_id", None), getattr(config, "max_position_embeddings", None)
    if not isinstance(pad, int) or not isinstance(rows, int):
        return 0
    padded = any(isinstance(m, nn.Embedding) and m.padding_idx == pad and m.num_embeddings == rows
                 for m in model.modules())
    return pad + 1 if padded else 0


def build(model_type: str = "gpt2", task: str | None = None, n_layer: int = 4, d_model: int = 128,
          n_head: int = 4, vocab: int = 1000, seq: int = 64, seed: int = 0, **overrides) -> ModelSpec:
    """``model_type`` is any key of transformers' ``AutoConfig`` (gpt2, llama, mistral, qwen2, bert,
    t5, vit, ...); ``task`` one of causal-lm, masked-lm, classification, seq2seq,
    image-classification (default: the first transformers has a model of this type for, in the
    order of ``tasks_of``)."""
    try:
        import transformers
        from transformers import AutoConfig
    except ImportError:
        raise ImportError("models/hf.py needs Hugging Face transformers: pip install -e '.[hf]'") from None
    if n_layer < 1 or d_model < 1 or n_head < 1 or seq < 1 or vocab < 2:
        raise ValueError("n_layer, d_model, n_head and seq must be at least 1 and vocab at least 2")
    if d_model % n_head:
        raise ValueError(f"d_model={d_model} must be a multiple of n_head={n_head}")
    try:
        defaults = AutoConfig.for_model(model_type)
    except (ValueError, KeyError) as e:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=5)
        if close:  # transformers lists all ~800 types
            raise ValueError(f"model_type={model_type!r} is not a transformers model type; closest: "
                             f"{', '.join(close)}") from None
        raise ValueError(f"model_type={model_type!r}: {e}") from None
    task = _task(model_type, task)
    if task == "image-classification":
        overrides = {"image_size": 32, "patch_size": 8, "num_labels": 10, **overrides}
    fields = dict(_config_fields(defaults, model_type, n_layer, d_model, n_head, vocab, seq, overrides),
                  use_cache=False)
    if task == "classification" and fields.get("pad_token_id", getattr(defaults, "pad_token_id", None)) is None:
        fields["pad_token_id"] = vocab - 1  # a decoder's classifier finds the last token by the padding id
    config = _config(model_type, fields)
    model = _model(transformers, model_type, task, config, seed)
    _check_cuttable(model, model_type, task)
    offset = 0 if "max_position_embeddings" in overrides else _position_offset(model, config)
    if offset:
        config = _config(model_type, {**fields, "max_position_embeddings": seq + offset})
        model = _model(transformers, model_type, task, config, seed)
    model.train()
    vocab, make, n = getattr(config, "vocab_size", vocab), _BATCH[task], _passed(model, model_type, task)

    def batch(size, gen):
        inputs, target = make(size, gen, vocab, seq, config)
        return inputs[:n], target
    tp_plan = TP_PLANS.get(model_type) if task == "causal-lm" else None
    return ModelSpec(model=model, batch=batch, loss=token_loss, name=f"hf-{model_type}", trace="export",
                     tp_plan=tp_plan)
