"""TensorRT backend: the bundle's plans (``larp-rt build``) on an NVIDIA GPU through cuda-python; no torch.

Loading checks before it creates anything:

1. every plan's file has its recorded size and sha256, and was built from the ONNX graph the bundle holds now;
2. the plan's builder (TensorRT-RTX or datacenter TensorRT) is installed here at the plan's version, and the plan's
   header bytes agree with its manifest entry (flavour, version, size: ``read_plan_header``);
3. a usable GPU exists (``probe_gpus``: cudaGetDeviceCount in a child process, so a broken driver cannot crash
   this one) and its compute capability is one of the plan's targets;
4. the engine validity API (TensorRT-RTX's ``Runtime.get_engine_validity``, a header check) accepts the plan.

Each failure names the plan's target, this machine and the ``larp-rt build`` command that fixes it. Only then are
TensorRT / CUDA runtime objects created. Without a usable GPU, ``Engine(backend="tensorrt")`` raises at step 3
and ``backend="auto"`` never picks TensorRT.

Running (per batch bucket, allocated once): device buffers for every input and output; the KV cache on the device
(one buffer per layer and tensor, bound as (rows, h, S_w, hd) with the cache window S_w following the longest row,
like the ONNX Runtime backend: a step reads about ``pos`` slots); after the decode step a small NVRTC kernel writes
every row's new entries into its slot ``pos[r]``, a gather kernel picks the sampled rows' logits and the cpp_ext
CUDA sampling kernel (``kernels.launch_cuda``) draws on the same stream. That sequence is captured as one CUDA
graph per (bucket, window, request-row count) and replayed (``LARP_RT_TRT_CUDA_GRAPHS=0`` runs it eagerly).
``generate`` (every request from step 0) runs ``LARP_RT_TRT_CHUNK`` steps (default 16) per graph: a kernel feeds
each step's drawn tokens to the next step's input on the device, positions and sampling steps come from tables
uploaded once per chunk, and the tokens reach the host once per chunk (one synchronisation per chunk). The
step-level scheduler's runner steps one at a time (requests join and leave between steps): its inputs and
parameters travel in pinned buffers the graph copies from, one synchronisation per step.
Encode and decode run on their plans with buffers per bucket as well. Weight-stripped plans are refitted at load
from the bundle's own ONNX files. TensorRT-RTX's JIT kernels persist in a runtime cache per plan under
``$LARP_RT_TRT_CACHE`` (default ``~/.cache/larp_rt/tensorrt``).
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
from pathlib import Path

import numpy as np

from .. import sampling
from ..bundle import TRT_FLAGS, Bundle, BundleError, PlanError, build_command, sha256_file
from .base import Backend, StepEvent, StepRunner, StepSample

__all__ = ["TensorRTBackend", "Machine", "PlanMismatchError", "TensorRTUnavailable", "probe_gpus", "check_plans",
           "machine", "rebuild_command", "plan_issues", "PlanIssue", "read_plan_header", "PLAN_MAGIC"]

PKG = {"tensorrt-rtx": "tensorrt_rtx", "tensorrt": "tensorrt"}
FLAG = TRT_FLAGS

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


class TensorRTUnavailable(RuntimeError):
    """No usable GPU / TensorRT here (raised before any TensorRT or CUDA runtime object exists)."""


class PlanMismatchError(RuntimeError):
    """A plan does not suit this machine (builder version, compute capability, validity); rebuild it."""


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


def _installed(pkg: str) -> str | None:
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
    versions = {k: _installed(k) for k in PKG}
    if not probe:
        return Machine(versions)
    gpus, why = probe_gpus()
    return Machine(versions, tuple(gpus), why)


def _trt_version_of(mod_name: str) -> str | None:
    """The module's own version (the wheel's metadata can carry a longer build number, e.g. 1.7.1.116)."""
    return None if mod_name is None else _installed(mod_name)


def rebuild_command(bundle: Bundle, flavour: str, cc: str | None = None, entry: dict | None = None) -> str:
    """``larp-rt build`` with the options the manifest recorded (see ``bundle.build_command``)."""
    return build_command(bundle.path, bundle.manifest, entry, flavour=flavour, cc=cc)


def _same_version(a: str, b: str) -> bool:
    """Plans record the module's __version__ (1.7.1.116); metadata may say the same or a prefix of it."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


PLAN_MAGIC = {b"vtrt": "tensorrt-rtx", b"ftrt": "tensorrt", b"ptrt": "tensorrt"}  # a plan's first four bytes


def read_plan_header(path: str | os.PathLike) -> dict:
    """What a plan's first bytes say, read as bytes (no TensorRT object): ``magic`` and ``flavour`` (None: not a
    TensorRT plan magic), and where the header has TensorRT-RTX's layout also ``size`` and ``version``. That layout
    (seen in TensorRT-RTX 1.7 plans): b"vtrt", 12 bytes, the plan's size in bytes (uint64 little-endian), the
    builder's version (major, minor, patch, build: one byte each), b"vtrt" again; the second magic is required
    before the size and version are read. Datacenter TensorRT's header is undocumented: only its magic is read."""
    with open(path, "rb") as f:
        head = f.read(32)
    magic = head[:4]
    out = {"magic": magic.decode("latin-1"), "flavour": PLAN_MAGIC.get(magic), "size": None, "version": None}
    if magic == b"vtrt" and len(head) == 32 and head[28:32] == b"vtrt":
        out["size"] = int.from_bytes(head[16:24], "little")
        out["version"] = ".".join(str(b) for b in head[24:28])
    return out


@dataclass(frozen=True)
class PlanIssue:
    """One thing wrong with one plan: ``phase`` 0 its file (``kind`` malformed, missing, altered, stale: built from
    another ONNX file than the bundle's), 1 the builder installed here (version; not_installed: none of the plan's
    flavour), 2 its header against its manifest entry (header); ``error`` the exception class ``check_plans`` raises
    for it; ``reason`` what is wrong, ``fix`` the ``larp-rt build`` command."""

    plan: str
    file: str
    phase: int
    kind: str
    error: type
    reason: str
    fix: str
    after: str = ""  # what the fix needs first (pip install ...)

    @property
    def not_installed(self) -> bool:
        return self.kind == "not_installed"

    @property
    def message(self) -> str:
        return f"{self.reason}; rebuild with `{self.fix}`" + (f" {self.after}" if self.after else "")


