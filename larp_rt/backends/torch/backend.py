"""PyTorch backend: the bundle's checkpoints (``torch/``) on the CPU or a CUDA device (generator bf16, tokenizer fp16).

Generation runs the fast path (``fast.py``) by default: static buffers per batch bucket and one decode step
(model step + CFG mix + sampler) that is captured as a CUDA graph on CUDA and runs eagerly on the CPU. Token ids
and the sampler's state stay on the device; the host fetches tokens in chunks. ``fast_path=False`` (and the serving
scheduler) runs the loop every backend shares (``base.ContinuousBatch``) over ``_TorchRunner``: the model's
per-row step (every row at its own position), logits to the host, the CPU kernel (or the numpy reference)
samples. The fast path uses the fused sampling op where it is built for the device, else the torch reference
sampler; all draw the same Philox streams, so every path and backend gives the same tokens for the same seeds.
``cuda_graphs=None`` reads ``LARP_RT_CUDA_GRAPHS`` (default on; ``0`` runs the fast step eagerly on CUDA).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import numpy as np

from ... import kernels
from ...bundle import Bundle, BundleError
from ...checkpoint import load_pretrained, require_torch
from ...sampling import RowParams
from ..base import Backend, StepEvent, StepRunner
from ..layout import cache_slots

__all__ = ["TorchBackend"]
ENV_CUDA_GRAPHS = "LARP_RT_CUDA_GRAPHS"


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, bundle: Bundle, *, device: str = "auto", threads: int | None = None, fast_path: bool = True,
                 cuda_graphs: bool | None = None, sampler: str = "auto"):
        """fast_path: static buffers + one decode step per batch bucket (default), or False for the eager loop.
        cuda_graphs: capture that step on CUDA (None: env LARP_RT_CUDA_GRAPHS, default on); ignored on the CPU.
        sampler: "auto" (the fused op where built for the device), "kernel" (require it), "reference" (torch)."""
        torch = require_torch("the torch backend")
        super().__init__(bundle.tokenizer_config, bundle.generator_config)
        self.torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' but torch sees no CUDA device; use device='cpu'")
        self.device = torch.device(device)
        if threads is not None:
            torch.set_num_threads(int(threads))
        half = self.device.type == "cuda"
        self.tok = self.gen = None
        if bundle.tokenizer_config is not None:
            self.tok = self._load(bundle, "tokenizer", torch.float16 if half else torch.float32)
        if bundle.generator_config is not None:
            self.gen = self._load(bundle, "generator", torch.bfloat16 if half else torch.float32)
        if cuda_graphs is None:
            cuda_graphs = os.environ.get(ENV_CUDA_GRAPHS, "1").strip().lower() not in ("0", "false", "no", "off")
        if sampler not in ("auto", "kernel", "reference"):
            raise ValueError(f"sampler must be 'auto', 'kernel' or 'reference' on the torch backend, got {sampler!r}")
        from .fast import use_kernel_sampler

        have = use_kernel_sampler(self.device)
        if sampler == "kernel" and not have:
            raise ValueError(f"sampler='kernel': the fused sampling op is not built for {self.device.type} "
                             "(see larp_rt.kernels.available()); use sampler='auto'")
        self.kernel_sampler = have and sampler != "reference"
        self.sampler_name = "kernel" if self.kernel_sampler else "reference"
        if self.kernel_sampler and kernels.available()["cpu"]:  # the shared loop samples on the host
            self.sampler, self.sampler_takes_uniform = kernels.sample_numpy, False
        self.model_lock = threading.RLock()  # the model's caches: one step (or fast-path generation) at a time
        self.fast_path = bool(fast_path)
        self.cuda_graphs = bool(cuda_graphs)
        self._fast = None
        self._prior_step = None  # the prior's cached step module (created on first use)

    def _load(self, bundle: Bundle, kind: str, dtype):
        path = bundle.checkpoint_dir(kind)
        if path is None:
            raise BundleError(
                f"bundle {str(bundle.path)!r} carries no PyTorch {kind} checkpoint (exported with --onnx-only); "
                "use backend='onnxruntime' or re-export without --onnx-only"
            )
        return load_pretrained(path, kind=kind, device=self.device, dtype=dtype)

    def encode(self, video: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            x = self.torch.from_numpy(video).to(self.device)
            return self.tok.encode(x).cpu().numpy()

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.tok.decode(self.torch.from_numpy(tokens).to(self.device)).float().cpu().numpy()

    def encode_latents(self, video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, N, d) normalised latents and the normalised codebook (K, d), float32 (for stochastic SVQ)."""
        F = self.torch.nn.functional
        with self.torch.inference_mode():
            x = self.torch.from_numpy(video).to(self.device, self.tok.x_embedder.proj.weight.dtype)
            z = F.normalize(self.tok.encode_latents(x).float(), dim=-1)
            codes = self.tok.bottleneck.regularizer.codebook().float()
            return z.cpu().numpy(), codes.cpu().numpy()

    @property
    def fast(self):
        """The generator's ``FastGenerator`` (created on first use)."""
        if self._fast is None:
            from .fast import FastGenerator

            self._fast = FastGenerator(self.gen, cuda_graphs=self.cuda_graphs, kernel_sampler=self.kernel_sampler)
        return self._fast

    def new_runner(self, capacity: int) -> _TorchRunner:
        return _TorchRunner(self, capacity)

    # the tokenizer's AR prior ----------------------------------------------------------------
    def _prior(self):
        if self.tok is None or self.tok.prior_model is None:
            raise BundleError("the bundle's PyTorch tokenizer checkpoint holds no AR prior (prior_model.*)")
        return self.tok.prior_model

    def prior_logprobs_full(self, tokens: np.ndarray) -> np.ndarray:
        """(B, N) int64 -> (B, N - 1) float32: the prior's full causal forward, the authors' logits, log-softmax."""
        from ...models.prior_step import prior_reference_logits

        self._prior()
        torch = self.torch
        with torch.inference_mode():
            t = torch.from_numpy(tokens).to(self.device)
            logits = prior_reference_logits(self.tok, t).float()  # (B, N-1, K)
            lp = torch.log_softmax(logits, dim=-1).gather(-1, t[:, 1:, None])[..., 0]
            return lp.cpu().numpy()

    def prior_runner(self, capacity: int) -> _TorchPriorRunner:
        """A StepRunner over the prior's cached step (``models.prior_step.PriorStep``: what ``prior.onnx`` computes)."""
        self._prior()
        with self.model_lock:
            if self._prior_step is None:
                from ...models.prior_step import PriorStep

                self._prior_step = PriorStep(self.tok).eval()
        return _TorchPriorRunner(self, capacity)

    @property
    def prior_sampler(self):
        return self.sampler  # the host sampler of the shared loop (kernel or reference)

    def generate_iter(self, class_ids: np.ndarray, params: RowParams) -> Iterator[StepEvent]:
        if not self.fast_path:
            yield from super().generate_iter(class_ids, params)  # the shared loop over _TorchRunner
            return
        with self.model_lock:  # the fast path runs on the model's own caches
            yield from self.fast.generate_iter(class_ids, params)

    def close(self) -> None:
        super().close()
        with self.model_lock:
            if self._fast is not None:
                self._fast.release()
            if self.gen is not None:
                self.gen.clear_caches()


