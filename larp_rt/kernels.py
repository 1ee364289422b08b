"""The fused sampling kernels of ``cpp_ext/``: found and loaded lazily, with the pure samplers as fallback.

What is here (torch stays optional: ``import larp_rt.kernels`` needs only numpy):

- ``available()``: which kernels this install has (CPU, CUDA, ONNX Runtime custom-op library) and why not.
- ``sample_numpy(cond, uncond, params, step, return_logprobs=False)``: the CPU kernel with the signature and the
  results of ``larp_rt.sampling.sample`` (bit-exact: see ``available()["exact_exp"]``; ``step`` an int or one per
  row); falls back to it when the kernels are disabled or missing.
- ``register_torch_op()`` / ``sample_torch(...)``: the PyTorch op ``torch.ops.larp_rt.sample`` (CPU and CUDA,
  with a fake implementation for torch.compile; on CUDA it launches on the current stream and never syncs, so
  it can be captured in a CUDA graph with the step in a device tensor).
- ``ort_custom_op_library()``: path of the ONNX Runtime custom-op library (domain ``larp_rt``, op ``Sample``).
- ``launch_cuda(...)``: the CUDA kernel on raw device pointers and a stream handle (TensorRT / cuda-python).
- ``disabled()`` / ``set_disabled()`` / ``force_fallback()`` and the environment variable
  ``LARP_RT_DISABLE_KERNELS=1``: force the pure samplers (tests use it). ``LARP_RT_KERNELS_DIR`` points at
  another directory of built libraries.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from pathlib import Path

import numpy as np

from . import sampling as _ref

__all__ = [
    "ENV_DISABLE", "ENV_LIB_DIR", "SampleArgs", "available", "disabled", "set_disabled", "force_fallback",
    "library_dir", "cpu_library", "cuda_library", "ort_custom_op_library", "sample_numpy", "register_torch_op",
    "sample_torch", "launch_cuda", "set_num_threads", "DTYPE_CODES", "decode_attention", "attention_isa",
    "quantize_kv", "KV_DTYPE_CODES", "pack_matmul_weights", "packed_matmul", "matmul_isa", "MATMUL_PANEL",
    "sample_bounds", "TOKEN_NON_FINITE", "TOKEN_BAD_PARAMS",
]

ENV_DISABLE = "LARP_RT_DISABLE_KERNELS"
ENV_LIB_DIR = "LARP_RT_KERNELS_DIR"
CPU_LIB = "liblarp_sampling.so"
CUDA_LIB = "liblarp_sampling_cuda.so"
ORT_LIB = "liblarp_rt_ort.so"
ABI_VERSION = 2  # cpp_ext/include/larp_rt/larp_sampling.h LARP_SAMPLING_ABI_VERSION
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
# the tokens a device kernel writes for a row it cannot sample (sample_args.h LARP_TOKEN_*; a host kernel raises)
TOKEN_NON_FINITE = -1  # NaN/Inf logits
TOKEN_BAD_PARAMS = -2  # a parameter outside the bounds of larp_rt.sampling (MAX_CFG_SCALE, ...)

_lock = threading.RLock()
_disabled_override: bool | None = None
_libs: dict[str, ctypes.CDLL | None] = {}
_errors: dict[str, str] = {}
_exp_info: dict[str, object] = {}


class SampleArgs(ctypes.Structure):
    """Mirror of ``larp_sample_args`` (cpp_ext/include/larp_rt/sample_args.h)."""

    _fields_ = [
        ("cond", ctypes.c_void_p),
        ("uncond", ctypes.c_void_p),
        ("ld_cond", ctypes.c_int64),
        ("ld_uncond", ctypes.c_int64),
        ("dtype", ctypes.c_int32),
        ("num_threads", ctypes.c_int32),
        ("batch", ctypes.c_int64),
        ("vocab", ctypes.c_int64),
        ("cfg_scale", ctypes.c_void_p),
        ("temperature", ctypes.c_void_p),
        ("top_k", ctypes.c_void_p),
        ("top_p", ctypes.c_void_p),
        ("seed", ctypes.c_void_p),
        ("stream", ctypes.c_void_p),
        ("step_ptr", ctypes.c_void_p),
        ("step", ctypes.c_int64),
        ("tokens", ctypes.c_void_p),
        ("logprobs", ctypes.c_void_p),
        ("steps", ctypes.c_void_p),  # (B,) int64 per-row steps or NULL (then step_ptr / step)
    ]


# --------------------------------------------------------------------------------------------
# switches and loading
# --------------------------------------------------------------------------------------------
def disabled() -> bool:
    """True when the pure samplers must be used (``set_disabled(True)`` or ``LARP_RT_DISABLE_KERNELS=1``)."""
    if _disabled_override is not None:
        return _disabled_override
    return os.environ.get(ENV_DISABLE, "").strip().lower() not in ("", "0", "false", "no")


def set_disabled(flag: bool | None) -> None:
    """Force the fallback (True), force the kernels (False), or defer to the environment variable (None)."""
    global _disabled_override
    _disabled_override = flag


@contextlib.contextmanager
def force_fallback(flag: bool = True):
    """``with force_fallback(): ...`` runs the pure samplers inside the block."""
    global _disabled_override
    old = _disabled_override
    _disabled_override = flag
    try:
        yield
    finally:
        _disabled_override = old


def library_dir() -> Path:
    """Where the built libraries are looked for: ``$LARP_RT_KERNELS_DIR`` or ``larp_rt/_lib/``."""
    env = os.environ.get(ENV_LIB_DIR)
    return Path(env) if env else Path(__file__).resolve().parent / "_lib"


def _load(name: str) -> ctypes.CDLL | None:
    with _lock:
        if name in _libs:
            return _libs[name]
        path = library_dir() / name
        lib = None
        if not path.is_file():
            how = ("this install was built without a CUDA toolkit: reinstall with nvcc on PATH or CUDA_HOME set"
                   if name == CUDA_LIB else "build the kernels with `pip install -e .` (see cpp_ext/README.md)")
            _errors[name] = f"{path} not found: {how}"
        else:
            try:
                lib = ctypes.CDLL(str(path))
                if lib.larp_sampling_abi_version() != ABI_VERSION:
                    _errors[name] = f"{path} has ABI {lib.larp_sampling_abi_version()}, want {ABI_VERSION}: rebuild"
                    lib = None
            except (OSError, AttributeError) as e:
                _errors[name] = f"cannot load {path}: {e}"
                lib = None
        if lib is not None:
            lib.larp_last_error.restype = ctypes.c_char_p
            _setup_exp(lib, name)
        _libs[name] = lib
        return lib


def _probe_points() -> np.ndarray:
    rng = np.random.default_rng(12345)
    return np.concatenate([
        np.linspace(-40.0, 0.0, 4001), -rng.exponential(2.0, 4000), rng.uniform(-745.0, 0.0, 1000),
        np.array([0.0, -0.0, -1e-300, -708.5, -744.0, -746.0]),
    ])


def _exp_matches(lib: ctypes.CDLL, x: np.ndarray, want: np.ndarray) -> bool:
    got = np.empty_like(x)
    lib.larp_exp_batch(x.ctypes.data_as(ctypes.c_void_p), got.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(len(x)))
    return bool(np.array_equal(got, want))


def _numpy_svml_exp8() -> int | None:
    """Address of numpy's own 8-lane float64 exp (SVML, used by np.exp on AVX-512 machines), if it exports one."""
    try:
        from numpy._core import _multiarray_umath as umath
    except ImportError:  # numpy < 2
        try:
            from numpy.core import _multiarray_umath as umath
        except ImportError:
            return None
    try:
        fn = getattr(ctypes.CDLL(umath.__file__), "__svml_exp8_ha")
    except (OSError, AttributeError):
        return None
    return ctypes.cast(fn, ctypes.c_void_p).value


