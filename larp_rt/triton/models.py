"""The python-backend models behind the repository that ``larp-rt triton`` writes (imported inside the stub).

Tensors cross the stub by DLPack (``np.from_dlpack`` in, ``Tensor.from_dlpack`` out): the stub's own numpy glue
(``as_numpy()`` / ``Tensor(name, array)``) misreads numpy 2 arrays (wrong strides in, "output tensor shape does
not match size of output" out). The stub renames a consumed capsule "used_dlpack" where numpy expects
"used_dltensor"; ``_out`` renames it so numpy's capsule destructor does not raise (the stub releases the tensor).

Isolation: what one request (or its client) may do to the others.

* ``larp_generate``: a request's rows are submitted together or not at all: a refused row (bad parameters:
  INVALID_ARG; a full queue or a stopping scheduler: UNAVAILABLE) withdraws (cancels) the rows of that request
  submitted before it, and the request gets that one error. A row that fails while running cancels its request's
  other rows (INTERNAL); a request its client cancelled (gRPC) has its rows cancelled (CANCELLED).
* ``larp_generate_stream``: the scheduler thread only enqueues a request's events (a bounded queue per request:
  past ``_EVENTS`` waiting partial events the newest replaces the last one waiting; the final one always goes);
  ``stream_senders`` sender threads send them, each request served by one sender at a time and put back at the
  end of the line after each response, so a slow receiver holds one sender, never the loop nor the other
  streams. A watcher asks each open request's response sender ``is_cancelled()`` every ``cancel_poll_ms``; a
  departed client (or a send that fails) cancels its scheduler request at once and gets its final CANCELLED
  response.
* ``larp_encode`` / ``larp_decode``: each request is validated on its own (INVALID_ARG with its message); the
  valid ones run as one Engine call; when that joint call fails each valid request runs alone, so a failure is
  the error of the requests it hits only (INTERNAL; INVALID_ARG when the Engine refused that input).
* ``larp_video``: a failed joint BLS request falls back to one per request, so an error is that request's
  only; the inner response's error code is kept where the stub keeps it (2.51 does not: see ``Video._check``).

Metrics: the generate models put their scheduler into Triton's /metrics (the python backend's custom metrics,
sampled every 0.1 s): ``larp_scheduler_queue_depth``, ``larp_scheduler_active_requests``,
``larp_scheduler_active_rows``, ``larp_stream_open`` (gauges) and ``larp_scheduler_requests_total{outcome}``
(counter), labelled by model and instance.

Hooks (tests, diagnostics): the config parameter ``hooks`` names a Python file; its ``hook(event, model=...,
**info)`` is called at "execute" (larp_generate; ``requests``: how many), "step" (on the scheduler thread after
each decode step; ``stats``: the scheduler's stats function), "send" (on a sender thread before each stream
response; ``request_id``, ``kind``) and "run" (before an encode / decode Engine call; ``inputs``: the arrays).
Nothing is called without it.
"""

from __future__ import annotations

import collections
import ctypes
import importlib.util
import json
import math
import os
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from ..sampling import SamplingParams
from .frames import to_frames

_set_name = ctypes.pythonapi.PyCapsule_SetName
_set_name.argtypes = [ctypes.py_object, ctypes.c_char_p]
_set_name.restype = ctypes.c_int
_USED = ctypes.create_string_buffer(b"used_dltensor")  # lives as long as the module: capsule names are not copied

_EVENTS = 64  # partial events waiting per stream before the newest replaces the last one waiting
_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
INVALID_ARG = pb_utils.TritonError.INVALID_ARG
INTERNAL = pb_utils.TritonError.INTERNAL
UNAVAILABLE = pb_utils.TritonError.UNAVAILABLE
CANCELLED = pb_utils.TritonError.CANCELLED


def _out(name: str, arr: np.ndarray):
    arr = np.ascontiguousarray(arr)
    cap = arr.__dlpack__()
    t = pb_utils.Tensor.from_dlpack(name, cap)
    _set_name(cap, _USED)
    return t


