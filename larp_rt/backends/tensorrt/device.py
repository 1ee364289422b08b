"""TensorRT backend, layer 1 of 4: this machine's GPUs and CUDA, below any TensorRT object.

- ``probe_gpus``: the CUDA devices, probed once per process in a child process (a broken driver cannot crash this
  one); ``Machine`` / ``machine()``: what plans are checked against (the installed builders and those GPUs).
- ``load_cudart`` / ``cuda_ok``: the cuda-python runtime API and its error check; ``DeviceBuffer`` and
  ``PinnedBuffer``: device and page-locked host memory.
- ``compile_ptx`` / ``KVKernels``: the backend's own kernels (``kv_kernels.cu``, package data: KV-cache slot writes,
  token feeding, row gather), compiled with NVRTC (no GPU needed for PTX) and loaded with the driver API.

cuda-python is imported inside the functions: importing this module needs neither it nor a GPU.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

import numpy as np

PKG = {"tensorrt-rtx": "tensorrt_rtx", "tensorrt": "tensorrt"}  # builder (manifest flavour) -> its Python module

_PROBE = r"""
import json
try:
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        from cuda import cudart as rt
except ImportError as e:
    print(json.dumps({"error": "cuda-python is not installed (" + str(e) + "): pip install 'larp_rt[tensorrt]'"}))
    raise SystemExit(0)
err, n = rt.cudaGetDeviceCount()
if int(err) != 0:
    print(json.dumps({"error": "cudaGetDeviceCount: " + str(err)}))
    raise SystemExit(0)
gpus = []
for i in range(n):
    e, p = rt.cudaGetDeviceProperties(i)
    if int(e) == 0:
        name = p.name.decode(errors="replace").rstrip("\x00") if isinstance(p.name, bytes) else str(p.name)
        gpus.append({"index": i, "name": name, "cc": f"{p.major}.{p.minor}"})
print(json.dumps({"gpus": gpus}))
"""
_probe_lock = threading.Lock()
_probe_cache: tuple[list[dict], str] | None = None


def probe_gpus(timeout: float = 60.0) -> tuple[list[dict], str]:
    """([{index, name, cc}], why-empty): CUDA devices seen by cuda-python, probed once per process in a child
    process (a missing or broken driver makes it exit or die there, never here). ``LARP_RT_TRT_PROBE=0`` probes
    nothing and reports no GPU."""
    global _probe_cache
    with _probe_lock:
        if _probe_cache is not None:
            return _probe_cache
        if os.environ.get("LARP_RT_TRT_PROBE", "1") == "0":
            _probe_cache = ([], "LARP_RT_TRT_PROBE=0")
            return _probe_cache
        try:
            r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            _probe_cache = ([], f"the CUDA probe failed: {e}")
            return _probe_cache
        if r.returncode != 0:
            how = f"signal {-r.returncode}" if r.returncode < 0 else f"exit status {r.returncode}"
            tail = (r.stderr.strip().splitlines() or [""])[-1]
            _probe_cache = ([], f"the CUDA probe ended with {how} {tail}".strip())
            return _probe_cache
        try:
            out = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            _probe_cache = ([], f"the CUDA probe printed nothing readable: {r.stdout[-200:]!r}")
            return _probe_cache
        gpus = out.get("gpus") or []
        _probe_cache = (gpus, out.get("error") or ("no CUDA device" if not gpus else ""))
        return _probe_cache


def installed_version(pkg: str) -> str | None:
    """The installed distribution's version (None: not installed)."""
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Machine:
    """What plans are checked against: the installed builders' versions and the GPUs (none: no usable GPU)."""

    versions: dict = field(default_factory=dict)  # "tensorrt-rtx" / "tensorrt" -> version or None
    gpus: tuple = ()  # ({"index", "name", "cc"}, ...)
    why_no_gpu: str = ""

    def describe(self) -> str:
        have = ", ".join(f"{k} {v}" for k, v in self.versions.items() if v) or "no TensorRT"
        g = "; ".join(f"GPU {x['index']} {x['name']} (compute capability {x['cc']})" for x in self.gpus)
        if not g:
            g = f"no usable GPU ({self.why_no_gpu})" if self.why_no_gpu else "GPUs not probed"
        return f"this machine: {have}; {g}"


