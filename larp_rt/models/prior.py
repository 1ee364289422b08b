"""LARP's AR prior: a small causal GPT in the continuous code space (training-time only).

Names follow the authors' GPTC (hywang66/LARP `models/gptc.py`): `input_proj`, `pos_emb`, `blocks.{i}.ln1/ln2`,
`blocks.{i}.attn.{key,query,value,proj}`, `blocks.{i}.mlp.{0,2}`, `ln_f`, `head`; loaded as `prior_model.*`.
Shapes: B batch, L sequence, E width, d code dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import PriorConfig

__all__ = ["LARPPrior"]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.heads = cfg.heads
        self.key = nn.Linear(cfg.dim, cfg.dim)
        self.query = nn.Linear(cfg.dim, cfg.dim)
        self.value = nn.Linear(cfg.dim, cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.attn_p = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, L, E = x.shape
        split = lambda t: t.view(B, L, self.heads, E // self.heads).transpose(1, 2)  # noqa: E731 (B, h, L, hd)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_p if self.training else 0.0, is_causal=True)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, L, E)))


class Block(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(), nn.Linear(4 * cfg.dim, cfg.dim), nn.Dropout(cfg.dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class LARPPrior(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.config = cfg
        self.input_proj = nn.Linear(cfg.code_dim, cfg.dim)
        self.pos_emb = nn.Parameter(torch.randn(1, cfg.max_seq_len, cfg.dim) * 0.02)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.depth)])
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.code_dim)
        for m in self.modules():  # GPT init (authors' _init_weights)
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, d) code vectors -> (B, L, d) predictions of the next vector (causal)."""
        L = x.shape[1]
        if L > self.config.max_seq_len:
            raise ValueError(f"prior input length {L} exceeds max_seq_len={self.config.max_seq_len}")
        h = self.drop(self.input_proj(x) + self.pos_emb[:, :L])
        return self.head(self.ln_f(self.blocks(h)))

    def ar_predict(self, x: Tensor) -> Tensor:
        """Teacher-forced prediction: (B, N, d) -> (B, N, d) L2-normalised, slot 0 = x[:, 0], slot i = pred of x_i."""
        pred = self.forward(x[:, :-1])  # (B, N-1, d) predictions for positions 1..N-1
        return F.normalize(torch.cat([x[:, :1], pred], dim=1), p=2, dim=-1)

