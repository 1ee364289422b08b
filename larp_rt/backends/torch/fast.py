"""The torch backend's generation fast path: static buffers and one decode step, captured once per batch bucket.

gpt-fast style, only the hot step is compiled/captured. A batch of B requests runs in a bucket of Bb = the next
power of two request rows (the extra rows repeat request 0; their draws are dropped) and, when any request uses
guidance, Bb null-class rows after them (a request with cfg_scale == 1 mixes to exactly its cond logits, so
guided and unguided requests share one graph). Everything the step touches is a tensor allocated once per bucket:

    row_tokens (R, 1)   int64    tokens fed to the next step (request rows, then the same tokens for null rows)
    pos        (R,)     int64    the position of each row (the model's per-row step; a bucket's rows start together,
                                 so they move in step, but the step itself takes any positions)
    step       (Bb,)    int64    the step each request samples (the sampler's per-row counter)
    out        (N, Bb)  int64    every step's tokens, written at row ``step`` (step-major, so that a chunk of steps
                                 is one contiguous block for the device-to-host copy)
    params              per-row sampling parameters (copied in per generation), and for the reference sampler
                        its uniforms (Bb, N), drawn once per generation and indexed with the device step

One step = ``decode_one_token(row_tokens, pos)`` -> CFG split -> sampler -> ``out[step] = tokens``,
``row_tokens = tokens``, ``step += 1``, ``pos += 1``: no host value, no host sync. On CUDA it is captured as a
CUDA graph per bucket (after warm-up steps on a side stream; all graphs share one memory pool) and replayed; on
the CPU, or with ``cuda_graphs=False``, the very same function runs eagerly. The KV caches are the model's
(``setup_caches``), shared by the buckets and sized for the largest one seen (growing them drops the graphs).

The sampler is the fused kernel op (``larp_rt.kernels``) where it is built for the device and not disabled, else
the torch reference (``larp_rt.sampling_torch``); both draw exactly what ``larp_rt.sampling.sample`` draws, so the
tokens equal the eager path's and the ONNX Runtime backend's. A row whose logits are NaN/Inf gets token -1 on the
device (the CUDA kernel marks it; for the reference sampler this module does; the CPU kernel raises at once) and
is fed on as token 0; the host checks every chunk of tokens it fetches and raises then.

Tokens stay on the device: ``generate_iter`` copies them to the host in chunks of ``sync_every`` steps
(non-blocking into pinned memory, one chunk behind the steps being enqueued, so the GPU never waits for Python),
then yields one ``StepEvent`` per step; ``generate`` fetches once at the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from ... import kernels
from ... import sampling_torch as ST
from ...models.generator import LARPGenerator
from ...sampling import RowParams
from ..base import NON_FINITE, StepEvent, bucket, device_row_error, device_row_exception
from ..layout import RowLayout, step_position

__all__ = ["FastGenerator", "StaticRowParams", "bucket_size", "pad_params", "use_kernel_sampler", "NON_FINITE"]

_PARAM_TENSORS = ("cfg_scale", "temperature", "top_k", "top_p", "seed", "stream")


def bucket_size(batch: int) -> int:
    """Request rows of the bucket that serves ``batch`` requests: the next power of two (the shared loop's buckets)."""
    return bucket(batch)


def pad_params(params: RowParams, rows: int) -> RowParams:
    """``params`` grown to ``rows`` rows; the extra rows repeat row 0 (so they add no new sampler branch)."""
    extra = rows - len(params)
    if extra < 0:
        raise ValueError(f"cannot pad {len(params)} rows to {rows}")
    return RowParams(**{f.name: np.concatenate([getattr(params, f.name), np.repeat(getattr(params, f.name)[:1], extra)])
                        for f in dataclasses.fields(RowParams)})


def use_kernel_sampler(device: torch.device) -> bool:
    """True when the fused sampling op is built for ``device`` and not disabled (else the torch reference)."""
    info = kernels.available()
    built = info["cuda"] if device.type == "cuda" else info["cpu"]
    return bool(built and not info["disabled"] and kernels.register_torch_op() is not None)


def _reference_branches(params: RowParams, vocab: int) -> tuple[bool, ...]:
    """The host-side branches the torch reference sampler takes for ``params`` (a captured graph freezes them)."""
    k = params.top_k
    return (bool((params.temperature == 0).all()), bool((params.temperature == 0).any()),
            bool(((k > 0) & (k < vocab)).any()), bool((params.top_p < 1.0).any()))


class StaticRowParams(ST.DeviceRowParams):
    """``DeviceRowParams`` of a fixed row count whose tensors keep their storage: ``load`` copies new values in."""

    def __init__(self, rows: int, device: torch.device | str):
        ones = np.ones(rows, np.float32)
        super().__init__(RowParams(cfg_scale=ones, temperature=ones, top_k=np.zeros(rows, np.int64), top_p=ones,
                                   seed=np.zeros(rows, np.uint64), stream=np.zeros(rows, np.uint64)), device)
        for name in _PARAM_TENSORS:  # own storage: on the CPU as_tensor shares the numpy arrays
            setattr(self, name, getattr(self, name).clone())
        self.top_p32 = self.top_p.float()  # what the kernel op reads (float32, as RowParams holds it)

    def load(self, params: RowParams) -> None:
        if len(params) != len(self):
            raise ValueError(f"params has {len(params)} rows, this buffer {len(self)}")
        new = ST.DeviceRowParams(params, "cpu")  # the same dtype conversions, on the host
        for name in _PARAM_TENSORS:
            getattr(self, name).copy_(getattr(new, name))
        self.top_p32.copy_(new.top_p)
        self.host, self.any_greedy, self.all_greedy = params, new.any_greedy, new.all_greedy


class _Bucket:
    """The static tensors of one (request rows, guided?, sampler) bucket, and its CUDA graph once captured."""

    def __init__(self, batch: int, cfg: bool, kernel: bool, steps: int, device: torch.device):
        self.batch, self.cfg, self.kernel, self.steps = batch, cfg, kernel, steps
        self.rows = 2 * batch if cfg else batch
        i64 = dict(dtype=torch.int64, device=device)
        self.row_tokens = torch.zeros(self.rows, 1, **i64)
        self.pos = torch.zeros(self.rows, **i64)
        self.step = torch.zeros(batch, **i64)
        self.out = torch.zeros(steps, batch, **i64)
        self.params = StaticRowParams(batch, device)
        self.table = None if kernel else torch.zeros(batch, steps, dtype=torch.float64, device=device)
        self.host = torch.empty(steps, batch, dtype=torch.int64, pin_memory=True) if device.type == "cuda" else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warm = 0  # warm-up steps run (before the capture)
        self.done = 0  # steps sampled in the current generation
        self.live = 0  # requests of the current generation (<= batch)
        self.generation = 0  # the FastGenerator's generation counter at this bucket's last begin()


class FastGenerator:
    """Static-cache, single-step generation over a ``LARPGenerator`` (class-conditional), graph-captured on CUDA.

        fg = FastGenerator(gen)                      # gen: bf16 on CUDA, or any dtype on the CPU
        tokens = fg.generate(class_ids, row_params)  # (B, N) int64 numpy; one host sync
        for ev in fg.generate_iter(class_ids, row_params): ...   # StepEvent per step, fetched in chunks

    ``cuda_graphs=False`` runs the step eagerly on CUDA too (the graph == eager tests). ``kernel_sampler``: True /
    False force the fused op / the torch reference (None: the op where it is built). ``sync_every``: steps per
    device-to-host chunk of ``generate_iter`` (CUDA; default 32, 1 on the CPU). ``warmup``: eager steps on a side
    stream before a bucket's capture. Low level (benchmarks): ``begin`` (prefill + step 0), ``advance`` (one step),
    ``tokens`` (fetch). Generations on one FastGenerator run one at a time.
    """

    def __init__(self, gen: LARPGenerator, *, cuda_graphs: bool = True, sync_every: int | None = None,
                 warmup: int = 2, kernel_sampler: bool | None = None):
        if not isinstance(gen, LARPGenerator):
            raise ValueError(f"gen must be a LARPGenerator, got {type(gen).__name__}")
        if sync_every is not None and (not isinstance(sync_every, int) or sync_every < 1):
            raise ValueError(f"sync_every must be a positive int or None, got {sync_every!r}")
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
        self.gen = gen
        self.config = gen.config
        self.device = gen.tok_embeddings.weight.device
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        self.sync_every = sync_every if sync_every is not None else (32 if self.device.type == "cuda" else 1)
        self.warmup = warmup
        self.kernel_sampler = kernel_sampler  # None: the fused op where it is built for the device
        self.captures = 0  # graphs captured so far
        self._buckets: dict[tuple, _Bucket] = {}
        self._cache = None  # layer 0's KVCache that the buckets (and their graphs) were built on
        self._pool = None
        self._side = None
        self._generation = 0  # bumped by every begin(): an older generation (its iterator) stops

    # ------------------------------------------------------------------------------------------
    # buckets and caches
    # ------------------------------------------------------------------------------------------
    def _ensure_caches(self, rows: int) -> None:
        gen = self.gen
        cache = gen.layers[0].attention.kv_cache
        ours = cache is not None and cache is self._cache and gen.causal_mask is not None
        if ours and gen.cache_shape[0] >= rows:
            return
        capacity = max(rows, gen.cache_shape[0] if ours else 0)
        self.release()  # the graphs point at the old caches (ours, or replaced by someone else)
        gen.setup_caches(capacity)
        self._cache = gen.layers[0].attention.kv_cache

    def _bucket(self, batch: int, cfg: bool, kernel: bool, branches: tuple) -> _Bucket:
        self._ensure_caches(2 * batch if cfg else batch)
        key = (batch, cfg, kernel, branches)
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(batch, cfg, kernel, self.config.max_seq_len, self.device)
        return b

    def release(self) -> None:
        """Drop every bucket and graph (the model's caches stay; ``gen.clear_caches()`` frees them)."""
        for b in self._buckets.values():
            if b.graph is not None:
                b.graph.reset()
        self._buckets.clear()
        self._cache = None

    @property
    def buckets(self) -> list[tuple]:
        """Keys (request rows, guided, kernel sampler, reference-sampler branches) of the allocated buckets."""
        return list(self._buckets)

    # ------------------------------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------------------------------
    def _sample_and_write(self, b: _Bucket, logits: Tensor) -> None:
        """logits (R, V) of step ``b.step`` -> tokens into out[step] and row_tokens; step += 1, pos += 1."""
        Bb, p = b.batch, b.params
        cond = logits[:Bb]
        uncond = logits[Bb:] if b.cfg else None
        if b.kernel:
            op = kernels.register_torch_op()
            tokens, _ = op(cond, uncond, p.cfg_scale, p.temperature, p.top_k, p.top_p32, p.seed, p.stream, b.step)
        else:
            u = b.table.gather(1, b.step.view(-1, 1)).view(-1)  # (Bb,) each row's uniform at its device step
            tokens = ST.sample(cond, uncond, p, b.step, check_finite=False, u=u)
            finite = torch.isfinite(ST.cfg_mix(cond, uncond, p.cfg_scale)).all(dim=-1)
            tokens = torch.where(finite, tokens, torch.full_like(tokens, -1))  # as the CUDA kernel marks them
        b.out.index_copy_(0, b.step[:1], tokens.view(1, Bb))  # the bucket's rows are at one step
        feed = tokens.clamp(min=0).view(Bb, 1)  # a -1 row must not index the embedding
        b.row_tokens[:Bb].copy_(feed)
        if b.cfg:
            b.row_tokens[Bb:].copy_(feed)
        b.step.add_(1)
        b.pos.add_(1)

    def _body(self, b: _Bucket) -> None:
        """The decode step: the one function that is captured (CUDA) or run eagerly."""
        self._sample_and_write(b, self.gen.decode_one_token(b.row_tokens, b.pos))

    def _capture(self, b: _Bucket) -> None:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one pool for every bucket: they never run concurrently
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._side):
            self._body(b)  # recorded, not run: the state (step, pos, ...) does not move
        b.graph = graph
        self.captures += 1

    # ------------------------------------------------------------------------------------------
    # generation
    # ------------------------------------------------------------------------------------------
    def begin(self, class_ids, params: RowParams) -> _Bucket:
        """Prefill ``class_ids`` (B,) and sample step 0; returns the bucket (``done`` == 1)."""
        cfg = self.config
        if cfg.frame_prediction:
            raise ValueError("this generator predicts frames from prefix tokens; the fast path serves "
                             "class-conditional generators")
        ids = np.asarray(class_ids, np.int64).reshape(-1)
        B = len(ids)
        if B == 0 or len(params) != B:
            raise ValueError(f"class_ids ({B}) and params ({len(params)}) must have the same, non-zero length")
        Bb = bucket_size(B)
        padded = pad_params(params, Bb)
        kernel = use_kernel_sampler(self.device) if self.kernel_sampler is None else self.kernel_sampler
        branches = () if kernel else _reference_branches(padded, cfg.vocab_size)
        b = self._bucket(Bb, params.uses_cfg, kernel, branches)
        # the bucket's layout: request rows [0, Bb) (the padding repeats request 0), then a null row for every one
        layout = RowLayout.offline(np.full(Bb, b.cfg))
        rows = layout.row_values(np.concatenate([ids, np.repeat(ids[:1], Bb - B)]), cfg.null_class, b.rows)
        b.params.load(padded)
        self._generation += 1
        b.generation = self._generation
        b.live, b.done = B, 0
        with torch.inference_mode():
            if b.table is not None:
                b.table.copy_(b.params.uniform_table(b.steps))
            b.step.zero_()
            b.pos.fill_(step_position(1, cfg.cls_token_num) - 1)  # _sample_and_write moves it to step 1's position
            logits = self.gen.prefill(torch.as_tensor(rows, device=self.device))
            self._sample_and_write(b, logits)
        b.done = 1
        return b

    def advance(self, b: _Bucket) -> None:
        """Sample the next step (a graph replay once captured). Enqueues device work only; never syncs."""
        self._check_live(b, b.generation)
        if b.done >= b.steps:
            raise RuntimeError(f"all {b.steps} steps are sampled; call begin() for a new generation")
        with torch.inference_mode():
            if self.cuda_graphs and b.graph is None:
                if self._side is None:
                    self._side = torch.cuda.Stream(self.device)
                if b.warm < self.warmup:  # warm-up steps are real steps, run eagerly on the capture's side stream
                    self._side.wait_stream(torch.cuda.current_stream(self.device))
                    with torch.cuda.stream(self._side):
                        self._body(b)
                    torch.cuda.current_stream(self.device).wait_stream(self._side)
                    b.warm += 1
                    b.done += 1
                    return
                self._capture(b)
            if b.graph is not None:
                b.graph.replay()
            else:
                self._body(b)
        b.done += 1

    def tokens(self, b: _Bucket) -> np.ndarray:
        """The sampled tokens of the live requests so far, (B, done) int64 (one host sync); raises on NaN/Inf."""
        host = b.out[: b.done, : b.live].cpu().numpy()
        _raise_marked(host, 0)
        return np.ascontiguousarray(host.T)

    def generate(self, class_ids, params: RowParams) -> np.ndarray:
        """All tokens, (B, N) int64; the host syncs once, at the end."""
        b = self.begin(class_ids, params)
        while b.done < b.steps:
            self.advance(b)
        return self.tokens(b)

    def generate_iter(self, class_ids, params: RowParams, *, sync_every: int | None = None) -> Iterator[StepEvent]:
        """One StepEvent per step; tokens reach the host in chunks of ``sync_every`` steps, one chunk behind."""
        chunk = sync_every or self.sync_every
        b = self.begin(class_ids, params)
        N, gen_id = b.steps, b.generation
        pending: list[tuple[int, int, object]] = []
        lo = 0
        while lo < N:
            hi = min(lo + chunk, N)
            self._check_live(b, gen_id)
            while b.done < hi:
                self.advance(b)
            pending.append((lo, hi, self._fetch(b, lo, hi)))
            lo = hi
            while len(pending) > (1 if lo < N else 0):  # the previous chunk has long been copied
                yield from self._events(b, gen_id, *pending.pop(0))

    def _check_live(self, b: _Bucket, gen_id: int) -> None:
        if b.generation != gen_id or gen_id != self._generation:
            raise RuntimeError("another generation started on this generator (they share the KV caches and "
                               "buffers); generations on one backend run one at a time")

    def _fetch(self, b: _Bucket, lo: int, hi: int):
        if b.host is None:
            return b.out[lo:hi].numpy().copy()  # CPU: already here
        b.host[lo:hi].copy_(b.out[lo:hi], non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return done

    def _events(self, b: _Bucket, gen_id: int, lo: int, hi: int, fetched) -> Iterator[StepEvent]:
        if isinstance(fetched, np.ndarray):
            chunk = fetched
        else:
            fetched.synchronize()
            self._check_live(b, gen_id)  # else the pinned buffer may hold a newer generation's tokens
            chunk = b.host[lo:hi].numpy().copy()
        chunk = chunk[:, : b.live]
        _raise_marked(chunk, lo)
        for i in range(hi - lo):
            yield StepEvent(lo + i, b.steps, chunk[i])


def _raise_marked(chunk: np.ndarray, lo: int) -> None:
    """Raise for the first row a sampler marked in ``chunk`` (steps lo.., rows): its step, row and reason."""
    bad = np.argwhere(chunk < 0)
    if len(bad):
        j, r = bad[0]
        raise device_row_exception(chunk[j, r], f"row {r} of the batch failed at step {lo + j}: "
                                   f"{device_row_error(chunk[j, r])}", row=int(r))