def _in(request, name: str) -> np.ndarray | None:
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else np.array(np.from_dlpack(t))  # a copy: the stub's buffer is the request's


def _params(args) -> dict[str, str]:
    cfg = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}


def _error(msg: str, code=INVALID_ARG):
    """An error response: INVALID_ARG (HTTP 400) for bad input, UNAVAILABLE (503) for a full queue or a stopping
    scheduler, CANCELLED for a departed client, INTERNAL (500) for a failure of ours."""
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(msg, code))


def _refusal(e: BaseException):
    """The error code of a refused submission."""
    from ..serving import QueueFull, SchedulerClosed

    if isinstance(e, (QueueFull, SchedulerClosed)):
        return UNAVAILABLE
    return INVALID_ARG if isinstance(e, ValueError) else INTERNAL


def _warn(msg: str) -> None:
    try:
        pb_utils.Logger.log_warn(msg)
    except Exception:  # the logger is the stub's; never let logging fail a request
        pass


def _engine(p: dict[str, str]):
    from ..engine import Engine

    threads = int(p.get("threads") or 0) or None
    os.environ.setdefault("LARP_RT_ORT_SPIN", "0")
    return Engine(p["bundle"], backend="auto", device=p.get("device") or "cpu",
                  threads=threads, preallocate=0)  # the scheduler owns (and pre-faults) its caches


def _load_hook(path: str, model: str):
    """The ``hook`` function of the file the ``hooks`` parameter names, or None."""
    if not path:
        return None
    spec = importlib.util.spec_from_file_location(f"larp_rt_triton_hooks_{model}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"hooks: cannot import {path!r}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, "hook", None)


SAMPLING = ("SEED", "CFG_SCALE", "TEMPERATURE", "TOP_K", "TOP_P")


def row_params(request, B: int, default: SamplingParams) -> list[SamplingParams]:
    """One SamplingParams per row from the optional inputs; SEED < 0, NaN floats or TOP_K < 0 mean the default."""
    cols = {n: _in(request, n) for n in SAMPLING}
    for n, v in cols.items():
        if v is not None and v.reshape(-1).shape[0] != B:
            raise ValueError(f"{n} has {v.reshape(-1).shape[0]} values for {B} CLASS_ID rows; give one per row")
    out = []
    for i in range(B):
        kw = {}
        for name, field in (("CFG_SCALE", "cfg_scale"), ("TEMPERATURE", "temperature"), ("TOP_P", "top_p")):
            v = cols[name]
            if v is not None and not math.isnan(float(v.reshape(-1)[i])):
                kw[field] = float(v.reshape(-1)[i])
        if cols["TOP_K"] is not None and int(cols["TOP_K"].reshape(-1)[i]) >= 0:
            kw["top_k"] = int(cols["TOP_K"].reshape(-1)[i])
        if cols["SEED"] is not None and int(cols["SEED"].reshape(-1)[i]) >= 0:
            kw["seed"] = int(cols["SEED"].reshape(-1)[i])
        base = {f: getattr(default, f) for f in ("cfg_scale", "temperature", "top_k", "top_p")}
        out.append(SamplingParams(**{**base, **kw}))
    return out


def class_ids(request) -> np.ndarray:
    ids = _in(request, "CLASS_ID")
    return ids.reshape(-1)


class _Model:
    """What every model shares: its config parameters, name and instance, and the optional hook."""

    def initialize(self, args):
        self.p = _params(args)
        self.name = args.get("model_name", type(self).__name__)
        self.instance = args.get("model_instance_name", self.name)
        self._hook = _load_hook(self.p.get("hooks", ""), self.name)

    def _call(self, event: str, **info) -> None:
        if self._hook is not None:
            self._hook(event, model=self.name, **info)