class _TorchRunner(StepRunner):
    """KV caches of ``capacity`` rows for the model's per-row step (``LARPGenerator.step``). The model reads its
    caches from its attention layers, so a step swaps this runner's caches (and causal mask) in, runs, and swaps
    the previous ones back, under the backend's model lock: several runners (a scheduler's, the backend's own, the
    fast path's) share one model. Logits come back to the host, where the loop samples."""

    def __init__(self, be: TorchBackend, capacity: int):
        from ...models.generator import KVCache

        torch, gen = be.torch, be.gen
        cfg = gen.config
        self.be, self.capacity = be, int(capacity)
        S = cache_slots(cfg.num_positions)  # every position a video needs (the bundle's kv_cache.max_seq)
        dtype, device = gen.tok_embeddings.weight.dtype, be.device
        self.caches = [KVCache(self.capacity, S, cfg.n_head, cfg.head_dim, dtype, device) for _ in gen.layers]
        self.mask = torch.tril(torch.ones(S, S, dtype=torch.bool, device=device))
        self.S = S

    def run(self, tokens: np.ndarray, pos: np.ndarray, sample=None) -> np.ndarray:
        torch, gen = self.be.torch, self.be.gen
        rows = len(tokens)
        if not 1 <= rows <= self.capacity:
            raise ValueError(f"a step takes 1..{self.capacity} rows, got {rows}")
        if int(np.max(pos)) >= self.S:
            raise ValueError(f"position {int(np.max(pos))} is past the cache's {self.S} slots")
        with self.be.model_lock, torch.inference_mode():
            saved = [layer.attention.kv_cache for layer in gen.layers], gen.causal_mask
            try:
                for layer, c in zip(gen.layers, self.caches, strict=True):
                    layer.attention.kv_cache = c
                gen.causal_mask = self.mask
                t = torch.from_numpy(np.ascontiguousarray(tokens, np.int64)).to(self.be.device)
                p = torch.from_numpy(np.ascontiguousarray(pos, np.int64)).to(self.be.device)
                logits = gen.step(t, p).float().cpu().numpy()
            finally:
                for layer, c in zip(gen.layers, saved[0], strict=True):
                    layer.attention.kv_cache = c
                gen.causal_mask = saved[1]
        return logits

    def clear_rows(self, rows: np.ndarray) -> None:
        """Zero ``rows`` of every layer's cache (attention weighs masked slots by 0, and 0 * NaN is NaN)."""
        r = self.be.torch.as_tensor(np.asarray(rows, np.int64), device=self.be.device)
        with self.be.model_lock, self.be.torch.inference_mode():
            for c in self.caches:
                c.k_cache[r] = 0
                c.v_cache[r] = 0

    def prefill(self, rows: np.ndarray, prefix: np.ndarray) -> np.ndarray:
        """Frame prediction: the model's cached prefill of the prefixes (R, P) over caches of their own, its P
        entries per layer copied into slots 0 .. P-1 of rows ``rows`` of this runner's caches."""
        from ...models.generator import KVCache

        torch, gen = self.be.torch, self.be.gen
        R, P = prefix.shape
        if P >= self.S:
            raise ValueError(f"a prefix of {P} tokens does not fit the cache's {self.S} slots")
        cfg, dev = gen.config, self.be.device
        dtype = gen.tok_embeddings.weight.dtype
        with self.be.model_lock, torch.inference_mode():
            saved = [layer.attention.kv_cache for layer in gen.layers], gen.causal_mask
            try:
                tmp = [KVCache(R, P, cfg.n_head, cfg.head_dim, dtype, dev) for _ in gen.layers]
                for layer, c in zip(gen.layers, tmp, strict=True):
                    layer.attention.kv_cache = c
                gen.causal_mask = torch.tril(torch.ones(P, P, dtype=torch.bool, device=dev))
                x = torch.from_numpy(np.ascontiguousarray(prefix, np.int64)).to(dev)
                logits = gen.prefill(x).float().cpu().numpy()
                r = torch.from_numpy(np.asarray(rows, np.int64)).to(dev)
                for c, t in zip(self.caches, tmp, strict=True):
                    c.k_cache[r, :, :P] = t.k_cache
                    c.v_cache[r, :, :P] = t.v_cache
            finally:
                for layer, c in zip(gen.layers, saved[0], strict=True):
                    layer.attention.kv_cache = c
                gen.causal_mask = saved[1]
        return logits

    def close(self) -> None:
        self.caches = []