_ENTRY_KEYS = ("file", "sha256", "flavour", "version", "compute_capabilities")


def plan_issues(root: str | os.PathLike, manifest: dict, mach: Machine, *, sha=sha256_file) -> list[PlanIssue]:
    """Everything wrong with the manifest's plans that can be told without a GPU or a TensorRT runtime: each plan's
    file (present, its recorded size and sha256, built from the ONNX graph the bundle holds now), the builder
    installed here (``mach.versions``) and the plan's header bytes against its entry (magic = flavour, version,
    size). ``sha``: the hash function (a caching one lets a caller hash each file once)."""
    root = Path(root)
    graphs = manifest.get("graphs") or {}
    out: list[PlanIssue] = []
    for name, e in (manifest.get("plans") or {}).items():
        if not isinstance(e, dict) or any(k not in e for k in _ENTRY_KEYS):
            miss = [k for k in _ENTRY_KEYS if not isinstance(e, dict) or k not in e]
            file = str(e.get("file", f"plans/{name}")) if isinstance(e, dict) else f"plans/{name}"
            out.append(PlanIssue(name, file, 0, "malformed", PlanError,
                                 f"manifest.json's plan entry {name!r} is malformed (no {', '.join(miss)})",
                                 build_command(root, manifest, flavour="auto")))
            continue
        fix = build_command(root, manifest, e)
        p = root / e["file"]

        def issue(phase: int, kind: str, reason: str, error: type = PlanError, **kw) -> None:
            out.append(PlanIssue(name, e["file"], phase, kind, error, reason, fix, **kw))  # noqa: B023 (called at once)

        if not p.is_file():
            issue(0, "missing", f"plan {str(p)!r} is missing")
            continue
        size = p.stat().st_size
        damaged = True
        if isinstance(e.get("size"), int) and size != e["size"]:
            issue(0, "altered", f"plan {str(p)!r} was altered: {size} bytes where manifest.json records {e['size']} "
                     "(truncated or overwritten)")
        elif sha(p) != e["sha256"]:
            issue(0, "altered", f"plan {str(p)!r} was altered (sha256 mismatch with manifest.json)")
        else:
            damaged = False
        g = graphs.get(name)
        if isinstance(g, dict) and "file" in g and (root / g["file"]).is_file() and \
                sha(root / g["file"]) != e.get("onnx_sha256"):
            issue(0, "stale", f"plan {e['file']!r} was built from another {g['file']} than the bundle holds now")
        fl, ver = e["flavour"], str(e["version"])
        have = mach.versions.get(fl)
        if have is None or not _same_version(have, ver):
            issue(1, "version" if have else "not_installed",
                  f"plan {e['file']!r} ({name}) was built with {fl} {ver} for compute capability "
                  f"{', '.join(e['compute_capabilities'])}; {mach.describe()}. Plans only load in the "
                  "TensorRT they were built with", PlanMismatchError,
                  after="" if have else f"after pip install {fl}=={ver}")
        if damaged:
            continue  # a damaged file's header says nothing
        head = read_plan_header(p)
        if head["flavour"] is None:
            why = (f"is not a TensorRT plan (it starts with {head['magic']!r}, not "
                   f"{', '.join(repr(k.decode()) for k in PLAN_MAGIC)})")
        elif head["flavour"] != fl:
            why = f"is a {head['flavour']} plan by its header, and manifest.json says {fl}"
        elif head["version"] is not None and not _same_version(head["version"], ver):
            why = f"was built with {fl} {head['version']} by its header, and manifest.json says {ver}"
        elif head["size"] is not None and head["size"] != size:
            why = f"is {size} bytes, and its header says {head['size']}"
        else:
            continue
        issue(2, "header", f"plan {str(p)!r} {why}")
    return out


def check_plans(bundle: Bundle, mach: Machine, *, device: int = 0, need_gpu: bool = True) -> dict[str, dict]:
    """Every plan entry of the bundle against its files and ``mach``; returns the entries. Raises PlanError (a
    BundleError: a file missing, altered or stale, a header that contradicts the manifest) or PlanMismatchError
    (builder version / compute capability) with the rebuild command, or TensorRTUnavailable (no GPU, when
    ``need_gpu``). Everything before the GPU check needs no GPU and no TensorRT runtime (``plan_issues``)."""
    plans = bundle.manifest.get("plans") or {}
    if not plans:
        raise BundleError(f"bundle {str(bundle.path)!r} has no TensorRT plans: build them with "
                          f"`larp-rt build {bundle.path}`")
    issues = plan_issues(bundle.path, bundle.manifest, mach)
    for phase in (0, 1, 2):
        for issue in issues:
            if issue.phase == phase:
                raise issue.error(issue.message)
    if not need_gpu:
        return plans
    if not mach.gpus:
        raise TensorRTUnavailable(
            f"backend='tensorrt' needs a usable NVIDIA GPU, and there is none ({mach.why_no_gpu or 'not probed'}); "
            "use backend='onnxruntime' (CPU) or run on a machine with a GPU")
    gpu = mach.gpus[min(device, len(mach.gpus) - 1)]
    for name, e in plans.items():
        targets = e["compute_capabilities"]
        if gpu["cc"] not in targets:
            raise PlanMismatchError(
                f"plan {e['file']!r} ({name}) targets compute capability {', '.join(targets)} ({e['flavour']} "
                f"{e['version']}); {mach.describe()}. Rebuild with "
                f"`{rebuild_command(bundle, e['flavour'], gpu['cc'], e)}`")
    return plans


# ---------------------------------------------------------------------------------------------------------------
# CUDA helpers (cuda-python runtime API)
# ---------------------------------------------------------------------------------------------------------------
def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart
    return cudart


def _ok(res, what: str):
    err = res[0] if isinstance(res, tuple) else res
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {err}")
    if isinstance(res, tuple):
        return res[1] if len(res) == 2 else res[1:]
    return None


