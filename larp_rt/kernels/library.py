"""Kernels, layer 1 of 4: the built libraries themselves (found, loaded, checked) and the switches around them.

Everything the other layers share lives here, once: the library paths (``$LARP_RT_KERNELS_DIR`` or
``larp_rt/_lib/``, where setup.py writes them), the ABI check, the loaded libraries and their load errors, the
fallback switch (``disabled()`` / ``set_disabled()`` / ``force_fallback()`` / ``$LARP_RT_DISABLE_KERNELS``), the
float64 exp set to numpy's (bit-exact logprobs), ``available()`` and the SIMD paths the CPU kernels picked. It
mirrors the C ABI (``SampleArgs``, the dtype codes, the failure tokens) and raises the libraries' last error.
The calls on top of it: ``cpu`` (numpy arrays), ``cuda`` (raw device pointers) and ``torch_ops`` (the PyTorch op).
Needs only numpy and ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from pathlib import Path

import numpy as np

from ..errors import kernel_error

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
    return Path(env) if env else Path(__file__).resolve().parent.parent / "_lib"  # larp_rt/kernels/ -> larp_rt/


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


def load_error(name: str, default: str | None = None) -> str | None:
    """Why library ``name`` (CPU_LIB, CUDA_LIB, ORT_LIB) did not load (``default`` when it did or was not tried)."""
    return _errors.get(name, default)


def raise_last_error(lib: ctypes.CDLL, rc: int = 1, cuda: bool = False) -> None:
    """Raise the library's last error message: RuntimeError for rc 2 (a CUDA failure), else the typed refusal of
    ``errors.kernel_error`` (NonFiniteLogitsError, SamplingParamsError: both ValueErrors, or a plain ValueError)."""
    fn = lib.larp_cuda_last_error if cuda else lib.larp_last_error
    fn.restype = ctypes.c_char_p
    msg = fn().decode("utf-8", "replace")
    if rc == 2:
        raise RuntimeError(msg)
    raise kernel_error(msg)


# --------------------------------------------------------------------------------------------
# the SIMD paths the CPU kernels chose on this machine
# --------------------------------------------------------------------------------------------
def matmul_isa() -> str | None:
    """Which code the packed matmul runs: "avx512", "avx2" or "portable" (None when the kernels are not built)."""
    lib = cpu_library()
    if lib is None:
        return None
    return {3: "avx512", 2: "avx2"}.get(lib.larp_matmul_isa(), "portable")


def attention_isa() -> str | None:
    """Which code the attention kernel runs: "avx2" or "portable" (None when the kernels are not built)."""
    lib = cpu_library()
    return None if lib is None else ("avx2" if lib.larp_attention_isa() == 2 else "portable")