class _TorchPriorRunner(StepRunner):
    """KV caches of ``capacity`` rows for the prior's step module (stateless: the caches are passed in, so runners
    need no lock); row r's new entries are written into its slot pos[r]; logits come back to the host."""

    def __init__(self, be: TorchBackend, capacity: int):
        torch, step = be.torch, be._prior_step
        self.be, self.step, self.capacity = be, step, int(capacity)
        cfg = be.tok.prior_model.config
        self.S = cache_slots(be.tokenizer_config.num_tokens)
        dtype = step.codes.dtype
        self.caches = [torch.zeros(self.capacity, step.heads, self.S, step.head_dim, dtype=dtype, device=be.device)
                       for _ in range(2 * cfg.depth)]

    def run(self, tokens: np.ndarray, pos: np.ndarray, sample=None) -> np.ndarray:
        torch = self.be.torch
        rows = len(tokens)
        if not 1 <= rows <= self.capacity:
            raise ValueError(f"a step takes 1..{self.capacity} rows, got {rows}")
        if int(np.max(pos)) >= self.S:
            raise ValueError(f"position {int(np.max(pos))} is past the cache's {self.S} slots")
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(tokens, np.int64)).to(self.be.device).view(-1, 1)
            p = torch.from_numpy(np.ascontiguousarray(pos, np.int64)).to(self.be.device)
            logits, *new = self.step(t, p, *(c[:rows] for c in self.caches))
            r = torch.arange(rows, device=self.be.device)
            for c, n in zip(self.caches, new, strict=True):
                c[r, :, p] = n[:, :, 0]
            return logits.float().cpu().numpy()

    def close(self) -> None:
        self.caches = []
