"""Any Hugging Face ``transformers`` causal language model, built from its configuration with
random weights (nothing is downloaded), described to planner as an explicit sequence of layers:
the token embedding, each decoder block, the final norm and the language-model head.

Hugging Face models do not trace with torch.fx as a whole, so the model is wrapped: small adapter
modules call the model's own submodules (same parameters) one after the other, each taking and
returning one tensor. The adapter handles the two common layouts, learned absolute positions
(GPT-2 style: ``wte``/``wpe``/``h``/``ln_f``) and rotary positions computed in every block
(Llama, Mistral, Qwen2/3, Gemma, Phi-3, GPT-NeoX style); the factory runs the wrapper and the
original model on a few tokens and refuses an architecture whose forward it does not reproduce.

Needs transformers (``pip install -e '.[hf]'``). Small by default so that it profiles on a
CPU in seconds; scale it with factory arguments, and pass any other configuration field as is:

    planner profile models/hf.py:build --arg model_type=llama --arg n_layer=16 \\
        --arg d_model=2048 --arg n_head=32 --arg num_key_value_heads=8 --arg vocab=32000 \\
        --arg seq=2048
"""

from __future__ import annotations

import inspect
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from planner.model import ModelSpec

_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


class Embed(nn.Module):
    """Token ids -> hidden states: token embedding, learned positions if any, dropout if any."""

    def __init__(self, tokens: nn.Module, positions: nn.Module | None, drop: nn.Module | None):
        super().__init__()
        self.tokens = tokens
        self.positions = positions
        self.drop = drop

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tokens(ids)
        if self.positions is not None:
            pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
            h = h + self.positions(pos)
        if self.drop is not None:
            h = self.drop(h)
        return h  # (mb, seq, hidden)


