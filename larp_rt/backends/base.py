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
``inject_faults`` is the tests' hook to make a request's step fail.

``Backend.generate`` is that loop with every request admitted at step 0; the serving scheduler
(``larp_rt.serving``) is the same loop with requests arriving while it runs. Either way a request draws from
its own Philox stream at its own step, so its tokens never depend on what shares its batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .. import sampling
from ..config import GeneratorConfig, TokenizerConfig
from ..sampling import RowParams

__all__ = ["Backend", "ContinuousBatch", "Sequence", "StepEvent", "StepRunner", "StepSample", "NON_FINITE",
           "BAD_PARAMS", "bucket", "inject_faults", "device_row_error"]

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


_ROW_IN_ERROR = re.compile(r"(?:first at row (\d+)\b)|(?:^(?:larp_rt\.Sample: )?[a-z_]+\[(\d+)\] = )")


def _failed_row(msg: str, n: int) -> int | None:
    """The row a kernel's refusal names ("... (first at row 3, ...)", "temperature[3] = nan: ..."), if any."""
    m = _ROW_IN_ERROR.search(msg)
    if m is None:
        return None
    r = int(m.group(1) or m.group(2))
    return r if 0 <= r < n else None
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
    next step to sample (``total`` when finished); ``error`` is set when it failed (NaN/Inf logits, or the sampler
    refused its row): it failed alone, the other sequences of its steps went on."""

    __slots__ = ("class_id", "params", "total", "tag", "row", "null_row", "step", "tokens", "error", "prefix")

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

    @property
    def guided(self) -> bool:
        return bool(self.params.cfg_scale[0] != 1.0)

    @property
    def rows_needed(self) -> int:
        return 2 if self.guided else 1

    @property
    def done(self) -> bool:
        return self.step >= self.total or self.error is not None


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
        self._rows = np.array([s.row for s in seqs], np.int64)
        guided = np.array([s.null_row >= 0 for s in seqs], bool)
        self._guided = np.flatnonzero(guided)
        self._null = np.array([s.null_row for s in seqs if s.null_row >= 0], np.int64)
        self._classes = np.array([s.class_id for s in seqs], np.int64)
        self._params = _row_params(seqs)
        self._any_guided = bool(len(self._guided))
        # the sampler's uncond rows: the null row of a guided sequence, its own row otherwise (mixes to cond)
        self._uncond = np.where(guided, np.array([s.null_row for s in seqs], np.int64), self._rows)
        self._sample_rows = np.concatenate([self._rows, self._uncond]) if self._any_guided else self._rows
        self._hi = int(max(self._rows.max(), self._null.max() if len(self._null) else -1)) + 1
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
        p = cfg.cls_token_num - 1 + k  # step k >= 1 feeds token k - 1 at position cls + k - 1; step 0 prefills at 0
        if k.all():
            tok[self._rows] = last
            pos[self._rows] = p
            if self._any_guided:
                tok[self._null] = last[self._guided]
                pos[self._null] = p[self._guided]
        else:
            first = k == 0
            p = np.where(first, 0, p)
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

    def _finish_step(self, idx: np.ndarray, tokens: np.ndarray, errors: list[str | None]) -> list[Sequence]:
        """Record the step of sequences ``idx``: a token for each one without an error (its step advances), the error
        of each one that failed (its rows are cleared and freed; nothing of it reaches the others). Returns the
        sequences that finished or failed (evicted)."""
        done: list[Sequence] = []
        for j, i in enumerate(idx):
            s = self.sequences[i]
            if errors[j] is not None:
                s.error = errors[j]
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
                rows = np.concatenate([self._rows[idx], self._uncond[idx]]) if self._any_guided else self._rows[idx]
                sample = StepSample(rows, params.select(idx), k[idx], next(_versions))  # a fresh binding key
            try:
                return np.array(self.runner.run(tok, pos, sample), np.int64), None  # a copy: the buffer is reused
            except ValueError as e:
                return None, str(e)

        n = len(k)
        errors: list[str | None] = [None] * n
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
                errors[i] = device_row_error(tokens[i])
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
        errors: list[str | None] = [None] * n
        for i in range(n):
            one = slice(i, i + 1)
            try:
                tokens[i] = be.sampler(cond[one], None if uncond is None else uncond[one], params.select(one), k[one],
                                       **({"u": extra["u"][one]} if extra else {}))[0]
            except ValueError as e:
                errors[i] = str(e)
        return tokens, errors


class Backend:
    """Base class: subclasses implement encode/decode and ``new_runner`` (or override generate_iter)."""

    name = "base"

    def __init__(self, tokenizer_config: TokenizerConfig | None, generator_config: GeneratorConfig | None):
        self.tokenizer_config = tokenizer_config
        self.generator_config = generator_config
        self.sampler: Sampler = sampling.sample  # the engine may swap in a fused kernel with the same semantics
        self.sampler_takes_uniform = True  # the sampler accepts u= (the rows' uniforms, drawn once per request)
        self.sampler_name = "reference"
        self.sampler_reason = ""  # why ``sampler_name`` was picked (said by the Engine and the CLI)
        self._runner: StepRunner | None = None

    # tokenizer -------------------------------------------------------------------------------
    def encode(self, video: np.ndarray) -> np.ndarray:
        """(B, C, T, H, W) float32 in [0, 1] -> (B, N) int64."""
        raise NotImplementedError

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """(B, N) int64 -> (B, C, T, H, W) float32 in [0, 1]."""
        raise NotImplementedError

    # generator -------------------------------------------------------------------------------
    def new_runner(self, capacity: int) -> StepRunner:
        """A StepRunner with its own KV caches for ``capacity`` rows (the scheduler owns one; ``generate`` reuses
        the backend's own)."""
        raise NotImplementedError

    def runner(self, rows: int) -> StepRunner:
        """The backend's own runner for ``generate``: kept, and replaced by a bigger bucket when ``rows`` outgrow it."""
        if self._runner is None or self._runner.capacity < rows:
            if self._runner is not None:
                self._runner.close()
            self._runner = self.new_runner(bucket(rows))
        return self._runner

    def generate_iter(self, class_ids: np.ndarray, params: RowParams) -> Iterator[StepEvent]:
        """Every request admitted at step 0 on the backend's runner: rows [0, B) are the requests, then one null
        row per guided request; one StepEvent (B tokens) per step."""
        cfg = self.generator_config
        assert cfg is not None
        B, N = len(class_ids), cfg.max_seq_len
        guided = np.flatnonzero(params.cfg_scale != 1.0)
        batch = ContinuousBatch(self, self.runner(B + len(guided)))
        seqs = [Sequence(c, params.select(slice(i, i + 1)), N) for i, c in enumerate(class_ids)]
        null = dict(zip(guided.tolist(), range(B, B + len(guided)), strict=True))
        for i, s in enumerate(seqs):
            batch.admit(s, (i, null.get(i, -1)))
        yield from _run_admitted(batch, seqs, N)

    def predict_iter(self, prefix: np.ndarray, params: RowParams) -> Iterator[StepEvent]:
        """Frame prediction: every prefix (B, cls_token_num) admitted at step 0 on the backend's runner (row i =
        request i, no guidance); step 0 is one multi-token prefill, then one decode step per token."""
        cfg = self.generator_config
        assert cfg is not None and cfg.frame_prediction
        B, N = len(prefix), cfg.max_seq_len
        batch = ContinuousBatch(self, self.runner(B))
        seqs = [Sequence(0, params.select(slice(i, i + 1)), N, prefix=prefix[i]) for i in range(B)]
        for i, s in enumerate(seqs):
            batch.admit(s, (i, -1))
        yield from _run_admitted(batch, seqs, N)

    def close(self) -> None:
        """Release sessions and buffers."""
        if self._runner is not None:
            self._runner.close()
            self._runner = None


def _run_admitted(batch: ContinuousBatch, seqs: list[Sequence], N: int) -> Iterator[StepEvent]:
    """Step ``batch`` N times for ``seqs`` (all admitted at step 0), yielding every step's tokens; a sequence that
    failed (non-finite logits, a refused row) evicts them all and raises its error, naming its row."""
    for k in range(N):
        batch.step()
        bad = [(i, s) for i, s in enumerate(seqs) if s.error]
        if bad:
            for s in seqs:
                batch.evict(s)
            i, s = bad[0]
            what = "" if s.prefix is not None else f" (class id {s.class_id})"
            raise ValueError(f"row {i} of the batch{what} failed at step {k}: {s.error}")
        yield StepEvent(k, N, np.fromiter((s.tokens[k] for s in seqs), np.int64, len(seqs)))