def _setup_exp(lib: ctypes.CDLL, name: str) -> None:
    """Make the library's float64 exp the one numpy's np.exp uses here, so that the kernel is bit-exact."""
    if not hasattr(lib, "larp_set_exp_impl"):
        return
    x = _probe_points()
    want = np.exp(x)
    lib.larp_set_exp_impl(0, None)
    impl = "libm"
    exact = _exp_matches(lib, x, want)
    if not exact:
        addr = _numpy_svml_exp8()
        if addr is not None and lib.larp_set_exp_impl(1, ctypes.c_void_p(addr)) == 0:
            if _exp_matches(lib, x, want):
                impl, exact = "numpy-svml", True
            else:
                lib.larp_set_exp_impl(0, None)
    _exp_info[name] = {"exp_impl": impl, "exact_exp": exact}


def cpu_library() -> ctypes.CDLL | None:
    """The CPU kernel library (None when not built or not loadable; see ``available()['errors']``)."""
    lib = _load(CPU_LIB)
    if lib is not None and not hasattr(lib, "_larp_typed"):
        lib.larp_sample_cpu.argtypes = [ctypes.POINTER(SampleArgs)]
        lib.larp_sample_cpu.restype = ctypes.c_int
        lib._larp_typed = True
    return lib


def cuda_library() -> ctypes.CDLL | None:
    """The CUDA kernel library (None when this install was built without a CUDA toolkit)."""
    lib = _load(CUDA_LIB)
    if lib is not None and not hasattr(lib, "_larp_typed"):
        lib.larp_sample_cuda.argtypes = [ctypes.POINTER(SampleArgs), ctypes.c_void_p]
        lib.larp_sample_cuda.restype = ctypes.c_int
        lib._larp_typed = True
    return lib


