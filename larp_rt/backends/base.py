"""The small interface every backend implements, and the generation loop they share.

A backend runs three computations of a bundle: ``encode`` (video -> indices), ``decode`` (indices -> video)
and the generator's cached step. The step runs on a ``StepRunner``: the KV caches of a fixed number of rows,
allocated once, and one decode step over them in which **every row sits at its own position** (the bundle's
``pos`` (B,) input). ``ContinuousBatch`` owns the loop over a runner: requests (``Sequence``) join it and leave it
at step boundaries, each on its own rows (its class row, and a null-class row when it uses guidance) at its own
position and sampling step. A request's prefill is the step at position 0 with its class token, so a joining
request simply takes part in the next decode step; a finished one frees its rows for the next.

A row that cannot be sampled (NaN/Inf logits, a parameter the kernel refuses) fails its request alone: a host
sampler samples each request of a refused batch alone; a runner that samples in its graph reports rows (a
device kernel's negative tokens) or is run again over the same rows and positions without the failing requests
(``ContinuousBatch._run_sampling``); the failed request's rows are cleared (``StepRunner.clear_rows``) and freed.
``inject_faults`` is the tests' hook to make a request's step fail. Failures are typed (``larp_rt.errors``): a
``NonFiniteLogitsError`` or a ``SamplingParamsError``, both ValueErrors; ``Sequence.failure`` holds it.

Where rows, positions and cache slots sit is ``layout.py`` (``RowLayout``, ``step_position``, the cache window).

``Backend.generate`` is that loop with every request admitted at step 0; the serving scheduler
(``larp_rt.serving``) is the same loop with requests arriving while it runs. Either way a request draws from
its own Philox stream at its own step, so its tokens never depend on what shares its batch.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .. import sampling
from ..config import GeneratorConfig, TokenizerConfig
from ..errors import BackendCapabilityError, NonFiniteLogitsError, SamplingError, SamplingParamsError
from ..sampling import RowParams
from .layout import RowLayout, cache_slots, cache_window, rebind_width, step_position, window_width

__all__ = ["Backend", "ContinuousBatch", "Sequence", "StepEvent", "StepRunner", "StepSample", "NON_FINITE",
           "BAD_PARAMS", "bucket", "inject_faults", "device_row_error", "device_row_exception", "RowLayout",
           "step_position", "cache_slots", "cache_window", "window_width", "rebind_width"]

Sampler = Callable[..., np.ndarray]
# raised when a sampler met NaN/Inf logits (a device sampler marks such a row with token -1)
NON_FINITE = "logits contain NaN/Inf: the model produced non-finite values; check the weights and the precision"
# a device sampler marks a row whose parameters are outside the bounds of larp_rt.sampling with token -2
BAD_PARAMS = ("the sampler refused the request's parameters (outside the bounds of SamplingParams.validate: "
              "cfg_scale, temperature, top_k, top_p)")
_DEVICE_CODES = {-1: NON_FINITE, -2: BAD_PARAMS}  # kernels.TOKEN_NON_FINITE, kernels.TOKEN_BAD_PARAMS


def device_row_error(token: int) -> str:
    """What a device sampler's negative token means (-1: NaN/Inf logits, -2: parameters out of bounds)."""
    return _DEVICE_CODES.get(int(token), f"the sampler marked the row with token {int(token)}")


def device_row_exception(token: int, message: str | None = None, *, row: int | None = None) -> ValueError:
    """The typed error of a device sampler's negative token: NonFiniteLogitsError (-1), SamplingParamsError (-2),
    else a ValueError; ``message`` defaults to ``device_row_error(token)``."""
    cls = {-1: NonFiniteLogitsError, -2: SamplingParamsError}.get(int(token))
    msg = device_row_error(token) if message is None else message
    return ValueError(msg) if cls is None else cls(msg, row=row)


def retyped(error: BaseException | None, message: str, *, row: int | None = None) -> ValueError:
    """A new error with ``message`` of ``error``'s type when it is a SamplingError (a NaN/Inf or a refused row keeps
    its type through the loops that reword it), else a ValueError."""
    if isinstance(error, SamplingError):
        return type(error)(message, row=row)
    return ValueError(message)


