"""LARP's class-conditional AR generator: Llama-style with a learned absolute position table.

Names follow the authors' `LARP_AR` (hywang66/LARP `models/larp_ar.py`): `cls_embedding.embedding_table`,
`tok_embeddings`, `abs_pe`, `layers.{i}.attention.{wqkv,wo}`, `layers.{i}.feed_forward.{w1,w2,w3}`,
`layers.{i}.{attention_norm,ffn_norm}`, `norm`, `output`.

Generation is split gpt-fast style: `setup_caches` allocates the static KV cache once, `prefill` runs the
prefix (the class token), `decode_one_token` runs one position. CFG is done by the caller with paired rows:
cond rows first, then the same number of null-class rows (class id `config.null_class`).

Shapes: B batch (rows, including CFG rows), L sequence, S cache length, D width, h heads, hd head dim, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import GeneratorConfig, find_multiple

__all__ = ["LARPGenerator", "KVCache", "RMSNorm"]


class RMSNorm(nn.Module):
    """RMSNorm computed in (at least) fp32, as the authors' (fp64 stays fp64 for parity tests)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


class KVCache(nn.Module):
    """Static per-layer cache (max_batch, h, S, hd), allocated once; not part of the state dict."""

    def __init__(self, max_batch: int, max_seq: int, heads: int, head_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        shape = (max_batch, heads, max_seq, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # input_pos: (L,) shared by the rows, or (B,) one per row when L == 1; k/v: (B, h, L, hd)
        # -> the first B rows of the full caches (B, h, S, hd)
        B, L = k.shape[0], k.shape[2]
        k_out, v_out = self.k_cache[:B], self.v_cache[:B]
        if L == 1 and input_pos.numel() == B:  # per-row positions: row b writes slot input_pos[b]
            rows = torch.arange(B, device=k.device)
            k_out[rows, :, input_pos] = k[:, :, 0].to(k_out.dtype)
            v_out[rows, :, input_pos] = v[:, :, 0].to(v_out.dtype)
        else:
            k_out.index_copy_(2, input_pos, k.to(k_out.dtype))
            v_out.index_copy_(2, input_pos, v.to(v_out.dtype))
        return k_out, v_out


class Attention(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.n_head, self.head_dim, self.dim = cfg.n_head, cfg.head_dim, cfg.dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, input_pos: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        B, L, _ = x.shape
        q, k, v = self.wqkv(x).view(B, L, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3x(B, h, L, hd)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, h, S, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask: (1 or B, 1, L, S) bool
        else:
            p = self.attn_dropout_p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, L, self.dim)))


class FeedForward(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: Tensor, input_pos: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), input_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra null row (index num_classes) when class dropout is used (CFG)."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.num_classes = cfg.num_classes
        self.dropout_prob = cfg.class_dropout_prob
        self.embedding_table = nn.Embedding(cfg.num_classes + int(cfg.class_dropout_prob > 0), cfg.dim)

    def forward(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device, generator=generator) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class LARPGenerator(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.config = cfg
        self.cls_embedding = None if cfg.frame_prediction else LabelEmbedder(cfg)
        self.tok_embeddings = nn.Embedding(cfg.input_vocab, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self.abs_pe = nn.Parameter(torch.randn(1, cfg.num_positions, cfg.dim) * 0.02)
        self.layers = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.causal_mask: Tensor | None = None
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
        nn.init.zeros_(self.output.weight)  # authors zero the output layer

    @property
    def has_null_class(self) -> bool:
        emb = self.cls_embedding
        return emb is not None and emb.embedding_table.num_embeddings > self.config.num_classes

    # ---------------------------------------------------------------------------------------
    # full causal forward (training, reference)
    # ---------------------------------------------------------------------------------------
    def forward(self, cond: Tensor, tokens: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Teacher-forced logits.

        cond: (B,) class ids (class-conditional) or (B, cls_token_num) prefix tokens (frame prediction).
        tokens: (B, L) the first L <= max_seq_len - 1 tokens of the video.
        Returns (B, L + 1, V): row j predicts token j (j = 0..L).
        """
        cfg = self.config
        if self.cls_embedding is not None:
            prefix = self.cls_embedding(cond, generator=generator).unsqueeze(1)  # (B, 1, D)
        else:
            prefix = self.tok_embeddings(cond)  # (B, cls, D)
        h = torch.cat([prefix, self.tok_embeddings(tokens)], dim=1)  # (B, cls + L, D)
        if h.shape[1] > cfg.num_positions:
            raise ValueError(f"sequence of {h.shape[1]} positions exceeds the position table ({cfg.num_positions})")
        h = self.tok_dropout(h) + self.abs_pe[:, : h.shape[1]]
        for layer in self.layers:
            h = layer(h)
        logits = self.output(self.norm(h))  # (B, cls + L, V)
        return logits[:, cfg.cls_token_num - 1:]

    # ---------------------------------------------------------------------------------------
    # cached generation
    # ---------------------------------------------------------------------------------------
    def setup_caches(self, max_batch: int, max_seq: int | None = None, *, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> None:
        """Allocate the static KV caches for ``max_batch`` rows (CFG rows included) once.

        ``max_seq`` defaults to every position a video needs (prefix + max_seq_len - 1), rounded up to 8.
        """
        cfg = self.config
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
        max_seq = find_multiple(cfg.num_positions, 8) if max_seq is None else max_seq
        if not isinstance(max_seq, int) or not cfg.cls_token_num <= max_seq:
            raise ValueError(f"max_seq must be an int >= cls_token_num={cfg.cls_token_num}, got {max_seq!r}")
        dtype = dtype or self.tok_embeddings.weight.dtype
        device = device or self.tok_embeddings.weight.device
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch, max_seq, cfg.n_head, cfg.head_dim, dtype, device)
        self.causal_mask = torch.tril(torch.ones(max_seq, max_seq, dtype=torch.bool, device=device))

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.causal_mask = None

    @property
    def cache_shape(self) -> tuple[int, int] | None:
        """(max_batch, max_seq) of the allocated caches, or None."""
        cache = self.layers[0].attention.kv_cache
        return None if cache is None else (cache.k_cache.shape[0], cache.k_cache.shape[2])

    def _forward_cached(self, h: Tensor, input_pos: Tensor) -> Tensor:
        # h: (B, L, D) embeddings at positions input_pos: (L,) shared by the rows, or (B,) one per row when L == 1
        # -> logits of the last position (B, V)
        assert self.causal_mask is not None
        B, L = h.shape[:2]
        if L == 1 and input_pos.numel() == B:  # per-row positions (rows of one step at different positions)
            h = h + self.abs_pe[0, input_pos].unsqueeze(1)  # (B, 1, D)
            mask = self.causal_mask[input_pos].view(B, 1, 1, -1)  # (B, 1, 1, S): row b sees slots <= pos[b]
        else:
            h = h + self.abs_pe[:, input_pos]
            mask = self.causal_mask[input_pos].unsqueeze(0).unsqueeze(0)  # (1, 1, L, S)
        for layer in self.layers:
            h = layer(h, input_pos, mask)
        return self.output(self.norm(h[:, -1]))

    def prefill(self, cond: Tensor) -> Tensor:
        """Run the prefix through the cache; return logits for token 0, (B, V).

        cond: (B,) class ids in [0, num_classes] (num_classes = null class, for CFG rows), or
        (B, cls_token_num) prefix tokens for frame prediction. B <= the cache's max_batch.
        """
        cfg = self.config
        shape = self.cache_shape
        if shape is None:
            raise RuntimeError("call setup_caches(max_batch, ...) before prefill()")
        if not isinstance(cond, Tensor) or cond.dtype not in (torch.int64, torch.int32):
            got = f"{type(cond).__name__} {getattr(cond, 'dtype', '')}"
            raise ValueError(f"cond must be an int64/int32 tensor, got {got}")
        if cond.shape[0] > shape[0] or cond.shape[0] == 0:
            raise ValueError(f"cond has {cond.shape[0]} rows; the cache holds 1..{shape[0]} (setup_caches(max_batch))")
        if self.cls_embedding is not None:
            hi = cfg.num_classes if self.has_null_class else cfg.num_classes - 1
            if cond.ndim != 1:
                raise ValueError(f"cond must be class ids of shape (B,), got {tuple(cond.shape)}")
            if int(cond.min()) < 0 or int(cond.max()) > hi:
                raise ValueError(
                    f"class ids must be in [0, {hi}] ({cfg.num_classes} classes"
                    f"{', null class ' + str(cfg.num_classes) if self.has_null_class else ''}), got {cond.tolist()}"
                )
            h = self.cls_embedding(cond.long()).unsqueeze(1)  # (B, 1, D)
        else:
            if cond.ndim != 2 or cond.shape[1] != cfg.cls_token_num:
                raise ValueError(
                    f"cond must be prefix tokens of shape (B, {cfg.cls_token_num}), got {tuple(cond.shape)}"
                )
            if int(cond.min()) < 0 or int(cond.max()) >= cfg.input_vocab:
                raise ValueError(f"prefix tokens must be in [0, {cfg.input_vocab - 1}]")
            h = self.tok_embeddings(cond.long())  # (B, cls, D)
        input_pos = torch.arange(cfg.cls_token_num, device=h.device)
        return self._forward_cached(h, input_pos)

    def decode_one_token(self, token: Tensor, input_pos: Tensor) -> Tensor:
        """One cached step: token (B, 1) int64 at position input_pos, (1,) for every row or (B,) one per row
        -> logits (B, V).

        Token k of the video (k >= 0) sits at position cls_token_num + k. Hot path: no validation here
        (the engine validates at its boundary); no allocation beyond the step's activations.
        """
        return self._forward_cached(self.tok_embeddings(token.view(-1, 1)), input_pos)

    def step(self, tokens: Tensor, pos: Tensor) -> Tensor:
        """The exported decode step's semantics (class-conditional): tokens (B,) int64 at positions pos (B,), one per
        row, where ``vocab_size + c`` at position 0 is the prefill of class c (null class included) and a video
        token in [0, vocab_size) sits at its position; rows may be at different positions -> logits (B, V).
        Frame prediction: tokens in [0, vocab_size] (the separator included), no class tokens; its prefix is
        prefilled with ``prefill`` (or the export's multi-token prefill graph)."""
        tokens = tokens.view(-1)
        if self.cls_embedding is None:  # frame prediction: video tokens (or the separator, index vocab_size)
            return self._forward_cached(self.tok_embeddings(tokens).unsqueeze(1), pos.view(-1))
        V = self.config.vocab_size
        is_cls = tokens >= V
        h = torch.where(is_cls.view(-1, 1), self.cls_embedding.embedding_table((tokens - V).clamp(min=0)),
                        self.tok_embeddings(tokens.clamp(max=V - 1)))
        return self._forward_cached(h.unsqueeze(1), pos.view(-1))