def ort_custom_op_library(configure: bool = True) -> str | None:
    """Path of the ONNX Runtime custom-op library (for ``SessionOptions.register_custom_ops_library``).

    ``configure`` also loads it here once and sets its exp to numpy's (bit-exact logprobs with the reference);
    ONNX Runtime's later dlopen of the same path shares that state.
    """
    path = library_dir() / ORT_LIB
    if not path.is_file():
        _errors[ORT_LIB] = f"{path} not found: build the kernels with `pip install -e .` (see cpp_ext/README.md)"
        return None
    if configure:
        _load(ORT_LIB)
    return str(path)


def available() -> dict:
    """What this install can run: {'disabled', 'cpu', 'cuda_library', 'cuda', 'ort_library', 'attention_isa',
    'exp_impl', 'exact_exp', 'library_dir', 'errors'}; 'cuda' also needs a visible CUDA device."""
    cpu = cpu_library() is not None
    cuda_lib = cuda_library()
    ndev = 0
    if cuda_lib is not None:
        try:
            ndev = int(cuda_lib.larp_cuda_device_count())
        except OSError:
            ndev = 0
    info = _exp_info.get(CPU_LIB, {"exp_impl": None, "exact_exp": False})
    return {
        "disabled": disabled(),
        "cpu": cpu,
        "cuda_library": cuda_lib is not None,
        "cuda": cuda_lib is not None and ndev > 0,
        "ort_library": ort_custom_op_library(configure=False),
        "attention_isa": attention_isa() if cpu else None,
        "exp_impl": info["exp_impl"],
        "exact_exp": info["exact_exp"],
        "library_dir": str(library_dir()),
        "errors": dict(_errors),
    }


def sample_bounds() -> dict[str, float] | None:
    """The parameter bounds the built kernels enforce (sample_args.h, as float32 values widened to float):
    {'max_cfg_scale', 'min_temperature', 'max_temperature', 'min_top_p'}; None when the CPU kernels are not built.
    They mirror ``larp_rt.sampling.MAX_CFG_SCALE`` etc. (rounded to float32)."""
    lib = cpu_library()
    if lib is None:
        return None
    out = (ctypes.c_float * 4)()
    if lib.larp_sample_bounds(out) != 0:
        _raise(lib)
    return dict(zip(("max_cfg_scale", "min_temperature", "max_temperature", "min_top_p"), map(float, out),
                    strict=True))


def _raise(lib: ctypes.CDLL, rc: int = 1, cuda: bool = False) -> None:
    fn = lib.larp_cuda_last_error if cuda else lib.larp_last_error
    fn.restype = ctypes.c_char_p
    msg = fn().decode("utf-8", "replace")
    raise (RuntimeError if rc == 2 else ValueError)(msg)


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
        raise RuntimeError(f"the CPU kernels are not built: {_errors.get(CPU_LIB)}")
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
        raise RuntimeError(f"the CPU kernels are not built: {_errors.get(CPU_LIB)}")
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