class _Metrics:
    """Custom metrics (gauges and one counter by outcome) sampled from ``sample()`` every ``every`` seconds on a
    thread of their own; nothing when the python backend has no custom metrics (or the server disables them)."""

    GAUGES = {"queue_depth": "requests waiting for rows in the instance's scheduler",
              "active_requests": "requests running in the instance's continuous batch",
              "active_rows": "batch rows in use (a guided request takes two)",
              "open_streams": "larp_generate_stream requests not yet answered with their final response"}

    def __init__(self, labels: dict[str, str], sample, every: float = 0.1):
        self.labels, self.sample, self.every = labels, sample, every
        self._stop = threading.Event()
        self._families: dict = {}
        self._gauges: dict = {}
        self._counters: dict = {}
        self._last: dict = {}
        try:
            for key, doc in self.GAUGES.items():
                name = "larp_stream_open" if key == "open_streams" else f"larp_scheduler_{key}"
                fam = pb_utils.MetricFamily(name=name, description=doc, kind=pb_utils.MetricFamily.GAUGE)
                self._families[key] = fam
            self._families["outcomes"] = pb_utils.MetricFamily(
                name="larp_scheduler_requests_total", description="scheduler requests ended, by outcome",
                kind=pb_utils.MetricFamily.COUNTER)
        except Exception as e:
            _warn(f"larp_rt: no custom metrics ({e})")
            self._families = {}
            return
        self._thread = threading.Thread(target=self._run, name="larp-rt-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.update()
            except Exception as e:
                _warn(f"larp_rt: metrics update failed: {e}")

    def update(self) -> None:
        values = self.sample()
        for key, v in values.items():
            if key == "outcomes":
                for outcome, n in v.items():
                    seen = self._last.get(("outcome", outcome), 0)
                    if n > seen:
                        if outcome not in self._counters:
                            self._counters[outcome] = self._families["outcomes"].Metric(
                                labels={**self.labels, "outcome": outcome})
                        self._counters[outcome].increment(n - seen)
                        self._last[("outcome", outcome)] = n
            elif key in self._families and self._last.get(key) != v:
                if key not in self._gauges:
                    self._gauges[key] = self._families[key].Metric(labels=self.labels)
                self._gauges[key].set(float(v))
                self._last[key] = v

    def close(self) -> None:
        self._stop.set()
        t = getattr(self, "_thread", None)
        if t is not None:
            t.join(2.0)
        self._gauges.clear()  # the Metric objects go before their families
        self._counters.clear()
        self._families.clear()


class Generate(_Model):
    """Every row of every request is one request of the instance's Scheduler (one continuous batch)."""

    def initialize(self, args):
        from ..serving import Observer, Scheduler

        super().initialize(args)
        self.engine = _engine(self.p)
        rows = int(self.p.get("scheduler_rows") or 16)
        queue = int(self.p.get("scheduler_queue") or 1 << 16)
        self.every = int(self.p.get("stream_every") or 16)
        self.poll = float(self.p.get("cancel_poll_ms") or 100) / 1000.0
        observer = None
        if self._hook is not None:
            model = self

            class _Hooked(Observer):
                def on_step(self, rows, requests, seconds, tokens):
                    try:
                        model._call("step", stats=model.scheduler.stats, rows=rows, requests=requests)
                    except Exception as e:  # the loop must not die of a hook
                        _warn(f"larp_rt: step hook raised {e!r}")

            observer = _Hooked()
        self.scheduler = Scheduler(self.engine, max_batch=rows, max_queue=queue, observer=observer).start()
        self.metrics = _Metrics({"model": self.name, "instance": self.instance}, self._sample)

    def _sample(self) -> dict:
        s = self.scheduler.stats()
        return {k: s[k] for k in ("queue_depth", "active_requests", "active_rows", "outcomes")}

    def _submit(self, request, on_step=None):
        """Submit every row of ``request``, or none: a refused row cancels the rows submitted before it."""
        ids = class_ids(request)
        self.engine.check_class_ids(ids)
        params = row_params(request, len(ids), self.engine.default_params)
        subs = []
        try:
            for c, p in zip(ids, params, strict=True):
                try:
                    subs.append(self.scheduler.submit(int(c), p, on_step=on_step))
                except ValueError as e:
                    if len(ids) == 1:
                        raise
                    raise ValueError(f"CLASS_ID row {len(subs)}: {str(e).removeprefix('params[0]: ')}") from None
        except BaseException:
            for s in subs:  # withdrawn: the loop drops them at its next step boundary
                s.cancel()
            raise
        return subs

    @staticmethod
    def _failure(req):
        """The error response of a scheduler request that did not end "ok"."""
        from ..serving import RequestCancelled

        try:
            req.result(0)
        except RequestCancelled as e:
            return _error(f"generation cancelled: {e}", UNAVAILABLE)
        except Exception as e:
            return _error(f"generation failed: {e}", INTERNAL)
        return _error("generation failed", INTERNAL)

    def execute(self, requests):
        self._call("execute", requests=len(requests))
        responses: list = [None] * len(requests)
        jobs: dict[int, list] = {}
        wake = threading.Event()
        for i, r in enumerate(requests):
            try:
                jobs[i] = self._submit(r)
            except Exception as e:  # this request's error; the others go on
                responses[i] = _error(str(e), _refusal(e))
                continue
            for s in jobs[i]:
                s.add_done_callback(lambda _req: wake.set())
        polled = time.monotonic()
        while jobs:
            wake.clear()
            poll = time.monotonic() - polled >= self.poll
            if poll:
                polled = time.monotonic()
            for i in list(jobs):
                subs = jobs[i]
                failed = next((s for s in subs if s.done() and s.outcome != "ok"), None)
                if failed is not None:  # one row failed: the request has failed, its other rows are withdrawn
                    for s in subs:
                        s.cancel()
                    responses[i] = self._failure(failed)
                elif all(s.done() for s in subs):
                    gens = [s.result(0) for s in subs]
                    tokens = np.concatenate([g.tokens for g in gens], 0).astype(np.int64)
                    seeds = np.array([[s.seed] for s in subs], np.int64)
                    responses[i] = pb_utils.InferenceResponse([_out("TOKENS", tokens), _out("SEED", seeds)])
                elif poll and _cancelled(requests[i]):
                    for s in subs:
                        s.cancel()
                    responses[i] = _error("the client cancelled the request", CANCELLED)
                else:
                    continue
                del jobs[i]
            if jobs:
                wake.wait(self.poll)
        return responses

    def finalize(self):
        self.scheduler.stop(drain=False)
        self.metrics.close()
        self.engine.close()


def _cancelled(obj) -> bool:
    """``obj.is_cancelled()`` (a request or a response sender; Triton >= 23.10); False where it cannot say."""
    try:
        return bool(obj.is_cancelled())
    except Exception:
        return False


class _Stream:
    """One larp_generate_stream request: its response sender and the events waiting to be sent."""

    __slots__ = ("sender", "rid", "sub", "events", "closed", "busy", "queued", "polled")

    def __init__(self, sender, rid: str):
        self.sender, self.rid = sender, rid
        self.sub = None  # its scheduler request
        self.events: collections.deque = collections.deque()
        self.closed = False  # its final event is queued (or sent): nothing more goes in
        self.busy = False  # a sender (or the watcher) holds it
        self.queued = False  # in the ready line
        self.polled = time.monotonic()


class _Senders:
    """Sender threads for a decoupled model: ``push`` (any thread, never blocks on a client) queues an event;
    ``workers`` threads send, each stream held by one of them at a time; a watcher thread cancels the streams
    whose client has gone. ``send(stream, event)`` builds and sends one response and says whether it was final."""

    def __init__(self, send, *, workers: int, poll: float):
        self._send = send
        self.poll = poll
        self._cv = threading.Condition()
        self._ready: collections.deque[_Stream] = collections.deque()
        self._open: set[_Stream] = set()
        self._stop = False
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._work, name=f"larp-rt-sender-{i}", daemon=True)
                         for i in range(workers)]
        self._threads.append(threading.Thread(target=self._watch, name="larp-rt-watcher", daemon=True))
        for t in self._threads:
            t.start()

    @property
    def open_streams(self) -> int:
        with self._cv:
            return len(self._open)

    def open(self, sender, rid: str) -> _Stream:
        s = _Stream(sender, rid)
        with self._cv:
            self._open.add(s)
        return s

    def attach(self, s: _Stream, sub) -> None:
        with self._cv:
            s.sub = sub
            gone = s.closed
        if gone:  # cancelled between its submission and here
            sub.cancel()

    def push(self, s: _Stream, event: tuple, final: bool = False) -> None:
        """Queue ``event`` (a tuple whose first item is its kind) for ``s``; a final one closes it."""
        with self._cv:
            if s.closed:
                return
            if final:
                s.closed = True
                s.events.append(event)
            elif len(s.events) >= _EVENTS:
                s.events[-1] = event  # coalesce: the newest progress replaces the last one waiting
            else:
                s.events.append(event)
            self._schedule(s)

    def _schedule(self, s: _Stream) -> None:  # under the lock
        if s.events and not s.busy and not s.queued:
            s.queued = True
            self._ready.append(s)
            self._cv.notify()

    def cancel(self, s: _Stream, why: str) -> None:
        """The client has gone: cancel its scheduler request, drop what waits, queue its final CANCELLED."""
        with self._cv:
            sub = s.sub
            if not s.closed:
                s.events.clear()
                s.closed = True
                s.events.append(("error", why, CANCELLED))
                self._schedule(s)
        if sub is not None:
            sub.cancel()

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._ready and not self._stop:
                    self._cv.wait()
                if not self._ready:
                    return
                s = self._ready.popleft()
                s.queued, s.busy = False, True
                event = s.events.popleft()
                due = event[0] == "partial" and time.monotonic() - s.polled >= self.poll
            if due:  # a stream that always has something waiting is polled here, not by the watcher
                s.polled = time.monotonic()
                if _cancelled(s.sender):
                    self.cancel(s, "the client cancelled the request")  # replaces what waits by the final
                    self._release(s, False)
                    continue
            try:
                final = self._send(s, event)
            except Exception as e:  # the client has gone (or the response could not be made): stop its work
                _warn(f"larp_rt: stream {s.rid!r}: sending failed ({e}); cancelling it")
                if s.sub is not None:
                    s.sub.cancel()
                if event[0] == "partial":
                    try:
                        s.sender.send(flags=_FINAL)
                    except Exception:
                        pass
                final = True
            self._release(s, final)

    def _release(self, s: _Stream, final: bool) -> None:
        with self._cv:
            s.busy = False
            if final:
                s.closed = True
                s.events.clear()
                self._open.discard(s)
            else:
                self._schedule(s)

    def _watch(self) -> None:
        while True:
            with self._cv:
                if self._stop:
                    return
                now = time.monotonic()
                due = [s for s in self._open
                       if not s.busy and not s.queued and not s.closed and now - s.polled >= self.poll]
                for s in due:
                    s.busy = True
            for s in due:
                s.polled = time.monotonic()
                if _cancelled(s.sender):
                    self.cancel(s, "the client cancelled the request")
                self._release(s, False)
            self._stopping.wait(self.poll / 2)  # not on the condition: its notify() is for the senders

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is queued (the finals of the cancelled requests), then end the threads."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._stopping.set()
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))


