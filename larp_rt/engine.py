"""``larp_rt.Engine``: encode, decode and generate over one backend of a bundle.

    eng = Engine("bundles/larp-tiny")                        # ONNX Runtime (CPU, or CUDA/TensorRT EPs) by default
    tokens = eng.encode(video)                               # (B,3,T,H,W) float in [0,1] or uint8 (B,T,H,W,3)
    video = eng.decode(tokens)                               # -> (B,3,T,H,W) float32 in [0,1]
    out = eng.generate([3, 7], SamplingParams(cfg_scale=1.25, seed=0))
    out.tokens, out.seeds                                    # (2, N) int64; the seed of every request

Every argument is validated here, at the boundary, with an error that names it (the checks of
``larp_rt.checks``, shared with the scheduler, HTTP and the CLI); backends get clean arrays. The Engine is the thin
API: the generation loops are the backend's (``larp_rt.backends.base``), the prior's loops ``larp_rt.prior``'s and
the stochastic SVQ draw ``larp_rt.sampling.svq_sample``. ``require*``, ``request_rows`` and ``prefix_rows`` are the
public checks other entry points build on.

Threads: one Engine may be shared by any number of threads. ``encode`` and ``decode`` run concurrently (ONNX
Runtime sessions and the torch modules' forward are safe to call from several threads; nothing of theirs is
shared state); generations are serialised: one ``generate`` (or ``generate_iter``, from its first step until it
is exhausted or closed) runs at a time on the Engine's own KV caches, and the others wait for it. Each call
returns exactly what it returns alone. To batch concurrent requests into one running decode loop instead, use
``larp_rt.serving.Scheduler`` (step-level batching; it owns its own caches). The tokenizer's AR prior
(``prior_logprobs`` / ``prior_nll`` / ``prior_generate``) runs on caches of its own per call, so its calls run
concurrently with each other and with generations.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from . import checks, prior
from .backends.base import Backend
from .bundle import Bundle
from .manifest import PriorSpec
from .sampling import RowParams, SamplingParams, resolve_params, svq_sample

__all__ = ["Engine", "Generation"]

log = logging.getLogger(__name__)
BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")


@dataclass(frozen=True)
class Generation:
    """The result of ``Engine.generate``: tokens (B, N) int64 and the seed each request used (drawn when None)."""

    tokens: np.ndarray
    seeds: list[int]
    params: list[SamplingParams]

    def __array__(self, dtype=None, copy=None):
        return self.tokens if dtype is None else self.tokens.astype(dtype)


class Engine:
    def __init__(
        self,
        bundle: str | os.PathLike | Bundle,
        backend: str = "auto",
        *,
        device: str = "auto",
        threads: int | None = None,
        verify: bool = True,
        sampler: str = "auto",
        preallocate: int | None = None,
        prior_graph: str = "auto",
    ):
        """Load a bundle. backend: "auto" (ONNX Runtime if installed, else torch), "onnxruntime", "torch",
        "tensorrt" (the bundle's plans from `larp-rt build` on an NVIDIA GPU; never picked by "auto").
        device: "auto", "cpu" or "cuda". threads: intra-op threads (default: the backend's).
        verify: check every file's sha256 against the manifest (default; False trusts the files).
        sampler: "auto" (the fastest available), "fused" (ONNX Runtime: the bundle's decode_sample graph),
        "kernel" (the C++/CUDA kernel), "graph" (ONNX Runtime: the bundle's standard-ops sample graph) or
        "reference" (numpy / torch); every one draws the same tokens for the same seeds.
        ``engine.sampler_name`` says which one runs and ``engine.sampler_reason`` why (logged at INFO).
        preallocate: rows of the generator's KV cache allocated and pre-faulted now, at start-up, so that the first
        request does not pay for it (default: the rows of one request, 2 with guidance; 0: on first use). Larger
        batches grow it on first use.
        prior_graph (ONNX Runtime): the prior's step graph, "auto" (the bundle's fused ``prior_fused`` graph where
        the custom-op library runs on the CPU, else ``prior``), "fused" or "standard"; ``engine.prior_graph_name``
        says which one runs. The other backends take "auto"."""
        _check_init_args(backend, device=device, threads=threads, sampler=sampler, preallocate=preallocate,
                         prior_graph=prior_graph)
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle, verify=verify)
        self.backend: Backend = _make_backend(self.bundle, backend, device=device, threads=threads, sampler=sampler,
                                              prior_graph=prior_graph)
        self.tokenizer_config = self.bundle.tokenizer_config
        self.generator_config = self.bundle.generator_config
        defaults = self.bundle.default_sampling
        self.default_params = SamplingParams(**{k: defaults[k] for k in ("cfg_scale", "temperature", "top_k", "top_p")
                                                if k in defaults})
        self._gen_lock = threading.Lock()  # one generation at a time on the backend's own runner
        if self.generator_config is not None:
            log.info("larp_rt Engine: %s backend, sampler %s (%s)", self.backend_name, self.sampler_name,
                     self.sampler_reason or "the backend's")
            cfg = self.generator_config
            rows = (2 if self._has_null_class() and not cfg.frame_prediction else 1) if preallocate is None \
                else preallocate
            if rows:
                self.backend.runner(rows)  # the caches of the first request(s), pages touched now

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def sampler_name(self) -> str:
        """Which sampler draws the tokens: "fused", "kernel", "graph" or "reference" (same draws in each)."""
        return self.backend.sampler_name

    @property
    def sampler_reason(self) -> str:
        """Why ``sampler_name`` was picked (e.g. why the bundle's fused step is not used here)."""
        return self.backend.sampler_reason

    @property
    def prior_graph_name(self) -> str | None:
        """The bundle graph the prior's steps run through on ONNX Runtime ("prior_fused" or "prior"); None for
        the other backends or without a prior."""
        return self.backend.prior_graph_name

    def close(self) -> None:
        with self._gen_lock:
            self.backend.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------
    # tokenizer
    # ------------------------------------------------------------------------------------------
    def require(self, part: str):
        """The config of ``part`` ("tokenizer" or "generator"), or a ValueError saying the bundle has none (and how
        to export one)."""
        cfg = self.tokenizer_config if part == "tokenizer" else self.generator_config
        if cfg is None:
            raise ValueError(f"bundle {str(self.bundle.path)!r} has no {part}; export one with --{part}")
        return cfg


    def encode(self, video) -> np.ndarray:
        """Video (B, C, T, H, W) float in [0, 1], or uint8 frames (B, T, H, W, C) -> tokens (B, N) int64."""
        return self.backend.encode(self.check_video(video))

    def decode(self, tokens) -> np.ndarray:
        """Tokens (B, N) ints in [0, codebook) -> video (B, C, T, H, W) float32 in [0, 1]."""
        return self.backend.decode(self.check_tokens(tokens))

    def check_video(self, video) -> np.ndarray:
        """``larp_rt.checks.check_video`` for this bundle's tokenizer: -> (B, C, T, H, W) float32 in [0, 1]."""
        return checks.check_video(video, self.require("tokenizer"))

    def check_tokens(self, tokens) -> np.ndarray:
        """``larp_rt.checks.check_tokens`` for this bundle's tokenizer: -> (B, N) int64 in [0, codebook)."""
        return checks.check_tokens(tokens, self.require("tokenizer"))

    # ------------------------------------------------------------------------------------------
    # generator
    # ------------------------------------------------------------------------------------------
    def check_class_ids(self, class_ids) -> np.ndarray:
        """``larp_rt.checks.check_class_ids`` for this bundle's generator: -> (B,) int64 in [0, num_classes)."""
        return checks.check_class_ids(class_ids, self.require("generator"), where=f"bundle {str(self.bundle.path)!r}")

    def request_rows(self, class_ids, params) -> tuple[np.ndarray, RowParams, list[SamplingParams]]:
        """Checked class-conditional requests: (class ids (B,) int64, their RowParams (seeds drawn where None), the
        SamplingParams of each row). ``params``: as ``generate`` takes them (None: the bundle's defaults). Raises
        ValueError for guidance without a null class."""
        ids = self.check_class_ids(class_ids)
        cfg = self.generator_config
        if params is None:
            params = self.default_params
        rp = resolve_params(params, len(ids), cfg.vocab_size)
        plist = [params] * len(ids) if isinstance(params, SamplingParams) else list(params)
        if rp.uses_cfg and not self._has_null_class():
            raise ValueError("cfg_scale != 1 needs a generator trained with class dropout (a null class); "
                             "this one has none: use cfg_scale=1.0")
        return ids, rp, plist


    def _has_null_class(self) -> bool:
        return self.generator_config.class_dropout_prob > 0

    def generate_iter(self, class_ids, params: SamplingParams | Sequence[SamplingParams] | None = None):
        """Yield a StepEvent per position (``.step``, ``.total``, ``.tokens`` (B,)); returns the Generation.

        The arguments are checked at once; the generation holds the Engine's generator from its first step until
        it is exhausted or closed (``close()`` it, or use ``generate``, when stopping early)."""
        ids, rp, plist = self.request_rows(class_ids, params)
        return self._generate_iter(ids, rp, plist)

    def _generate_iter(self, ids, rp, plist):
        out = np.empty((len(ids), self.generator_config.max_seq_len), np.int64)
        with self._gen_lock:
            for ev in self.backend.generate_iter(ids, rp):
                out[:, ev.step] = ev.tokens
                yield ev
        return Generation(out, [int(s) for s in rp.seed], plist)

    def generate(
        self,
        class_ids,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> Generation:
        """Sample token sequences for ``class_ids``. ``params``: one SamplingParams for the whole batch (row i
        draws from the stream (seed, i)), a list with one per class id (each its own stream), or None for the
        bundle's defaults with a fresh seed. ``progress(step, total)`` is called after every position."""
        return _run(self.generate_iter(class_ids, params), progress)

    def generate_video(self, class_ids, params=None, *, progress=None) -> tuple[np.ndarray, Generation]:
        """generate + decode: (B, C, T, H, W) float32 videos and the Generation."""
        self.require("tokenizer")
        gen = self.generate(class_ids, params, progress=progress)
        return self.decode(gen.tokens), gen

    # ------------------------------------------------------------------------------------------
    # frame prediction (the authors' LARP-L-long-AR-FP recipe)
    # ------------------------------------------------------------------------------------------
    @property
    def predicts_frames(self) -> bool:
        """True for a frame-prediction bundle (``predict``); False for a class-conditional one (``generate``)."""
        return bool(self.generator_config is not None and self.generator_config.frame_prediction)

    def require_frame_prediction(self):
        """The generator's config when the bundle predicts frames (a frame-prediction generator whose prefix is the
        tokenizer's N tokens + the separator), else a ValueError saying why not."""
        cfg = self.require("generator")
        self.require("tokenizer")
        if not cfg.frame_prediction:
            raise ValueError(f"bundle {str(self.bundle.path)!r} holds a class-conditional generator: it generates "
                             "from class ids (Engine.generate / `larp-rt generate`), it cannot predict frames; "
                             "export a frame-prediction generator (e.g. the authors' LARP-L-long-AR-FP) to predict")
        if cfg.cls_token_num != self.tokenizer_config.num_tokens + 1:
            raise ValueError(f"the generator's prefix ({cfg.cls_token_num} tokens) is not the tokenizer's "
                             f"{self.tokenizer_config.num_tokens} tokens + the separator: re-export a matching pair")
        return cfg


    def check_frames(self, frames, num_cond_frames: int = 5) -> np.ndarray:
        """Conditioning frames -> the padded clip (B, C, T, H, W) float32 in [0, 1] the encoder takes: the first
        ``num_cond_frames`` frames, the last of them repeated up to the tokenizer's T (the authors' recipe).
        ``frames``: uint8 (B, t, H, W, C) or float in [0, 1] (B, C, t, H, W) with t >= num_cond_frames
        (``larp_rt.checks.check_frames``)."""
        return checks.check_frames(frames, num_cond_frames, self.require("tokenizer"))

    def cond_tokens(self, frames, *, num_cond_frames: int = 5, stochastic_cond: bool = False,
                    seed: int | None = None) -> np.ndarray:
        """The prefix of ``predict``: (B, N + 1) int64, the tokens of the padded conditioning clip + the separator
        (index codebook size). Deterministic SVQ (argmax) by default; ``stochastic_cond=True`` draws each token from
        ``softmax(cos(latent, code) / svq_temperature)`` (the authors' SVQ) with ``numpy.random.default_rng(seed)``
        (reproducible for a given seed; a fresh one when None)."""
        self.require_frame_prediction()
        clip = self.check_frames(frames, num_cond_frames)
        if stochastic_cond:
            tokens = self._stochastic_encode(clip, seed)
        else:
            if seed is not None:
                raise ValueError("seed is for stochastic_cond=True (the deterministic encoder draws nothing)")
            tokens = self.backend.encode(clip)
        sep = np.full((len(tokens), 1), self.tokenizer_config.codebook_size, np.int64)
        return np.concatenate([tokens.astype(np.int64), sep], axis=1)

    def _stochastic_encode(self, clip: np.ndarray, seed: int | None) -> np.ndarray:
        cfg = self.tokenizer_config
        checks.check_seed(seed)
        latents, codes = self.backend.encode_latents(clip)  # (B, N, d) normalised, (K, d) normalised
        return svq_sample(latents, codes, cfg.svq_temperature, seed, cfg.codebook_size)

    def prefix_rows(self, prefix: np.ndarray, params) -> tuple[RowParams, list[SamplingParams]]:
        """Checked frame-prediction requests over ``prefix`` (B, cls_token_num) (``cond_tokens``): (their RowParams,
        the SamplingParams of each row). ``params`` as ``predict`` takes them; guidance is refused."""
        cfg = self.generator_config
        if params is None:
            params = self.default_params
        rp = resolve_params(params, len(prefix), cfg.vocab_size)
        if rp.uses_cfg:
            raise ValueError("frame prediction has no class condition, so classifier-free guidance does not apply: "
                             f"use cfg_scale=1.0 (got {sorted(set(rp.cfg_scale.tolist()))})")
        plist = [params] * len(prefix) if isinstance(params, SamplingParams) else list(params)
        return rp, plist


    def predict_iter(self, frames, params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                     num_cond_frames: int = 5, stochastic_cond: bool = False, seed: int | None = None):
        """``predict``'s token stream: a StepEvent per generated token (step 0 is the prefix's one-run prefill);
        returns the Generation (the N generated tokens). Decode ``Generation.tokens`` for the video."""
        prefix = self.cond_tokens(frames, num_cond_frames=num_cond_frames, stochastic_cond=stochastic_cond,
                                  seed=seed)
        rp, plist = self.prefix_rows(prefix, params)
        return self._predict_iter(prefix, rp, plist)

    def _predict_iter(self, prefix, rp, plist):
        out = np.empty((len(prefix), self.generator_config.max_seq_len), np.int64)
        with self._gen_lock:
            for ev in self.backend.predict_iter(prefix, rp):
                out[:, ev.step] = ev.tokens
                yield ev
        return Generation(out, [int(s) for s in rp.seed], plist)

    def predict(self, frames, params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                num_cond_frames: int = 5, stochastic_cond: bool = False, seed: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, Generation]:
        """Predict the whole clip from its first ``num_cond_frames`` frames (frame-prediction bundles).

        ``frames``: uint8 (B, t, H, W, C) or float in [0, 1] (B, C, t, H, W), t >= num_cond_frames (frames past
        the conditioning ones are ignored). The first ``num_cond_frames`` are padded to the tokenizer's T by
        repeating the last, encoded (deterministic SVQ, or the authors' stochastic SVQ with
        ``stochastic_cond=True`` and ``seed``, the conditioning draw's seed; the sampling seed is in ``params``)
        and followed by the separator token; the generator prefills that prefix in one run and samples N tokens
        with ``params`` (as in ``generate``; no guidance); the
        tokenizer decodes them. Returns (video (B, C, T, H, W) float32 in [0, 1], the Generation).
        ``progress(step, total)`` after every token."""
        gen = _run(self.predict_iter(frames, params, num_cond_frames=num_cond_frames,
                                     stochastic_cond=stochastic_cond, seed=seed), progress)
        return self.decode(gen.tokens), gen

    # ------------------------------------------------------------------------------------------
    # the tokenizer's AR prior (prior.onnx / prior_score.onnx)
    # ------------------------------------------------------------------------------------------
    @property
    def has_prior(self) -> bool:
        return self.bundle.prior_spec is not None

    def require_prior(self) -> PriorSpec:
        """The bundle's prior entry (its manifest's, typed), or a ValueError saying the tokenizer was exported
        without one."""
        self.require("tokenizer")
        prior = self.bundle.prior_spec
        if prior is None:
            raise ValueError(
                f"bundle {str(self.bundle.path)!r} has no AR prior: its tokenizer was exported without one (a "
                "checkpoint without prior_model.* weights, or a bundle exported before larp_rt exported priors); "
                "export a tokenizer trained with the prior (`larp-rt export --tokenizer DIR`)")
        return prior


    def prior_logprobs(self, tokens, *, method: str = "auto") -> np.ndarray:
        """Tokens (B, N) -> (B, N - 1) float32: ``log p(token t | tokens < t)`` under the tokenizer's AR prior, for
        t = 1 .. N - 1 (token 0 is never predicted). method: "full" (one causal forward over the whole sequence,
        ``prior_score.onnx``: the fast way), "steps" (N - 1 cached steps of ``prior.onnx``, as generation runs) or
        "auto" (= "full")."""
        if method not in ("auto", "full", "steps"):
            raise ValueError(f"method must be 'auto', 'full' or 'steps', got {method!r}")
        self.require_prior()
        tokens = self.check_tokens(tokens)
        if method == "steps":
            return prior.logprobs_steps(self.backend, tokens)
        return np.asarray(self.backend.prior_logprobs_full(tokens), np.float32)

    def prior_nll(self, tokens, *, method: str = "auto") -> np.ndarray:
        """(B,) float64: each video's mean negative log-likelihood under the prior, in nats per predicted token
        (the mean of ``-prior_logprobs`` over tokens 1 .. N - 1). Compare with log(codebook size), a uniform guess."""
        return -self.prior_logprobs(tokens, method=method).astype(np.float64).mean(axis=1)

    def check_prefix(self, prefix_tokens) -> np.ndarray:
        """A prior prefix: (B, P) ints in [0, codebook) with 1 <= P <= N -> int64 (``larp_rt.checks.check_prefix``)."""
        return checks.check_prefix(prefix_tokens, self.require("tokenizer"))

    def prior_generate_iter(self, prefix_tokens, params: SamplingParams | Sequence[SamplingParams] | None = None):
        """Yield a StepEvent per sampled token (``.step`` = the token's index P .. N-1); returns the Generation."""
        self.require_prior()
        prefix = self.check_prefix(prefix_tokens)
        cfg = self.tokenizer_config
        if params is None:
            params = SamplingParams()  # temperature 1, no filtering, a fresh seed (the bundle's defaults are the
            # generator's, with its guidance scale)
        rp = resolve_params(params, len(prefix), cfg.codebook_size)
        if rp.uses_cfg:
            raise ValueError("cfg_scale must be 1.0 for the prior: it has no class condition, so classifier-free "
                             f"guidance does not apply (got cfg_scale {sorted(set(rp.cfg_scale.tolist()))})")
        plist = [params] * len(prefix) if isinstance(params, SamplingParams) else list(params)
        return self._prior_iter(prefix, rp, plist)

    def _prior_iter(self, prefix: np.ndarray, rp: RowParams, plist):
        out = yield from prior.sample_iter(self.backend, prefix, rp, self.tokenizer_config.num_tokens)
        return Generation(out, [int(s) for s in rp.seed], plist)

    def prior_generate(
        self,
        prefix_tokens,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> Generation:
        """Continue ``prefix_tokens`` (B, P), 1 <= P <= N, with the tokenizer's AR prior: tokens P .. N-1 are drawn
        with the samplers of ``generate`` (temperature, top-k, top-p; guidance does not apply: cfg_scale must be 1).
        ``params`` as in ``generate`` (one SamplingParams: row i draws from the stream (seed, i); a list: one per
        row, each its own (seed_i, 0); None: temperature 1 with a fresh seed). Token t is drawn with the Philox step
        counter t (its index in the video, like ``generate``), so the draw for a position does not depend on the
        prefix length. Returns the whole sequences (B, N), prefix included. ``progress(t + 1, N)`` after each token."""
        return _run(self.prior_generate_iter(prefix_tokens, params), progress)

    def __repr__(self) -> str:
        parts = [p for p, c in (("tokenizer", self.tokenizer_config), ("generator", self.generator_config)) if c]
        return f"Engine({str(self.bundle.path)!r}, backend={self.backend_name!r}, parts={parts})"


def _check_init_args(backend: str, *, device: str, threads: int | None, sampler: str, preallocate: int | None,
                     prior_graph: str) -> None:
    """The arguments of ``Engine.__init__`` that need no bundle, each with what was expected."""
    if preallocate is not None and (not isinstance(preallocate, int) or isinstance(preallocate, bool)
                                    or preallocate < 0):
        raise ValueError(f"preallocate must be a non-negative int (rows) or None, got {preallocate!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    from .backends.onnxruntime import PRIOR_GRAPHS, SAMPLERS

    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if prior_graph not in PRIOR_GRAPHS:
        raise ValueError(f"prior_graph must be one of {', '.join(PRIOR_GRAPHS)}, got {prior_graph!r}")


def _make_backend(bundle: Bundle, backend: str, *, device: str, threads: int | None, sampler: str,
                  prior_graph: str) -> Backend:
    """The backend ``backend`` (resolved from "auto") over ``bundle``."""
    if backend == "auto":
        backend = "onnxruntime" if bundle.graphs and importlib.util.find_spec("onnxruntime") else "torch"
    if prior_graph != "auto" and backend != "onnxruntime":
        raise ValueError(f"prior_graph={prior_graph!r} picks an ONNX Runtime step graph; the {backend} backend "
                         "takes prior_graph='auto'")
    if backend == "tensorrt":  # never picked by "auto": plans need a GPU, checked before anything is created
        from .backends.tensorrt import TensorRTBackend

        return TensorRTBackend(bundle, device=device, threads=threads, sampler=sampler)
    if backend == "onnxruntime":
        from .backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(bundle, device=device, threads=threads, sampler=sampler, prior_graph=prior_graph)
    if sampler not in ("auto", "kernel", "reference"):
        raise ValueError(f"sampler={sampler!r} runs on the onnxruntime backend; the torch backend takes "
                         "'auto', 'kernel' or 'reference'")
    from .backends.torch import TorchBackend

    return TorchBackend(bundle, device=device, threads=threads, sampler=sampler)


def _run(it, progress: Callable[[int, int], None] | None) -> Generation:
    """Exhaust a generation iterator (StepEvents, then its Generation), reporting ``progress(step + 1, total)``."""
    while True:
        try:
            ev = next(it)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(ev.step + 1, ev.total)