def matmul_isa() -> str | None:
    """Which code the packed matmul runs: "avx512", "avx2" or "portable" (None when the kernels are not built)."""
    lib = cpu_library()
    if lib is None:
        return None
    return {3: "avx512", 2: "avx2"}.get(lib.larp_matmul_isa(), "portable")


def quantize_kv(x) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of cache entries (..., hd) with one float32 scale per entry (per token and head): scale =
    max|x| / 127 (1 for an all-zero entry), q = round_half_even(x / scale) in [-127, 127]. The same arithmetic as
    the exported graph (export/graphs.py ``quantize_entry``). Returns (q int8 (..., hd), scale float32 (...))."""
    x = np.asarray(x, np.float32)
    amax = np.abs(x).max(-1)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(x / scale[..., None]), -127, 127).astype(np.int8)
    return q, scale


def attention_isa() -> str | None:
    """Which code the attention kernel runs: "avx2" or "portable" (None when the kernels are not built)."""
    lib = cpu_library()
    return None if lib is None else ("avx2" if lib.larp_attention_isa() == 2 else "portable")


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


def _kernel_step(step, B: int) -> int | np.ndarray:
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


def _default_threads(B: int, V: int) -> int:
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
    step = _kernel_step(step, B)
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
        num_threads=_default_threads(B, V) if num_threads is None else int(num_threads), batch=B, vocab=V,
        cfg_scale=ptr(cfg), temperature=ptr(temp), top_k=ptr(top_k), top_p=ptr(top_p), seed=ptr(seed),
        stream=ptr(stream), step_ptr=None, step=step, tokens=ptr(tokens), logprobs=ptr(logp), steps=ptr(steps),
    )
    if lib.larp_sample_cpu(ctypes.byref(args)) != 0:
        _raise(lib)
    return (tokens, logp) if return_logprobs else tokens


# --------------------------------------------------------------------------------------------
# CUDA on raw pointers (TensorRT / cuda-python)
# --------------------------------------------------------------------------------------------
def launch_cuda(
    *,
    cond: int,
    uncond: int | None,
    dtype: str,
    batch: int,
    vocab: int,
    cfg_scale: int,
    temperature: int,
    top_k: int,
    top_p: int,
    seed: int,
    stream_ids: int,
    tokens: int,
    logprobs: int | None = None,
    step: int = 0,
    step_ptr: int | None = None,
    steps_ptr: int | None = None,
    ld_cond: int | None = None,
    ld_uncond: int | None = None,
    cuda_stream=0,
) -> None:
    """Enqueue the CUDA sampling kernel on ``cuda_stream`` (a cudaStream_t / CUstream handle: an int, or any
    object ``int()`` accepts such as cuda-python's ``CUstream`` / ``cudaStream_t``; 0 = the legacy default
    stream), e.g. the stream a TensorRT execution context runs on, with device pointers (ints):
    ``cond``/``uncond`` logits [batch, vocab] (row strides ``ld_*`` in elements, default vocab), per-row
    float32 ``cfg_scale``/``temperature``/``top_p``, int64 ``top_k``, uint64 ``seed``/``stream_ids``, outputs
    int64 ``tokens`` and optional float64 ``logprobs``; the step from ``steps_ptr`` (device int64 [batch], one per
    row: read as uint64, not checked) when given, else ``step_ptr`` (device int64), else ``step``. A row the kernel
    cannot sample gets token TOKEN_NON_FINITE (NaN/Inf logits) or TOKEN_BAD_PARAMS (a parameter outside the
    bounds of ``larp_rt.sampling``: the parameters are in device memory, so the kernel checks them). Never
    synchronises. Raises RuntimeError when the CUDA kernels are not built, ValueError on bad arguments."""
    lib = cuda_library()
    if lib is None:
        raise RuntimeError(f"CUDA sampling kernels unavailable: {_errors.get(CUDA_LIB, 'not built')}")
    if dtype not in DTYPE_CODES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_CODES)}, got {dtype!r}")
    args = SampleArgs(
        cond=cond, uncond=uncond, ld_cond=vocab if ld_cond is None else ld_cond,
        ld_uncond=(vocab if ld_uncond is None else ld_uncond) if uncond else 0, dtype=DTYPE_CODES[dtype],
        num_threads=0, batch=batch, vocab=vocab, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
        top_p=top_p, seed=seed, stream=stream_ids, step_ptr=step_ptr, step=step, tokens=tokens, logprobs=logprobs,
        steps=steps_ptr,
    )
    handle = int(cuda_stream) if cuda_stream is not None else 0
    rc = lib.larp_sample_cuda(ctypes.byref(args), ctypes.c_void_p(handle or None))
    if rc != 0:
        _raise(lib, rc, cuda=True)


# --------------------------------------------------------------------------------------------
# the PyTorch op
# --------------------------------------------------------------------------------------------
_torch_op = None


def register_torch_op():
    """Register ``torch.ops.larp_rt.sample`` (idempotent) and return it; None when torch is not installed.

    sample(cond, uncond?, cfg_scale, temperature, top_k, top_p, seed, stream, step) -> (tokens, logprobs):
    cond/uncond [B, V] float32/float16/bfloat16 with unit stride along V (views of one [2B, V] tensor are
    fine); per-row tensors of length B on the logits' device (cfg_scale/temperature/top_p floating, top_k and
    seed/stream int64 bit patterns); step an int64 tensor with one element (every row; on the device for CUDA
    graphs, or a host value on the CPU) or B elements (one per row, on the logits' device).
    Returns int64 tokens [B] and float64 logprobs [B]. The op calls the kernels regardless of the fallback
    flag; ``sample_torch`` is the switchable entry point.
    """
    global _torch_op
    with _lock:
        if _torch_op is not None:
            return _torch_op
        try:
            import torch
        except ImportError:
            return None

        schema = ("(Tensor cond, Tensor? uncond, Tensor cfg_scale, Tensor temperature, Tensor top_k, Tensor top_p, "
                  "Tensor seed, Tensor stream, Tensor step) -> (Tensor, Tensor)")

        @torch.library.custom_op("larp_rt::sample", mutates_args=(), schema=schema)
        def _sample(cond, uncond, cfg_scale, temperature, top_k, top_p, seed, stream, step):
            return _run_torch(torch, cond, uncond, cfg_scale, temperature, top_k, top_p, seed, stream, step)

        @_sample.register_fake
        def _(cond, uncond, cfg_scale, temperature, top_k, top_p, seed, stream, step):
            B = cond.shape[0]
            _check_step_shape(step, B)
            return (torch.empty(B, dtype=torch.int64, device=cond.device),
                    torch.empty(B, dtype=torch.float64, device=cond.device))

        _torch_op = torch.ops.larp_rt.sample
        return _torch_op


def _check_step_shape(step, B) -> bool:
    """True when ``step`` holds one step per row (B elements), False for one shared step; raises otherwise."""
    n = step.numel()
    if n == 1:  # shared (B = 1: either reads the same)
        return False
    if step.ndim != 1 or n != B:
        raise ValueError(f"step must have one element (every row) or shape ({B},) (one per row), "
                         f"got shape {tuple(step.shape)}")
    return True


def _run_torch(torch, cond, uncond, cfg_scale, temperature, top_k, top_p, seed, stream, step):
    codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    if cond.ndim != 2:
        raise ValueError(f"cond must have shape (B, V), got {tuple(cond.shape)}")
    B, V = cond.shape
    if uncond is not None and tuple(uncond.shape) != (B, V):
        raise ValueError(f"uncond shape {tuple(uncond.shape)} must equal cond shape {(B, V)}")
    if cond.dtype not in codes:
        cond = cond.float()
    if uncond is not None and uncond.dtype != cond.dtype:
        cond, uncond = cond.float(), uncond.float()
    dev = cond.device
    if (V > 1 and cond.stride(1) != 1) or 0 < cond.stride(0) < V:
        cond = cond.contiguous()
    if uncond is not None:
        if uncond.device != dev:
            raise ValueError(f"uncond is on {uncond.device}, cond on {dev}: put both on one device")
        if (V > 1 and uncond.stride(1) != 1) or 0 < uncond.stride(0) < V:
            uncond = uncond.contiguous()

    def per_row(name, t, dtype):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device}, the logits on {dev}: move it to {dev}")
        if tuple(t.shape) != (B,):
            raise ValueError(f"{name} must have shape ({B},), got {tuple(t.shape)}")
        return t.to(dtype).contiguous()

    cfg_scale = per_row("cfg_scale", cfg_scale, torch.float32)
    temperature = per_row("temperature", temperature, torch.float32)
    top_k = per_row("top_k", top_k, torch.int64)
    top_p = per_row("top_p", top_p, torch.float32)
    seed = per_row("seed", seed, torch.int64)
    stream = per_row("stream", stream, torch.int64)
    per_row_step = _check_step_shape(step, B)
    tokens = torch.empty(B, dtype=torch.int64, device=dev)
    logp = torch.empty(B, dtype=torch.float64, device=dev)
    if B == 0:
        return tokens, logp
    on_cuda = dev.type == "cuda"
    step_ptr, step_val, steps_ptr = None, 0, None
    if per_row_step:
        if step.device != dev:
            raise ValueError(f"per-row step is on {step.device}, the logits on {dev}: move it to {dev}")
        step = step.to(torch.int64).contiguous()
        steps_ptr = step.data_ptr()
    elif step.device == dev:
        step = step.to(torch.int64).contiguous()
        step_ptr = step.data_ptr()
    elif step.device.type == "cpu":
        step_val = int(step.item())  # a host value: no device sync
    else:
        raise ValueError(f"step is on {step.device}: put it on {dev} (or the CPU)")
    args = SampleArgs(
        cond=cond.data_ptr(), uncond=uncond.data_ptr() if uncond is not None else None, ld_cond=cond.stride(0),
        ld_uncond=uncond.stride(0) if uncond is not None else 0, dtype=codes[cond.dtype],
        num_threads=1 if on_cuda else _default_threads(B, V), batch=B, vocab=V, cfg_scale=cfg_scale.data_ptr(),
        temperature=temperature.data_ptr(), top_k=top_k.data_ptr(), top_p=top_p.data_ptr(), seed=seed.data_ptr(),
        stream=stream.data_ptr(), step_ptr=step_ptr, step=step_val, tokens=tokens.data_ptr(),
        logprobs=logp.data_ptr(), steps=steps_ptr,
    )
    if on_cuda:
        lib = cuda_library()
        if lib is None:
            raise RuntimeError(f"CUDA sampling kernels unavailable: {_errors.get(CUDA_LIB, 'not built')}")
        with torch.cuda.device(dev):
            handle = torch.cuda.current_stream(dev).cuda_stream
            rc = lib.larp_sample_cuda(ctypes.byref(args), ctypes.c_void_p(handle or None))
    elif dev.type == "cpu":
        lib = cpu_library()
        if lib is None:
            raise RuntimeError(f"CPU sampling kernels unavailable: {_errors.get(CPU_LIB, 'not built')}")
        rc = lib.larp_sample_cpu(ctypes.byref(args))
    else:
        raise ValueError(f"larp_rt::sample runs on cpu or cuda tensors, got {dev}")
    if rc != 0:
        _raise(lib, rc, cuda=on_cuda)
    return tokens, logp


def sample_torch(cond_logits, uncond_logits, params, step, *, return_logprobs: bool = False):
    """``larp_rt.sampling_torch.sample`` through the kernel op (same arguments: ``params`` is a
    ``sampling_torch.DeviceRowParams``; ``step`` an int, an int64 tensor of one element, or B per-row steps: a
    tensor or integers). Falls back to the torch reference when the kernels are disabled or not built for the
    logits' device."""
    import torch

    from . import sampling_torch as _ref_torch

    dev = cond_logits.device
    have = cuda_library() is not None if dev.type == "cuda" else cpu_library() is not None
    op = register_torch_op() if have and not disabled() else None
    if op is None:
        return _ref_torch.sample(cond_logits, uncond_logits, params, step, return_logprobs=return_logprobs)
    if not isinstance(step, torch.Tensor):
        s = _kernel_step(step, len(params))  # per row: on the logits' device; an int: a host value
        step = torch.as_tensor(s, device=dev) if isinstance(s, np.ndarray) else torch.tensor(s, dtype=torch.int64)
    tokens, logp = op(cond_logits, uncond_logits, params.cfg_scale, params.temperature, params.top_k,
                      params.top_p, params.seed, params.stream, step)
    return (tokens, logp) if return_logprobs else tokens