class GenerateStream(Generate):
    """Decoupled: execute() only submits; the loop thread queues partial events (STEP, TOTAL, TOKEN) every
    ``stream_every`` steps and the final one (TOKENS + SEED); sender threads send them (see the module's doc)."""

    def initialize(self, args):
        super().initialize(args)
        workers = int(self.p.get("stream_senders") or 4)
        self.senders = _Senders(self._send, workers=workers, poll=self.poll)

    def _sample(self) -> dict:
        senders = getattr(self, "senders", None)  # the metrics thread starts before the senders
        return {**super()._sample(), "open_streams": senders.open_streams if senders is not None else 0}

    def _send(self, s: _Stream, event: tuple) -> bool:
        kind = event[0]
        self._call("send", request_id=s.rid, kind=kind)
        if kind == "partial":
            _, step, total, token = event
            s.sender.send(pb_utils.InferenceResponse([
                _out("STEP", np.array([step], np.int32)), _out("TOTAL", np.array([total], np.int32)),
                _out("TOKEN", np.array([token], np.int64))]))
            return False
        if kind == "final":
            _, tokens, seed, total = event
            s.sender.send(pb_utils.InferenceResponse([
                _out("TOKENS", tokens), _out("SEED", np.array([seed], np.int64)),
                _out("STEP", np.array([total], np.int32)), _out("TOTAL", np.array([total], np.int32)),
                _out("TOKEN", np.array([tokens[-1]], np.int64))]), flags=_FINAL)
            return True
        _, msg, code = event
        s.sender.send(_error(msg, code), flags=_FINAL)
        return True

    def execute(self, requests):
        every, senders = self.every, self.senders
        for r in requests:
            s = senders.open(r.get_response_sender(), r.request_id())

            def on_step(step, total, token, s=s):  # the loop thread: queue, never send
                if (step + 1) % every == 0 and step + 1 < total:
                    senders.push(s, ("partial", step + 1, total, token))

            def done(req, s=s):  # the loop thread, under the scheduler's lock: queue, never send
                if req.outcome == "ok":
                    g = req.result(0)
                    senders.push(s, ("final", g.tokens.reshape(-1).astype(np.int64), req.seed, req.total), True)
                elif req.outcome == "cancelled":
                    senders.push(s, ("error", f"generation cancelled (request {req.id})", CANCELLED), True)
                else:
                    try:
                        req.result(0)
                        msg = "generation failed"
                    except Exception as e:
                        msg = f"generation failed: {e}"
                    senders.push(s, ("error", msg, INTERNAL), True)

            try:
                n = len(class_ids(r))
                if n != 1:
                    raise ValueError(f"larp_generate_stream takes one CLASS_ID per request, got {n}")
                sub = self._submit(r, on_step)[0]
            except Exception as e:
                senders.push(s, ("error", str(e), _refusal(e)), True)
                continue
            senders.attach(s, sub)
            sub.add_done_callback(done)
        return None

    def finalize(self):
        self.scheduler.stop(drain=False)  # ends every request: their finals are queued
        self.senders.stop()
        self.metrics.close()
        self.engine.close()


