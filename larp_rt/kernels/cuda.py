"""Kernels, layer 3 of 4: the CUDA sampling kernel on raw device pointers and a stream handle.

``launch_cuda`` is the entry point of callers that own their device memory and stream (the TensorRT backend,
cuda-python): it fills the ABI's ``SampleArgs`` with device pointers and enqueues the kernel, never synchronising.
No torch and no CUDA Python package here: the library (``library.cuda_library``) links the CUDA runtime itself.
"""

from __future__ import annotations

import ctypes

from .library import CUDA_LIB, DTYPE_CODES, SampleArgs, cuda_library, load_error, raise_last_error


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
        raise RuntimeError(f"CUDA sampling kernels unavailable: {load_error(CUDA_LIB, 'not built')}")
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
        raise_last_error(lib, rc, cuda=True)
