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
from collections.abc import Iterator

import numpy as np

from .. import sampling
from ..bundle import Bundle
from ..sampling import RowParams
from .base import NON_FINITE, Backend, StepEvent

__all__ = ["OnnxRuntimeBackend", "SAMPLERS", "available_providers"]


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


SAMPLERS = ("auto", "fused", "kernel", "graph", "reference")


class OnnxRuntimeBackend(Backend):
    """sampler: how tokens are drawn (identical draws for the same seeds, see larp_rt/sampling.py):
    "fused" = the bundle's decode_sample graph (decode + the custom larp_rt::Sample op, one run per token);
    "kernel" = decode graph + the C++ kernel through ctypes; "graph" = decode graph + the bundle's standard-ops
    sample graph; "reference" = decode graph + the numpy reference; "auto" = the fastest available here."""

    name = "onnxruntime"

    def __init__(self, bundle: Bundle, *, device: str = "auto", threads: int | None = None, sampler: str = "auto"):
        import onnxruntime as ort

        super().__init__(bundle.tokenizer_config, bundle.generator_config)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
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
        if bundle.generator_config is not None:
            self._choose_sampler(sampler)

    def _choose_sampler(self, want: str) -> None:
        from .. import kernels

        info = kernels.available()
        lib_ok = info["ort_library"] is not None and not info["disabled"]
        has_fused = "decode_sample" in self.bundle.graphs
        if want == "fused" and not (has_fused and lib_ok):
            why = ("the bundle has no decode_sample graph (export with --fused-sampler)" if not has_fused else
                   "the ONNX Runtime custom-op library is " + ("disabled" if info["disabled"] else "not built"))
            raise ValueError(f"sampler='fused' is not available: {why}; use sampler='auto'")
        if want == "kernel" and not (info["cpu"] and not info["disabled"]):
            raise ValueError("sampler='kernel' needs the built CPU kernels (pip install -e .; see cpp_ext/README.md)"
                             " and LARP_RT_DISABLE_KERNELS unset; use sampler='auto'")
        if want == "auto":
            # CPU: the fused graph is the fastest (its attention node replaces ~15 standard ones per layer; see
            # the README's results). GPU providers: its DecodeAttention node runs on the CPU only (ONNX Runtime
            # would copy the cache to the host every step), so the decode graph + the standard-ops sample graph
            if has_fused and lib_ok and not self.on_gpu:
                want = "fused"
            elif info["cpu"] and not info["disabled"] and not self.on_gpu:
                want = "kernel"
            elif self.on_gpu and "sample" in self.bundle.graphs:
                want = "graph"
            else:
                want = "reference"
        self.sampler_name = want
        if want == "fused":
            self._so.register_custom_ops_library(kernels.ort_custom_op_library())
        elif want == "kernel":
            self.sampler, self.sampler_takes_uniform = kernels.sample_numpy, False
        elif want == "graph":
            self.sampler = self._graph_sampler
        # "reference": the base class default

    def session(self, name: str):
        if name not in self._sessions:
            path = self.bundle.graph_path(name)
            self._sessions[name] = self.ort.InferenceSession(str(path), self._so, providers=self.providers)
        return self._sessions[name]

    def encode(self, video: np.ndarray) -> np.ndarray:
        return self.session("encoder").run(["indices"], {"video": video})[0]

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        return self.session("decoder").run(["video"], {"indices": tokens})[0]

    # sampling through the bundle's standard-ops graph -----------------------------------------
    def _graph_sampler(self, cond, uncond, params: RowParams, step: int, u=None) -> np.ndarray:
        logits = cond if uncond is None else np.concatenate([cond, uncond])
        if u is None:
            u = sampling.uniform(params.seed, params.stream, step)
        tokens = self.session("sample").run(["tokens"], {
            "logits": np.ascontiguousarray(logits, np.float32), "cfg_scale": params.cfg_scale,
            "temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p,
            "uniform": np.ascontiguousarray(u, np.float64)})[0]
        if (tokens < 0).any():
            sampling.sample(cond, uncond, params, step)  # raises the reference's error naming the row
        return tokens

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

    def generate_iter(self, class_ids: np.ndarray, params: RowParams) -> Iterator[StepEvent]:
        if self.sampler_name != "fused":
            yield from super().generate_iter(class_ids, params)
            return
        # the fused graph samples in the graph: rows are B, or 2B with a null row for every request when any
        # uses guidance (cfg_scale == 1 rows then mix to exactly their cond logits, as in the reference)
        cfg = self.generator_config
        B, N = len(class_ids), cfg.max_seq_len
        guided = params.uses_cfg
        ids = np.concatenate([class_ids, np.full(B, cfg.null_class, np.int64)]) if guided else class_ids
        st = self._state(len(ids))
        st.bind(len(ids), params)
        tokens = st.run(ids + cfg.vocab_size, 0, sample_step=0)
        for k in range(N):
            if k:
                row_tokens = np.concatenate([tokens, tokens]) if guided else tokens
                tokens = st.run(row_tokens, cfg.cls_token_num + k - 1, sample_step=k)
            if (tokens < 0).any():
                raise ValueError(NON_FINITE)
            yield StepEvent(k, N, tokens.copy())

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
        self.fused = be.sampler_name == "fused"
        self.sess = be.session("decode_sample" if self.fused else "decode")
        dt = be.kv_dtype
        self.token = np.zeros((capacity, 1), np.int64)
        self.pos = np.zeros(1, np.int64)
        if self.fused:  # per-request sampling inputs and the drawn tokens
            self.sample_step = np.zeros((), np.int64)
            self.params = {n: np.zeros(capacity, t) for n, t in (
                ("cfg_scale", np.float32), ("temperature", np.float32), ("top_k", np.int64), ("top_p", np.float32),
                ("seed", np.int64), ("stream", np.int64))}
            self.tokens = np.zeros(capacity, np.int64)
            self.logprobs = np.zeros(capacity, np.float64)
        else:
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

    def bind(self, rows: int, params: RowParams | None = None) -> None:
        io = self.sess.io_binding()

        def cpu_in(name: str, buf: np.ndarray) -> None:  # zero-copy: ORT reads our buffer in place
            io.bind_input(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)

        cpu_in("token", self.token[:rows])
        cpu_in("pos", self.pos)
        if self.fused:
            assert params is not None
            B = len(params)
            for name, buf in self.params.items():
                src = getattr(params, name)
                buf[:B] = src.view(np.int64) if src.dtype == np.uint64 else src
                cpu_in(name, buf[:B])
            cpu_in("sample_step", self.sample_step)
            io.bind_output("tokens", "cpu", 0, np.int64, [B], self.tokens[:B].ctypes.data)
            io.bind_output("logprobs", "cpu", 0, np.float64, [B], self.logprobs[:B].ctypes.data)
            self.batch = B
        else:
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

    def run(self, tokens: np.ndarray, pos: int, sample_step: int | None = None) -> np.ndarray:
        """One step; returns the (rows, V) logits, or with the fused graph the (B,) drawn tokens."""
        rows = self.rows
        self.token[:rows, 0] = tokens
        self.pos[0] = pos
        if self.dev is None and pos >= self.width:
            self._grow(pos)
        if self.fused:
            self.sample_step[...] = sample_step
            try:
                self.sess.run_with_iobinding(self.binding)
            except Exception as e:  # the op's CPU kernel refuses non-finite logits with the reference's message
                msg = str(e)
                if "NaN/Inf" in msg:
                    raise ValueError(msg[msg.index("larp_rt.Sample"):] if "larp_rt.Sample" in msg else msg) from None
                raise
        else:
            self.sess.run_with_iobinding(self.binding)
        if self.dev is None:
            for cache, new in zip(self.views, self.new, strict=True):
                cache[:, :, pos] = new[:rows, :, 0]
        else:
            self.dev.write_slot(rows, pos)
        return self.tokens[: self.batch] if self.fused else self.logits[:rows]


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