class _Pinned:
    """A page-locked host buffer viewed as a numpy array."""

    def __init__(self, cudart, shape, dtype):
        self.cudart = cudart
        self.nbytes = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)
        self.ptr = int(_ok(cudart.cudaMallocHost(self.nbytes), "cudaMallocHost"))
        raw = (ctypes.c_char * self.nbytes).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def free(self):
        if self.ptr:
            self.cudart.cudaFreeHost(self.ptr)
            self.ptr = 0


class _Device:
    def __init__(self, cudart, nbytes: int):
        self.cudart = cudart
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(_ok(cudart.cudaMalloc(self.nbytes), "cudaMalloc"))
        _ok(cudart.cudaMemset(self.ptr, 0, self.nbytes), "cudaMemset")

    def free(self):
        if self.ptr:
            self.cudart.cudaFree(self.ptr)
            self.ptr = 0


_KERNELS = r"""
// row r's new cache entries (present: rows x h x hd) into slot pos[r] of its cache (rows x h x W x hd), for every
// layer and tensor at once (blockIdx.y picks the pair); elements are copied as raw bits of ESIZE bytes
template <typename T>
__device__ void kv_write_t(T* cache, const T* present, const long long* pos, int rows, int H, int W, int hd) {
  long long n = (long long)rows * H * hd;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    long long d = i % hd, rh = i / hd, r = rh / H;
    long long p = pos[r];
    if (p >= 0 && p < W) cache[(rh * W + p) * hd + d] = present[i];
  }
}
extern "C" __global__ void kv_write2(unsigned long long const* caches, unsigned long long const* presents,
                                     const long long* pos, int rows, int H, int W, int hd) {
  kv_write_t((unsigned short*)caches[blockIdx.y], (const unsigned short*)presents[blockIdx.y], pos, rows, H, W, hd);
}
extern "C" __global__ void kv_write4(unsigned long long const* caches, unsigned long long const* presents,
                                     const long long* pos, int rows, int H, int W, int hd) {
  kv_write_t((unsigned int*)caches[blockIdx.y], (const unsigned int*)presents[blockIdx.y], pos, rows, H, W, hd);
}
// the next step's input on the device: row r's token is what its request drew (row_req[r] < 0: an idle row, 0)
extern "C" __global__ void feed_tokens(long long* token, const long long* sampled, const long long* row_req, int cap) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < cap; i += gridDim.x * blockDim.x) {
    long long q = row_req[i];
    long long t = q >= 0 ? sampled[q] : 0;
    token[i] = t >= 0 ? t : 0;  // a failed row (-1) feeds 0; the host reports the failure after the chunk
  }
}
// dst[i] = src[rows[i]] (V floats per row): the sampled rows' logits, contiguous for the sampling kernel
extern "C" __global__ void gather_rows(float* dst, const float* src, const long long* rows, int R, int V) {
  long long n = (long long)R * V;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    dst[i] = src[rows[i / V] * (long long)V + i % V];
}
"""


