"""An encoder-decoder transformer for sequence-to-sequence training (translation style), pre-norm:
source embedding, encoder layers, target embedding, decoder layers (causal self-attention, cross
attention to the encoder's output, MLP), a final norm and a language-model head.

The model takes two inputs, source and target tokens. The encoder's output (the "memory") is
produced by the last encoder layer, which also applies the encoder's final norm, and every decoder
layer reads it, so it crosses every cut inside the decoder. The target embedding is a layer of its
own, so the target tokens are a model input that is first used in the middle of the model.

Small by default so that it profiles on a CPU in seconds; scale it with factory arguments:

    planner profile models/encdec.py:build --arg n_enc=6 --arg n_dec=6 --arg d_model=512 \\
        --arg n_head=8 --arg vocab=32000 --arg src_seq=256 --arg tgt_seq=256
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from planner.model import ModelSpec


@dataclass(frozen=True)
class EncDecConfig:
    n_enc: int = 3
    n_dec: int = 3
    d_model: int = 128
    n_head: int = 4
    vocab: int = 1024  # shared by source and target (separate embedding tables)
    src_seq: int = 48
    tgt_seq: int = 32
    dropout: float = 0.0


class Embeddings(nn.Module):
    """Token plus learned position embedding; positions are made here so that the model traces."""

    def __init__(self, cfg: EncDecConfig, seq: int):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(seq, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.drop(self.tok(idx) + self.pos(pos))  # (mb, seq, d)


class Attention(nn.Module):
    """Multi-head attention of queries from ``x`` over keys and values from ``kv``."""

    def __init__(self, cfg: EncDecConfig, causal: bool):
        super().__init__()
        assert cfg.d_model % cfg.n_head == 0, "d_model must be a multiple of n_head"
        self.n_head = cfg.n_head
        self.causal = causal
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def _heads(self, z: torch.Tensor) -> torch.Tensor:
        b, t, d = z.shape
        return z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)  # (mb, heads, seq, hd)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        k, v = self.kv(kv).split(d, dim=2)
        y = F.scaled_dot_product_attention(self._heads(self.q(x)), self._heads(k), self._heads(v),
                                           is_causal=self.causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: EncDecConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: EncDecConfig, final_norm: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg, causal=False)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)
        # The encoder's final norm lives in its last layer, so that layer's output is the memory.
        self.ln_out = nn.LayerNorm(cfg.d_model) if final_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h)
        x = x + self.mlp(self.ln_2(x))
        return self.ln_out(x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: EncDecConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.self_attn = Attention(cfg, causal=True)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.cross_attn = Attention(cfg, causal=False)
        self.ln_3 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.self_attn(h, h)
        x = x + self.cross_attn(self.ln_2(x), memory)
        return x + self.mlp(self.ln_3(x))


class EncoderDecoder(nn.Module):
    def __init__(self, cfg: EncDecConfig):
        super().__init__()
        self.cfg = cfg
        self.src_emb = Embeddings(cfg, cfg.src_seq)
        self.encoder = nn.ModuleList(EncoderLayer(cfg, final_norm=i == cfg.n_enc - 1)
                                     for i in range(cfg.n_enc))
        self.tgt_emb = Embeddings(cfg, cfg.tgt_seq)
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_dec))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        memory = self.src_emb(src)
        for layer in self.encoder:
            memory = layer(memory)
        x = self.tgt_emb(tgt)
        for layer in self.decoder:
            x = layer(x, memory)
        return self.lm_head(self.ln_f(x))  # (mb, tgt_seq, vocab)


def seq2seq_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def build(n_enc: int = 3, n_dec: int = 3, d_model: int = 128, n_head: int = 4, vocab: int = 1024,
          src_seq: int = 48, tgt_seq: int = 32, dropout: float = 0.0, seed: int = 0) -> ModelSpec:
    if n_enc < 1 or n_dec < 1:
        raise ValueError(f"n_enc={n_enc}, n_dec={n_dec}: both must be at least 1")
    if d_model < 1 or n_head < 1 or src_seq < 1 or tgt_seq < 1 or vocab < 2:
        raise ValueError(f"d_model={d_model}, n_head={n_head}, src_seq={src_seq}, tgt_seq={tgt_seq}, "
                         f"vocab={vocab}: sizes must be at least 1 and vocab at least 2")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout} must be in [0, 1)")
    if d_model % n_head:
        raise ValueError(f"d_model={d_model} must be a multiple of n_head={n_head}")
    cfg = EncDecConfig(n_enc=n_enc, n_dec=n_dec, d_model=d_model, n_head=n_head, vocab=vocab,
                       src_seq=src_seq, tgt_seq=tgt_seq, dropout=dropout)
    torch.manual_seed(seed)
    model = EncoderDecoder(cfg)

    def batch(size: int, gen: torch.Generator):
        src = torch.randint(0, vocab, (size, src_seq), generator=gen)
        tgt = torch.randint(0, vocab, (size, tgt_seq + 1), generator=gen)
        return (src, tgt[:, :-1]), tgt[:, 1:]  # teacher forcing: predict the next target token

    return ModelSpec(model=model, batch=batch, loss=seq2seq_loss, name="encdec")
