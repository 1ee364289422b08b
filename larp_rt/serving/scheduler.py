"""Step-level (continuous) batching: one generation loop over one backend, requests joining and leaving it.

    sched = Scheduler(engine, max_batch=8, max_queue=64).start()
    req = sched.submit(3, SamplingParams(cfg_scale=1.25, seed=0))     # from any thread
    gen = req.result(timeout=60)                                       # Generation: tokens (1, N), seeds
    sched.stop()                                                       # drains: running and queued work finish

The scheduler owns a ``StepRunner`` of ``max_batch`` rows (its own KV caches; CFG rows count: a guided request
takes two) and one loop thread running ``base.ContinuousBatch``. Requests wait in a bounded FIFO queue. At every
step boundary the loop drops finished, cancelled and timed-out requests (their rows are free at once), admits
waiting requests into the free rows in arrival order, and runs one decode step for all of them: a joining
request's prefill (its class token at position 0) runs in the same step as the others' next positions.

Failure isolation: a request whose step fails (NaN/Inf logits, the sampler's refusal of its row) ends alone with a
ValueError naming the cause; the other requests of that step draw their tokens as if it had not failed (see
``base.ContinuousBatch``) and its rows are cleared and freed. Only a failure of the step itself (not of a row)
fails every request it carried.

Batch invariance: a request draws from its own Philox stream (seed, stream) at its own step, and every row of
the step sits at its own position, so its tokens equal ``Engine.generate`` of that request alone with the same
seed, whatever else shares the batch and whenever it arrived (up to the floating-point batch variance of the
matmul kernels, which the tests have not seen flip a token).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from ..backends.base import ContinuousBatch, Sequence
from ..checks import check_request_args
from ..engine import Engine, Generation
from ..sampling import SamplingParams

__all__ = ["Scheduler", "Request", "Observer", "QueueFull", "SchedulerClosed", "RequestCancelled"]

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The queue holds ``max_queue`` requests; retry after ``retry_after`` seconds (an estimate)."""

    def __init__(self, msg: str, retry_after: float):
        super().__init__(msg)
        self.retry_after = retry_after


class SchedulerClosed(RuntimeError):
    """The scheduler is stopping or stopped: it takes no new requests."""


class RequestCancelled(RuntimeError):
    """The request was cancelled (by its caller, or by a non-draining stop) before it finished."""


class Observer:
    """Hooks the loop calls on its own thread (metrics); the base class ignores them. Keep them quick."""

    def on_queue(self, depth: int) -> None:
        """The number of waiting requests changed."""

    def on_step(self, rows: int, requests: int, seconds: float, tokens: int) -> None:
        """A decode step ran: ``rows`` batch rows (CFG rows included) for ``requests`` requests, drawing ``tokens``."""

    def on_request(self, outcome: str, seconds: float) -> None:
        """A request ended ("ok", "cancelled", "timeout" or "error") ``seconds`` after its submission."""