def compile_ptx(cc: str) -> bytes:
    """The KV-write and gather kernels as PTX for compute capability ``cc`` (NVRTC; runs without a GPU)."""
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        from cuda import nvrtc
    prog = _ok(nvrtc.nvrtcCreateProgram(_KERNELS.encode(), b"larp_rt_kv.cu", 0, [], []), "nvrtcCreateProgram")
    arch = f"--gpu-architecture=compute_{cc.replace('.', '')}".encode()
    err = nvrtc.nvrtcCompileProgram(prog, 2, [arch, b"--std=c++14"])[0]
    if int(err) != 0:
        size = _ok(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        raise RuntimeError(f"NVRTC could not compile the KV-write kernels: {log.decode(errors='replace')}")
    size = _ok(nvrtc.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize")
    ptx = b" " * size
    _ok(nvrtc.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
    nvrtc.nvrtcDestroyProgram(prog)
    return ptx


class _Kernels:
    """The KV-write and gather kernels, compiled once with NVRTC for this GPU and loaded into its context."""

    def __init__(self, cc: str):
        try:
            from cuda.bindings import driver
        except ImportError:
            from cuda import cuda as driver
        self.driver = driver
        ptx = compile_ptx(cc)
        # the runtime API has made the primary context current (cudaSetDevice + allocations)
        self.module = _ok(driver.cuModuleLoadData(ptx), "cuModuleLoadData")
        self.fn = {n: _ok(driver.cuModuleGetFunction(self.module, n.encode()), "cuModuleGetFunction")
                   for n in ("kv_write2", "kv_write4", "gather_rows", "feed_tokens")}

    def launch(self, name: str, grid, block: int, stream: int, args: list[tuple[int, type]]) -> None:
        vals = [c(v) for v, c in args]
        ptrs = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
        _ok(self.driver.cuLaunchKernel(self.fn[name], grid[0], grid[1], 1, block, 1, 1, 0, stream,
                                       ctypes.addressof(ptrs), 0), f"cuLaunchKernel({name})")


# ---------------------------------------------------------------------------------------------------------------
class _Plan:
    """One deserialised plan: its engine, one execution context per profile (batch bucket), created lazily."""

    def __init__(self, be: TensorRTBackend, name: str, entry: dict):
        trt = be.trt
        self.be, self.name, self.entry = be, name, entry
        blob = (be.bundle.path / entry["file"]).read_bytes()
        validity = getattr(be.runtime, "get_engine_validity", None)
        if validity is not None:
            state, diag = validity(blob)
            if state == trt.EngineValidity.INVALID:
                raise PlanMismatchError(
                    f"TensorRT says plan {entry['file']!r} is not valid on this machine (diagnostics {diag}); "
                    f"{be.machine.describe()}; rebuild with "
                    f"`{rebuild_command(be.bundle, entry['flavour'], be.gpu['cc'])}`")
        self.engine = be.runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise PlanMismatchError(f"TensorRT could not deserialise plan {entry['file']!r}; rebuild with "
                                    f"`{rebuild_command(be.bundle, entry['flavour'], be.gpu['cc'])}`")
        if entry.get("weights") == "stripped":  # refit from the bundle's own ONNX weights
            refitter = trt.Refitter(self.engine, be.logger)
            parser = trt.OnnxParserRefitter(refitter, be.logger)
            if not parser.refit_from_file(str(be.bundle.path / entry["onnx"])) or not refitter.refit_cuda_engine():
                raise RuntimeError(f"refitting weight-stripped plan {entry['file']!r} from {entry['onnx']} failed")
        self.buckets = list(entry["buckets"])
        self.inputs = [i["name"] for i in entry["inputs"]]
        self.outputs = [o["name"] for o in entry["outputs"]]
        self.dtypes = {d["name"]: np.dtype(d["dtype"]) for d in entry["inputs"] + entry["outputs"]}
        self._contexts: dict[int, object] = {}
        self.runtime_cache = None
        self.cache_path = None

    def context(self, bucket: int, shared: bool = True):
        """The execution context of ``bucket``'s profile: shared (encode/decode, under the backend's lock) or a
        new one (each step runner binds its own buffers)."""
        ctx = self._contexts.get(bucket) if shared else None
        if ctx is None:
            be, k = self.be, self.buckets.index(bucket)
            if be.flavour == "tensorrt-rtx" and hasattr(self.engine, "create_runtime_config"):
                rc = self.engine.create_runtime_config()
                if self.runtime_cache is None:
                    self.runtime_cache = rc.create_runtime_cache()
                    self.cache_path = be.cache_dir / f"{self.entry['sha256'][:24]}-{be.gpu['cc']}.rtcache"
                    if self.cache_path.is_file():
                        self.runtime_cache.deserialize(self.cache_path.read_bytes())
                rc.set_runtime_cache(self.runtime_cache)
                ctx = self.engine.create_execution_context(rc)
            else:
                ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(k, be.stream)
            if shared:
                self._contexts[bucket] = ctx
        return ctx

    def bucket_for(self, rows: int) -> int:
        for b in self.buckets:
            if b >= rows:
                return b
        raise ValueError(f"plan {self.entry['file']!r} serves at most {self.buckets[-1]} rows, got {rows}; rebuild "
                         f"with a bigger bucket: `larp-rt build {self.be.bundle.path} --batch "
                         f"{','.join(map(str, self.buckets + [rows]))}`")

    def save_cache(self) -> None:
        if self.runtime_cache is not None and self.cache_path is not None:
            try:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                self.cache_path.write_bytes(bytes(self.runtime_cache.serialize()))
            except OSError:
                pass  # a cache is an optimisation


class TensorRTBackend(Backend):
    """The bundle's TensorRT plans on GPU ``device`` (``LARP_RT_CUDA_DEVICE``, default 0)."""

    name = "tensorrt"

    def __init__(self, bundle: Bundle, *, device: str = "auto", threads: int | None = None, sampler: str = "auto"):
        if device == "cpu":
            raise ValueError("backend='tensorrt' runs on a GPU; device='cpu' runs on backend='onnxruntime'")
        if sampler not in ("auto", "kernel", "reference"):
            raise ValueError(f"sampler={sampler!r}: the tensorrt backend samples with 'kernel' (the CUDA kernel on "
                             "the engine's stream; 'auto' picks it when built) or 'reference' (on the host)")
        super().__init__(bundle.tokenizer_config, bundle.generator_config)
        self.bundle = bundle
        dev = int(os.environ.get("LARP_RT_CUDA_DEVICE", "0"))
        check_plans(bundle, machine(probe=False), need_gpu=False)  # files and versions: no GPU needed to tell
        self.machine = machine(probe=True)
        entries = check_plans(bundle, self.machine, device=dev)  # raises without a GPU: nothing created yet
        self.gpu = self.machine.gpus[min(dev, len(self.machine.gpus) - 1)]
        self.flavour = next(iter(entries.values()))["flavour"]
        import importlib

        self.trt = trt = importlib.import_module(PKG[self.flavour])
        self.cudart = cudart = _cudart()
        _ok(cudart.cudaSetDevice(int(self.gpu["index"])), "cudaSetDevice")
        self.stream = int(_ok(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreate"))
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.cache_dir = Path(os.environ.get("LARP_RT_TRT_CACHE", Path.home() / ".cache" / "larp_rt" / "tensorrt"))
        self.plans = {name: _Plan(self, name, e) for name, e in entries.items()}
        self._io: dict[tuple[str, int], dict] = {}
        self._lock = threading.Lock()  # encode/decode share the stream and the per-bucket buffers
        self._kernels: _Kernels | None = None
        from .. import kernels

        self.cuda_sampler = sampler in ("auto", "kernel") and kernels.cuda_library() is not None
        if sampler == "kernel" and not self.cuda_sampler:
            raise ValueError("sampler='kernel' needs the built CUDA sampling kernels (liblarp_sampling_cuda.so; "
                             "reinstall with nvcc on PATH); use sampler='auto'")
        self.sampler_name = "kernel" if self.cuda_sampler else "reference"
        if not self.cuda_sampler and kernels.cpu_library() is not None and sampler == "auto":
            self.sampler, self.sampler_takes_uniform = kernels.sample_numpy, False

    def kernels(self) -> _Kernels:
        if self._kernels is None:
            self._kernels = _Kernels(self.gpu["cc"])
        return self._kernels

    def plan(self, name: str) -> _Plan:
        if name not in self.plans:
            raise BundleError(f"bundle {str(self.bundle.path)!r} has no {name!r} plan (it has "
                              f"{', '.join(self.plans) or 'none'}); rebuild with `larp-rt build {self.bundle.path}`")
        return self.plans[name]

    # encode / decode -------------------------------------------------------------------------
    def _run_graph(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        plan = self.plan(name)
        B = len(next(iter(feeds.values())))
        top = plan.buckets[-1]
        if B > top:  # in chunks of the biggest bucket
            parts = [self._run_graph(name, {k: v[i:i + top] for k, v in feeds.items()}) for i in range(0, B, top)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        bucket = plan.bucket_for(B)
        cudart, s = self.cudart, self.stream
        with self._lock:
            self.set_device()
            ctx = plan.context(bucket)
            io = self._io.get((name, bucket))
            if io is None:  # buffers at the bucket's largest shapes, once
                io = {}
                for n in plan.inputs + plan.outputs:
                    shape = [bucket if isinstance(d, str) else d for d in _entry_shape(plan.entry, n)]
                    io[n] = (_Device(cudart, int(np.prod(shape)) * plan.dtypes[n].itemsize), shape)
                self._io[(name, bucket)] = io
            for n in plan.inputs:
                x = np.ascontiguousarray(feeds[n], plan.dtypes[n])
                ctx.set_input_shape(n, x.shape)
                ctx.set_tensor_address(n, io[n][0].ptr)
                _ok(cudart.cudaMemcpyAsync(io[n][0].ptr, x.ctypes.data, x.nbytes,
                                           cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, s), "cudaMemcpyAsync")
            for n in plan.outputs:
                ctx.set_tensor_address(n, io[n][0].ptr)
            if not ctx.execute_async_v3(s):
                raise RuntimeError(f"TensorRT could not run plan {plan.entry['file']!r}")
            out = {}
            for n in plan.outputs:
                y = np.empty(tuple(ctx.get_tensor_shape(n)), plan.dtypes[n])
                _ok(cudart.cudaMemcpyAsync(y.ctypes.data, io[n][0].ptr, y.nbytes,
                                           cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync")
                out[n] = y
            _ok(cudart.cudaStreamSynchronize(s), "cudaStreamSynchronize")
        return out

    def encode(self, video: np.ndarray) -> np.ndarray:
        return self._run_graph("encoder", {"video": video})["indices"]

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        return self._run_graph("decoder", {"indices": tokens})["video"]

    def prior_logprobs_full(self, tokens: np.ndarray) -> np.ndarray:
        return self._run_graph("prior_score", {"tokens": tokens})["logprobs"]

    # generation ------------------------------------------------------------------------------
    def new_runner(self, capacity: int) -> _TrtRunner:
        return _TrtRunner(self, capacity)

    def generate_iter(self, class_ids: np.ndarray, params):
        """Every request from step 0 (``Engine.generate``). With the device sampler the steps run in chunks of
        ``LARP_RT_TRT_CHUNK`` (default 16) as one CUDA graph each: the sampled tokens feed the next step on the
        device and reach the host once per chunk (one synchronisation per chunk, not per step). Without it (or
        ``LARP_RT_TRT_CHUNK=0``) the shared per-step loop runs."""
        chunk = int(os.environ.get("LARP_RT_TRT_CHUNK", "16"))
        if not self.cuda_sampler or chunk <= 0:
            yield from super().generate_iter(class_ids, params)
            return
        cfg = self.generator_config
        B, N, V = len(class_ids), cfg.max_seq_len, cfg.vocab_size
        guided = np.flatnonzero(params.cfg_scale != 1.0)
        G = len(guided)
        runner = self.runner(B + G)
        null = np.arange(B, B + G)
        row_req = np.full(runner.capacity, -1, np.int64)
        row_req[:B] = np.arange(B)
        row_req[null] = guided
        first = np.zeros(runner.capacity, np.int64)
        first[:B] = V + class_ids
        first[null] = V + cfg.null_class
        if G:
            uncond = np.arange(B)
            uncond[guided] = null
            sample_rows = np.concatenate([np.arange(B), uncond])
        else:
            sample_rows = np.arange(B)
        for k, tokens in runner.run_chunks(first, row_req, sample_rows, params, N, cfg.cls_token_num, chunk):
            if (tokens < 0).any():
                from .base import NON_FINITE

                raise ValueError(NON_FINITE)
            yield StepEvent(k, N, tokens)

    def prior_runner(self, capacity: int) -> _TrtRunner:
        """A StepRunner over the prior's step plan (``run(tokens, pos)`` -> (rows, K) logits; host sampler)."""
        if self.bundle.prior is None:
            raise ValueError(f"bundle {str(self.bundle.path)!r} has no AR prior")
        return _TrtRunner(self, capacity, graph=self.bundle.prior["graph"])

    @property
    def prior_sampler(self):
        from .. import kernels

        return kernels.sample_numpy if kernels.cpu_library() is not None else sampling.sample

    def set_device(self) -> None:
        """Make this backend's GPU current on the calling thread (runners may step on a scheduler's thread)."""
        _ok(self.cudart.cudaSetDevice(int(self.gpu["index"])), "cudaSetDevice")

    def close(self) -> None:
        super().close()
        for p in getattr(self, "plans", {}).values():
            p.save_cache()
        for io in getattr(self, "_io", {}).values():
            for buf, _ in io.values():
                buf.free()
        self._io = {}


def _entry_shape(entry: dict, name: str) -> list:
    """An I/O tensor's largest shape over the plan's profiles (symbols resolved to each profile's max)."""
    for d in entry["inputs"] + entry["outputs"]:
        if d["name"] == name:
            hi = {}
            for prof in entry["profiles"]:
                for sym, (_, _, mx) in prof.items():
                    hi[sym] = max(hi.get(sym, 0), mx)
            return [hi.get(x, x) if isinstance(x, str) else x for x in d["shape"]]
    raise KeyError(name)


class _TrtRunner(StepRunner):
    """The decode plan over ``capacity`` rows (a batch bucket of the plan; every step runs all of them, idle rows at
    position 0), its KV cache on the device, the step + KV write + sampling captured as CUDA graphs."""

    def __init__(self, be: TensorRTBackend, capacity: int, graph: str = "decode"):
        self.be = be
        be.set_device()
        plan = self.plan = be.plan(graph)
        self.capacity = plan.bucket_for(capacity)
        cap = self.capacity
        self.ctx = plan.context(cap, shared=False)
        if graph == "decode":
            cfg = be.generator_config
            if cfg is None:
                raise ValueError("this bundle has no generator")
            kv = be.bundle.kv_cache
            self.L, self.H, self.hd, self.V = cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.vocab_size
            self.samples = be.cuda_sampler
        else:  # the tokenizer's prior: its own cache geometry, logits to the host sampler
            kv = be.bundle.prior["kv_cache"]
            self.L, self.H, self.hd = int(kv["layers"]), int(kv["heads"]), int(kv["head_dim"])
            self.V = int(be.bundle.prior["codebook_size"])
            self.samples = False
        plan_max = max(p["S"][2] for p in plan.entry["profiles"] if "S" in p) if plan.entry["profiles"] else 0
        self.S = min(int(kv["max_seq"]), int(plan_max or kv["max_seq"]))
        self.window = max(16, self.S // 8)
        self.kv_dtype = plan.dtypes["past_k_0"]
        es = self.kv_dtype.itemsize
        cudart = self.cudart = be.cudart
        self.stream = be.stream
        n_cache = cap * self.H * self.S * self.hd * es
        self.cache = [_Device(cudart, n_cache) for _ in range(2 * self.L)]  # k_0, v_0, k_1, ...
        self.scratch = _Device(cudart, n_cache)
        self.present = [_Device(cudart, cap * self.H * self.hd * es) for _ in range(2 * self.L)]
        self.d_token = _Device(cudart, cap * 8)
        self.d_pos = _Device(cudart, cap * 8)
        self.d_logits = _Device(cudart, cap * self.V * 4)
        self.h_token = _Pinned(cudart, (cap, 1), np.int64)
        self.h_pos = _Pinned(cudart, (cap,), np.int64)
        ptrs = np.array([c.ptr for c in self.cache] + [p.ptr for p in self.present], np.uint64)
        self.d_ptrs = _Device(cudart, ptrs.nbytes)
        _ok(cudart.cudaMemcpy(self.d_ptrs.ptr, ptrs.ctypes.data, ptrs.nbytes,
                              cudart.cudaMemcpyKind.cudaMemcpyHostToDevice), "cudaMemcpy")
        if self.samples:
            self.h_rows = _Pinned(cudart, (2 * cap,), np.int64)
            self.d_rows = _Device(cudart, 2 * cap * 8)
            self.d_gathered = _Device(cudart, 2 * cap * self.V * 4)
            self.h_par = {n: _Pinned(cudart, (cap,), t) for n, t in (
                ("cfg_scale", np.float32), ("temperature", np.float32), ("top_k", np.int64), ("top_p", np.float32),
                ("seed", np.uint64), ("stream", np.uint64), ("steps", np.int64))}
            self.d_par = {n: _Device(cudart, cap * 8) for n in self.h_par}
            self.d_tokens = _Device(cudart, cap * 8)
            self.h_tokens = _Pinned(cudart, (cap,), np.int64)
        else:
            self.h_logits = _Pinned(cudart, (cap, self.V), np.float32)
        self.width = 0
        self.graphs: dict[tuple, object] = {}
        self.use_graphs = os.environ.get("LARP_RT_TRT_CUDA_GRAPHS", "1") != "0"
        self.sample_key: tuple | None = None
        self._bind(min(self.window, self.S))

    # binding ---------------------------------------------------------------------------------
    def _bind(self, width: int) -> None:
        ctx, cap = self.ctx, self.capacity
        ctx.set_input_shape("token", (cap, 1))
        ctx.set_input_shape("pos", (cap,))
        ctx.set_tensor_address("token", self.d_token.ptr)
        ctx.set_tensor_address("pos", self.d_pos.ptr)
        for j in range(2 * self.L):
            kvn = "kv"[j % 2]
            ctx.set_input_shape(f"past_{kvn}_{j // 2}", (cap, self.H, width, self.hd))
            ctx.set_tensor_address(f"past_{kvn}_{j // 2}", self.cache[j].ptr)
            ctx.set_tensor_address(f"present_{kvn}_{j // 2}", self.present[j].ptr)
        ctx.set_tensor_address("logits", self.d_logits.ptr)
        self.width = width

    def _rewidth(self, width: int, keep: int) -> None:
        """Move the first ``keep`` slots of every row to the layout of window ``width`` (through the scratch
        buffer: source and destination layouts overlap), then rebind."""
        cudart, es, hd = self.cudart, self.kv_dtype.itemsize, self.hd
        if keep and self.width:
            rows = self.capacity * self.H
            kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
            for buf in self.cache:
                _ok(cudart.cudaMemcpy2DAsync(self.scratch.ptr, width * hd * es, buf.ptr, self.width * hd * es,
                                             keep * hd * es, rows, kind, self.stream), "cudaMemcpy2DAsync")
                _ok(cudart.cudaMemcpyAsync(buf.ptr, self.scratch.ptr, rows * width * hd * es, kind, self.stream),
                    "cudaMemcpyAsync")
        self._bind(width)

    # the step --------------------------------------------------------------------------------
    def _enqueue(self, B: int, R: int, guided: bool) -> None:
        """The step's work on the stream: inputs H2D, the plan, the KV writes, [gather + sample, tokens D2H]."""
        cudart, s, cap = self.cudart, self.stream, self.capacity
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _ok(cudart.cudaMemcpyAsync(self.d_token.ptr, self.h_token.ptr, cap * 8, h2d, s), "cudaMemcpyAsync")
        _ok(cudart.cudaMemcpyAsync(self.d_pos.ptr, self.h_pos.ptr, cap * 8, h2d, s), "cudaMemcpyAsync")
        if not self.ctx.execute_async_v3(s):
            raise RuntimeError("TensorRT could not run the decode plan")
        k = self.be.kernels()
        es = self.kv_dtype.itemsize
        name = "kv_write2" if es == 2 else "kv_write4"
        n = cap * self.H * self.hd
        grid = (max(1, min(1024, -(-n // 256))), 2 * self.L)
        k.launch(name, grid, 256, s, [(self.d_ptrs.ptr, ctypes.c_void_p),
                                      (self.d_ptrs.ptr + 2 * self.L * 8, ctypes.c_void_p),
                                      (self.d_pos.ptr, ctypes.c_void_p), (cap, ctypes.c_int),
                                      (self.H, ctypes.c_int), (self.width, ctypes.c_int), (self.hd, ctypes.c_int)])
        if not self.samples:
            _ok(cudart.cudaMemcpyAsync(self.h_logits.ptr, self.d_logits.ptr, cap * self.V * 4, d2h, s),
                "cudaMemcpyAsync")
            return
        from .. import kernels

        for nm, h in self.h_par.items():
            _ok(cudart.cudaMemcpyAsync(self.d_par[nm].ptr, h.ptr, B * 8 if h.array.itemsize == 8 else B * 4, h2d, s),
                "cudaMemcpyAsync")
        _ok(cudart.cudaMemcpyAsync(self.d_rows.ptr, self.h_rows.ptr, R * 8, h2d, s), "cudaMemcpyAsync")
        nV = R * self.V
        k.launch("gather_rows", (max(1, min(4096, -(-nV // 256))), 1), 256, s,
                 [(self.d_gathered.ptr, ctypes.c_void_p), (self.d_logits.ptr, ctypes.c_void_p),
                  (self.d_rows.ptr, ctypes.c_void_p), (R, ctypes.c_int), (self.V, ctypes.c_int)])
        p = self.d_par
        kernels.launch_cuda(cond=self.d_gathered.ptr, uncond=self.d_gathered.ptr + B * self.V * 4 if guided else None,
                            dtype="float32", batch=B, vocab=self.V, cfg_scale=p["cfg_scale"].ptr,
                            temperature=p["temperature"].ptr, top_k=p["top_k"].ptr, top_p=p["top_p"].ptr,
                            seed=p["seed"].ptr, stream_ids=p["stream"].ptr, tokens=self.d_tokens.ptr,
                            steps_ptr=p["steps"].ptr, cuda_stream=s)
        _ok(cudart.cudaMemcpyAsync(self.h_tokens.ptr, self.d_tokens.ptr, B * 8, d2h, s), "cudaMemcpyAsync")

    def _launch(self, B: int, R: int, guided: bool) -> None:
        cudart, s = self.cudart, self.stream
        key = (self.width, B, R, guided)
        if not self.use_graphs:
            self._enqueue(B, R, guided)
            return
        g = self.graphs.get(key)
        if g is None:
            self._enqueue(B, R, guided)  # eager once: JIT compilation and lazy allocations happen outside capture
            _ok(cudart.cudaStreamSynchronize(s), "cudaStreamSynchronize")
            if hasattr(self.ctx, "is_stream_capturable") and not self.ctx.is_stream_capturable(s):
                self.use_graphs = False
                return
            _ok(cudart.cudaStreamBeginCapture(s, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
                "cudaStreamBeginCapture")
            try:
                self._enqueue(B, R, guided)
            finally:
                graph = _ok(cudart.cudaStreamEndCapture(s), "cudaStreamEndCapture")
            g = self.graphs[key] = _ok(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
            return  # the eager run above was this step
        _ok(cudart.cudaGraphLaunch(g, s), "cudaGraphLaunch")

    def run(self, tokens: np.ndarray, pos: np.ndarray, sample: StepSample | None = None) -> np.ndarray:
        rows = len(tokens)
        if not 1 <= rows <= self.capacity:
            raise ValueError(f"a step takes 1..{self.capacity} rows, got {rows}")
        self.be.set_device()
        top = int(pos.max())
        if top >= self.S:
            raise ValueError(f"position {top} is past the cache's {self.S} slots")
        self.h_token.array[:rows, 0] = tokens
        self.h_token.array[rows:, 0] = 0
        self.h_pos.array[:rows] = pos
        self.h_pos.array[rows:] = 0  # rows beyond the step: idle at position 0 (their slot 0 is rewritten on join)
        need = min(self.S, -(-(top + 1) // self.window) * self.window)
        if need > self.width or need <= self.width // 2:
            self._rewidth(need, min(self.width, need))
        B = R = 0
        guided = False
        if self.samples:
            if sample is None:
                raise ValueError("the tensorrt runner samples on the device: pass the StepSample")
            B, R = len(sample.params), len(sample.rows)
            guided = R == 2 * B
            if (sample.version, B, R) != self.sample_key:
                self.h_rows.array[:R] = sample.rows
                for nm in ("cfg_scale", "temperature", "top_k", "top_p", "seed", "stream"):
                    self.h_par[nm].array[:B] = getattr(sample.params, nm)
                self.sample_key = (sample.version, B, R)
            self.h_par["steps"].array[:B] = sample.steps
        self._launch(B, R, guided)
        _ok(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        if self.samples:
            return self.h_tokens.array[:B].copy()
        return self.h_logits.array[:rows]  # the host sampler raises the reference's NaN/Inf error naming the row

    def _chunk_buffers(self, chunk: int) -> None:
        if getattr(self, "chunk_len", 0) >= chunk:
            return
        cudart, cap = self.cudart, self.capacity
        for name in ("h_pos_tab", "d_pos_tab", "h_steps_tab", "d_steps_tab", "d_ring", "h_ring"):
            if hasattr(self, name):
                getattr(self, name).free()
        self.h_pos_tab = _Pinned(cudart, (chunk, cap), np.int64)
        self.d_pos_tab = _Device(cudart, chunk * cap * 8)
        self.h_steps_tab = _Pinned(cudart, (chunk, cap), np.int64)
        self.d_steps_tab = _Device(cudart, chunk * cap * 8)
        self.d_ring = _Device(cudart, chunk * cap * 8)
        self.h_ring = _Pinned(cudart, (chunk, cap), np.int64)
        self.d_row_req = getattr(self, "d_row_req", None) or _Device(cudart, cap * 8)
        self.chunk_len = chunk

    def _enqueue_chunk(self, n: int, B: int, R: int, guided: bool) -> None:
        """``n`` steps back to back: step j reads position row j of the table, samples into ring row j and feeds its
        tokens to step j + 1 on the device."""
        from .. import kernels

        s, cap = self.stream, self.capacity
        k = self.be.kernels()
        es = self.kv_dtype.itemsize
        kv = "kv_write2" if es == 2 else "kv_write4"
        n_kv = cap * self.H * self.hd
        p = self.d_par
        for j in range(n):
            pos_j = self.d_pos_tab.ptr + j * cap * 8
            self.ctx.set_tensor_address("pos", pos_j)
            if not self.ctx.execute_async_v3(s):
                raise RuntimeError("TensorRT could not run the decode plan")
            k.launch(kv, (max(1, min(1024, -(-n_kv // 256))), 2 * self.L), 256, s,
                     [(self.d_ptrs.ptr, ctypes.c_void_p), (self.d_ptrs.ptr + 2 * self.L * 8, ctypes.c_void_p),
                      (pos_j, ctypes.c_void_p), (cap, ctypes.c_int), (self.H, ctypes.c_int),
                      (self.width, ctypes.c_int), (self.hd, ctypes.c_int)])
            nV = R * self.V
            k.launch("gather_rows", (max(1, min(4096, -(-nV // 256))), 1), 256, s,
                     [(self.d_gathered.ptr, ctypes.c_void_p), (self.d_logits.ptr, ctypes.c_void_p),
                      (self.d_rows.ptr, ctypes.c_void_p), (R, ctypes.c_int), (self.V, ctypes.c_int)])
            ring_j = self.d_ring.ptr + j * B * 8
            kernels.launch_cuda(cond=self.d_gathered.ptr,
                                uncond=self.d_gathered.ptr + B * self.V * 4 if guided else None, dtype="float32",
                                batch=B, vocab=self.V, cfg_scale=p["cfg_scale"].ptr, temperature=p["temperature"].ptr,
                                top_k=p["top_k"].ptr, top_p=p["top_p"].ptr, seed=p["seed"].ptr,
                                stream_ids=p["stream"].ptr, tokens=ring_j,
                                steps_ptr=self.d_steps_tab.ptr + j * cap * 8, cuda_stream=s)
            k.launch("feed_tokens", (max(1, -(-cap // 256)), 1), 256, s,
                     [(self.d_token.ptr, ctypes.c_void_p), (ring_j, ctypes.c_void_p),
                      (self.d_row_req.ptr, ctypes.c_void_p), (cap, ctypes.c_int)])
        self.ctx.set_tensor_address("pos", self.d_pos.ptr)  # the per-step path's binding again

    def run_chunks(self, first: np.ndarray, row_req: np.ndarray, sample_rows: np.ndarray, params, N: int, cls: int,
                   chunk: int):
        """Generation from step 0 in chunks (see ``TensorRTBackend.generate_iter``): yields (step, (B,) tokens)."""
        if not self.samples:
            raise RuntimeError("chunked generation needs the device sampler")
        self.be.set_device()
        cudart, s, cap = self.cudart, self.stream, self.capacity
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        B, R = len(params), len(sample_rows)
        guided = R == 2 * B
        chunk = max(1, min(chunk, N))
        self._chunk_buffers(chunk)
        active = row_req >= 0
        # once per generation: the first step's tokens, the row map, the sampled rows and the parameters
        self.h_token.array[:, 0] = first
        self.h_rows.array[:R] = sample_rows
        for nm in ("cfg_scale", "temperature", "top_k", "top_p", "seed", "stream"):
            self.h_par[nm].array[:B] = getattr(params, nm)
        self.sample_key = None
        h_req = _Pinned(cudart, (cap,), np.int64)
        h_req.array[:] = row_req
        uploads = [(self.d_token.ptr, self.h_token.ptr, cap * 8), (self.d_row_req.ptr, h_req.ptr, cap * 8),
                   (self.d_rows.ptr, self.h_rows.ptr, R * 8)]
        uploads += [(self.d_par[nm].ptr, h.ptr, B * h.array.itemsize) for nm, h in self.h_par.items() if nm != "steps"]
        for dst, src, nbytes in uploads:
            _ok(cudart.cudaMemcpyAsync(dst, src, nbytes, h2d, s), "cudaMemcpyAsync")
        try:
            k0 = 0
            while k0 < N:
                n = min(chunk, N - k0)
                steps = np.arange(k0, k0 + n)
                pos = np.where(steps == 0, 0, cls - 1 + steps)  # step 0 prefills at 0; step k feeds at cls - 1 + k
                self.h_pos_tab.array[:n] = np.where(active[None, :], pos[:, None], 0)
                self.h_steps_tab.array[:n] = steps[:, None]
                _ok(cudart.cudaMemcpyAsync(self.d_pos_tab.ptr, self.h_pos_tab.ptr, n * cap * 8, h2d, s), "H2D")
                _ok(cudart.cudaMemcpyAsync(self.d_steps_tab.ptr, self.h_steps_tab.ptr, n * cap * 8, h2d, s), "H2D")
                top = int(pos.max())
                if top >= self.S:
                    raise ValueError(f"position {top} is past the cache's {self.S} slots")
                need = min(self.S, -(-(top + 1) // self.window) * self.window)
                if need > self.width or need <= self.width // 2:
                    self._rewidth(need, min(self.width, need))
                key = ("chunk", self.width, n, B, R, guided)
                g = self.graphs.get(key) if self.use_graphs else None
                if g is not None:
                    _ok(cudart.cudaGraphLaunch(g, s), "cudaGraphLaunch")
                else:
                    self._enqueue_chunk(n, B, R, guided)  # eager (the first time: JIT and lazy allocations)
                    if self.use_graphs:  # capture for the next chunk of this shape
                        _ok(cudart.cudaStreamSynchronize(s), "cudaStreamSynchronize")
                        _ok(cudart.cudaStreamBeginCapture(
                            s, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal), "BeginCapture")
                        try:
                            self._enqueue_chunk(n, B, R, guided)
                        finally:
                            graph = _ok(cudart.cudaStreamEndCapture(s), "cudaStreamEndCapture")
                        self.graphs[key] = _ok(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
                _ok(cudart.cudaMemcpyAsync(self.h_ring.ptr, self.d_ring.ptr, n * B * 8, d2h, s), "D2H")
                _ok(cudart.cudaStreamSynchronize(s), "cudaStreamSynchronize")  # once per chunk
                ring = self.h_ring.array.reshape(-1)[: n * B].reshape(n, B).copy()
                for j in range(n):
                    yield k0 + j, ring[j]
                k0 += n
        finally:
            h_req.free()

    def close(self) -> None:
        cudart = self.cudart
        for g in self.graphs.values():
            cudart.cudaGraphExecDestroy(g)
        self.graphs = {}
        bufs = [*self.cache, *self.present, self.scratch, self.d_token, self.d_pos, self.d_logits, self.d_ptrs,
                self.h_token, self.h_pos]
        if self.samples:
            bufs += [self.h_rows, self.d_rows, self.d_gathered, self.d_tokens, self.h_tokens, *self.h_par.values(),
                     *self.d_par.values()]
        else:
            bufs.append(self.h_logits)
        bufs += [getattr(self, n) for n in ("h_pos_tab", "d_pos_tab", "h_steps_tab", "d_steps_tab", "d_ring", "h_ring",
                                           "d_row_req") if getattr(self, n, None) is not None]
        for b in bufs:
            b.free()

