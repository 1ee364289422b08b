"""Kernels, layer 2 of 4: the CPU kernels called with ctypes on numpy arrays (the torch-free runtime's path).

``sample_numpy`` is ``larp_rt.sampling.sample`` on the CPU kernel (bit-exact; the reference itself when the
kernels are disabled or not built); ``decode_attention`` and ``packed_matmul`` are the kernels the fused ONNX
decode graph runs, callable on their own; ``quantize_kv`` and ``pack_matmul_weights`` are the pure numpy layouts
they read; ``sample_bounds`` the parameter bounds the built kernels enforce; ``set_num_threads`` the kernel's
row threads. ``kernel_step`` and ``default_threads`` are shared with the torch op (``torch_ops``). The libraries
come from ``library``.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

from .. import sampling as _ref
from .library import CPU_LIB, DTYPE_CODES, SampleArgs, cpu_library, disabled, load_error, matmul_isa, raise_last_error


def sample_bounds() -> dict[str, float] | None:
    """The parameter bounds the built kernels enforce (sample_args.h, as float32 values widened to float):
    {'max_cfg_scale', 'min_temperature', 'max_temperature', 'min_top_p'}; None when the CPU kernels are not built.
    They mirror ``larp_rt.sampling.MAX_CFG_SCALE`` etc. (rounded to float32)."""
    lib = cpu_library()
    if lib is None:
        return None
    out = (ctypes.c_float * 4)()
    if lib.larp_sample_bounds(out) != 0:
        raise_last_error(lib)
    return dict(zip(("max_cfg_scale", "min_temperature", "max_temperature", "min_top_p"), map(float, out),
                    strict=True))


# --------------------------------------------------------------------------------------------
# the one-token cache attention of the fused decode graph (larp_rt::DecodeAttention), on numpy arrays
# --------------------------------------------------------------------------------------------
KV_DTYPE_CODES = {"float32": 0, "float16": 1, "int8": 2}  # larp_decode_attention_kv_* kv_dtype


def decode_attention(q, k, v, past_k, past_v, pos, num_threads: int = 1, k_scale=None, v_scale=None) -> np.ndarray:
    """Softmax attention of q over [the first ``pos`` slots of past_k/v | k/v]: q, k, v (B, H, 1, hd) float32
    (q pre-scaled), past_k/v (B, H, S, hd) -> y (B, H, 1, hd). ``pos``: an int (every row) or (B,) integers, one
    per row (row b reads its first min(pos[b], S) slots). The CPU kernel the fused decode graph runs.

    The cache may be float32, float16 or int8; an int8 cache needs ``k_scale`` and ``v_scale`` (B, H, S) float32
    (slot j holds ``scale_j * past[..., j, :]``, see ``quantize_kv``); the cache is read as it is, never widened."""
    lib = cpu_library()
    if lib is None:
        raise RuntimeError(f"the CPU kernels are not built: {load_error(CPU_LIB)}")
    q, k, v = (np.ascontiguousarray(a, dtype=np.float32) for a in (q, k, v))
    pk, pv = np.asarray(past_k), np.asarray(past_v)
    if pk.dtype.name not in KV_DTYPE_CODES or pv.dtype != pk.dtype:
        raise ValueError(f"past_k/past_v must both be float32, float16 or int8, got {pk.dtype} and {pv.dtype}")
    pk, pv = np.ascontiguousarray(pk), np.ascontiguousarray(pv)
    if q.ndim != 4 or q.shape[2] != 1 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share a (B, H, 1, hd) shape, got {q.shape}, {k.shape}, {v.shape}")
    B, H, _, hd = q.shape
    if pk.ndim != 4 or pk.shape[:2] != (B, H) or pk.shape[3] != hd or pv.shape != pk.shape:
        raise ValueError(f"past_k/past_v must have shape ({B}, {H}, S, {hd}), got {pk.shape}, {pv.shape}")
    S = pk.shape[2]
    code = KV_DTYPE_CODES[pk.dtype.name]
    scales = [None, None]
    if code == 2:
        if k_scale is None or v_scale is None:
            raise ValueError("an int8 cache needs k_scale and v_scale, (B, H, S) float32 (see kernels.quantize_kv)")
        scales = [np.ascontiguousarray(a, dtype=np.float32) for a in (k_scale, v_scale)]
        if any(a.shape != (B, H, S) for a in scales):
            raise ValueError(f"k_scale/v_scale must have shape ({B}, {H}, {S}), got {scales[0].shape}, "
                             f"{scales[1].shape}")
    elif k_scale is not None or v_scale is not None:
        raise ValueError(f"k_scale/v_scale are for int8 caches; this cache is {pk.dtype}")
    p = np.asarray(pos)
    if p.dtype == np.bool_ or not np.issubdtype(p.dtype, np.integer) or p.shape not in ((), (B,)):
        raise ValueError(f"pos must be an int >= 0 or a ({B},) integer array (one position per row), got {pos!r}")
    if p.size and p.min() < 0:
        raise ValueError(f"pos must be >= 0, got {pos!r}")
    # clamped to S here (also in the kernel): int64 for any integer input, uint64 beyond 2**63 included
    rows = np.ascontiguousarray(np.broadcast_to(np.minimum(p, S).astype(np.int64), (B,)))
    y = np.empty_like(q)
    fn = lib.larp_decode_attention_kv_cpu
    fn.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 4 + [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32]
    ptr = [None if a is None else a.ctypes.data for a in scales]
    rc = fn(q.ctypes.data, k.ctypes.data, v.ctypes.data, pk.ctypes.data, pv.ctypes.data, *ptr, y.ctypes.data,
            B, H, S, hd, rows.ctypes.data, code, int(num_threads))
    if rc:
        raise ValueError("larp_decode_attention_kv_cpu refused its arguments")
    return y


# --------------------------------------------------------------------------------------------
# the few-row matrix product of the fused decode graph (larp_rt::PackedMatMul), on numpy arrays
# --------------------------------------------------------------------------------------------
MATMUL_PANEL = 32  # cpp_ext/include/larp_rt/matmul_cpu.h kPanel
MATMUL_ISAS = {"auto": -1, "avx512": 3, "avx2": 2, "portable": 0}


def pack_matmul_weights(w) -> np.ndarray:
    """W (K, N) float32 -> its 32-column panels P (ceil(N / 32), K, 32), zero past N: the layout
    ``larp_rt::PackedMatMul`` streams (one panel = one contiguous read). Pure numpy (the export packs with it)."""
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise ValueError(f"weights must be a (K, N) matrix, got shape {w.shape}")
    K, N = w.shape
    panels = -(-N // MATMUL_PANEL)
    padded = np.zeros((K, panels * MATMUL_PANEL), np.float32)
    padded[:, :N] = w
    return np.ascontiguousarray(padded.reshape(K, panels, MATMUL_PANEL).transpose(1, 0, 2))


def packed_matmul(x, packed, n: int, *, isa: str = "auto", num_threads: int = 1) -> np.ndarray:
    """x (..., K) float32 @ W, with W given as ``pack_matmul_weights(W)`` and its column count ``n`` -> (..., n)
    float32. The CPU kernel the fused decode graph runs; ``isa`` forces a path ("avx512", "avx2", "portable"; the AVX
    paths agree bit for bit; ValueError where this CPU lacks it)."""
    lib = cpu_library()
    if lib is None:
        raise RuntimeError(f"the CPU kernels are not built: {load_error(CPU_LIB)}")
    if isa not in MATMUL_ISAS:
        raise ValueError(f"isa must be one of {', '.join(MATMUL_ISAS)}, got {isa!r}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    p = np.ascontiguousarray(packed, dtype=np.float32)
    if x.ndim < 1:
        raise ValueError("x must have at least one axis (..., K)")
    K = x.shape[-1]
    if not isinstance(n, (int, np.integer)) or n < 1 or p.shape != (-(-int(n) // MATMUL_PANEL), K, MATMUL_PANEL):
        raise ValueError(f"packed must have shape (ceil(n / 32), K, 32) = ({-(-int(n) // MATMUL_PANEL)}, {K}, 32) for "
                         f"n = {n}, got {p.shape}; pack W (K, n) with kernels.pack_matmul_weights")
    y = np.empty((*x.shape[:-1], int(n)), np.float32)
    fn = lib.larp_packed_matmul_cpu
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int32, ctypes.c_int32]
    M = int(np.prod(x.shape[:-1], dtype=np.int64))
    rc = fn(x.ctypes.data, p.ctypes.data, y.ctypes.data, M, K, int(n), MATMUL_ISAS[isa], int(num_threads))
    if rc == 2:
        raise ValueError(f"this CPU cannot run the {isa} path of the packed matmul (it runs {matmul_isa()})")
    if rc:
        raise ValueError("larp_packed_matmul_cpu refused its arguments")
    return y


def quantize_kv(x) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of cache entries (..., hd) with one float32 scale per entry (per token and head): scale =
    max|x| / 127 (1 for an all-zero entry), q = round_half_even(x / scale) in [-127, 127]. The same arithmetic as
    the exported graph (export/graphs.py ``quantize_entry``). Returns (q int8 (..., hd), scale float32 (...))."""
    x = np.asarray(x, np.float32)
    amax = np.abs(x).max(-1)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(x / scale[..., None]), -127, 127).astype(np.int8)
    return q, scale