# Test hook: ``fault(seq) -> bool`` is asked for every active sequence at every step; True makes that sequence's
# step fail as a model or kernel failure would, for values that pass validation: its logits become NaN where the
# loop holds them (runners that return logits: every host sampler sees real NaN/Inf logits), else its temperature
# becomes NaN in the in-graph sampler's parameters (the fused graph's op refuses the row, a device kernel marks it).
_fault: Callable[[Sequence], bool] | None = None


@contextlib.contextmanager
def inject_faults(fault: Callable[[Sequence], bool] | None):
    """``with inject_faults(lambda seq: ...):`` every ContinuousBatch (a scheduler's, ``Engine.generate``'s) asks
    ``fault`` per sequence and step, and fails the step of each sequence it returns True for (tests only)."""
    global _fault
    old, _fault = _fault, fault
    try:
        yield
    finally:
        _fault = old


def _failed_row(error: ValueError, n: int) -> int | None:
    """The row of a batch of ``n`` that a sampler's typed refusal names (``SamplingError.row``), if any."""
    r = error.row if isinstance(error, SamplingError) else None
    return r if r is not None and 0 <= r < n else None


_versions = itertools.count(1)  # membership versions, unique across batches (a runner outlives its batches)


def bucket(rows: int) -> int:
    """Row capacity of the runner that serves ``rows`` rows: the next power of two (1, 2, 4, 8, ...)."""
    return 1 << max(rows - 1, 0).bit_length()


@dataclass(frozen=True)
class StepEvent:
    """One generation step: ``tokens`` (B,) were drawn for position ``step`` of ``total``."""

    step: int
    total: int
    tokens: np.ndarray


@dataclass(frozen=True)
class StepSample:
    """What a runner that samples in its graph needs for one step: the rows the sampler reads (``rows`` (R_req,):
    the requests' rows, then, when any request is guided, one null-class row per request (a request's own row
    again when it is not guided), the requests' parameters (B_req rows) and their sampling steps (B_req,).
    ``version`` changes whenever the request set changes (the runner rebinds its parameter buffers then)."""

    rows: np.ndarray
    params: RowParams
    steps: np.ndarray
    version: int


class StepRunner:
    """The KV caches of ``capacity`` rows and the decode step over them (one per backend and loop owner).

    ``run(tokens, pos)``: tokens (R,) int64 (a video token, or ``vocab + class`` at position 0: the prefill),
    pos (R,) int64 per row (R <= capacity; row r's cache slots >= pos[r] are ignored, slot pos[r] is written)
    -> (R, V) float32 logits; when ``samples`` is True the runner draws in its graph and returns the (B_req,)
    tokens of ``sample`` instead."""

    capacity: int = 0
    samples: bool = False

    def run(self, tokens: np.ndarray, pos: np.ndarray, sample: StepSample | None = None) -> np.ndarray:
        raise NotImplementedError

    def prefill(self, rows: np.ndarray, prefix: np.ndarray) -> np.ndarray:
        """Frame prediction: the prefix (R, P) int64 of rows ``rows`` (R,) in one multi-token run (positions
        0 .. P-1), its P cache entries written into slots 0 .. P-1 of each row -> (R, V) float32 logits of the
        last prefix position (video token 0)."""
        raise NotImplementedError(f"{type(self).__name__} has no multi-token prefill (frame prediction)")

    def clear_rows(self, rows: np.ndarray) -> None:
        """Zero every cache slot of ``rows`` (the rows of a request that failed: NaN/Inf entries it may have written
        must not reach the next request on those rows through attention that reads masked slots)."""

    def close(self) -> None:
        """Release the buffers."""


