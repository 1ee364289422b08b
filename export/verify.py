"""Verification of exported graphs against PyTorch: the bottom layer of ``export/`` beside ``trace.py``.

Every graph is run in ONNX Runtime (CPU) on random inputs and compared with PyTorch; each comparison is a
``GraphCheck`` (max abs / max rel error against the precision's tolerance in ``TOLERANCES``). Beyond the stated
tolerances the export fails with ``ExportError`` and nothing is written. Also here: the ONNX Runtime session
every check opens, the random (or zero) KV-cache feeds of a decode graph in each cache type, and the manifest's
I/O entries. No torch import: the quantizers use these helpers on saved graphs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .. import kernels
from ..manifest import TensorSpec

__all__ = ["TOLERANCES", "ExportError", "GraphCheck", "io_spec", "ort_session", "compare", "scale_name",
           "cache_feeds", "dequantized_presents", "narrow_step"]

# max |ort - torch| allowed, by precision; indices must agree except at near-ties (checked separately)
TOLERANCES = {
    "fp32": {"latents": 1e-4, "video": 1e-4, "logits": 1e-3, "kv": 1e-4},
    "fp16": {"latents": 2e-2, "video": 2e-2, "logits": 5e-2, "kv": 2e-2},
}
# weight-only int8/int4 (export/quantize.py): traced and verified in float32, then quantized
TOLERANCES["int8"] = TOLERANCES["int4"] = TOLERANCES["fp32"]

_KV_NP = {"float32": np.float32, "float16": np.float16, "int8": np.int8}


class ExportError(RuntimeError):
    """Export or its verification failed; nothing was written."""


@dataclass
class GraphCheck:
    graph: str
    output: str
    max_abs: float
    max_rel: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.tol

    def line(self) -> str:
        status = "ok" if self.ok else "FAIL"
        return (f"  {self.graph:<8} {self.output:<12} max abs {self.max_abs:.3e}  max rel {self.max_rel:.3e}  "
                f"(tol {self.tol:.0e}) {status}")


def io_spec(name: str, dtype: str, shape: list) -> dict[str, Any]:
    """One input or output of a graph as the manifest lists it."""
    return {"name": name, "dtype": dtype, "shape": shape}


def ort_session(path: Path, custom_ops: bool = False) -> ort.InferenceSession:
    """A quiet ONNX Runtime CPU session of the graph at ``path`` (``custom_ops``: graphs with larp_rt::
    DecodeAttention / Sample / PackedMatMul nodes, the custom-op library registered)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if custom_ops:
        so.register_custom_ops_library(kernels.ort_custom_op_library())
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def compare(graph: str, output: str, ours: np.ndarray, ref: np.ndarray, tol: float) -> GraphCheck:
    """The error of ``ours`` against the reference ``ref``, as a check against ``tol``."""
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = max_abs / max(float(np.abs(ref).max()) if ref.size else 0.0, 1e-12)  # relative to the output's scale
    return GraphCheck(graph, output, max_abs, max_rel, tol)


def scale_name(cache_name: str) -> str:
    """past_k_3 -> past_k_scale_3 (the per-slot scales of an int8 cache)."""
    base, i = cache_name.rsplit("_", 1)
    return f"{base}_scale_{i}"


def cache_feeds(inputs: Sequence[dict | TensorSpec], rows: int, slots: int, rng: np.random.Generator, *,
                zeros: bool = False) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """Random (or zero) cache feeds for a decode graph's ``past_*`` inputs (the manifest's io list), in each
    input's dtype (int8 caches come with their ``past_*_scale_*`` inputs), and the same caches as float32 (the
    dequantized values, in input order) for a float reference. ``inputs``: TensorSpecs (a recorded graph's) or
    ``io_spec`` dicts (a graph being traced)."""
    feeds, floats = {}, []
    for io in (x.to_dict() if isinstance(x, TensorSpec) else x for x in inputs):
        name = io["name"]
        if not name.startswith("past_") or "_scale_" in name:
            continue
        _, H, _, hd = io["shape"]
        x = np.zeros((rows, H, slots, hd), np.float32) if zeros else rng.standard_normal((rows, H, slots, hd))
        x = x.astype(np.float32)
        if io["dtype"] == "int8":
            q, sc = kernels.quantize_kv(x)
            feeds[name], feeds[scale_name(name)] = q, sc
            floats.append(q.astype(np.float32) * sc[..., None])
        else:
            feeds[name] = x.astype(_KV_NP[io["dtype"]])
            floats.append(feeds[name].astype(np.float32))
    return feeds, floats


def dequantized_presents(names: list[str], values: list[np.ndarray]) -> np.ndarray:
    """(2L, B, h, 1, hd) float32 of a decode graph's ``present_*`` outputs (int8 entries times their scales)."""
    out = dict(zip(names, values, strict=True))
    cache = [n for n in names if "_scale_" not in n]
    return np.stack([out[n].astype(np.float32) * out[scale_name(n)][..., None] if out[n].dtype == np.int8
                     else out[n].astype(np.float32) for n in cache])


def narrow_step(names: list[str], values: list[np.ndarray]) -> float:
    """The largest rounding step of narrow cache entries (float16: 2^-10 of the largest magnitude, int8: the largest
    scale; 0 for float32): two graphs whose float32 entries differ by float32 rounding (PackedMatMul against
    ONNX Runtime's MatMul) may store entries one such step apart."""
    out = dict(zip(names, values, strict=True))
    steps = [0.0]
    for n, v in out.items():
        if v.dtype == np.float16:
            steps.append(float(np.abs(v.astype(np.float32)).max()) * 2.0**-10)
        elif v.dtype == np.int8:
            steps.append(float(out[scale_name(n)].max()))
    return max(steps)
