"""The tokenizer's AR prior into a bundle: ``prior.onnx`` (one step against a static KV cache, a position per row)
and ``prior_score.onnx`` (the whole sequence -> per-token log-probabilities), verified against PyTorch.

    entry, checks = export_prior(writer, tok, dtype, opset, batch, rng, tol, verify)
    manifest["tokenizer"]["prior"] = entry          # None when the tokenizer has no prior

Verification runs both graphs in ONNX Runtime (CPU) on random tokens against the PyTorch prior's full causal
forward (the authors' formula: ``linear(normalised prediction, normalised codebook) / latent_ce_temperature``):
the step graph is run position by position with every row at its own position (rows start one step apart, so a
step mixes positions and each row must ignore its cache slots >= pos[b]), and its logits are compared with the
full forward's; the score graph's log-probabilities with log-softmax of the same logits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import find_multiple
from ..models import LARPTokenizer
from .graphs import kv_names
from .prior_graph import PriorScoreGraph, PriorStepGraph

__all__ = ["export_prior", "prior_reference_logits", "STEP_POSITIONS"]

STEP_POSITIONS = 12  # positions the step graph is verified at (each row; rows start one step apart)


def prior_reference_logits(tok: LARPTokenizer, tokens: torch.Tensor) -> torch.Tensor:
    """(B, L) tokens -> (B, L - 1, K) logits of tokens 1 .. L-1: the PyTorch prior's full causal forward."""
    prior = tok.prior_model
    emb = tok.bottleneck.regularizer.codebook()
    pred = prior.ar_predict(F.embedding(tokens, emb))  # (B, L, d) normalised, slot 0 = the input
    return F.linear(pred.to(torch.promote_types(pred.dtype, torch.float32)),
                    emb.to(torch.promote_types(emb.dtype, torch.float32)))[:, 1:] / prior.config.latent_ce_temperature


def _step_names(n_layer: int) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
    past, present = kv_names("past", n_layer), kv_names("present", n_layer)
    dynamic = {"token": {0: "B"}, "pos": {0: "B"}, "logits": {0: "B"}, **{n: {0: "B", 2: "S"} for n in past},
               **{n: {0: "B"} for n in present}}
    return ["token", "pos", *past], ["logits", *present], dynamic


def export_prior(w, tok: LARPTokenizer, dtype, opset: int, batch: int, rng, tol: dict, verify: bool,
                 ) -> tuple[dict[str, Any] | None, list]:
    """Write the prior's graphs for ``tok`` (already in ``dtype``, eval); returns (manifest entry or None, checks)."""
    from .onnx_export import _compare, _export, _io, _ort_session

    if tok.prior_model is None:
        return None, []
    tcfg, pcfg = tok.config, tok.prior_model.config
    N, K = tcfg.num_tokens, tcfg.codebook_size
    L, H, E = pcfg.depth, pcfg.heads, pcfg.dim
    hd = E // H
    S = find_multiple(N, 8)  # positions 0 .. N-2 are ever fed; one cache slot per position
    kv_dtype = "float16" if dtype == torch.float16 else "float32"
    past, present = kv_names("past", L), kv_names("present", L)

    step = PriorStepGraph(tok).eval()
    token = torch.randint(0, K, (batch, 1), generator=rng)
    pos = torch.randint(1, N - 1, (batch,), generator=rng) if N > 2 else torch.zeros(batch, dtype=torch.int64)
    caches = [torch.randn(batch, H, S, hd, generator=rng).to(dtype) for _ in past]
    files = _export(step, (token, pos, *caches), w.path("prior.onnx"), *_step_names(L), opset)
    w.add_graph("prior", files[0],
                [_io("token", "int64", ["B", 1]), _io("pos", "int64", ["B"])]
                + [_io(n, kv_dtype, ["B", H, "S", hd]) for n in past],
                [_io("logits", "float32", ["B", K])] + [_io(n, kv_dtype, ["B", H, 1, hd]) for n in present],
                files[1:])
    score = PriorScoreGraph(tok).eval()
    tokens = torch.randint(0, K, (batch, N), generator=rng)
    files = _export(score, (tokens,), w.path("prior_score.onnx"), ["tokens"], ["logprobs"],
                    {"tokens": {0: "B"}, "logprobs": {0: "B"}}, opset)
    w.add_graph("prior_score", files[0], [_io("tokens", "int64", ["B", N])],
                [_io("logprobs", "float32", ["B", N - 1])], files[1:])
    entry = {
        "graph": "prior", "score_graph": "prior_score",
        "config": pcfg.to_dict(), "num_tokens": N, "codebook_size": K,
        "latent_ce_temperature": pcfg.latent_ce_temperature,
        "kv_cache": {"layers": L, "heads": H, "head_dim": hd, "max_seq": S,
                     "dtype": "fp16" if dtype == torch.float16 else "fp32"},
    }
    if not verify:
        return entry, []

    checks = []
    ref = prior_reference_logits(tok, tokens).float()  # (B, N-1, K)
    # the step graph: row b runs positions 0 .. M-1 starting at global step b, so every step mixes positions
    M = min(STEP_POSITIONS, N - 1)
    sess = _ort_session(w.path("prior.onnx"))
    np_dt = np.float16 if dtype == torch.float16 else np.float32
    cache = [np.zeros((batch, H, S, hd), np_dt) for _ in past]
    got = np.zeros((batch, M, K), np.float32)
    tok_np = tokens.numpy()
    rows = np.arange(batch)
    for j in range(M + batch - 1):
        p = j - rows  # row b's position at this step
        live = (p >= 0) & (p < M)
        pp = np.where(live, p, 0)  # idle rows: position 0 (their slot-0 write is overwritten or never read again)
        feeds = {"token": tok_np[rows, pp].reshape(-1, 1), "pos": pp.astype(np.int64),
                 **dict(zip(past, cache, strict=True))}
        logits, *new = sess.run(None, feeds)
        for c, n in zip(cache, new, strict=True):
            c[live, :, pp[live]] = n[live, :, 0]
        got[live, pp[live]] = logits[live]
    checks.append(_compare("prior", "logits", got, ref[:, :M].numpy(), tol["logits"]))
    (lp,) = _ort_session(w.path("prior_score.onnx")).run(None, {"tokens": tok_np})
    want = torch.log_softmax(ref.double(), dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
    checks.append(_compare("prior_score", "logprobs", lp, want.numpy(), tol["logits"]))
    return entry, checks
