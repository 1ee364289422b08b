"""Kernels, layer 4 of 4: the PyTorch binding, ``torch.ops.larp_rt.sample`` over the CPU and CUDA kernels.

``register_torch_op`` registers the custom op (with a fake implementation, so torch.compile traces it; on CUDA
it launches on the current stream and never syncs, so a CUDA graph can capture it with the step in a device
tensor); ``sample_torch`` is ``larp_rt.sampling_torch.sample`` through it, falling back to that reference when
the kernels are disabled or not built. torch is imported inside the functions only: ``import larp_rt.kernels``
stays torch-free. The libraries come from ``library``; the step checks and row threads from ``cpu``.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

from .cpu import default_threads, kernel_step
from .library import (
    CPU_LIB,
    CUDA_LIB,
    SampleArgs,
    cpu_library,
    cuda_library,
    disabled,
    load_error,
    raise_last_error,
)

_register_lock = threading.Lock()
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
    with _register_lock:
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


def _torch_logits(torch, cond, uncond, codes: dict):
    """The op's logits checked and laid out for the kernel: one dtype it reads (else both float32), unit stride
    along V, one device."""
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
    return cond, uncond


def _per_row(name: str, t, dtype, B: int, dev):
    """A per-row parameter on the logits' device, (B,) of ``dtype``, contiguous."""
    if t.device != dev:
        raise ValueError(f"{name} is on {t.device}, the logits on {dev}: move it to {dev}")
    if tuple(t.shape) != (B,):
        raise ValueError(f"{name} must have shape ({B},), got {tuple(t.shape)}")
    return t.to(dtype).contiguous()


def _torch_step(torch, step, per_row_step: bool, dev):
    """(step tensor to keep alive, step_ptr, step value, steps_ptr) for ``SampleArgs``: B per-row steps or one on
    the logits' device are read there (CUDA graphs), one on the CPU is passed by value (no device sync)."""
    if per_row_step:
        if step.device != dev:
            raise ValueError(f"per-row step is on {step.device}, the logits on {dev}: move it to {dev}")
        step = step.to(torch.int64).contiguous()
        return step, None, 0, step.data_ptr()
    if step.device == dev:
        step = step.to(torch.int64).contiguous()
        return step, step.data_ptr(), 0, None
    if step.device.type == "cpu":
        return step, None, int(step.item()), None
    raise ValueError(f"step is on {step.device}: put it on {dev} (or the CPU)")


def _launch_torch(torch, dev, args: SampleArgs) -> None:
    """Run the kernel of the logits' device on ``args`` (on CUDA: enqueued on torch's current stream)."""
    on_cuda = dev.type == "cuda"
    if on_cuda:
        lib = cuda_library()
        if lib is None:
            raise RuntimeError(f"CUDA sampling kernels unavailable: {load_error(CUDA_LIB, 'not built')}")
        with torch.cuda.device(dev):
            handle = torch.cuda.current_stream(dev).cuda_stream
            rc = lib.larp_sample_cuda(ctypes.byref(args), ctypes.c_void_p(handle or None))
    elif dev.type == "cpu":
        lib = cpu_library()
        if lib is None:
            raise RuntimeError(f"CPU sampling kernels unavailable: {load_error(CPU_LIB, 'not built')}")
        rc = lib.larp_sample_cpu(ctypes.byref(args))
    else:
        raise ValueError(f"larp_rt::sample runs on cpu or cuda tensors, got {dev}")
    if rc != 0:
        raise_last_error(lib, rc, cuda=on_cuda)


def _run_torch(torch, cond, uncond, cfg_scale, temperature, top_k, top_p, seed, stream, step):
    codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    cond, uncond = _torch_logits(torch, cond, uncond, codes)
    (B, V), dev = cond.shape, cond.device
    cfg_scale = _per_row("cfg_scale", cfg_scale, torch.float32, B, dev)
    temperature = _per_row("temperature", temperature, torch.float32, B, dev)
    top_k = _per_row("top_k", top_k, torch.int64, B, dev)
    top_p = _per_row("top_p", top_p, torch.float32, B, dev)
    seed = _per_row("seed", seed, torch.int64, B, dev)
    stream = _per_row("stream", stream, torch.int64, B, dev)
    per_row_step = _check_step_shape(step, B)
    tokens = torch.empty(B, dtype=torch.int64, device=dev)
    logp = torch.empty(B, dtype=torch.float64, device=dev)
    if B == 0:
        return tokens, logp
    step, step_ptr, step_val, steps_ptr = _torch_step(torch, step, per_row_step, dev)  # step: alive until the call
    args = SampleArgs(
        cond=cond.data_ptr(), uncond=uncond.data_ptr() if uncond is not None else None, ld_cond=cond.stride(0),
        ld_uncond=uncond.stride(0) if uncond is not None else 0, dtype=codes[cond.dtype],
        num_threads=1 if dev.type == "cuda" else default_threads(B, V), batch=B, vocab=V,
        cfg_scale=cfg_scale.data_ptr(), temperature=temperature.data_ptr(), top_k=top_k.data_ptr(),
        top_p=top_p.data_ptr(), seed=seed.data_ptr(), stream=stream.data_ptr(), step_ptr=step_ptr, step=step_val,
        tokens=tokens.data_ptr(), logprobs=logp.data_ptr(), steps=steps_ptr,
    )
    _launch_torch(torch, dev, args)
    return tokens, logp


def sample_torch(cond_logits, uncond_logits, params, step, *, return_logprobs: bool = False):
    """``larp_rt.sampling_torch.sample`` through the kernel op (same arguments: ``params`` is a
    ``sampling_torch.DeviceRowParams``; ``step`` an int, an int64 tensor of one element, or B per-row steps: a
    tensor or integers). Falls back to the torch reference when the kernels are disabled or not built for the
    logits' device."""
    import torch

    from .. import sampling_torch as _ref_torch

    dev = cond_logits.device
    have = cuda_library() is not None if dev.type == "cuda" else cpu_library() is not None
    op = register_torch_op() if have and not disabled() else None
    if op is None:
        return _ref_torch.sample(cond_logits, uncond_logits, params, step, return_logprobs=return_logprobs)
    if not isinstance(step, torch.Tensor):
        s = kernel_step(step, len(params))  # per row: on the logits' device; an int: a host value
        step = torch.as_tensor(s, device=dev) if isinstance(s, np.ndarray) else torch.tensor(s, dtype=torch.int64)
    tokens, logp = op(cond_logits, uncond_logits, params.cfg_scale, params.temperature, params.top_k,
                      params.top_p, params.seed, params.stream, step)
    return (tokens, logp) if return_logprobs else tokens