class Sequence:
    """One request in a ``ContinuousBatch``: a class id, its one-row ``RowParams``, and its tokens so far.

    ``rows`` are assigned on admission: its own row, and a null-class row when it uses guidance. ``step`` is the
    next step to sample (``total`` when finished); ``error`` (the message) and ``failure`` (the typed error:
    ``NonFiniteLogitsError``, ``SamplingParamsError`` or another ValueError) are set when it failed (NaN/Inf logits,
    or the sampler refused its row): it failed alone, the other sequences of its steps went on."""

    __slots__ = ("class_id", "params", "total", "tag", "row", "null_row", "step", "tokens", "error", "failure",
                 "prefix")

    def __init__(self, class_id: int, params: RowParams, total: int, tag=None, *, prefix: np.ndarray | None = None):
        if len(params) != 1:
            raise ValueError(f"a Sequence takes one-row RowParams, got {len(params)} rows")
        self.class_id, self.params, self.total, self.tag = int(class_id), params, int(total), tag
        # frame prediction: the prefix tokens (cls_token_num,) (cond tokens + separator), prefilled in one run
        self.prefix = None if prefix is None else np.ascontiguousarray(prefix, np.int64).reshape(-1)
        self.row = self.null_row = -1
        self.step = 0
        self.tokens = np.zeros(self.total, np.int64)
        self.error: str | None = None
        self.failure: ValueError | None = None

    @property
    def guided(self) -> bool:
        return bool(self.params.cfg_scale[0] != 1.0)

    @property
    def rows_needed(self) -> int:
        return 2 if self.guided else 1

    @property
    def done(self) -> bool:
        return self.step >= self.total or self.error is not None

    def fail(self, error: ValueError) -> None:
        """Record the failure of this sequence's step (its message in ``error``, the error in ``failure``)."""
        self.error, self.failure = str(error), error

    def exception(self) -> ValueError | None:
        """The error that ended this sequence (a fresh one of the failure's type and message), or None."""
        if self.error is None:
            return None
        return retyped(self.failure, self.error, row=getattr(self.failure, "row", None))


def _row_params(seqs: list[Sequence]) -> RowParams:
    return RowParams(**{f: np.concatenate([getattr(s.params, f) for s in seqs])
                        for f in RowParams.__dataclass_fields__})


