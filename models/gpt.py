"""A GPT in the style of nanoGPT: token and position embeddings, pre-norm transformer blocks, a
final norm and a language-model head, optionally tied to the token embedding.

Small by default so that it profiles on a CPU in seconds; scale it with factory arguments:

    planner profile models/gpt.py:build --arg n_layer=24 --arg d_model=1024 --arg n_head=16 \\
        --arg vocab=50257 --arg seq=1024
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from planner.model import ModelSpec


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 12
    d_model: int = 128
    n_head: int = 4
    vocab: int = 2048
    seq: int = 128
    dropout: float = 0.0
    tied: bool = False


class Embeddings(nn.Module):
    """Token plus position embedding; positions are made here so that the model traces."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)  # (seq,)
        return self.drop(self.wte(idx) + self.wpe(pos))  # (mb, seq, d)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.d_model % cfg.n_head == 0, "d_model must be a multiple of n_head"
        self.n_head = cfg.n_head
        self.head_dim = cfg.d_model // cfg.n_head  # read by planner's tp check before workers start
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        head_dim = self.head_dim
        # c_attn's outputs are grouped by head, (head, q|k|v, head_dim), as Megatron-LM lays out its
        # fused QKV, so that a column-parallel shard holds whole heads; the heads are counted from
        # the output, which holds n_head / tp of them under tensor parallelism
        qkv = self.c_attn(x)
        qkv = qkv.view(b, t, qkv.shape[-1] // (3 * head_dim), 3, head_dim)  # (mb, seq, heads, 3, head_dim)
        q, k, v = (z.transpose(1, 2) for z in qkv.unbind(3))  # (mb, heads, seq, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.c_proj = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(dict(
            emb=Embeddings(cfg),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.d_model),
        ))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.tied:
            self.lm_head.weight = self.transformer.emb.wte.weight

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.transformer.emb(idx)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))  # (mb, seq, vocab)


# Tensor parallelism (Megatron-LM, Shoeybi et al., 2019, section 3): attention and MLP split as a
# column- then a row-parallel Linear, embeddings by rows, the head by the vocabulary (its logits
# gathered for the loss); with sequence parallelism the norms run on the local part of the sequence.
TP_PLAN = {
    "transformer.emb": "scatter_output",
    "emb.wte": "rowwise",
    "emb.wpe": "rowwise",
    "ln_1": "sequence",
    "ln_2": "sequence",
    "attn": "gather_input",
    "attn.c_attn": "colwise",
    "attn.c_proj": "rowwise",
    "mlp": "gather_input",
    "mlp.c_fc": "colwise",
    "mlp.c_proj": "rowwise",
    "transformer.ln_f": "sequence",
    "lm_head": "colwise_gather",
}


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def build(n_layer: int = 12, d_model: int = 128, n_head: int = 4, vocab: int = 2048, seq: int = 128,
          dropout: float = 0.0, tied: bool = False, seed: int = 0) -> ModelSpec:
    if n_layer < 1 or d_model < 1 or n_head < 1 or seq < 1 or vocab < 2:
        raise ValueError(f"n_layer={n_layer}, d_model={d_model}, n_head={n_head}, seq={seq}, vocab={vocab}: "
                         "n_layer, d_model, n_head and seq must be at least 1 and vocab at least 2")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout} must be in [0, 1)")
    cfg = GPTConfig(n_layer=n_layer, d_model=d_model, n_head=n_head, vocab=vocab, seq=seq,
                    dropout=dropout, tied=tied)
    torch.manual_seed(seed)
    model = GPT(cfg)

    def batch(size: int, gen: torch.Generator):
        tokens = torch.randint(0, vocab, (size, seq + 1), generator=gen)
        return (tokens[:, :-1],), tokens[:, 1:]

    return ModelSpec(model=model, batch=batch, loss=lm_loss, name="gpt-tied" if tied else "gpt", tp_plan=TP_PLAN)
