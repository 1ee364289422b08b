"""The tokenizer's graphs (the codec): ``encoder.onnx`` and ``decoder.onnx``, exported and verified against
PyTorch, and ``codebook.npy`` (the runtime's stochastic SVQ).

    checks = export_codec(writer, tok, dtype, opset, batch, rng, tol, verify)

Verification: the encoder's latents and the decoder's video within the precision's tolerances on random inputs;
the encoder's indices must equal PyTorch's except at near-ties (top-2 cosines within the latent tolerance).
"""

from __future__ import annotations

import numpy as np
import torch

from ..bundle import BundleWriter
from ..models import LARPTokenizer
from .graphs import DecoderGraph, EncoderGraph
from .trace import export_module
from .verify import ExportError, GraphCheck, compare, io_spec, ort_session

__all__ = ["export_codec", "export_codebook", "check_indices", "CODEBOOK_FILE"]

CODEBOOK_FILE = "codebook.npy"


def export_codec(w: BundleWriter, tok: LARPTokenizer, dtype: torch.dtype, opset: int, batch: int,
                 rng: torch.Generator, tol: dict, verify: bool) -> list[GraphCheck]:
    """Write and verify ``encoder.onnx`` and ``decoder.onnx`` of ``tok`` (cast to ``dtype``); returns the checks."""
    cfg = tok.config
    tok = tok.to(dtype).eval()
    C, T, H, W = cfg.video_shape
    N, d = cfg.num_tokens, cfg.code_dim
    video = torch.rand(batch, C, T, H, W, generator=rng)
    enc = EncoderGraph(tok)
    files = export_module(enc, (video,), w.path("encoder.onnx"), ["video"], ["indices", "latents"],
                          {"video": {0: "B"}, "indices": {0: "B"}, "latents": {0: "B"}}, opset)
    w.add_graph("encoder", files[0], [io_spec("video", "float32", ["B", C, T, H, W])],
                [io_spec("indices", "int64", ["B", N]), io_spec("latents", "float32", ["B", N, d])], files[1:])
    indices = torch.randint(0, cfg.codebook_size, (batch, N), generator=rng)
    dec = DecoderGraph(tok)
    files = export_module(dec, (indices,), w.path("decoder.onnx"), ["indices"], ["video"],
                          {"indices": {0: "B"}, "video": {0: "B"}}, opset)
    w.add_graph("decoder", files[0], [io_spec("indices", "int64", ["B", N])],
                [io_spec("video", "float32", ["B", C, T, H, W])], files[1:])
    if not verify:
        return []
    checks = []
    idx_ref, z_ref = enc(video)
    idx_ort, z_ort = ort_session(w.path("encoder.onnx")).run(None, {"video": video.numpy()})
    checks.append(compare("encoder", "latents", z_ort, z_ref.numpy(), tol["latents"]))
    codes = tok.bottleneck.regularizer.codebook().float().numpy()
    check_indices(idx_ort, z_ref.numpy(), codes, idx_ref.numpy(), tol["latents"])
    (vid_ort,) = ort_session(w.path("decoder.onnx")).run(None, {"indices": indices.numpy()})
    checks.append(compare("decoder", "video", vid_ort, dec(indices).numpy(), tol["video"]))
    return checks


def check_indices(idx_ort: np.ndarray, z_ref: np.ndarray, codes: np.ndarray, idx_ref: np.ndarray, tol: float) -> int:
    """Indices may differ only where the top-2 cosines are within the latent tolerance (a near-tie); returns how
    many differ, raises ExportError beyond near-ties."""
    bad = idx_ort != idx_ref
    if not bad.any():
        return 0
    cos = z_ref[bad] @ codes.T  # (M, K)
    gap = np.abs(np.take_along_axis(cos, idx_ort[bad][:, None], 1) - np.take_along_axis(cos, idx_ref[bad][:, None], 1))
    if (gap > 4 * tol).any():
        raise ExportError(f"encoder indices disagree with PyTorch beyond near-ties (max cosine gap {gap.max():.2e})")
    return int(bad.sum())


def export_codebook(w: BundleWriter, tok: LARPTokenizer) -> str:
    """Write the tokenizer's L2-normalised codebook (K, d) float32 as ``codebook.npy`` (for the runtime's
    stochastic SVQ: ``p = softmax(cos(latent, code) / svq_temperature)`` over the encoder graph's latents, the
    authors' conditioning of frame prediction); returns its bundle path."""
    codes = tok.bottleneck.regularizer.codebook().detach().float().cpu().numpy()
    np.save(w.path(CODEBOOK_FILE), np.ascontiguousarray(codes, np.float32))
    w.add_file(CODEBOOK_FILE)
    return CODEBOOK_FILE