class ContinuousBatch:
    """Step-level batching over one ``StepRunner``: sequences join (``admit``) and leave (``evict``, or when they
    finish) at step boundaries; ``step()`` runs one decode step for every active sequence and samples its token.

    Rows: a sequence takes the lowest free rows; a step binds rows [0, highest used + 1) (free rows below it run
    as idle rows at position 0 and are ignored). Sampling: the backend's sampler (or the runner's in-graph one)
    with each sequence's own parameters, Philox stream and step."""

    def __init__(self, backend: Backend, runner: StepRunner):
        cfg = backend.generator_config
        if cfg is None:
            raise ValueError("this bundle has no generator")
        self.backend, self.runner, self.config = backend, runner, cfg
        self.sequences: list[Sequence] = []
        self._used = np.zeros(runner.capacity, bool)
        self._tok = np.zeros(runner.capacity, np.int64)
        self._pos = np.zeros(runner.capacity, np.int64)
        self._version = next(_versions)
        self._packed_version = -1
        self._uniforms = backend.sampler_takes_uniform and not runner.samples

    # membership ------------------------------------------------------------------------------
    @property
    def free_rows(self) -> int:
        return int(self.runner.capacity - self._used.sum())

    def __len__(self) -> int:
        return len(self.sequences)

    def admit(self, seq: Sequence, rows: tuple[int, int] | None = None) -> None:
        """Give ``seq`` its rows (the lowest free ones, or ``rows`` = (row, null_row or -1)); it is prefilled in the
        next step. Raises RuntimeError when the runner has no room (check ``free_rows``)."""
        if not 1 <= seq.total <= self.config.max_seq_len:
            raise ValueError(f"a sequence samples 1..{self.config.max_seq_len} tokens, got {seq.total}")
        if seq in self.sequences:
            raise RuntimeError("this sequence is already in the batch")
        if (seq.prefix is not None) != bool(self.config.frame_prediction):
            raise ValueError("a frame-prediction generator takes sequences with a prefix (and no class id); a "
                             "class-conditional one takes class ids (no prefix)")
        if seq.prefix is not None and seq.prefix.shape != (self.config.cls_token_num,):
            raise ValueError(f"the prefix must hold {self.config.cls_token_num} tokens, got {seq.prefix.shape}")
        need = seq.rows_needed
        if rows is None:
            free = np.flatnonzero(~self._used)
            if len(free) < need:
                raise RuntimeError(f"no room: the batch has {len(free)} free rows, the request needs {need}")
            rows = (int(free[0]), int(free[1]) if need == 2 else -1)
        row, null_row = rows
        for r in rows[:need]:
            if not 0 <= r < self.runner.capacity or self._used[r]:
                raise RuntimeError(f"row {r} is taken or outside the runner's {self.runner.capacity} rows")
        seq.row, seq.null_row = row, (null_row if need == 2 else -1)
        self._used[row] = True
        if seq.null_row >= 0:
            self._used[seq.null_row] = True
        self.sequences.append(seq)
        self._version = next(_versions)

    def evict(self, seq: Sequence) -> None:
        """Remove ``seq`` (finished, cancelled or failed) and free its rows."""
        if seq in self.sequences:
            self.sequences.remove(seq)
            for r in (seq.row, seq.null_row):
                if r >= 0:
                    self._used[r] = False
            self._version = next(_versions)

    def _pack(self) -> None:
        """Per-sequence arrays of the current membership (rebuilt when it changes, not per step)."""
        seqs = self.sequences
        layout = self._layout = RowLayout(np.array([s.row for s in seqs], np.int64),
                                          np.array([s.null_row for s in seqs], np.int64))
        self._rows = layout.rows
        self._guided = np.flatnonzero(layout.guided)
        self._null = layout.null_rows[self._guided]
        self._classes = np.array([s.class_id for s in seqs], np.int64)
        self._params = _row_params(seqs)
        self._any_guided = layout.any_guided
        self._uncond = layout.uncond_rows  # the sampler's uncond rows (see layout.RowLayout)
        self._sample_rows = layout.sample_rows()
        self._hi = layout.num_rows
        used = np.zeros(self._hi, bool)
        used[self._rows] = True
        used[self._null] = True
        self._idle = np.flatnonzero(~used)  # free rows below the highest used one
        self._k = np.array([s.step for s in seqs], np.int64)  # each sequence's next step
        self._last = np.array([s.tokens[s.step - 1] if s.step else 0 for s in seqs], np.int64)  # its last token
        if self._uniforms:  # every sequence's uniforms for its whole video, drawn once (the reference sampler's)
            self._table = sampling.uniform_table(self._params, max(s.total for s in seqs))
        self._packed_version = self._version

    # the step --------------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """One decode step for every active sequence: prefill for those at step 0 (their class token at position
        0), the next position for the others; draw each one's token. Returns the sequences that finished or failed
        in this step (they are evicted)."""
        if not self.sequences:
            return []
        if self._packed_version != self._version:
            self._pack()
        if self.config.frame_prediction and not self._k.all():
            return self._prefill_step()
        cfg, seqs = self.config, self.sequences
        V = cfg.vocab_size
        k, last = self._k, self._last
        hi = self._hi
        tok, pos = self._tok[:hi], self._pos[:hi]
        if len(self._idle):  # idle rows: token 0 at position 0 (reads no cache slot; its slot-0 write is never read)
            tok[self._idle] = 0
            pos[self._idle] = 0
        p = step_position(k, cfg.cls_token_num)  # step k >= 1 feeds token k - 1 at cls - 1 + k; step 0 prefills at 0
        if k.all():
            tok[self._rows] = last
            pos[self._rows] = p
            if self._any_guided:
                tok[self._null] = last[self._guided]
                pos[self._null] = p[self._guided]
        else:
            first = k == 0
            tok[self._rows] = np.where(first, V + self._classes, last)
            pos[self._rows] = p
            if self._any_guided:
                g = self._guided
                tok[self._null] = np.where(first[g], V + cfg.null_class, last[g])
                pos[self._null] = p[g]
        poison = self._faults()
        if self.runner.samples:
            tokens, errors = self._run_sampling(tok, pos, k, poison)
        else:
            logits = self.runner.run(tok, pos)
            cond = logits[self._rows]
            uncond = logits[self._uncond] if self._any_guided else None
            if poison is not None:  # the test hook: these requests' logits are NaN (copies: the runner's stay)
                cond = cond.copy()
                cond[poison] = np.nan
            extra = {"u": self._table[np.arange(len(k)), k]} if self._uniforms else {}
            tokens, errors = self._sample(cond, uncond, self._params, k, extra)
        return self._finish_step(np.arange(len(seqs)), tokens, errors)

    def _faults(self, idx: np.ndarray | None = None) -> np.ndarray | None:
        """The test hook's verdict for the sequences ``idx`` (all by default): a bool mask, or None (no fault)."""
        if _fault is None:
            return None
        seqs = self.sequences if idx is None else [self.sequences[i] for i in idx]
        mask = np.fromiter((bool(_fault(s)) for s in seqs), bool, len(seqs))
        return mask if mask.any() else None

    def _finish_step(self, idx: np.ndarray, tokens: np.ndarray, errors: list[ValueError | None]) -> list[Sequence]:
        """Record the step of sequences ``idx``: a token for each one without an error (its step advances), the error
        of each one that failed (its rows are cleared and freed; nothing of it reaches the others). Returns the
        sequences that finished or failed (evicted)."""
        done: list[Sequence] = []
        for j, i in enumerate(idx):
            s = self.sequences[i]
            if errors[j] is not None:
                s.fail(errors[j])
                self.runner.clear_rows(np.array([r for r in (s.row, s.null_row) if r >= 0], np.int64))
            else:
                s.tokens[s.step] = tokens[j]
                s.step += 1
                self._k[i] += 1
                self._last[i] = tokens[j]
            if s.done:
                done.append(s)
        for s in done:
            self.evict(s)
        return done

    def _run_sampling(self, tok: np.ndarray, pos: np.ndarray, k: np.ndarray, poison: np.ndarray | None):
        """The step on a runner that samples in its graph -> (tokens, errors), one per sequence.

        A runner that reports rows (a device sampler's negative tokens) needs nothing more. One that raises (the
        fused graph's op refuses its batch: NaN/Inf logits, a parameter) is run again over the same rows and
        positions without the failing requests: the one its message names (the kernel reports the first bad row),
        else halves of the requests (bisection), until every request has its token or its own error. A re-run
        feeds the same tokens at the same positions to the same rows (the failing requests' rows included, only
        their sampling is left out), so the others' logits, cache entries (rewritten with the same values) and
        Philox draws (counter-based: (seed, stream, step)) are those of the first run; the raising run wrote no
        cache entry (the runners write after a successful run)."""
        params = self._params
        if poison is not None:  # the test hook: the in-graph sampler refuses these requests' rows
            params = dataclasses.replace(params, temperature=np.where(poison, np.float32(np.nan), params.temperature))

        def probe(idx: np.ndarray | None):
            if idx is None:  # (poisoned parameters: a fresh key, so that the runner binds them, and rebinds after)
                sample = StepSample(self._sample_rows, params, k, self._version if poison is None else next(_versions))
            else:
                sample = StepSample(self._layout.sample_rows(idx), params.select(idx), k[idx], next(_versions))
            try:  # (a fresh binding key above)
                return np.array(self.runner.run(tok, pos, sample), np.int64), None  # a copy: the buffer is reused
            except ValueError as e:
                return None, e

        n = len(k)
        errors: list[ValueError | None] = [None] * n
        tokens, err = probe(None)
        if err is not None:
            tokens = np.zeros(n, np.int64)
            pending = [(np.arange(n), err)]
            while pending:
                sub, e = pending.pop()
                if len(sub) == 1:
                    errors[int(sub[0])] = e
                    continue
                r = _failed_row(e, len(sub))
                parts = [np.delete(sub, r)] if r is not None else [sub[: len(sub) // 2], sub[len(sub) // 2:]]
                if r is not None:
                    errors[int(sub[r])] = e
                for part in parts:
                    t, e2 = probe(part)
                    if e2 is None:
                        tokens[part] = t
                    else:
                        pending.append((part, e2))
        for i in np.flatnonzero(tokens < 0):  # a device sampler marked the row
            if errors[i] is None:
                errors[i] = device_row_exception(tokens[i])
        return tokens, errors

    def _prefill_step(self) -> list[Sequence]:
        """Frame prediction: the sequences at step 0 run their prefix through the runner's multi-token prefill
        (one run for all of them) and draw token 0; the others wait for the next step (a step is a prefill or a
        decode step, never both, so a joining request's long prefix never mixes into a decode step's rows)."""
        idx = np.flatnonzero(self._k == 0)
        seqs = [self.sequences[i] for i in idx]
        logits = self.runner.prefill(self._rows[idx], np.stack([s.prefix for s in seqs]))
        poison = self._faults(idx)
        if poison is not None:
            logits = logits.copy()
            logits[poison] = np.nan
        extra = {"u": self._table[idx, 0]} if self._uniforms else {}
        tokens, errors = self._sample(logits, None, self._params.select(idx), np.zeros(len(idx), np.int64), extra)
        return self._finish_step(idx, tokens, errors)

    def _sample(self, cond: np.ndarray, uncond: np.ndarray | None, params: RowParams, k: np.ndarray, extra: dict):
        """The backend's sampler on the requests' logits -> (tokens, errors): when it refuses the batch (NaN/Inf
        logits, a parameter), each request is sampled alone (a row's draw depends on its own logits, parameters and
        step only), so a request that fails, fails alone with the sampler's message."""
        be = self.backend
        n = len(k)
        try:
            return np.asarray(be.sampler(cond, uncond, params, k, **extra)), [None] * n
        except ValueError:
            pass
        tokens = np.zeros(n, np.int64)
        errors: list[ValueError | None] = [None] * n
        for i in range(n):
            one = slice(i, i + 1)
            try:
                tokens[i] = be.sampler(cond[one], None if uncond is None else uncond[one], params.select(one), k[one],
                                       **({"u": extra["u"][one]} if extra else {}))[0]
            except ValueError as e:
                errors[i] = e
        return tokens, errors


class Backend(abc.ABC):
    """What the Engine and the serving loop call on a backend. Subclasses implement ``new_runner`` (abstract) and,
    to serve a tokenizer, ``encode`` and ``decode``; the generation loops (``generate_iter``, ``predict_iter``) run
    over ``new_runner``'s runners unless a backend overrides them with a faster path. The tokenizer's parts, the
    stochastic encoder (``encode_latents``) and the AR prior (``prior_*``) have defaults that raise
    ``BackendCapabilityError`` naming a backend that has them (a generator-only backend needs only the runner).

    Attributes the Engine reads: ``name``, ``tokenizer_config`` / ``generator_config`` (None when the bundle has
    no such part), ``sampler`` (the host sampler, ``larp_rt.sampling.sample``'s signature), ``sampler_takes_uniform``
    (it accepts ``u=``), ``sampler_name`` / ``sampler_reason`` and ``prior_graph_name``."""

    name = "base"

    def __init__(self, tokenizer_config: TokenizerConfig | None, generator_config: GeneratorConfig | None):
        self.tokenizer_config = tokenizer_config
        self.generator_config = generator_config
        self.sampler: Sampler = sampling.sample  # the engine may swap in a fused kernel with the same semantics
        self.sampler_takes_uniform = True  # the sampler accepts u= (the rows' uniforms, drawn once per request)
        self.sampler_name = "reference"
        self.sampler_reason = ""  # why ``sampler_name`` was picked (said by the Engine and the CLI)
        self._runner: StepRunner | None = None

    def _lacks(self, what: str, use: str = "onnxruntime") -> BackendCapabilityError:
        return BackendCapabilityError(f"backend {self.name!r} has no {what}: use backend={use!r}")

    # tokenizer -------------------------------------------------------------------------------
    def encode(self, video: np.ndarray) -> np.ndarray:
        """Video (B, C, T, H, W) float32 in [0, 1], C-contiguous (checked by the Engine) -> tokens (B, N) int64."""
        raise self._lacks("tokenizer encoder (encode)")

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """Tokens (B, N) int64 in [0, codebook) -> video (B, C, T, H, W) float32 in [0, 1]."""
        raise self._lacks("tokenizer decoder (decode)")

    def encode_latents(self, video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Video (B, C, T, H, W) float32 in [0, 1] -> (the encoder's L2-normalised latents (B, N, d) float32, the
        normalised codebook (K, d) float32): the inputs of the stochastic SVQ draw (``predict(stochastic_cond=True)``,
        ``larp_rt.sampling.svq_sample``). Optional: the default raises BackendCapabilityError."""
        raise self._lacks("stochastic encoder (encode_latents, for stochastic_cond=True)")

    # generator -------------------------------------------------------------------------------
    @abc.abstractmethod
    def new_runner(self, capacity: int) -> StepRunner:
        """A StepRunner with its own KV caches for ``capacity`` rows (the scheduler owns one; ``generate`` reuses
        the backend's own). Its ``capacity`` may be larger (a plan's bucket)."""

    def runner(self, rows: int) -> StepRunner:
        """The backend's own runner for ``generate``: kept, and replaced by a bigger bucket when ``rows`` outgrow it."""
        if self._runner is None or self._runner.capacity < rows:
            if self._runner is not None:
                self._runner.close()
            self._runner = self.new_runner(bucket(rows))
        return self._runner

    def generate_iter(self, class_ids: np.ndarray, params: RowParams) -> Iterator[StepEvent]:
        """Class ids (B,) int64 (checked) and their (B,) RowParams -> one StepEvent per step k = 0 .. N-1 with the
        (B,) int64 tokens of step k. Every request is admitted at step 0 on the backend's runner, rows laid out by
        ``RowLayout.offline`` (rows [0, B) the requests, then one null row per guided request). A row that fails
        raises its typed error (a ValueError) naming its row, class id and step."""
        cfg = self.generator_config
        assert cfg is not None
        N = cfg.max_seq_len
        layout = RowLayout.offline(params.cfg_scale != 1.0)
        batch = ContinuousBatch(self, self.runner(layout.num_rows))
        seqs = [Sequence(c, params.select(slice(i, i + 1)), N) for i, c in enumerate(class_ids)]
        for i, s in enumerate(seqs):
            batch.admit(s, (int(layout.rows[i]), int(layout.null_rows[i])))
        yield from _run_admitted(batch, seqs, N)

    def predict_iter(self, prefix: np.ndarray, params: RowParams) -> Iterator[StepEvent]:
        """Frame prediction: prefixes (B, cls_token_num) int64 (the conditioning tokens + the separator) and their
        (B,) RowParams (no guidance) -> one StepEvent per generated token, (B,) int64. Every prefix is admitted at
        step 0 on the backend's runner (row i = request i); step 0 is one multi-token prefill, then one decode
        step per token."""
        cfg = self.generator_config
        assert cfg is not None and cfg.frame_prediction
        B, N = len(prefix), cfg.max_seq_len
        batch = ContinuousBatch(self, self.runner(B))
        seqs = [Sequence(0, params.select(slice(i, i + 1)), N, prefix=prefix[i]) for i in range(B)]
        for i, s in enumerate(seqs):
            batch.admit(s, (i, -1))
        yield from _run_admitted(batch, seqs, N)

    # the tokenizer's AR prior (optional) -----------------------------------------------------
    def prior_logprobs_full(self, tokens: np.ndarray) -> np.ndarray:
        """Tokens (B, N) int64 (checked) -> (B, N - 1) float32 ``log p(token t | tokens < t)`` for t = 1 .. N-1,
        from one causal forward of the prior over the whole sequence (``prior_score``)."""
        raise self._lacks("AR prior scorer (prior_logprobs_full)")

    def prior_runner(self, capacity: int) -> StepRunner:
        """A StepRunner over the prior's cached step: ``run(tokens (R,) int64, pos (R,) int64)`` -> (R, K) float32
        logits of the next tokens (the host samples); ``close()`` frees its caches. Each caller owns its runner."""
        raise self._lacks("AR prior step (prior_runner)")

    @property
    def prior_sampler(self) -> Sampler:
        """The host sampler of the prior's loop (``larp_rt.sampling.sample``'s signature; the same draws)."""
        return sampling.sample

    @property
    def prior_graph_name(self) -> str | None:
        """The bundle graph the prior's steps run through, where the backend picks one (ONNX Runtime); else None."""
        return None

    def close(self) -> None:
        """Release sessions and buffers (the backend's own runner; subclasses free theirs)."""
        if self._runner is not None:
            self._runner.close()
            self._runner = None


def _run_admitted(batch: ContinuousBatch, seqs: list[Sequence], N: int) -> Iterator[StepEvent]:
    """Step ``batch`` N times for ``seqs`` (all admitted at step 0), yielding every step's tokens; a sequence that
    failed (non-finite logits, a refused row) evicts them all and raises its error (its type kept), naming its row."""
    for k in range(N):
        batch.step()
        bad = [(i, s) for i, s in enumerate(seqs) if s.error]
        if bad:
            for s in seqs:
                batch.evict(s)
            i, s = bad[0]
            what = "" if s.prefix is not None else f" (class id {s.class_id})"
            raise retyped(s.failure, f"row {i} of the batch{what} failed at step {k}: {s.error}", row=i)
        yield StepEvent(k, N, np.fromiter((s.tokens[k] for s in seqs), np.int64, len(seqs)))