class Block(nn.Module):
    """One decoder block on hidden states alone: positions (and rotary embeddings) are made here,
    causality comes from the attention kernel (no mask, no cache), and only the hidden states are
    returned."""

    def __init__(self, block: nn.Module, rotary: nn.Module | None):
        super().__init__()
        self.block = block
        self.rotary = rotary
        accepted = inspect.signature(block.forward).parameters
        self.pass_position_ids = "position_ids" in accepted
        self.pass_use_cache = "use_cache" in accepted

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        kwargs = {}
        if self.rotary is not None or self.pass_position_ids:
            pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)  # (1, seq)
            if self.pass_position_ids:
                kwargs["position_ids"] = pos
            if self.rotary is not None:
                kwargs["position_embeddings"] = self.rotary(h, pos)
        if self.pass_use_cache:
            kwargs["use_cache"] = False
        out = self.block(h, attention_mask=None, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


class CausalLM(nn.Module):
    """The Hugging Face model's parts as a sequence: ``embed``, ``blocks.i``, ``norm``, ``lm_head``.

    The parts are the original model's modules (shared, not copied); the original model itself is
    kept as ``original`` without registering it, so the wrapper's parameters are named once."""

    def __init__(self, original: nn.Module, embed: Embed, blocks: list[Block], norm: nn.Module,
                 lm_head: nn.Module):
        super().__init__()
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.lm_head = lm_head
        object.__setattr__(self, "original", original)

    @property
    def layer_names(self) -> list[str]:
        return ["embed", *(f"blocks.{i}" for i in range(len(self.blocks))), "norm", "lm_head"]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.lm_head(self.norm(h))  # (mb, seq, vocab)


def _unsupported(model_type: str, why: str) -> ValueError:
    return ValueError(f"model_type={model_type!r} is not supported by planner's Hugging Face adapter: "
                      f"{why}")


def wrap(hf_model: nn.Module, model_type: str = "?") -> CausalLM:
    """Find the embedding, the decoder blocks, the final norm and the head of a causal LM."""
    n = hf_model.config.num_hidden_layers
    lists = [(name, m) for name, m in hf_model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n and name]
    if not lists:
        raise _unsupported(model_type, f"no list of {n} decoder blocks found")
    path, block_list = min(lists, key=lambda item: item[0].count("."))
    stack = hf_model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else hf_model
    tokens = hf_model.get_input_embeddings()
    lm_head = hf_model.get_output_embeddings()
    if tokens is None or lm_head is None:
        raise _unsupported(model_type, "no input embedding or output head")

    positions = drop = rotary = norm = None
    for name, child in stack.named_children():
        kind = type(child).__name__.lower()
        if child is tokens or child is block_list:
            continue
        if type(child) is nn.Embedding and positions is None:
            positions = child
        elif isinstance(child, nn.Dropout) and drop is None:
            drop = child
        elif "rotary" in kind and rotary is None:
            rotary = child
        elif "norm" in kind and norm is None:
            norm = child
        elif any(True for _ in child.parameters()):
            raise _unsupported(model_type, f"it has a part the adapter does not know: "
                                           f"{name} ({type(child).__name__})")
    if norm is None:
        raise _unsupported(model_type, "no final norm found beside the decoder blocks")
    if rotary is not None and \
            "position_embeddings" not in inspect.signature(block_list[0].forward).parameters:
        raise _unsupported(model_type, f"{type(block_list[0]).__name__} takes no position_embeddings")
    blocks = [Block(b, rotary) for b in block_list]
    return CausalLM(hf_model, Embed(tokens, positions, drop), blocks, norm, lm_head)


def _run_ours(model: CausalLM, model_type: str, ids: torch.Tensor) -> torch.Tensor:
    try:
        return model(ids)
    except Exception as e:
        raise _unsupported(model_type, f"run layer by layer it raised {type(e).__name__}: "
                                       f"{str(e).strip().splitlines()[0] if str(e) else ''}") from None


def _check(model: CausalLM, model_type: str, vocab: int, seq: int, seed: int) -> None:
    """The wrapper must compute the original model's logits. Built on the meta device, where
    there are no values to compare, it must at least run and give the logits' shape."""
    meta = next(model.parameters()).is_meta
    ids = torch.randint(0, vocab, (1, min(seq, 16)), generator=torch.Generator().manual_seed(seed))
    ids = ids.to("meta") if meta else ids
    modes = {name: m.training for name, m in model.original.named_modules()}
    model.original.eval()
    try:
        with torch.no_grad():
            ours = _run_ours(model, model_type, ids)
            if meta:
                if tuple(ours.shape) != (1, ids.shape[1], vocab):
                    raise _unsupported(model_type, f"run layer by layer it gives logits of shape "
                                                   f"{tuple(ours.shape)}, not {(1, ids.shape[1], vocab)}")
                return
            theirs = model.original(input_ids=ids, use_cache=False).logits
    finally:
        for name, m in model.original.named_modules():
            m.training = modes[name]
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5):
        diff = (ours - theirs).abs().max().item() if ours.shape == theirs.shape else "shape"
        raise _unsupported(model_type, "run layer by layer it does not reproduce the model's own "
                                       f"logits (largest difference {diff})")


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def _config_fields(defaults, model_type: str, n_layer: int, d_model: int, n_head: int, vocab: int,
                   seq: int, overrides: dict) -> dict:
    """The configuration's fields: the standard sizes, derived widths, no dropout, no special
    token outside the vocabulary, then the overrides."""
    fields = dict(num_hidden_layers=n_layer, hidden_size=d_model, num_attention_heads=n_head,
                  vocab_size=vocab, max_position_embeddings=seq)
    stored = defaults.to_dict()  # settable fields (some configurations derive head_dim, say)
    for name, value in (("intermediate_size", 4 * d_model), ("num_key_value_heads", n_head),
                        ("head_dim", d_model // n_head)):
        if stored.get(name) is not None:
            fields[name] = value
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


def build(model_type: str = "gpt2", n_layer: int = 4, d_model: int = 128, n_head: int = 4,
          vocab: int = 1000, seq: int = 64, seed: int = 0, check: bool = True,
          **overrides) -> ModelSpec:
    """``model_type`` is any key of transformers' ``AutoConfig`` (gpt2, llama, mistral, qwen2,
    ...). ``n_layer``, ``d_model``, ``n_head``, ``vocab`` and ``seq`` set the configuration's
    standard fields; the feed-forward width, key-value heads and head size follow from them unless
    given in ``overrides``, which are passed to the configuration as they are."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise ImportError("models/hf.py needs Hugging Face transformers: pip install -e '.[hf]'") \
            from None
    if n_layer < 1 or d_model < 1 or n_head < 1 or seq < 1 or vocab < 2:
        raise ValueError("n_layer, d_model, n_head and seq must be at least 1 and vocab at least 2")
    if d_model % n_head:
        raise ValueError(f"d_model={d_model} must be a multiple of n_head={n_head}")
    try:
        defaults = AutoConfig.for_model(model_type)
    except (ValueError, KeyError) as e:
        raise ValueError(f"model_type={model_type!r}: {e}") from None
    fields = _config_fields(defaults, model_type, n_layer, d_model, n_head, vocab, seq, overrides)
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except Exception as e:
        raise ValueError(f"model_type={model_type!r}: the configuration refuses these settings "
                         f"({type(e).__name__}: {str(e).strip().splitlines()[-1]})") from None
    vocab = config.vocab_size
    if getattr(config, "is_encoder_decoder", False):
        raise _unsupported(model_type, "encoder-decoder models are not causal LMs")
    # SDPA attention without a mask is causal, so the blocks need no mask passed between layers.
    torch.manual_seed(seed)
    try:
        original = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    except ValueError as e:  # no causal LM for this type, or no SDPA attention
        raise _unsupported(model_type, str(e).strip().splitlines()[0]) from None
    model = wrap(original, model_type)
    if check:
        _check(model, model_type, vocab, seq, seed)
    model.train()

    def batch(size: int, gen: torch.Generator):
        tokens = torch.randint(0, vocab, (size, seq + 1), generator=gen)
        return (tokens[:, :-1],), tokens[:, 1:]

    return ModelSpec(model=model, batch=batch, loss=lm_loss, layers=model.layer_names,
                     name=f"hf-{model_type}")