# --------------------------------------------------------------------------------------------
# numpy entry point (the torch-free runtime)
# --------------------------------------------------------------------------------------------
def _logits_for_kernel(name: str, x, rows: int) -> tuple[np.ndarray, int]:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] != rows:
        raise ValueError(f"{name} must have shape ({rows}, V), got {x.shape}")
    if x.dtype.name == "bfloat16":  # ml_dtypes
        code = DTYPE_CODES["bfloat16"]
    elif not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    elif x.dtype == np.float16:
        code = DTYPE_CODES["float16"]
    else:
        x = x.astype(np.float32, copy=False)  # what the reference does first
        code = DTYPE_CODES["float32"]
    s0, s1 = x.strides
    if (x.shape[1] > 1 and s1 != x.itemsize) or s0 % x.itemsize or s0 < 0 or 0 < s0 < x.shape[1] * x.itemsize:
        x = np.ascontiguousarray(x)
    return x, code


def _param(params: _ref.RowParams, name: str, dtype, B: int) -> np.ndarray:
    a = np.ascontiguousarray(np.asarray(getattr(params, name)), dtype=dtype)
    if a.shape != (B,):
        raise ValueError(f"params.{name} must have shape ({B},), got {a.shape}")
    return a


def kernel_step(step, B: int) -> int | np.ndarray:
    """``sampling.check_step`` plus the kernels' int64 counter: an int, or (B,) int64, each in [0, 2**63)."""
    step = _ref.check_step(step, B)
    if not isinstance(step, np.ndarray):
        if step >= 2**63:
            raise ValueError(f"step must be < 2**63, got {step}")
        return step
    if B and step.max() >= 2**63:
        r = int(np.argmax(step >= 2**63))
        raise ValueError(f"step[{r}] = {step[r]}: must be < 2**63")
    return step.astype(np.int64)


