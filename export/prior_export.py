"""The tokenizer's AR prior into a bundle: ``prior.onnx`` (one step against a static KV cache, a position per row)
and ``prior_score.onnx`` (the whole sequence -> per-token log-probabilities), verified against PyTorch. A float32
prior exported where the ONNX Runtime custom-op library is built also gets ``prior_fused.onnx``: the same step with
each layer's attention one ``larp_rt::DecodeAttention`` node (it reads only each row's written slots); prior.onnx
stays the portable fallback (no kernels, GPU providers). The manifest's prior entry names it (``fused_graph``).

    entry, checks = export_prior(writer, tok, dtype, opset, batch, rng, tol, verify)
    manifest["tokenizer"]["prior"] = entry          # None when the tokenizer has no prior

Verification runs the graphs in ONNX Runtime (CPU) on random tokens against the PyTorch prior's full causal
forward (the authors' formula: ``linear(normalised prediction, normalised codebook) / latent_ce_temperature``):
each step graph (prior.onnx, prior_fused.onnx) is run position by position with every row at its own position
(rows start one step apart, so a step mixes positions, and unwritten cache slots hold noise: each row must ignore
its slots >= pos[b]), and its logits are compared with the full forward's; the score graph's log-probabilities
with log-softmax of the same logits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch

from .. import kernels
from ..bundle import PRIOR_FUSED_ATTENTION, BundleWriter
from ..config import find_multiple
from ..models import LARPTokenizer
from ..models.prior_step import prior_reference_logits
from .graphs import decode_names, kv_names
from .prior_graph import PriorScoreGraph, PriorStepGraph
from .trace import export_module, share_external_data, trace_module
from .verify import GraphCheck, compare, io_spec, ort_session

__all__ = ["export_prior", "prior_reference_logits", "STEP_POSITIONS", "FUSED_GRAPH", "FUSED_ATTENTION"]

STEP_POSITIONS = 12  # positions the step graph is verified at (each row; rows start one step apart)
FUSED_GRAPH = "prior_fused"  # the step graph with larp_rt::DecodeAttention (float32 priors, kernels built)
FUSED_ATTENTION = PRIOR_FUSED_ATTENTION  # the op the reader (larp_rt.bundle.check_prior) requires


def export_prior(w: BundleWriter, tok: LARPTokenizer, dtype: torch.dtype, opset: int, batch: int,
                 rng: torch.Generator, tol: dict, verify: bool) -> tuple[dict[str, Any] | None, list[GraphCheck]]:
    """Write the prior's graphs for ``tok`` (already in ``dtype``, eval); returns (manifest entry or None, checks)."""
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
    files = export_module(step, (token, pos, *caches), w.path("prior.onnx"), *decode_names(L), opset)
    w.add_graph("prior", files[0],
                [io_spec("token", "int64", ["B", 1]), io_spec("pos", "int64", ["B"])]
                + [io_spec(n, kv_dtype, ["B", H, "S", hd]) for n in past],
                [io_spec("logits", "float32", ["B", K])] + [io_spec(n, kv_dtype, ["B", H, 1, hd]) for n in present],
                files[1:])
    fused = dtype == torch.float32 and kernels.ort_custom_op_library() is not None
    if fused:
        _export_fused_step(w, tok, (token, pos, *caches), opset)
    score = PriorScoreGraph(tok).eval()
    tokens = torch.randint(0, K, (batch, N), generator=rng)
    files = export_module(score, (tokens,), w.path("prior_score.onnx"), ["tokens"], ["logprobs"],
                    {"tokens": {0: "B"}, "logprobs": {0: "B"}}, opset)
    w.add_graph("prior_score", files[0], [io_spec("tokens", "int64", ["B", N])],
                [io_spec("logprobs", "float32", ["B", N - 1])], files[1:])
    entry = {
        "graph": "prior", "score_graph": "prior_score",
        "config": pcfg.to_dict(), "num_tokens": N, "codebook_size": K,
        "latent_ce_temperature": pcfg.latent_ce_temperature,
        "kv_cache": {"layers": L, "heads": H, "head_dim": hd, "max_seq": S,
                     "dtype": "fp16" if dtype == torch.float16 else "fp32"},
    }
    if fused:  # readers without the entry (or without the kernels) run prior.onnx
        entry.update({"fused_graph": FUSED_GRAPH, "fused_attention": FUSED_ATTENTION,
                      "custom_op_domain": "larp_rt", "custom_op_library": "liblarp_rt_ort.so"})
    if not verify:
        return entry, []

    checks = []
    ref = prior_reference_logits(tok, tokens).float()  # (B, N-1, K)
    # each step graph: row b runs positions 0 .. M-1 starting at global step b, so every step mixes positions
    M = min(STEP_POSITIONS, N - 1)
    tok_np = tokens.numpy()
    np_dt = np.float16 if dtype == torch.float16 else np.float32
    for graph in ("prior", FUSED_GRAPH) if fused else ("prior",):
        sess = ort_session(w.path(f"{graph}.onnx"), custom_ops=graph == FUSED_GRAPH)
        noise = np.random.default_rng(0)  # unwritten slots hold noise: a graph reading slots >= pos[b] fails
        cache = [noise.standard_normal((batch, H, S, hd)).astype(np_dt) for _ in past]
        got = _run_steps(sess, tok_np, M, K, past, cache)
        checks.append(compare(graph, "logits", got, ref[:, :M].numpy(), tol["logits"]))
    (lp,) = ort_session(w.path("prior_score.onnx")).run(None, {"tokens": tok_np})
    want = torch.log_softmax(ref.double(), dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
    checks.append(compare("prior_score", "logprobs", lp, want.numpy(), tol["logits"]))
    return entry, checks


def _run_steps(sess, tokens: np.ndarray, M: int, K: int, past: list[str], cache: list[np.ndarray]) -> np.ndarray:
    """Positions 0 .. M-1 of every row through a step graph's session, row b starting at global step b (idle rows
    at position 0, their slot-0 write overwritten or never read again); ``cache`` (B, h, S, hd) per name in ``past``
    is written in place -> (B, M, K) float32 logits."""
    batch = len(tokens)
    got = np.zeros((batch, M, K), np.float32)
    rows = np.arange(batch)
    for j in range(M + batch - 1):
        p = j - rows  # row b's position at this step
        live = (p >= 0) & (p < M)
        pp = np.where(live, p, 0)
        feeds = {"token": tokens[rows, pp].reshape(-1, 1), "pos": pp.astype(np.int64),
                 **dict(zip(past, cache, strict=True))}
        logits, *new = sess.run(None, feeds)
        for c, n in zip(cache, new, strict=True):
            c[live, :, pp[live]] = n[live, :, 0]
        got[live, pp[live]] = logits[live]
    return got


def _export_fused_step(w, tok: LARPTokenizer, args: tuple, opset: int) -> None:
    """``prior_fused.onnx``: ``PriorStepGraph(fused_attention=True)`` with prior.onnx's I/O (names, dtypes, shapes);
    its weights point into prior.onnx's external data when prior.onnx has some (one weights file for both)."""
    L = tok.prior_model.config.depth
    step = PriorStepGraph(tok, fused_attention=True).eval()
    info = w.graph("prior")
    path = w.path(f"{FUSED_GRAPH}.onnx")
    if info.data:  # shared weights: the fused graph reads prior.onnx.data
        model = trace_module(step, args, *decode_names(L), opset, custom_opsets={"larp_rt": 1})
        onnx.checker.check_model(model, full_check=False)  # before sharing: the checker would look for the data here
        share_external_data(model, w.path(info.file))
        onnx.save_model(model, str(path))
        files = [path.name, *info.data]
    else:
        files = export_module(step, args, path, *decode_names(L), opset, custom_opsets={"larp_rt": 1})
    w.add_graph(FUSED_GRAPH, files[0], list(info.inputs), list(info.outputs), files[1:])
