"""ONNX Runtime backend: the embedded default (CPU everywhere; CUDA / TensorRT execution providers when present).

The KV cache lives in buffers allocated once per runner (a batch bucket, or a scheduler's rows) and bound with IO
binding: the decode graph reads them in place and returns only the new entries, which row r writes into its
slot ``pos[r]`` (every row at its own position). On the CPU the buffers are numpy arrays (bound in windows that
follow the longest row for the standard-ops attention, so a step reads ~pos slots, not max_seq); on a GPU
provider they are device OrtValues and the slot writes are strided device-to-device copies (cuda-python), so the
cache never crosses to the host. Inputs (token, pos) and outputs (logits, new entries) are bound to preallocated
buffers too: a decode step allocates nothing.

The tokenizer's prior steps run the bundle's ``prior_fused`` graph (its attention one larp_rt::DecodeAttention
node per layer, reading only each row's written slots: the cache is bound at full length once) when the bundle
has it, the custom-op library is built and not disabled and the provider is the CPU; else ``prior`` (standard ops,
cache windows). ``backend.prior_graph_name`` says which one the next prior run uses.

Thread safety: ONNX Runtime sessions may run from several threads at once; sessions are created under a lock,
and every runner (the backend's own, a scheduler's) has its own buffers and IO binding.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from .. import sampling
from ..bundle import Bundle
from ..errors import NonFiniteLogitsError, kernel_error
from ..manifest import KVCacheSpec
from ..sampling import RowParams
from .base import Backend, StepRunner, StepSample
from .layout import cache_window, rebind_width, window_width

__all__ = ["OnnxRuntimeBackend", "SAMPLERS", "PRIOR_GRAPHS", "available_providers", "prefaulted"]


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


def prefaulted(size: int, dtype) -> np.ndarray:
    """A zeroed buffer whose pages are already mapped: ``np.zeros`` of a large size maps the zero page lazily, so
    the first step that writes the cache would pay every page fault (about 1.2 s for 537 MB on this project's CPU
    machine). Writing the zeros here moves that cost to the runner's creation (start-up)."""
    buf = np.empty(size, dtype)
    buf.fill(0)
    return buf


SAMPLERS = ("auto", "fused", "kernel", "graph", "reference")
# the prior's step graph: "auto" = the fused one where it can run, else prior.onnx; "fused" = the fused one or an
# error saying why not; "standard" = prior.onnx (standard ops)
PRIOR_GRAPHS = ("auto", "fused", "standard")
KV_NUMPY = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}  # the manifest's kv_cache dtype