class _Tokenizer(_Model):
    def initialize(self, args):
        super().initialize(args)
        self.engine = _engine(self.p)

    def finalize(self):
        self.engine.close()

    def _run(self, run, xs: list[np.ndarray]) -> list[np.ndarray]:
        self._call("run", inputs=xs)
        y = run(np.concatenate(xs, 0))
        return np.split(y, np.cumsum([len(x) for x in xs])[:-1])

    def _batched(self, requests, name: str, check, run, out_name: str):
        """Validate each request alone (INVALID_ARG with its message); run the valid ones as one call; if that
        fails, run each alone, so an error is only the requests' it hits (INTERNAL, or INVALID_ARG for the
        Engine's ValueError)."""
        valid, responses = [], [None] * len(requests)
        for i, r in enumerate(requests):
            try:
                x = _in(r, name)
                check(x)
                valid.append((i, x))
            except Exception as e:
                responses[i] = _error(str(e))
        groups = [valid] if valid else []
        while groups:
            group = groups.pop()
            try:
                ys = self._run(run, [x for _, x in group])
            except Exception as e:
                if len(group) > 1:
                    _warn(f"larp_rt: {self.name}: a batch of {len(group)} requests failed ({e}); "
                          "running them one by one")
                    groups.extend([g] for g in reversed(group))
                    continue
                code = INVALID_ARG if isinstance(e, ValueError) else INTERNAL
                responses[group[0][0]] = _error(f"{name}: {e}", code)
                continue
            for (i, _), y in zip(group, ys, strict=True):
                responses[i] = pb_utils.InferenceResponse([_out(out_name, y)])
        return responses