class Request:
    """One submitted request: its tokens arrive in ``result()``; ``cancel()`` frees its rows at the next step."""

    def __init__(self, rid: int, class_id: int, params: SamplingParams, seq: Sequence,
                 on_step: Callable[[int, int, int], None] | None, deadline: float | None):
        self.id, self.class_id, self.params, self.seq = rid, class_id, params, seq
        self.seed = int(seq.params.seed[0])
        self.stream = int(seq.params.stream[0])
        self.total = seq.total
        self.submitted = time.monotonic()
        self.deadline = deadline
        self.outcome: str | None = None  # "ok" | "cancelled" | "timeout" | "error"
        self._on_step = on_step
        self._cancel = False
        self._event = threading.Event()
        self._error: BaseException | None = None
        self._result: Generation | None = None
        self._callbacks: list[Callable[[Request], None]] = []
        self._lock = threading.Lock()

    @property
    def steps_done(self) -> int:
        return self.seq.step

    def done(self) -> bool:
        return self._event.is_set()

    def cancel(self) -> bool:
        """Ask the loop to drop this request at the next step boundary; False when it has already ended."""
        if self.done():
            return False
        self._cancel = True
        return True

    def add_done_callback(self, fn: Callable[[Request], None]) -> None:
        """``fn(request)`` once it ends (on the loop thread; at once if it has ended already)."""
        with self._lock:
            if not self.done():
                self._callbacks.append(fn)
                return
        fn(self)

    def result(self, timeout: float | None = None) -> Generation:
        """Wait for the tokens: a Generation with tokens (1, N) int64. Raises RequestCancelled, TimeoutError (its
        own deadline passed; a ``timeout`` here that runs out first raises TimeoutError too, and the request goes
        on), or the error that ended it (``larp_rt.errors.NonFiniteLogitsError`` for non-finite logits,
        ``SamplingParamsError`` for the sampler's refusal of its row, both ValueErrors: it failed alone)."""
        if not self._event.wait(timeout):
            raise TimeoutError(f"request {self.id} has not finished within {timeout} s (it is still running)")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def _finish(self, outcome: str, result: Generation | None = None, error: BaseException | None = None) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self.outcome, self._result, self._error = outcome, result, error
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:
                log.exception("done callback of request %d raised", self.id)

    def __repr__(self) -> str:
        return (f"Request(id={self.id}, class_id={self.class_id}, seed={self.seed}, step={self.steps_done}/"
                f"{self.total}, outcome={self.outcome})")


