"""ONNX Runtime backend: the embedded default (CPU everywhere; CUDA / TensorRT execution providers when present).

The KV cache lives in buffers allocated once per batch bucket and bound with IO binding: the decode graph
reads them in place and returns only the new position's entries, which are written into slot ``pos``. On the
CPU the buffers are numpy arrays bound in growing windows (a step reads ~pos slots, not max_seq); on a GPU
provider they are device OrtValues and
the slot write is a strided device-to-device copy on the session's stream (cuda-python), so the cache never
crosses to the host. Inputs (token, pos) and outputs (logits, new entries) are bound to preallocated buffers
too: a decode step allocates nothing.
"""

from __future__ import annotations

import os

import numpy as np

from ..bundle import Bundle
from .base import Backend

__all__ = ["OnnxRuntimeBackend", "available_providers"]


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def _providers(device: str) -> list[str]:
    have = available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    gpu = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in have]
    if device == "cuda" and not gpu:
        raise RuntimeError(
            "device='cuda' needs onnxruntime-gpu (CUDAExecutionProvider); this onnxruntime has "
            f"{have}. Install larp_rt[gpu] in a venv without the CPU onnxruntime wheel, or use device='cpu'"
        )
    return gpu + ["CPUExecutionProvider"]


def _bucket(rows: int) -> int:
    return 1 << max(rows - 1, 0).bit_length()  # 1, 2, 4, 8, ...


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, *, device: str = "auto", threads: int | None = None):
        import onnxruntime as ort

        super().__init__(bundle.tokenizer_config, bundle.generator_config)
        self.ort = ort
        self.bundle = bundle
        self.providers = _providers(device)
        self.on_gpu = self.providers[0] != "CPUExecutionProvider"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads is not None:
            so.intra_op_num_threads = int(threads)
        if os.environ.get("LARP_RT_ORT_SPIN", "1") == "0":  # idle ORT threads stop spinning (shared CPUs)
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._so = so
        self._sessions: dict[str, object] = {}
        self._gen_state: _GenState | None = None
        self.kv_dtype = np.float16 if bundle.precision == "fp16" else np.float32
        from .. import kernels

        if kernels.available()["cpu"]:  # the fused CPU kernel: same draws as the reference, faster
            self.sampler = kernels.sample_numpy

    def session(self, name: str):
        if name not in self._sessions:
            path = self.bundle.graph_path(name)
            self._sessions[name] = self.ort.InferenceSession(str(path), self._so, providers=self.providers)
        return self._sessions[name]

    def encode(self, video: np.ndarray) -> np.ndarray:
        return self.session("encoder").run(["indices"], {"video": video})[0]

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        return self.session("decoder").run(["video"], {"indices": tokens})[0]

    # generation ------------------------------------------------------------------------------
    def _state(self, rows: int) -> _GenState:
        st = self._gen_state
        if st is None or st.capacity < rows:
            st = self._gen_state = _GenState(self, _bucket(rows))
        return st

    def _begin(self, class_ids: np.ndarray) -> np.ndarray:
        st = self._state(len(class_ids))
        st.bind(len(class_ids))
        V = self.generator_config.vocab_size
        return st.run(class_ids + V, 0)  # the prefill is the step at position 0 with class tokens

    def _step(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        return self._gen_state.run(tokens, pos)

    def close(self) -> None:
        self._sessions.clear()
        self._gen_state = None


class _GenState:
    """Preallocated, bound buffers for up to ``capacity`` rows.

    CPU caches grow in windows: the decode graph's cache length S is dynamic, and each step binds the cache as
    (rows, h, S_w, hd) with S_w the smallest multiple of ``window`` above ``pos`` (capped at max_seq), so a
    step reads about pos + window slots instead of all max_seq. Each layer's cache is one flat buffer of the
    full size allocated once; when the window grows, the written slots move in place to the wider layout
    (a handful of times per video). Nothing is allocated per step.
    """

    def __init__(self, be: OnnxRuntimeBackend, capacity: int):
        cfg, kv = be.generator_config, be.bundle.kv_cache
        self.be, self.capacity = be, capacity
        self.L, self.H, self.S, self.hd = cfg.n_layer, cfg.n_head, int(kv["max_seq"]), cfg.head_dim
        self.V = cfg.vocab_size
        self.window = max(16, self.S // 8)
        self.sess = be.session("decode")
        dt = be.kv_dtype
        self.token = np.zeros((capacity, 1), np.int64)
        self.pos = np.zeros(1, np.int64)
        self.logits = np.zeros((capacity, self.V), np.float32)
        if be.on_gpu:
            self.dev = _CudaCache(be, (capacity, self.H, self.S, self.hd), dt, self.L)
        else:
            self.dev = None
            size = capacity * self.H * self.S * self.hd
            self.flat = [np.zeros(size, dt) for _ in range(2 * self.L)]  # k_0, v_0, k_1, ...
            self.new = [np.zeros((capacity, self.H, 1, self.hd), dt) for _ in range(2 * self.L)]
        self.rows = 0
        self.width = 0  # current window S_w
        self.binding = None

    def _views(self, width: int) -> list[np.ndarray]:
        n = self.rows * self.H * width * self.hd
        return [f[:n].reshape(self.rows, self.H, width, self.hd) for f in self.flat]

    def bind(self, rows: int) -> None:
        io = self.sess.io_binding()

        def cpu_in(name: str, buf: np.ndarray) -> None:  # zero-copy: ORT reads our buffer in place
            io.bind_input(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)

        cpu_in("token", self.token[:rows])
        cpu_in("pos", self.pos)
        io.bind_output("logits", "cpu", 0, np.float32, [rows, self.V], self.logits[:rows].ctypes.data)
        self.binding, self.rows, self.width = io, rows, 0
        if self.dev is None:
            for j, buf in enumerate(self.new):
                name = f"present_{'kv'[j % 2]}_{j // 2}"
                io.bind_output(name, "cpu", 0, buf.dtype, list(buf[:rows].shape), buf[:rows].ctypes.data)
        else:
            self.dev.bind(io, rows)

    def _grow(self, pos: int) -> None:
        """Make the window hold slot ``pos``: move written slots [0, pos) to the wider layout and rebind."""
        width = min(self.S, -(-(pos + 1) // self.window) * self.window)
        written = min(pos, self.width)
        if written:
            old, new = self._views(self.width), self._views(width)
            for o, n in zip(old, new, strict=True):
                np.copyto(n[:, :, :written], o[:, :, :written])  # overlapping: numpy buffers the move
        self.views = self._views(width)
        for j, v in enumerate(self.views):
            self.binding.bind_input(f"past_{'kv'[j % 2]}_{j // 2}", "cpu", 0, v.dtype, list(v.shape), v.ctypes.data)
        self.width = width

    def run(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        rows = self.rows
        self.token[:rows, 0] = tokens
        self.pos[0] = pos
        if self.dev is None and pos >= self.width:
            self._grow(pos)
        self.sess.run_with_iobinding(self.binding)
        if self.dev is None:
            for cache, new in zip(self.views, self.new, strict=True):
                cache[:, :, pos] = new[:rows, :, 0]
        else:
            self.dev.write_slot(rows, pos)
        return self.logits[:rows]


class _CudaCache:
    """Device-resident caches for a GPU execution provider; the new entries are copied into slot ``pos`` with
    one strided cudaMemcpy2D per layer and tensor (B*h rows of hd elements, pitch S*hd). Synchronous on
    purpose: ORT's own stream is not ours, and run_with_iobinding has finished when it returns."""

    def __init__(self, be: OnnxRuntimeBackend, shape, dtype, layers: int):
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            try:
                from cuda import cudart  # older cuda-python
            except ImportError as e:
                raise RuntimeError("the ONNX Runtime GPU path needs cuda-python: pip install 'larp_rt[gpu]'") from e
        self.cudart = cudart
        ort = be.ort
        cap, H, S, hd = shape
        self.H, self.S, self.hd, self.L = H, S, hd, layers
        self.esize = np.dtype(dtype).itemsize
        dev_id = int(os.environ.get("LARP_RT_CUDA_DEVICE", "0"))
        zeros = np.zeros(shape, dtype)
        self.k = [ort.OrtValue.ortvalue_from_numpy(zeros, "cuda", dev_id) for _ in range(layers)]
        self.v = [ort.OrtValue.ortvalue_from_numpy(zeros, "cuda", dev_id) for _ in range(layers)]
        new = np.zeros((cap, H, 1, hd), dtype)
        self.new_k = [ort.OrtValue.ortvalue_from_numpy(new, "cuda", dev_id) for _ in range(layers)]
        self.new_v = [ort.OrtValue.ortvalue_from_numpy(new, "cuda", dev_id) for _ in range(layers)]
        self.dtype, self.dev_id = dtype, dev_id

    def bind(self, io, rows: int) -> None:
        shape_past = [rows, self.H, self.S, self.hd]
        shape_new = [rows, self.H, 1, self.hd]
        for i in range(self.L):
            io.bind_input(f"past_k_{i}", "cuda", self.dev_id, self.dtype, shape_past, self.k[i].data_ptr())
            io.bind_input(f"past_v_{i}", "cuda", self.dev_id, self.dtype, shape_past, self.v[i].data_ptr())
            io.bind_output(f"present_k_{i}", "cuda", self.dev_id, self.dtype, shape_new, self.new_k[i].data_ptr())
            io.bind_output(f"present_v_{i}", "cuda", self.dev_id, self.dtype, shape_new, self.new_v[i].data_ptr())

    def write_slot(self, rows: int, pos: int) -> None:
        row_bytes = self.hd * self.esize
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        for cache, new in ((self.k, self.new_k), (self.v, self.new_v)):
            for i in range(self.L):
                dst = cache[i].data_ptr() + pos * row_bytes
                err = self.cudart.cudaMemcpy2D(dst, self.S * row_bytes, new[i].data_ptr(), row_bytes,
                                               row_bytes, rows * self.H, kind)
                if int(err[0]) != 0:
                    raise RuntimeError(f"cudaMemcpy2D failed: {err}")