def machine(probe: bool = True) -> Machine:
    """This machine: the builders installed and, with ``probe``, its GPUs (``probe_gpus``)."""
    versions = {k: installed_version(k) for k in PKG}
    if not probe:
        return Machine(versions)
    gpus, why = probe_gpus()
    return Machine(versions, tuple(gpus), why)



# ---------------------------------------------------------------------------------------------------------------
# CUDA helpers (cuda-python runtime API)
# ---------------------------------------------------------------------------------------------------------------
def load_cudart():
    """cuda-python's runtime API module (``cuda.bindings.runtime``, or ``cuda.cudart`` in older releases)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart
    return cudart


def cuda_ok(res, what: str):
    """A cuda-python call's result without its error code (RuntimeError naming ``what`` when it failed)."""
    err = res[0] if isinstance(res, tuple) else res
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {err}")
    if isinstance(res, tuple):
        return res[1] if len(res) == 2 else res[1:]
    return None


class PinnedBuffer:
    """A page-locked host buffer viewed as a numpy array."""

    def __init__(self, cudart, shape, dtype):
        self.cudart = cudart
        self.nbytes = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)
        self.ptr = int(cuda_ok(cudart.cudaMallocHost(self.nbytes), "cudaMallocHost"))
        raw = (ctypes.c_char * self.nbytes).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def free(self):
        if self.ptr:
            self.cudart.cudaFreeHost(self.ptr)
            self.ptr = 0


class DeviceBuffer:
    """``nbytes`` of device memory, zeroed; ``ptr`` its address."""

    def __init__(self, cudart, nbytes: int):
        self.cudart = cudart
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(cuda_ok(cudart.cudaMalloc(self.nbytes), "cudaMalloc"))
        cuda_ok(cudart.cudaMemset(self.ptr, 0, self.nbytes), "cudaMemset")

    def free(self):
        if self.ptr:
            self.cudart.cudaFree(self.ptr)
            self.ptr = 0


@cache
def kernel_source() -> str:
    """The CUDA C++ source of the backend's kernels (``kv_kernels.cu``, shipped beside this module)."""
    return resources.files(__package__).joinpath("kv_kernels.cu").read_text(encoding="utf-8")


def compile_ptx(cc: str) -> bytes:
    """The KV-write and gather kernels as PTX for compute capability ``cc`` (NVRTC; runs without a GPU)."""
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        from cuda import nvrtc
    prog = cuda_ok(nvrtc.nvrtcCreateProgram(kernel_source().encode(), b"larp_rt_kv.cu", 0, [], []),
                   "nvrtcCreateProgram")
    arch = f"--gpu-architecture=compute_{cc.replace('.', '')}".encode()
    err = nvrtc.nvrtcCompileProgram(prog, 2, [arch, b"--std=c++14"])[0]
    if int(err) != 0:
        size = cuda_ok(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        raise RuntimeError(f"NVRTC could not compile the KV-write kernels: {log.decode(errors='replace')}")
    size = cuda_ok(nvrtc.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize")
    ptx = b" " * size
    cuda_ok(nvrtc.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
    nvrtc.nvrtcDestroyProgram(prog)
    return ptx


class KVKernels:
    """The KV-write and gather kernels, compiled once with NVRTC for this GPU and loaded into its context."""

    def __init__(self, cc: str):
        try:
            from cuda.bindings import driver
        except ImportError:
            from cuda import cuda as driver
        self.driver = driver
        ptx = compile_ptx(cc)
        # the runtime API has made the primary context current (cudaSetDevice + allocations)
        self.module = cuda_ok(driver.cuModuleLoadData(ptx), "cuModuleLoadData")
        self.fn = {n: cuda_ok(driver.cuModuleGetFunction(self.module, n.encode()), "cuModuleGetFunction")
                   for n in ("kv_write2", "kv_write4", "gather_rows", "feed_tokens")}

    def launch(self, name: str, grid, block: int, stream: int, args: list[tuple[int, type]]) -> None:
        vals = [c(v) for v, c in args]
        ptrs = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
        cuda_ok(self.driver.cuLaunchKernel(self.fn[name], grid[0], grid[1], 1, block, 1, 1, 0, stream,
                                       ctypes.addressof(ptrs), 0), f"cuLaunchKernel({name})")