class OnnxRuntimeBackend(Backend):
    """sampler: how tokens are drawn (identical draws for the same seeds, see larp_rt/sampling.py):
    "fused" = the bundle's decode_sample graph (decode + the custom larp_rt::Sample op, one run per token);
    "kernel" = decode graph + the C++ kernel through ctypes; "graph" = decode graph + the bundle's standard-ops
    sample graph; "reference" = decode graph + the numpy reference; "auto" = the fastest available here.
    prior_graph: the prior's step graph (PRIOR_GRAPHS): "auto" = the bundle's fused graph where it can run (see the
    module docstring), else prior.onnx; "fused" = the fused graph (an error says why it cannot run); "standard" =
    prior.onnx. Both give the same logits within float32 rounding and draw the same tokens."""

    name = "onnxruntime"

    def __init__(self, bundle: Bundle, *, device: str = "auto", threads: int | None = None, sampler: str = "auto",
                 prior_graph: str = "auto"):
        import onnxruntime as ort

        super().__init__(bundle.tokenizer_config, bundle.generator_config)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if prior_graph not in PRIOR_GRAPHS:
            raise ValueError(f"prior_graph must be one of {', '.join(PRIOR_GRAPHS)}, got {prior_graph!r}")
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
        self._session_lock = threading.Lock()
        self._custom_ops = False
        kv = bundle.kv_cache_spec or KVCacheSpec()  # none without a generator: the weights' float type
        self.kv_dtype = KV_NUMPY[kv.dtype_or(bundle.precision)]
        self.kv_scaled = self.kv_dtype == np.int8  # per-slot float32 scales beside the int8 cache
        if bundle.generator_config is not None:
            if kv.attention == "larp_rt::DecodeAttention":  # a narrow cache read by the fused op
                self._need_custom_ops(f"the bundle's {kv.dtype} KV cache")
            self._choose_sampler(sampler)
        self.prior_graph = prior_graph
        if prior_graph == "fused" and (why := self._prior_fused_unavailable()) is not None:
            raise ValueError(f"prior_graph='fused' is not available: {why}; use prior_graph='auto'")

    def _need_custom_ops(self, what: str) -> None:
        """Register the custom-op library (once), or say why this install cannot run ``what``."""
        from .. import kernels

        if self.on_gpu:
            raise ValueError(f"{what} is read by larp_rt::DecodeAttention, a CPU op (ONNX Runtime would copy the "
                             "cache to the host every step): use device='cpu', or export without --kv-dtype for "
                             "GPU providers")
        if kernels.ort_custom_op_library() is None or kernels.disabled():
            why = "disabled (LARP_RT_DISABLE_KERNELS)" if kernels.disabled() else "not built"
            raise ValueError(f"{what} needs the ONNX Runtime custom-op library (liblarp_rt_ort.so), which is {why} "
                             "here: reinstall with `pip install -e .` (see cpp_ext/README.md) or re-export the "
                             "bundle without --kv-dtype")
        if not self._custom_ops:
            self._so.register_custom_ops_library(kernels.ort_custom_op_library())
            self._custom_ops = True

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
        self.sampler_reason = "asked for"
        if want == "auto":
            # CPU: the fused graph is the fastest (its attention node reads only the written cache slots and
            # replaces ~15 standard ones per layer; see the README's results). GPU providers: its DecodeAttention
            # node runs on the CPU only (ONNX Runtime would copy the cache to the host every step), so the decode
            # graph + the standard-ops sample graph
            lib_why = "disabled (LARP_RT_DISABLE_KERNELS)" if info["disabled"] else "not built"
            if has_fused and lib_ok and not self.on_gpu:
                want, why = "fused", "decode_sample.onnx: the DecodeAttention + Sample ops in the step, the fastest"
            elif info["cpu"] and not info["disabled"] and not self.on_gpu:
                want = "kernel"
                why = ("decode.onnx + the C++ sampling kernel: the bundle has no decode_sample.onnx (re-export it "
                       "with the kernels built for the faster fused step)" if not has_fused else
                       f"decode.onnx + the C++ sampling kernel: the custom-op library of decode_sample.onnx is "
                       f"{lib_why} here")
            elif self.on_gpu and "sample" in self.bundle.graphs:
                want, why = "graph", "decode.onnx + sample.onnx on the GPU provider (the fused ops are CPU-only)"
            else:
                want, why = "reference", f"decode.onnx + the numpy reference: the kernels are {lib_why} here"
            self.sampler_reason = why
            if has_fused and want != "fused":
                import logging

                logging.getLogger("larp_rt").warning("the bundle's fused step (decode_sample.onnx) is not used: %s",
                                                     why)
        self.sampler_name = want
        if want == "fused":
            self._need_custom_ops("sampler='fused'")
        elif want == "kernel":
            self.sampler, self.sampler_takes_uniform = kernels.sample_numpy, False
        elif want == "graph":
            self.sampler = self._graph_sampler
        # "reference": the base class default

    def session(self, name: str):
        sess = self._sessions.get(name)
        if sess is None:
            with self._session_lock:  # two threads asking at once get one session
                sess = self._sessions.get(name)
                if sess is None:
                    path = self.bundle.graph_path(name)
                    sess = self._sessions[name] = self.ort.InferenceSession(str(path), self._so,
                                                                            providers=self.providers)
        return sess

    def encode(self, video: np.ndarray) -> np.ndarray:
        return self.session("encoder").run(["indices"], {"video": video})[0]

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        return self.session("decoder").run(["video"], {"indices": tokens})[0]

    def encode_latents(self, video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, N, d) normalised latents of the encoder graph and the bundle's normalised codebook (K, d)."""
        codes = self.bundle.load_codebook()
        return self.session("encoder").run(["latents"], {"video": video})[0], codes

    # sampling through the bundle's standard-ops graph -----------------------------------------
    def _graph_sampler(self, cond, uncond, params: RowParams, step: int, u=None) -> np.ndarray:
        sampling.check_row_params(params, cond.shape[1])  # the graph cannot raise: the kernels' check, here
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
    def new_runner(self, capacity: int) -> _OrtRunner:
        return _OrtRunner(self, capacity)

    # the tokenizer's AR prior ----------------------------------------------------------------
    PRIOR_CHUNK_BYTES = 256 << 20  # the score graph's (rows, N - 1, K) float32 logits per run stay under this

    def prior_logprobs_full(self, tokens: np.ndarray) -> np.ndarray:
        """(B, N) int64 -> (B, N - 1) float32 log p(token t | tokens < t), through ``prior_score.onnx`` (one run
        per chunk of rows, so the graph's internal logits stay bounded)."""
        N, K = tokens.shape[1], self.tokenizer_config.codebook_size
        rows = max(1, self.PRIOR_CHUNK_BYTES // (4 * N * K))
        sess = self.session("prior_score")
        return np.concatenate([sess.run(["logprobs"], {"tokens": tokens[i:i + rows]})[0]
                               for i in range(0, len(tokens), rows)])

    def _prior_fused_unavailable(self) -> str | None:
        """None when the prior's fused step graph can run here now, else why not."""
        from .. import kernels

        prior = self.bundle.prior_spec
        if prior is None:
            return f"bundle {str(self.bundle.path)!r} has no AR prior"
        if not prior.fused_graph:
            return ("the bundle has no fused prior step graph (an fp16 prior, or exported where the ONNX Runtime "
                    "custom-op library was not built): re-export it with the kernels built (pip install -e .)")
        if self.on_gpu:
            return ("larp_rt::DecodeAttention is a CPU op (a GPU provider would copy the cache to the host every "
                    "step): use device='cpu'")
        if kernels.ort_custom_op_library() is None:
            return ("the ONNX Runtime custom-op library (liblarp_rt_ort.so) is not built here: reinstall with "
                    "`pip install -e .` (see cpp_ext/README.md)")
        if kernels.disabled():
            return "the kernels are disabled (LARP_RT_DISABLE_KERNELS / kernels.force_fallback)"
        return None

    @property
    def prior_graph_name(self) -> str | None:
        """The bundle graph the next prior runner steps through: the fused one (``prior_fused``) or ``prior``; None
        without a prior. With prior_graph='fused' where it cannot run (kernels disabled since), raises."""
        prior = self.bundle.prior_spec
        if prior is None:
            return None
        if self.prior_graph == "standard":
            return prior.graph
        why = self._prior_fused_unavailable()
        if why is None:
            return prior.fused_graph
        if self.prior_graph == "fused":
            raise ValueError(f"prior_graph='fused' is not available: {why}; use prior_graph='auto'")
        return prior.graph

    def prior_runner(self, capacity: int) -> _OrtPriorRunner:
        """A StepRunner over the prior's step graph (``prior_graph_name``: the fused graph where it can run, else
        ``prior.onnx``); ``run(tokens, pos)`` -> (rows, K) logits of the next tokens; ``runner.graph_name``."""
        graph = self.prior_graph_name
        if graph is None:
            raise ValueError(f"bundle {str(self.bundle.path)!r} has no AR prior")
        fused = graph == self.bundle.prior_spec.fused_graph
        if fused:
            with self._session_lock:  # the library is registered once, before the graph's session is created
                self._need_custom_ops("the prior's fused step graph")
        return _OrtPriorRunner(self, capacity, graph, fused=fused)

    @property
    def prior_sampler(self):
        """The host sampler of the prior's loop (the in-graph fused sampler is the generator's): the CPU kernel
        when built (unless the reference was asked for), else the reference. Every one draws the same tokens."""
        from .. import kernels

        info = kernels.available()
        if self.sampler_name != "reference" and info["cpu"] and not info["disabled"]:
            return kernels.sample_numpy
        return sampling.sample

    def close(self) -> None:
        super().close()
        self._sessions.clear()


class _OrtRunner(StepRunner):
    """Preallocated, bound buffers for up to ``capacity`` rows, each row at its own position.

    Each layer's cache is one flat buffer of ``capacity * h * S * hd`` elements, allocated once and bound as
    (rows, h, S_w, hd) with IO binding (zero copy: the graph reads it in place and returns only the new entries,
    which are written into slot pos[r] of row r). ``rows`` is the step's row count; S_w is the cache window:

    * the fused graph with its DecodeAttention op reads only row r's first pos[r] slots whatever the bound shape,
      so it is bound at the full S once and never moves;
    * the standard-ops attention reads all S_w slots of every row, so S_w follows the longest active row: the
      smallest multiple of ``window`` above its position (a step reads about that many slots, not max_seq). When
      the window grows (or halves after the longest row left), the written slots move in place to the new layout
      (a handful of times per video). Nothing is allocated per step.
    """

    def __init__(self, be: OnnxRuntimeBackend, capacity: int):
        cfg, kv = be.generator_config, be.bundle.kv_cache_spec
        self.be, self.capacity = be, int(capacity)
        self.L, self.H, self.S, self.hd = cfg.n_layer, cfg.n_head, kv.max_seq, cfg.head_dim
        self.V = cfg.vocab_size
        self.window = cache_window(self.S)
        self.samples = be.sampler_name == "fused"
        self.sess = be.session("decode_sample" if self.samples else "decode")
        # the fused graph of a float32 bundle reads the cache through its own op (only the valid slots); so does
        # every decode graph of a narrow-cache bundle
        attention = be.bundle.sampler.fused_attention if be.bundle.sampler else None
        op_reads = kv.attention == "larp_rt::DecodeAttention" or (
            self.samples and attention == "larp_rt::DecodeAttention")
        self.windowed = not op_reads and not be.on_gpu
        self.scaled = be.kv_scaled
        dt = be.kv_dtype
        cap = self.capacity
        self.token = np.zeros((cap, 1), np.int64)
        self.pos = np.zeros(cap, np.int64)
        if self.samples:  # per-request sampling inputs (a request's null row doubles the row picks) and outputs
            self.sample_rows = np.zeros(2 * cap, np.int64)
            self.params = {n: np.zeros(cap, t) for n, t in (
                ("cfg_scale", np.float32), ("temperature", np.float32), ("top_k", np.int64), ("top_p", np.float32),
                ("seed", np.int64), ("stream", np.int64))}
            self.sample_step = np.zeros(cap, np.int64)
            self.tokens = np.zeros(cap, np.int64)
            self.logprobs = np.zeros(cap, np.float64)
        else:
            self.logits = np.zeros((cap, self.V), np.float32)
        if be.on_gpu:
            self.dev = _CudaCache(be, (cap, self.H, self.S, self.hd), dt, self.L)
        else:
            self.dev = None
            size = cap * self.H * self.S * self.hd
            self.flat = [prefaulted(size, dt) for _ in range(2 * self.L)]  # k_0, v_0, k_1, ...
            self.new = [np.zeros((cap, self.H, 1, self.hd), dt) for _ in range(2 * self.L)]
            if self.scaled:  # int8: one float32 scale per (row, head, slot), bound at the full S like the cache
                self.flat_s = [prefaulted(cap * self.H * self.S, np.float32) for _ in range(2 * self.L)]
                self.new_s = [np.zeros((cap, self.H, 1), np.float32) for _ in range(2 * self.L)]
        self.binding = self.sess.io_binding()
        self.rows = 0  # rows bound
        self.width = 0  # current window S_w (bound cache length)
        self.sample_key: tuple | None = None  # (version, B_req, R_req) of the bound sampling inputs

    def _in(self, name: str, buf: np.ndarray) -> None:  # zero-copy: ORT reads our buffer in place
        self.binding.bind_input(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)

    def _out(self, name: str, buf: np.ndarray) -> None:
        self.binding.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)

    def _views(self, rows: int, width: int) -> list[np.ndarray]:
        n = rows * self.H * width * self.hd
        return [f[:n].reshape(rows, self.H, width, self.hd) for f in self.flat]

    def _bind_rows(self, rows: int) -> None:
        self._in("token", self.token[:rows])
        self._in("pos", self.pos[:rows])
        if not self.samples:
            self._out("logits", self.logits[:rows])
        if self.dev is None:
            for j, buf in enumerate(self.new):
                self._out(f"present_{'kv'[j % 2]}_{j // 2}", buf[:rows])
            if self.scaled:
                for j, buf in enumerate(self.new_s):
                    self._out(f"present_{'kv'[j % 2]}_scale_{j // 2}", buf[:rows])
            self.rows = rows
            self._bind_cache(self.width or (self.window if self.windowed else self.S))
        else:
            self.dev.bind(self.binding, rows)
            self.rows = rows

    def _bind_cache(self, width: int) -> None:
        self.views = self._views(self.rows, width)
        for j, v in enumerate(self.views):
            self._in(f"past_{'kv'[j % 2]}_{j // 2}", v)
        if self.scaled:  # never windowed (the op reads the valid slots): width is S
            n = self.rows * self.H * width
            self.scale_views = [f[:n].reshape(self.rows, self.H, width) for f in self.flat_s]
            for j, v in enumerate(self.scale_views):
                self._in(f"past_{'kv'[j % 2]}_scale_{j // 2}", v)
        self.width = width

    def _rewidth(self, width: int, keep: int) -> None:
        """Move the first ``keep`` slots of every bound row to the layout of window ``width`` and rebind."""
        if keep and self.width:
            old, new = self._views(self.rows, self.width), self._views(self.rows, width)
            for o, n in zip(old, new, strict=True):
                np.copyto(n[:, :, :keep], o[:, :, :keep])  # overlapping: numpy buffers the move
        self._bind_cache(width)

    def _bind_sample(self, sample: StepSample) -> None:
        R, B = len(sample.rows), len(sample.params)
        key = (sample.version, B, R)
        if key == self.sample_key:
            return
        self.sample_rows[:R] = sample.rows
        self._in("sample_rows", self.sample_rows[:R])
        for name, buf in self.params.items():
            src = getattr(sample.params, name)
            buf[:B] = src.view(np.int64) if src.dtype == np.uint64 else src
            self._in(name, buf[:B])
        self._in("sample_step", self.sample_step[:B])
        self._out("tokens", self.tokens[:B])
        self._out("logprobs", self.logprobs[:B])
        self.sample_key = key

    def run(self, tokens: np.ndarray, pos: np.ndarray, sample: StepSample | None = None) -> np.ndarray:
        """One step for rows [0, len(tokens)); returns the (rows, V) logits, or with the fused graph the
        (B_req,) drawn tokens."""
        rows = len(tokens)
        if not 1 <= rows <= self.capacity:
            raise ValueError(f"a step takes 1..{self.capacity} rows, got {rows}")
        if rows != self.rows:
            self._bind_rows(rows)
        self.token[:rows, 0] = tokens
        self.pos[:rows] = pos
        top = int(self.pos[:rows].max())
        if top >= self.S:
            raise ValueError(f"position {top} is past the cache's {self.S} slots")
        if self.dev is None and self.windowed:
            need = rebind_width(top, self.window, self.S, self.width)
            if need is not None:
                self._rewidth(need, min(self.width, need))
        if self.samples:
            if sample is None:
                raise ValueError("the fused graph samples in the step: pass the StepSample")
            self._bind_sample(sample)
            self.sample_step[: len(sample.steps)] = sample.steps
            try:
                self.sess.run_with_iobinding(self.binding)
            except Exception as e:  # the op's CPU kernel refuses a row (NaN/Inf logits, a parameter) like the reference
                msg = str(e)
                if "larp_rt.Sample:" in msg:  # ONNX Runtime's text around the op's message: typed, row named
                    raise kernel_error(msg[msg.index("larp_rt.Sample:"):].strip()) from None
                if isinstance(err := kernel_error(msg), NonFiniteLogitsError):
                    raise err from None
                raise
        else:
            self.sess.run_with_iobinding(self.binding)
        p = self.pos[:rows]
        if self.dev is None:
            pairs = list(zip(self.views, self.new, strict=True))
            if self.scaled:
                pairs += zip(self.scale_views, self.new_s, strict=True)
            if (p == p[0]).all():  # every row at one position (a batch that started together): a strided copy
                for cache, new in pairs:
                    cache[:, :, p[0]] = new[:rows, :, 0]
            else:
                r = np.arange(rows)
                for cache, new in pairs:
                    cache[r, :, p] = new[:rows, :, 0]
        else:
            self.dev.write_slots(rows, p)
        return self.tokens[: len(sample.steps)] if self.samples else self.logits[:rows]

    def prefill(self, rows: np.ndarray, prefix: np.ndarray) -> np.ndarray:
        """Frame prediction: ``prefix_prefill.onnx`` over the prefixes (R, P) of rows ``rows``; its P entries per
        layer go into slots 0 .. P-1 of those rows (the cache window grows to hold them first)."""
        gen = self.be.bundle.generator_spec
        entry = gen.prefill if gen is not None else None
        if entry is None:
            raise ValueError(f"bundle {str(self.be.bundle.path)!r} has no multi-token prefill graph: re-export the "
                             "frame-prediction generator with this larp_rt (`larp-rt export --generator DIR`)")
        rows = np.asarray(rows, np.int64)
        R, P = prefix.shape
        if P >= self.S:
            raise ValueError(f"a prefix of {P} tokens does not fit the cache's {self.S} slots")
        if self.dev is not None:
            raise NotImplementedError("the multi-token prefill writes host caches; on a GPU execution provider "
                                      "frame prediction is not supported yet: use device='cpu' or backend='torch'")
        pos = np.broadcast_to(np.arange(P, dtype=np.int64), (R, P)).copy()
        logits, *new = self.be.session(entry.graph).run(None, {"tokens": np.ascontiguousarray(prefix, np.int64),
                                                                  "pos": pos})
        hi = int(rows.max()) + 1
        if hi > self.rows:
            self._bind_rows(hi)  # rows above the bound ones: their views (the layout of a row is its own)
        if self.windowed:
            need = window_width(P, self.window, self.S)  # the next step sits at position P
            if need > self.width:
                self._rewidth(need, self.width)
        if self.scaled:  # the graph's float32 entries -> int8 + scales, as the decode graph quantizes its own
            from .. import kernels

            for cache, sc, n in zip(self.views, self.scale_views, new, strict=True):
                cache[rows, :, :P], sc[rows, :, :P] = kernels.quantize_kv(n)
        else:  # float16 caches: numpy rounds to nearest even, as the graph's Cast
            for cache, n in zip(self.views, new, strict=True):
                cache[rows, :, :P] = n
        return logits

    def clear_rows(self, rows: np.ndarray) -> None:
        """Zero every cache slot (and int8 scale) of ``rows``, bound rows of the last step: the standard-ops attention
        reads masked slots too (a NaN there is NaN after the mask), so a failed request's entries must not stay."""
        rows = np.asarray(rows, np.int64)
        rows = rows[rows < self.rows]
        if not len(rows):
            return
        if self.dev is not None:
            self.dev.clear_rows(rows)
            return
        for v in self.views:
            v[rows] = 0
        if self.scaled:
            for v in self.scale_views:
                v[rows] = 0

    def close(self) -> None:
        self.binding = None
        self.flat = self.new = self.views = []
        self.flat_s = self.new_s = self.scale_views = []


