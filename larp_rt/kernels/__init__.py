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

The package is layered like a header -> launcher -> binding stack, each module importing only those before it:
``library`` (finding and loading the built libraries in ``larp_rt/_lib/``, the ABI, the switches; all the module
state lives there), ``cpu`` (ctypes calls on numpy arrays), ``cuda`` (the CUDA kernel on raw pointers) and
``torch_ops`` (the PyTorch op). Callers use this package's names (``kernels.cuda_library()``, ...), so a test that
patches ``larp_rt.kernels.X`` reaches them.
"""

from __future__ import annotations

from .cpu import (
    KV_DTYPE_CODES,
    MATMUL_ISAS,
    MATMUL_PANEL,
    decode_attention,
    pack_matmul_weights,
    packed_matmul,
    quantize_kv,
    sample_bounds,
    sample_numpy,
    set_num_threads,
)
from .cuda import launch_cuda
from .library import (
    ABI_VERSION,
    CPU_LIB,
    CUDA_LIB,
    DTYPE_CODES,
    ENV_DISABLE,
    ENV_LIB_DIR,
    ORT_LIB,
    TOKEN_BAD_PARAMS,
    TOKEN_NON_FINITE,
    SampleArgs,
    attention_isa,
    available,
    cpu_library,
    cuda_library,
    disabled,
    force_fallback,
    library_dir,
    matmul_isa,
    ort_custom_op_library,
    set_disabled,
)
from .torch_ops import register_torch_op, sample_torch

__all__ = [
    "ENV_DISABLE", "ENV_LIB_DIR", "SampleArgs", "available", "disabled", "set_disabled", "force_fallback",
    "library_dir", "cpu_library", "cuda_library", "ort_custom_op_library", "sample_numpy", "register_torch_op",
    "sample_torch", "launch_cuda", "set_num_threads", "DTYPE_CODES", "decode_attention", "attention_isa",
    "quantize_kv", "KV_DTYPE_CODES", "pack_matmul_weights", "packed_matmul", "matmul_isa", "MATMUL_PANEL",
    "sample_bounds", "TOKEN_NON_FINITE", "TOKEN_BAD_PARAMS",
    # the library file names, the ABI version and the matmul paths (module constants before the split)
    "CPU_LIB", "CUDA_LIB", "ORT_LIB", "ABI_VERSION", "MATMUL_ISAS",
]