class Encode(_Tokenizer):
    def execute(self, requests):
        return self._batched(requests, "VIDEO", self.engine.check_video, self.engine.encode, "TOKENS")


class Decode(_Tokenizer):
    def execute(self, requests):
        return self._batched(requests, "TOKENS", self.engine.check_tokens,
                             lambda t: to_frames(self.engine.decode(t)), "FRAMES")


class _Failed(Exception):
    """An inner (BLS) request's error, with its code."""

    def __init__(self, msg: str, code):
        super().__init__(msg)
        self.code = code


class Video(_Model):
    """BLS: one larp_generate request with every row of the batch's requests (so they share its continuous batch),
    then one larp_decode request; when the joint request fails (one request's bad input) each request runs alone,
    so the error is that request's only, with the inner model's error code."""

    def finalize(self):
        pass

    def execute(self, requests):
        if len(requests) > 1:
            try:
                return self._joint(requests)
            except Exception:
                pass
        return [self._one(r) for r in requests]

    def _joint(self, requests):
        ids = [class_ids(r) for r in requests]
        sizes = [len(i) for i in ids]
        cols = {"CLASS_ID": np.concatenate(ids).astype(np.int64).reshape(-1, 1)}
        for name, dtype, missing in (("SEED", np.int64, -1), ("CFG_SCALE", np.float32, np.nan),
                                     ("TEMPERATURE", np.float32, np.nan), ("TOP_K", np.int32, -1),
                                     ("TOP_P", np.float32, np.nan)):
            vals = [_in(r, name) for r in requests]
            if all(v is None for v in vals):
                continue
            parts = []
            for v, n in zip(vals, sizes, strict=True):
                if v is None:
                    parts.append(np.full(n, missing, dtype))
                elif v.size != n:
                    raise ValueError(f"{name}: one value per CLASS_ID row")
                else:
                    parts.append(v.reshape(-1).astype(dtype))
            cols[name] = np.concatenate(parts).reshape(-1, 1)
        frames, tokens, seeds = self._run([_out(k, v) for k, v in cols.items()])
        out, at = [], 0
        for n in sizes:
            out.append(pb_utils.InferenceResponse([_out("FRAMES", frames[at:at + n]), _out("TOKENS", tokens[at:at + n]),
                                                   _out("SEED", seeds[at:at + n])]))
            at += n
        return out

    @staticmethod
    def _check(resp, default) -> None:
        """Raise the inner response's error. Triton 2.51's stub hands BLS errors back as INTERNAL whatever their
        code, so INTERNAL reads as unknown: ``default`` then (larp_generate: INVALID_ARG, its errors are mostly
        the caller's input; larp_decode: INTERNAL, its input is ours)."""
        if resp.has_error():
            err = resp.error()
            try:
                code = err.code()
            except Exception:
                code = INTERNAL
            raise _Failed(err.message(), default if code == INTERNAL else code)

    def _run(self, inputs):
        gen = pb_utils.InferenceRequest(model_name="larp_generate", inputs=inputs,
                                        requested_output_names=["TOKENS", "SEED"]).exec()
        self._check(gen, INVALID_ARG)
        tokens = np.array(np.from_dlpack(pb_utils.get_output_tensor_by_name(gen, "TOKENS")))
        seeds = np.array(np.from_dlpack(pb_utils.get_output_tensor_by_name(gen, "SEED")))
        dec = pb_utils.InferenceRequest(model_name="larp_decode", inputs=[_out("TOKENS", tokens)],
                                        requested_output_names=["FRAMES"]).exec()
        self._check(dec, INTERNAL)
        frames = np.array(np.from_dlpack(pb_utils.get_output_tensor_by_name(dec, "FRAMES")))
        return frames, tokens, seeds

    def _one(self, r):
        try:
            inputs = [t for t in (pb_utils.get_input_tensor_by_name(r, n) for n in ("CLASS_ID",) + SAMPLING)
                      if t is not None]
            frames, tokens, seeds = self._run(inputs)
            return pb_utils.InferenceResponse([_out("FRAMES", frames), _out("TOKENS", tokens), _out("SEED", seeds)])
        except _Failed as e:
            return _error(str(e), e.code)
        except ValueError as e:
            return _error(str(e))
        except Exception as e:
            return _error(str(e), INTERNAL)
