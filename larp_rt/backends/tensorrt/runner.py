"""TensorRT backend, layer 3 of 4: the step runner, the decode plan stepping on the GPU as CUDA graphs.

``TrtRunner`` owns one execution context of the decode (or prior step) plan over a batch bucket, the KV cache on
the device (bound with a cache window that follows the longest row, moved when it grows or shrinks), pinned
input and parameter buffers, and per step: inputs H2D, the plan, the KV slot writes, the sampled rows' gather and
the CUDA sampling kernel (``kernels.launch_cuda``), captured once per shape as a CUDA graph and replayed.
``run_chunks`` runs several steps per graph for generation from step 0, the tokens fed on the device.
It uses the device layer (buffers, NVRTC kernels) and the backend's loaded plans (through ``RunnerHost``, so it
imports nothing above it); it creates no plan itself.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Protocol

import numpy as np

from ... import kernels
from ...bundle import Bundle
from ...config import GeneratorConfig
from ..base import StepRunner, StepSample
from ..layout import cache_window, rebind_width, step_position
from .device import DeviceBuffer, KVKernels, PinnedBuffer, cuda_ok


class RunnerHost(Protocol):
    """What a runner uses of its backend (``backend.TensorRTBackend``, which sits above this module): the bundle,
    the loaded plans, the CUDA runtime, stream and GPU, and the NVRTC kernels."""

    bundle: Bundle
    generator_config: GeneratorConfig | None
    cuda_sampler: bool
    cudart: Any
    stream: int

    def plan(self, name: str) -> Any: ...

    def kernels(self) -> KVKernels: ...

    def set_device(self) -> None: ...


class TrtRunner(StepRunner):
    """The decode plan over ``capacity`` rows (a batch bucket of the plan; every step runs all of them, idle rows at
    position 0), its KV cache on the device, the step + KV write + sampling captured as CUDA graphs."""

    def __init__(self, be: RunnerHost, capacity: int, graph: str = "decode"):
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
            kv = be.bundle.kv_cache_spec
            self.L, self.H, self.hd, self.V = cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.vocab_size
            self.samples = be.cuda_sampler
        else:  # the tokenizer's prior: its own cache geometry, logits to the host sampler
            prior = be.bundle.prior_spec
            kv = prior.kv_cache
            self.L, self.H, self.hd = kv.layers, kv.heads, kv.head_dim
            self.V = prior.codebook_size
            self.samples = False
        self.S = min(kv.max_seq, plan.entry.max_of("S") or kv.max_seq)
        self.window = cache_window(self.S)
        self.kv_dtype = plan.dtypes["past_k_0"]
        es = self.kv_dtype.itemsize
        cudart = self.cudart = be.cudart
        self.stream = be.stream
        n_cache = cap * self.H * self.S * self.hd * es
        self.cache = [DeviceBuffer(cudart, n_cache) for _ in range(2 * self.L)]  # k_0, v_0, k_1, ...
        self.scratch = DeviceBuffer(cudart, n_cache)
        self.present = [DeviceBuffer(cudart, cap * self.H * self.hd * es) for _ in range(2 * self.L)]
        self.d_token = DeviceBuffer(cudart, cap * 8)
        self.d_pos = DeviceBuffer(cudart, cap * 8)
        self.d_logits = DeviceBuffer(cudart, cap * self.V * 4)
        self.h_token = PinnedBuffer(cudart, (cap, 1), np.int64)
        self.h_pos = PinnedBuffer(cudart, (cap,), np.int64)
        ptrs = np.array([c.ptr for c in self.cache] + [p.ptr for p in self.present], np.uint64)
        self.d_ptrs = DeviceBuffer(cudart, ptrs.nbytes)
        cuda_ok(cudart.cudaMemcpy(self.d_ptrs.ptr, ptrs.ctypes.data, ptrs.nbytes,
                                  cudart.cudaMemcpyKind.cudaMemcpyHostToDevice), "cudaMemcpy")
        if self.samples:
            self.h_rows = PinnedBuffer(cudart, (2 * cap,), np.int64)
            self.d_rows = DeviceBuffer(cudart, 2 * cap * 8)
            self.d_gathered = DeviceBuffer(cudart, 2 * cap * self.V * 4)
            self.h_par = {n: PinnedBuffer(cudart, (cap,), t) for n, t in (
                ("cfg_scale", np.float32), ("temperature", np.float32), ("top_k", np.int64), ("top_p", np.float32),
                ("seed", np.uint64), ("stream", np.uint64), ("steps", np.int64))}
            self.d_par = {n: DeviceBuffer(cudart, cap * 8) for n in self.h_par}
            self.d_tokens = DeviceBuffer(cudart, cap * 8)
            self.h_tokens = PinnedBuffer(cudart, (cap,), np.int64)
        else:
            self.h_logits = PinnedBuffer(cudart, (cap, self.V), np.float32)
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
                cuda_ok(cudart.cudaMemcpy2DAsync(self.scratch.ptr, width * hd * es, buf.ptr, self.width * hd * es,
                                                 keep * hd * es, rows, kind, self.stream), "cudaMemcpy2DAsync")
                cuda_ok(cudart.cudaMemcpyAsync(buf.ptr, self.scratch.ptr, rows * width * hd * es, kind, self.stream),
                        "cudaMemcpyAsync")
        self._bind(width)

    # the step --------------------------------------------------------------------------------
    def _enqueue(self, B: int, R: int, guided: bool) -> None:
        """The step's work on the stream: inputs H2D, the plan, the KV writes, [gather + sample, tokens D2H]."""
        cudart, s, cap = self.cudart, self.stream, self.capacity
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_ok(cudart.cudaMemcpyAsync(self.d_token.ptr, self.h_token.ptr, cap * 8, h2d, s), "cudaMemcpyAsync")
        cuda_ok(cudart.cudaMemcpyAsync(self.d_pos.ptr, self.h_pos.ptr, cap * 8, h2d, s), "cudaMemcpyAsync")
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
            cuda_ok(cudart.cudaMemcpyAsync(self.h_logits.ptr, self.d_logits.ptr, cap * self.V * 4, d2h, s),
                    "cudaMemcpyAsync")
            return
        for nm, h in self.h_par.items():
            nbytes = B * 8 if h.array.itemsize == 8 else B * 4
            cuda_ok(cudart.cudaMemcpyAsync(self.d_par[nm].ptr, h.ptr, nbytes, h2d, s), "cudaMemcpyAsync")
        cuda_ok(cudart.cudaMemcpyAsync(self.d_rows.ptr, self.h_rows.ptr, R * 8, h2d, s), "cudaMemcpyAsync")
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
        cuda_ok(cudart.cudaMemcpyAsync(self.h_tokens.ptr, self.d_tokens.ptr, B * 8, d2h, s), "cudaMemcpyAsync")

    def _launch(self, B: int, R: int, guided: bool) -> None:
        cudart, s = self.cudart, self.stream
        key = (self.width, B, R, guided)
        if not self.use_graphs:
            self._enqueue(B, R, guided)
            return
        g = self.graphs.get(key)
        if g is None:
            self._enqueue(B, R, guided)  # eager once: JIT compilation and lazy allocations happen outside capture
            cuda_ok(cudart.cudaStreamSynchronize(s), "cudaStreamSynchronize")
            if hasattr(self.ctx, "is_stream_capturable") and not self.ctx.is_stream_capturable(s):
                self.use_graphs = False
                return
            cuda_ok(cudart.cudaStreamBeginCapture(s, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
                    "cudaStreamBeginCapture")
            try:
                self._enqueue(B, R, guided)
            finally:
                graph = cuda_ok(cudart.cudaStreamEndCapture(s), "cudaStreamEndCapture")
            g = self.graphs[key] = cuda_ok(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
            return  # the eager run above was this step
        cuda_ok(cudart.cudaGraphLaunch(g, s), "cudaGraphLaunch")

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
        need = rebind_width(top, self.window, self.S, self.width)
        if need is not None:
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
        cuda_ok(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
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
        self.h_pos_tab = PinnedBuffer(cudart, (chunk, cap), np.int64)
        self.d_pos_tab = DeviceBuffer(cudart, chunk * cap * 8)
        self.h_steps_tab = PinnedBuffer(cudart, (chunk, cap), np.int64)
        self.d_steps_tab = DeviceBuffer(cudart, chunk * cap * 8)
        self.d_ring = DeviceBuffer(cudart, chunk * cap * 8)
        self.h_ring = PinnedBuffer(cudart, (chunk, cap), np.int64)
        self.d_row_req = getattr(self, "d_row_req", None) or DeviceBuffer(cudart, cap * 8)
        self.chunk_len = chunk

    def _enqueue_chunk(self, n: int, B: int, R: int, guided: bool) -> None:
        """``n`` steps back to back: step j reads position row j of the table, samples into ring row j and feeds its
        tokens to step j + 1 on the device."""
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
        h_req = PinnedBuffer(cudart, (cap,), np.int64)
        h_req.array[:] = row_req
        uploads = [(self.d_token.ptr, self.h_token.ptr, cap * 8), (self.d_row_req.ptr, h_req.ptr, cap * 8),
                   (self.d_rows.ptr, self.h_rows.ptr, R * 8)]
        uploads += [(self.d_par[nm].ptr, h.ptr, B * h.array.itemsize) for nm, h in self.h_par.items() if nm != "steps"]
        for dst, src, nbytes in uploads:
            cuda_ok(cudart.cudaMemcpyAsync(dst, src, nbytes, h2d, s), "cudaMemcpyAsync")
        try:
            k0 = 0
            while k0 < N:
                n = min(chunk, N - k0)
                steps = np.arange(k0, k0 + n)
                pos = step_position(steps, cls)  # step 0 prefills at 0; step k feeds at cls - 1 + k
                self.h_pos_tab.array[:n] = np.where(active[None, :], pos[:, None], 0)
                self.h_steps_tab.array[:n] = steps[:, None]
                cuda_ok(cudart.cudaMemcpyAsync(self.d_pos_tab.ptr, self.h_pos_tab.ptr, n * cap * 8, h2d, s), "H2D")
                cuda_ok(cudart.cudaMemcpyAsync(self.d_steps_tab.ptr, self.h_steps_tab.ptr, n * cap * 8, h2d, s), "H2D")
                top = int(pos.max())
                if top >= self.S:
                    raise ValueError(f"position {top} is past the cache's {self.S} slots")
                need = rebind_width(top, self.window, self.S, self.width)
                if need is not None:
                    self._rewidth(need, min(self.width, need))
                key = ("chunk", self.width, n, B, R, guided)
                g = self.graphs.get(key) if self.use_graphs else None
                if g is not None:
                    cuda_ok(cudart.cudaGraphLaunch(g, s), "cudaGraphLaunch")
                else:
                    self._enqueue_chunk(n, B, R, guided)  # eager (the first time: JIT and lazy allocations)
                    if self.use_graphs:  # capture for the next chunk of this shape
                        cuda_ok(cudart.cudaStreamSynchronize(s), "cudaStreamSynchronize")
                        cuda_ok(cudart.cudaStreamBeginCapture(
                            s, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal), "BeginCapture")
                        try:
                            self._enqueue_chunk(n, B, R, guided)
                        finally:
                            graph = cuda_ok(cudart.cudaStreamEndCapture(s), "cudaStreamEndCapture")
                        self.graphs[key] = cuda_ok(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
                cuda_ok(cudart.cudaMemcpyAsync(self.h_ring.ptr, self.d_ring.ptr, n * B * 8, d2h, s), "D2H")
                cuda_ok(cudart.cudaStreamSynchronize(s), "cudaStreamSynchronize")  # once per chunk
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