_num_threads: int | None = None


def set_num_threads(n: int | None) -> None:
    """Worker threads of the CPU kernel over rows (None = automatic: all cores for large batches)."""
    global _num_threads
    if n is not None and int(n) < 1:
        raise ValueError(f"num_threads must be >= 1 or None, got {n}")
    _num_threads = None if n is None else int(n)


def default_threads(B: int, V: int) -> int:
    """The kernel's row threads for a (B, V) batch: ``set_num_threads``'s, else one unless the batch is large."""
    if _num_threads is not None:
        return min(_num_threads, max(B, 1))
    if B < 2 or B * V < (1 << 19):
        return 1
    return max(1, min(B, os.cpu_count() or 1))


def sample_numpy(
    cond_logits,
    uncond_logits,
    params: _ref.RowParams,
    step: int | np.ndarray,
    return_logprobs: bool = False,
    *,
    num_threads: int | None = None,
):
    """``larp_rt.sampling.sample`` on the CPU kernel: (B,) int64 tokens [and (B,) float64 log-probabilities].

    Same arguments, errors and results (tokens always; logprobs bit for bit when ``available()['exact_exp']``):
    ``step`` an int (every row) or (B,) integers, one per row, each < 2**63 (the kernel's int64 counter).
    Uses the reference itself when the kernels are disabled or not built. Never mutates its inputs.
    """
    lib = None if disabled() else cpu_library()
    if lib is None:
        return _ref.sample(cond_logits, uncond_logits, params, step, return_logprobs=return_logprobs)
    B = len(params)
    cond, code = _logits_for_kernel("cond_logits", cond_logits, B)
    uncond = None
    if uncond_logits is not None:
        uncond, ucode = _logits_for_kernel("uncond_logits", uncond_logits, B)
        if uncond.shape != cond.shape:
            raise ValueError(f"uncond_logits shape {uncond.shape} must equal cond_logits shape {cond.shape}")
        if ucode != code:  # mixed precisions: both to float32, exactly like the reference
            cond, code = cond.astype(np.float32), DTYPE_CODES["float32"]
            uncond = uncond.astype(np.float32)
    step = kernel_step(step, B)
    steps, step = (step, 0) if isinstance(step, np.ndarray) else (None, step)
    V = cond.shape[1]
    if V == 0:
        raise ValueError("cond_logits must have at least one token (V >= 1)")
    cfg = _param(params, "cfg_scale", np.float32, B)
    temp = _param(params, "temperature", np.float32, B)
    top_k = _param(params, "top_k", np.int64, B)
    top_p = _param(params, "top_p", np.float32, B)
    seed = _param(params, "seed", np.uint64, B)
    stream = _param(params, "stream", np.uint64, B)
    tokens = np.empty(B, np.int64)
    logp = np.zeros(B, np.float64)
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p) if a is not None else None
    args = SampleArgs(
        cond=ptr(cond), uncond=ptr(uncond), ld_cond=cond.strides[0] // cond.itemsize,
        ld_uncond=(uncond.strides[0] // uncond.itemsize) if uncond is not None else 0, dtype=code,
        num_threads=default_threads(B, V) if num_threads is None else int(num_threads), batch=B, vocab=V,
        cfg_scale=ptr(cfg), temperature=ptr(temp), top_k=ptr(top_k), top_p=ptr(top_p), seed=ptr(seed),
        stream=ptr(stream), step_ptr=None, step=step, tokens=ptr(tokens), logprobs=ptr(logp), steps=ptr(steps),
    )
    if lib.larp_sample_cpu(ctypes.byref(args)) != 0:
        raise_last_error(lib)
    return (tokens, logp) if return_logprobs else tokens