class _OrtPriorRunner(_OrtRunner):
    """``_OrtRunner``'s buffers, IO binding, cache windows and slot writes over the prior's step graph ``graph``
    (``prior`` or ``prior_fused``, same I/O names: token, pos, past_{k,v}_i -> logits, present_{k,v}_i). The fused
    graph's DecodeAttention reads only row r's first pos[r] slots, so its cache is bound at full length once (no
    windows); prior.onnx's standard ops read every bound slot, so on the CPU its cache is bound in windows. On a
    GPU provider the cache stays in host buffers (bound at full length; ONNX Runtime copies it per step): the prior
    is small, the generator's device cache is not reused."""

    def __init__(self, be: OnnxRuntimeBackend, capacity: int, graph: str, *, fused: bool):
        prior = be.bundle.prior_spec
        if prior is None:
            raise ValueError(f"bundle {str(be.bundle.path)!r} has no AR prior")
        kv = prior.kv_cache
        self.be, self.capacity = be, int(capacity)
        self.L, self.H, self.S, self.hd = kv.layers, kv.heads, kv.max_seq, kv.head_dim
        self.V = prior.codebook_size
        self.window = cache_window(self.S)
        self.samples = False
        self.graph_name = graph
        self.sess = be.session(graph)
        self.windowed = not fused and not be.on_gpu
        self.scaled = False
        dt = np.float16 if kv.dtype == "fp16" else np.float32
        cap = self.capacity
        self.token = np.zeros((cap, 1), np.int64)
        self.pos = np.zeros(cap, np.int64)
        self.logits = np.zeros((cap, self.V), np.float32)
        self.dev = None
        size = cap * self.H * self.S * self.hd
        self.flat = [np.zeros(size, dt) for _ in range(2 * self.L)]
        self.new = [np.zeros((cap, self.H, 1, self.hd), dt) for _ in range(2 * self.L)]
        self.binding = self.sess.io_binding()
        self.rows = 0
        self.width = 0
        self.sample_key = None


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

    def clear_rows(self, rows: np.ndarray) -> None:
        """Zero rows ``rows`` of every layer's cache (a row is one contiguous H * S * hd block)."""
        n = self.H * self.S * self.hd * self.esize
        for cache in (*self.k, *self.v):
            for r in rows:
                err = self.cudart.cudaMemset(cache.data_ptr() + int(r) * n, 0, n)
                if int(err[0]) != 0:
                    raise RuntimeError(f"cudaMemset failed: {err}")

    def write_slots(self, rows: int, pos: np.ndarray) -> None:
        """Row r's new entries into its slot pos[r]: one strided copy per layer and tensor when every row sits at
        one position, else one per row (h rows of hd elements, pitch S*hd)."""
        row_bytes = self.hd * self.esize
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        same = bool((pos == pos[0]).all())
        spans = [(0, rows, int(pos[0]))] if same else [(r, 1, int(pos[r])) for r in range(rows)]
        for cache, new in ((self.k, self.new_k), (self.v, self.new_v)):
            for i in range(self.L):
                for r0, n, p in spans:
                    dst = cache[i].data_ptr() + (r0 * self.H * self.S + p) * row_bytes
                    src = new[i].data_ptr() + r0 * self.H * row_bytes
                    err = self.cudart.cudaMemcpy2D(dst, self.S * row_bytes, src, row_bytes, row_bytes, n * self.H, kind)
                    if int(err[0]) != 0:
                        raise RuntimeError(f"cudaMemcpy2D failed: {err}")
