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

The package, one job per module, each importing only those before it:

- ``device``: this machine's GPUs (``probe_gpus``, ``Machine``), the CUDA runtime, device and pinned buffers, and
  the NVRTC kernels whose source is ``kv_kernels.cu``;
- ``plans``: the plan checks against the manifest and this machine (``plan_issues``, ``check_plans``), no GPU;
- ``runner``: ``TrtRunner``, the step runner with its KV cache on the device and its CUDA graphs;
- ``backend``: ``TensorRTBackend``, the loaded plans, encode / decode and generation.

A test that replaces a module's name patches it where it is used (``backend.load_cudart``, ``backend.machine``,
``backend.LoadedPlan``, ``device.probe_gpus`` for ``machine()``), not on this package.
"""

from __future__ import annotations

from .backend import LoadedPlan, TensorRTBackend
from .device import (
    PKG,
    DeviceBuffer,
    KVKernels,
    Machine,
    PinnedBuffer,
    compile_ptx,
    installed_version,
    kernel_source,
    load_cudart,
    machine,
    probe_gpus,
)
from .plans import (
    FLAG,
    PLAN_MAGIC,
    PlanIssue,
    PlanMismatchError,
    TensorRTUnavailable,
    check_plans,
    plan_issues,
    read_plan_header,
    rebuild_command,
)
from .runner import TrtRunner

__all__ = ["TensorRTBackend", "Machine", "PlanMismatchError", "TensorRTUnavailable", "probe_gpus", "check_plans",
           "machine", "rebuild_command", "plan_issues", "PlanIssue", "read_plan_header", "PLAN_MAGIC",
           # module names importable before the split, and the layers' public pieces
           "PKG", "FLAG", "compile_ptx", "kernel_source", "installed_version", "load_cudart", "DeviceBuffer",
           "PinnedBuffer", "KVKernels", "LoadedPlan", "TrtRunner"]
