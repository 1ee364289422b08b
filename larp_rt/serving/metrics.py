"""Prometheus metrics of the server: a scheduler ``Observer`` plus the HTTP layer's outcome counter.

    metrics = ServingMetrics(max_batch=8)
    sched = Scheduler(engine, max_batch=8, observer=metrics)
    app = create_app(engine, sched, metrics=metrics)          # GET /metrics renders metrics.render()

Each instance owns its ``CollectorRegistry`` (never the global one), so several apps live in one process (the
tests run a few). The scheduler calls the ``on_*`` hooks on its loop thread; prometheus-client's metrics are
thread-safe, and each hook does a handful of increments, so the loop is not held up.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .scheduler import Observer

__all__ = ["ServingMetrics", "HTTP_OUTCOMES", "http_outcome"]

# what an HTTP response meant, by status (the label of larp_rt_http_requests_total)
HTTP_OUTCOMES = ("ok", "rejected", "unauthorized", "too_large", "queue_full", "unavailable", "timeout", "error",
                 "disconnected")


def http_outcome(status: int) -> str:
    """Status code -> outcome label. 499 is the server's own "client closed the request" (nginx's convention)."""
    if status < 400:
        return "ok"
    return {401: "unauthorized", 413: "too_large", 429: "queue_full", 499: "disconnected", 503: "unavailable",
            504: "timeout"}.get(status, "rejected" if status < 500 else "error")


# step latencies: the tiny CPU model takes ~0.1 ms a step, the large GPU ones tens of ms
_STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_OCCUPANCY_BUCKETS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


class ServingMetrics(Observer):
    """The scheduler's observer and the app's counters, in one registry.

    max_batch: the scheduler's row capacity, the denominator of the occupancy (rows / max_batch).
    """

    def __init__(self, max_batch: int, *, registry: CollectorRegistry | None = None, prefix: str = "larp_rt"):
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive int (the scheduler's), got {max_batch!r}")
        self.max_batch = max_batch
        self.registry = CollectorRegistry(auto_describe=True) if registry is None else registry
        r, p = self.registry, prefix
        self.queue_depth = Gauge(f"{p}_queue_depth", "Scheduler requests waiting for a batch slot", registry=r)
        self.batch_rows = Gauge(f"{p}_batch_rows", "Rows of the last step (CFG null rows included)", registry=r)
        self.batch_requests = Gauge(f"{p}_batch_requests", "Requests in the last step", registry=r)
        self.occupancy = Gauge(f"{p}_batch_occupancy", "Rows of the last step / max_batch", registry=r)
        self.occupancy_hist = Histogram(f"{p}_batch_occupancy_ratio", "Rows / max_batch, one sample per step",
                                        buckets=_OCCUPANCY_BUCKETS, registry=r)
        self.step_seconds = Histogram(f"{p}_step_seconds", "Wall time of one generation step of the whole batch",
                                      buckets=_STEP_BUCKETS, registry=r)
        self.steps = Counter(f"{p}_steps", "Generation steps run", registry=r)
        self.tokens = Counter(f"{p}_tokens", "Tokens sampled", registry=r)
        self.tokens_per_second = Gauge(f"{p}_tokens_per_second",
                                       "Tokens per second over the steps of the last second of running", registry=r)
        self.requests = Counter(f"{p}_requests", "Scheduler requests (one per class id) by outcome", ["outcome"],
                                registry=r)
        self.request_seconds = Histogram(f"{p}_request_seconds", "Scheduler request time, submission to outcome",
                                         buckets=_REQUEST_BUCKETS, registry=r)
        self.http_requests = Counter(f"{p}_http_requests", "HTTP requests by route and outcome",
                                     ["route", "outcome"], registry=r)
        self.max_batch_gauge = Gauge(f"{p}_max_batch", "The scheduler's max_batch (rows)", registry=r)
        self.max_batch_gauge.set(max_batch)
        for outcome in ("ok", "cancelled", "timeout", "error"):  # present from the start: rate() needs a baseline
            self.requests.labels(outcome=outcome)
        # the rate gauge: the tokens and step seconds of the steps that ended in the last second (a window, so
        # one odd step does not make it jump); touched only by the scheduler thread
        self._window: deque[tuple[float, int, float]] = deque()
        self._window_tokens, self._window_seconds = 0, 0.0

    # -- Observer (the scheduler's loop thread) -------------------------------------------------------
    def on_queue(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def on_step(self, rows: int, requests: int, seconds: float, tokens: int) -> None:
        occ = rows / self.max_batch
        self.batch_rows.set(rows)
        self.batch_requests.set(requests)
        self.occupancy.set(occ)
        self.occupancy_hist.observe(occ)
        self.step_seconds.observe(seconds)
        self.steps.inc()
        self.tokens.inc(tokens)
        now = time.monotonic()
        w = self._window
        w.append((now, tokens, seconds))
        self._window_tokens += tokens
        self._window_seconds += seconds
        while len(w) > 1 and w[0][0] < now - 1.0:
            _, n, s = w.popleft()
            self._window_tokens -= n
            self._window_seconds -= s
        if len(w) == 1:  # resync the running sums (no float drift over a long run)
            self._window_tokens, self._window_seconds = tokens, seconds
        if self._window_seconds > 0:
            self.tokens_per_second.set(self._window_tokens / self._window_seconds)

    def on_request(self, outcome: str, seconds: float) -> None:
        self.requests.labels(outcome=outcome).inc()
        self.request_seconds.observe(seconds)

    # -- the HTTP layer (the event loop) ---------------------------------------------------------------
    def on_http(self, route: str, status: int) -> None:
        self.http_requests.labels(route=route, outcome=http_outcome(status)).inc()

    def render(self) -> tuple[bytes, str]:
        """The registry in Prometheus' text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
