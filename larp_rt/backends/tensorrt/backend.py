"""TensorRT backend, layer 4 of 4: ``TensorRTBackend``, the bundle's plans loaded and run on one GPU.

It checks the plans first (``plans.check_plans``: files and versions without a GPU, then the GPU probe), and only
then creates TensorRT and CUDA runtime objects: the deserialised plans (``LoadedPlan``: TensorRT's validity check,
refit of weight-stripped plans, one execution context per batch bucket, TensorRT-RTX's runtime cache), a stream,
and per-bucket device buffers for encode / decode / prior scoring. Generation steps run on ``runner.TrtRunner``;
``generate_iter`` runs chunks of steps as one CUDA graph each when the CUDA sampling kernel is built.
"""

from __future__ import annotations

import importlib
import os
import threading
from pathlib import Path

import numpy as np

from ... import kernels, sampling
from ...bundle import Bundle, BundleError
from ...manifest import PlanEntry
from ..base import Backend, StepEvent, device_row_exception
from ..layout import RowLayout
from .device import PKG, DeviceBuffer, KVKernels, cuda_ok, load_cudart, machine
from .plans import PlanMismatchError, check_plans, rebuild_command
from .runner import TrtRunner


class LoadedPlan:
    """One deserialised plan: its engine, one execution context per profile (batch bucket), created lazily."""

    def __init__(self, be: TensorRTBackend, name: str, entry: PlanEntry):
        trt = be.trt
        self.be, self.name, self.entry = be, name, entry
        blob = (be.bundle.path / entry.file).read_bytes()
        validity = getattr(be.runtime, "get_engine_validity", None)
        if validity is not None:
            state, diag = validity(blob)
            if state == trt.EngineValidity.INVALID:
                raise PlanMismatchError(
                    f"TensorRT says plan {entry.file!r} is not valid on this machine (diagnostics {diag}); "
                    f"{be.machine.describe()}; rebuild with "
                    f"`{rebuild_command(be.bundle, entry.flavour, be.gpu['cc'])}`")
        self.engine = be.runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise PlanMismatchError(f"TensorRT could not deserialise plan {entry.file!r}; rebuild with "
                                    f"`{rebuild_command(be.bundle, entry.flavour, be.gpu['cc'])}`")
        if entry.weights == "stripped":  # refit from the bundle's own ONNX weights
            refitter = trt.Refitter(self.engine, be.logger)
            parser = trt.OnnxParserRefitter(refitter, be.logger)
            if not parser.refit_from_file(str(be.bundle.path / entry.onnx)) or not refitter.refit_cuda_engine():
                raise RuntimeError(f"refitting weight-stripped plan {entry.file!r} from {entry.onnx} failed")
        self.buckets = list(entry.buckets or ())
        self.inputs = [i.name for i in entry.inputs or ()]
        self.outputs = [o.name for o in entry.outputs or ()]
        self.dtypes = {d.name: np.dtype(d.dtype) for d in (*(entry.inputs or ()), *(entry.outputs or ()))}
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
                    self.cache_path = be.cache_dir / f"{self.entry.sha256[:24]}-{be.gpu['cc']}.rtcache"
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
        raise ValueError(f"plan {self.entry.file!r} serves at most {self.buckets[-1]} rows, got {rows}; rebuild "
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
        self.flavour = next(iter(entries.values())).flavour
        self.trt = trt = importlib.import_module(PKG[self.flavour])
        self.cudart = cudart = load_cudart()
        cuda_ok(cudart.cudaSetDevice(int(self.gpu["index"])), "cudaSetDevice")
        self.stream = int(cuda_ok(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreate"))
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.cache_dir = Path(os.environ.get("LARP_RT_TRT_CACHE", Path.home() / ".cache" / "larp_rt" / "tensorrt"))
        self.plans = {name: LoadedPlan(self, name, e) for name, e in entries.items()}
        self._io: dict[tuple[str, int], dict] = {}
        self._lock = threading.Lock()  # encode/decode share the stream and the per-bucket buffers
        self._kernels: KVKernels | None = None
        self.cuda_sampler = sampler in ("auto", "kernel") and kernels.cuda_library() is not None
        if sampler == "kernel" and not self.cuda_sampler:
            raise ValueError("sampler='kernel' needs the built CUDA sampling kernels (liblarp_sampling_cuda.so; "
                             "reinstall with nvcc on PATH); use sampler='auto'")
        self.sampler_name = "kernel" if self.cuda_sampler else "reference"
        if not self.cuda_sampler and kernels.cpu_library() is not None and sampler == "auto":
            self.sampler, self.sampler_takes_uniform = kernels.sample_numpy, False

    def kernels(self) -> KVKernels:
        """The backend's own NVRTC kernels (KV write, row gather, token feed), compiled on first use."""
        if self._kernels is None:
            self._kernels = KVKernels(self.gpu["cc"])
        return self._kernels

    def plan(self, name: str) -> LoadedPlan:
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
                    shape = [bucket if isinstance(d, str) else d for d in plan.entry.max_shape(n)]
                    io[n] = (DeviceBuffer(cudart, int(np.prod(shape)) * plan.dtypes[n].itemsize), shape)
                self._io[(name, bucket)] = io
            for n in plan.inputs:
                x = np.ascontiguousarray(feeds[n], plan.dtypes[n])
                ctx.set_input_shape(n, x.shape)
                ctx.set_tensor_address(n, io[n][0].ptr)
                cuda_ok(cudart.cudaMemcpyAsync(io[n][0].ptr, x.ctypes.data, x.nbytes,
                                           cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, s), "cudaMemcpyAsync")
            for n in plan.outputs:
                ctx.set_tensor_address(n, io[n][0].ptr)
            if not ctx.execute_async_v3(s):
                raise RuntimeError(f"TensorRT could not run plan {plan.entry.file!r}")
            out = {}
            for n in plan.outputs:
                y = np.empty(tuple(ctx.get_tensor_shape(n)), plan.dtypes[n])
                cuda_ok(cudart.cudaMemcpyAsync(y.ctypes.data, io[n][0].ptr, y.nbytes,
                                           cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync")
                out[n] = y
            cuda_ok(cudart.cudaStreamSynchronize(s), "cudaStreamSynchronize")
        return out

    def encode(self, video: np.ndarray) -> np.ndarray:
        return self._run_graph("encoder", {"video": video})["indices"]

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        return self._run_graph("decoder", {"indices": tokens})["video"]

    def encode_latents(self, video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, N, d) normalised latents of the encoder plan (its ``latents`` output, next to the indices) and the
        bundle's normalised codebook (K, d) (``codebook.npy``): the inputs of the stochastic SVQ draw."""
        if "latents" not in self.plan("encoder").outputs:
            raise self._lacks("stochastic encoder (encode_latents: this bundle's encoder plan has no 'latents' "
                              "output; rebuild it from a re-exported bundle)")
        codes = self.bundle.load_codebook()
        return self._run_graph("encoder", {"video": video})["latents"], codes

    def prior_logprobs_full(self, tokens: np.ndarray) -> np.ndarray:
        return self._run_graph("prior_score", {"tokens": tokens})["logprobs"]

    # generation ------------------------------------------------------------------------------
    def new_runner(self, capacity: int) -> TrtRunner:
        return TrtRunner(self, capacity)

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
        N, V = cfg.max_seq_len, cfg.vocab_size
        layout = RowLayout.offline(params.cfg_scale != 1.0)  # requests on rows [0, B), then their null rows
        runner = self.runner(layout.num_rows)
        cap = runner.capacity
        row_req = layout.row_request(cap)
        first = layout.row_values(V + np.asarray(class_ids, np.int64), V + cfg.null_class, cap)
        for k, tokens in runner.run_chunks(first, row_req, layout.sample_rows(), params, N, cfg.cls_token_num,
                                           chunk):
            bad = np.flatnonzero(tokens < 0)
            if len(bad):  # the kernel marked a row: -1 NaN/Inf logits, -2 parameters out of bounds
                raise device_row_exception(tokens[bad[0]], row=int(bad[0]))
            yield StepEvent(k, N, tokens)

    def prior_runner(self, capacity: int) -> TrtRunner:
        """A StepRunner over the prior's step plan (``run(tokens, pos)`` -> (rows, K) logits; host sampler)."""
        prior = self.bundle.prior_spec
        if prior is None:
            raise ValueError(f"bundle {str(self.bundle.path)!r} has no AR prior")
        return TrtRunner(self, capacity, graph=prior.graph)

    @property
    def prior_sampler(self):
        return kernels.sample_numpy if kernels.cpu_library() is not None else sampling.sample

    def set_device(self) -> None:
        """Make this backend's GPU current on the calling thread (runners may step on a scheduler's thread)."""
        cuda_ok(self.cudart.cudaSetDevice(int(self.gpu["index"])), "cudaSetDevice")

    def close(self) -> None:
        super().close()
        for p in getattr(self, "plans", {}).values():
            p.save_cache()
        for io in getattr(self, "_io", {}).values():
            for buf, _ in io.values():
                buf.free()
        self._io = {}