class Scheduler:
    """One generation loop over ``engine``'s backend, batching every submitted request at step level.

    max_batch: rows of the running batch (a request with cfg_scale != 1 takes two: its class row and a null-class
    row). max_queue: requests that may wait for rows; beyond it ``submit`` raises QueueFull. observer: metrics hooks.
    """

    def __init__(self, engine: Engine, *, max_batch: int = 8, max_queue: int = 64, observer: Observer | None = None):
        if not isinstance(engine, Engine):
            raise ValueError(f"engine must be a larp_rt.Engine, got {type(engine).__name__}")
        engine.require("generator")
        for name, v, lo in (("max_batch", max_batch, 1), ("max_queue", max_queue, 1)):  # every request queues first
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.observer = observer or Observer()
        self.runner = engine.backend.new_runner(max_batch)
        self.batch = ContinuousBatch(engine.backend, self.runner)
        self._active: dict[int, Request] = {}  # id(seq) -> request
        self._queue: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._drain = True
        self._thread: threading.Thread | None = None
        self._ids = 0
        self._steps = 0
        self._tokens = 0
        self._step_seconds = 0.0  # a running mean of the step time (Retry-After estimates)
        self._outcomes: collections.Counter[str] = collections.Counter()

    # lifecycle -------------------------------------------------------------------------------
    def start(self) -> Scheduler:
        with self._cv:
            if self._closed:
                raise SchedulerClosed("this scheduler was stopped; create a new one")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="larp-rt-scheduler", daemon=True)
                self._thread.start()
        return self

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def accepting(self) -> bool:
        return not self._closed

    @property
    def ready(self) -> bool:
        """Started, its loop alive, and taking requests."""
        return self._thread is not None and self._thread.is_alive() and not self._closed

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests. drain: let running and queued requests finish (waiting up to ``timeout`` s, then
        cancelling what is left); else cancel them now. Returns when the loop has ended."""
        with self._cv:
            self._closed = True
            self._drain = drain
            self._cv.notify_all()
        if self._thread is None:
            self._cancel_all("the scheduler was stopped before it started")
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cv:
                self._drain = False
                self._cv.notify_all()
            self._thread.join()

    # requests --------------------------------------------------------------------------------
    def submit(self, class_id, params: SamplingParams | None = None, *, stream: int = 0,
               on_step: Callable[[int, int, int], None] | None = None, timeout: float | None = None) -> Request:
        """Queue one request: ``class_id`` with ``params`` (None: the bundle's defaults; seed None draws one, see
        ``request.seed``). ``stream``: its Philox stream (``Engine.generate(ids, SamplingParams(seed=s))`` gives row
        i the stream (s, i)). ``on_step(step, total, token)``: called on the loop thread after each token (step
        0..total-1). ``timeout``: seconds from now; past it the request ends with TimeoutError and frees its rows.
        Raises ValueError (bad arguments, the Engine's message), QueueFull, SchedulerClosed."""
        if isinstance(class_id, (bool, np.bool_)) or not isinstance(class_id, (int, np.integer)):
            raise ValueError(f"class_id must be an int, got {type(class_id).__name__}")
        check_request_args(params, stream, timeout, on_step)
        ids, rp, _ = self.engine.request_rows([int(class_id)], [params or self.engine.default_params])
        rp = dataclasses.replace(rp, stream=np.array([stream], np.uint64))
        p = dataclasses.replace(params or self.engine.default_params, seed=int(rp.seed[0]))
        seq = Sequence(int(ids[0]), rp, self.engine.generator_config.max_seq_len)
        if seq.rows_needed > self.max_batch:
            raise ValueError(f"a request with cfg_scale != 1 needs 2 batch rows (its class and the null class); this "
                             f"scheduler has max_batch={self.max_batch}: raise --max-batch or use cfg_scale=1.0")
        return self._enqueue(seq, int(ids[0]), p, on_step, timeout)

    def submit_predict(self, frames, params: SamplingParams | None = None, *, num_cond_frames: int = 5,
                       stochastic_cond: bool = False, seed: int | None = None, stream: int = 0,
                       on_step: Callable[[int, int, int], None] | None = None,
                       timeout: float | None = None) -> Request:
        """Queue one frame-prediction request (frame-prediction bundles): ``frames`` of one clip, (1, t, H, W, C)
        uint8 or (1, C, t, H, W) float, as ``Engine.predict`` takes them (its conditioning is encoded here, on the
        caller's thread). Its prefix is prefilled in one run when it joins; ``result()`` holds the N generated
        tokens (decode them with ``engine.decode``). The other arguments as in ``submit``."""
        check_request_args(params, stream, timeout, on_step)
        prefix = self.engine.cond_tokens(frames, num_cond_frames=num_cond_frames, stochastic_cond=stochastic_cond,
                                         seed=seed)
        if len(prefix) != 1:
            raise ValueError(f"submit_predict takes the frames of one clip (batch 1), got {len(prefix)}")
        rp, _ = self.engine.prefix_rows(prefix, [params or self.engine.default_params])
        rp = dataclasses.replace(rp, stream=np.array([stream], np.uint64))
        p = dataclasses.replace(params or self.engine.default_params, seed=int(rp.seed[0]))
        seq = Sequence(0, rp, self.engine.generator_config.max_seq_len, prefix=prefix[0])
        return self._enqueue(seq, 0, p, on_step, timeout)

    def _enqueue(self, seq: Sequence, class_id: int, p: SamplingParams, on_step, timeout) -> Request:
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        with self._cv:
            if self._closed:
                raise SchedulerClosed("the scheduler is shutting down and takes no new requests")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later",
                                retry_after=self._retry_after())
            self._ids += 1
            req = Request(self._ids, class_id, p, seq, on_step, deadline)
            seq.tag = req
            self._queue.append(req)
            self.observer.on_queue(len(self._queue))
            self._cv.notify_all()
        return req

    def _retry_after(self) -> float:
        """About when a slot frees: the remaining steps of the request nearest to its end, at the mean step time."""
        step = self._step_seconds or 0.01
        left = min((r.total - r.steps_done for r in self._active.values()), default=0)
        return max(1.0, round(left * step, 1))

    def stats(self) -> dict:
        with self._cv:
            return {"queue_depth": len(self._queue), "active_requests": len(self._active),
                    "active_rows": self.max_batch - self.batch.free_rows, "max_batch": self.max_batch,
                    "max_queue": self.max_queue, "steps": self._steps, "tokens": self._tokens,
                    "outcomes": dict(self._outcomes), "accepting": not self._closed}

    # the loop --------------------------------------------------------------------------------
    def _end(self, req: Request, outcome: str, result=None, error=None) -> None:
        if req.done():
            return
        req._finish(outcome, result, error)
        self._outcomes[outcome] += 1
        self.observer.on_request(outcome, time.monotonic() - req.submitted)

    def _drop(self, req: Request, now: float) -> bool:
        """End a cancelled or expired request (queued or active); True when it was ended."""
        if req._cancel:
            self._end(req, "cancelled", error=RequestCancelled(f"request {req.id} was cancelled"))
        elif req.deadline is not None and now >= req.deadline:
            self._end(req, "timeout", error=TimeoutError(
                f"request {req.id} did not finish within its timeout ({req.steps_done}/{req.total} tokens)"))
        else:
            return False
        return True

    def _cancel_all(self, why: str) -> None:
        for req in list(self._queue) + list(self._active.values()):
            self._end(req, "cancelled", error=RequestCancelled(why))
            self.batch.evict(req.seq)
        self._queue.clear()
        self._active.clear()

    def _boundary(self) -> bool:
        """At a step boundary (under the lock): drop, admit; False when the loop should end."""
        now = time.monotonic()
        if self._closed and not self._drain:
            self._cancel_all("the scheduler was stopped without draining")
            return False
        for req in list(self._active.values()):
            if self._drop(req, now):
                self.batch.evict(req.seq)
                del self._active[id(req.seq)]
        if self._queue:
            kept = collections.deque(r for r in self._queue if not self._drop(r, now))
            changed = len(kept) != len(self._queue)
            self._queue = kept
            while self._queue and self.batch.free_rows >= self._queue[0].seq.rows_needed:  # FIFO: no overtaking
                req = self._queue.popleft()
                self.batch.admit(req.seq)
                self._active[id(req.seq)] = req
                changed = True
            if changed:
                self.observer.on_queue(len(self._queue))
        return bool(self._active) or not self._closed

    def _loop(self) -> None:
        while True:
            with self._cv:
                if not self._boundary():
                    break
                if not self._active:
                    self._cv.wait(timeout=0.5)
                    continue
                rows = self.max_batch - self.batch.free_rows
                seqs = list(self.batch.sequences)
                before = [s.step for s in seqs]  # a frame-prediction prefill step advances only the joining ones
            t0 = time.perf_counter()
            try:
                finished = self.batch.step()
            except Exception as e:  # the step itself failed (a row's failure fails its request alone): all of them
                log.exception("decode step failed")
                with self._cv:
                    for s in seqs:
                        self.batch.evict(s)
                        self._active.pop(id(s), None)
                        self._end(s.tag, "error", error=RuntimeError(f"the decode step failed: {e}"))
                continue
            dt = time.perf_counter() - t0
            self._steps += 1
            drawn = sum(1 for s, b in zip(seqs, before, strict=True) if s.error is None and s.step > b)
            self._tokens += drawn
            self._step_seconds = dt if self._steps == 1 else 0.9 * self._step_seconds + 0.1 * dt
            self.observer.on_step(rows, len(seqs), dt, drawn)
            for s, b in zip(seqs, before, strict=True):
                req = s.tag
                if req._on_step is not None and s.error is None and s.step > b:
                    try:
                        req._on_step(s.step - 1, s.total, int(s.tokens[s.step - 1]))
                    except Exception:
                        log.exception("on_step of request %d raised", req.id)
            if finished:
                with self._cv:
                    for s in finished:
                        req = self._active.pop(id(s))
                        if s.error is not None:
                            self._end(req, "error", error=s.exception())  # its type: NonFiniteLogitsError, ...
                        else:
                            self._end(req, "ok", Generation(s.tokens[None].copy(), [req.seed], [req.params]))
        self.runner.close()
