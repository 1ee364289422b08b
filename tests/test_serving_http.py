"""`larp-rt serve` over HTTP: uvicorn in a background thread on 127.0.0.1 and a free port, a tiny bundle.

Every wait is bounded; every server is stopped in a finalizer, also when its test fails. Where a test needs the
scheduler busy it submits a "holder" request straight to the scheduler whose first on_step blocks the loop thread
until released: the batch then stands still, deterministically, while the test looks at it.
"""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

httpx = pytest.importorskip("httpx", reason="the [serve] extra is not installed (pip install 'larp_rt[serve]')")
pytest.importorskip("fastapi", reason="the [serve] extra is not installed (pip install 'larp_rt[serve]')")
pytest.importorskip("uvicorn", reason="the [serve] extra is not installed (pip install 'larp_rt[serve]')")
torch = pytest.importorskip("torch")

from larp_rt.export import export_bundle  # noqa: E402

from larp_rt import Engine, GeneratorConfig, SamplingParams, TokenizerConfig, save_pretrained  # noqa: E402
from larp_rt.models import LARPGenerator, LARPTokenizer  # noqa: E402
from larp_rt.serving import Observer  # noqa: E402
from larp_rt.serving.app import build_server  # noqa: E402
from larp_rt.video import fit_clip, grid, read_video, write_video  # noqa: E402

LIMIT = 32 << 10  # the main server's body limit: an mp4 of the test clip is ~2 KB
WAIT = 20.0  # the bound of every wait for the server / the scheduler


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    tok = LARPTokenizer(TokenizerConfig.from_name("tiny")).eval()
    torch.nn.init.normal_(tok.final_layer.linear.weight, std=0.05)  # decoded videos with content, not all black:
    torch.nn.init.constant_(tok.final_layer.linear.bias, 0.5)  # the mp4 checks compare pixels
    gen = LARPGenerator(GeneratorConfig.from_name("tiny")).eval()
    torch.nn.init.normal_(gen.output.weight, std=0.3)  # peaked enough that greedy has no near-ties
    save_pretrained(tok, root / "tok")
    save_pretrained(gen, root / "gen")
    quiet = dict(printer=lambda s: None, onnx_only=True, verify=False)  # test_engine checks the export itself
    full = export_bundle(root / "tok", root / "gen", root / "bundle", **quiet)
    gen_only = export_bundle(None, root / "gen", root / "gen_only", **quiet)
    return full, gen_only


def new_engine(bundle):
    return Engine(bundle, backend="onnxruntime", threads=1)


@pytest.fixture(scope="module")
def ref(bundles):
    """The offline engine every result is compared with (its own instance: nothing shared with a server)."""
    return new_engine(bundles[0])


class Running:
    """A LarpServer on a thread; ``stop()`` is idempotent and bounded."""

    def __init__(self, engine, **kw):
        kw.setdefault("max_body_bytes", LIMIT)
        self.server = build_server(engine, host="127.0.0.1", port=0, log_level="warning", **kw)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + WAIT
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    @property
    def scheduler(self):
        return self.server.scheduler

    def client(self, **kw):
        kw.setdefault("timeout", WAIT)
        return httpx.Client(base_url=self.url, **kw)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(WAIT)
        if self.thread.is_alive():  # in-flight work did not finish: give up on it rather than hang the suite
            self.server.force_exit = True
            self.thread.join(WAIT)
        self.sock.close()


@pytest.fixture
def start(bundles):
    """start(**build_server kwargs) -> a Running on a fresh engine; stopped after the test, whatever happens."""
    running = []

    def _start(bundle=None, **kw):
        r = Running(new_engine(bundle or bundles[0]), **kw)
        running.append(r)
        return r

    yield _start
    for r in running:
        r.stop()


@pytest.fixture(scope="module")
def main(bundles):
    r = Running(new_engine(bundles[0]), max_batch=8, max_queue=64)
    yield r
    r.stop()


class Holder:
    """A request submitted straight to the scheduler whose first on_step blocks the loop until release()."""

    def __init__(self, scheduler):
        self.entered, self._release = threading.Event(), threading.Event()
        self.req = scheduler.submit(0, SamplingParams(cfg_scale=1.0, seed=1), on_step=self._hook)
        if not self.entered.wait(WAIT):
            raise RuntimeError("the scheduler never ran the holder's first step")

    def _hook(self, step, total, token):
        if not self._release.is_set() and not self.entered.is_set():
            self.entered.set()
            self._release.wait(WAIT)

    def release(self):
        self._release.set()


def wait_for(pred, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def expected(engine, body, seed):
    """What Engine.generate gives offline for a /v1/generate body (unset fields: the bundle's defaults)."""
    given = {k: body[k] for k in ("cfg_scale", "temperature", "top_k", "top_p") if k in body}
    return engine.generate(body["class_ids"], dataclasses.replace(engine.default_params, **given, seed=seed)).tokens


def read_sse(response):
    """(event, data) pairs of a text/event-stream response, comments skipped."""
    event, data = None, []
    for line in response.iter_lines():
        if line.startswith(":"):
            continue
        if not line:
            if event is not None:
                yield event, json.loads("\n".join(data))
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def counter(metrics_text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in metrics_text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        metric, _, rest = key.partition("{")
        got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if metric == name and got == want:
            return float(value)
    return 0.0


def moving_square(T=12, H=40, W=56):
    f = np.zeros((T, H, W, 3), np.uint8)
    for t in range(T):
        f[t, 10:20, 3 * t : 3 * t + 10] = (250, 40, 40)
    return f


# ------------------------------------------------------------------------------------------------
def test_health_models_metrics(main):
    with main.client() as c:
        h = c.get("/health")
        assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["ready"] is True
        m = c.get("/v1/models").json()
        assert m["parts"] == ["tokenizer", "generator"] and m["backend"] == "onnxruntime"
        assert m["precision"] == "fp32" and "decode" in m["graphs"] and m["sampler"]["running"]
        assert m["generator"]["config"]["num_classes"] == 8 and m["scheduler"]["max_batch"] == 8
        before = c.get("/metrics")
        assert before.headers["content-type"].startswith("text/plain")
        r = c.post("/v1/generate", json={"class_ids": [1], "seed": 3, "cfg_scale": 1.0})
        assert r.status_code == 200
        c.post("/v1/generate", json={"class_ids": [99]})
        after = c.get("/metrics").text
    for name in ("larp_rt_queue_depth", "larp_rt_batch_occupancy", "larp_rt_batch_occupancy_ratio_bucket",
                 "larp_rt_step_seconds_bucket", "larp_rt_tokens_per_second", "larp_rt_max_batch"):
        assert name in after, name
    assert counter(after, "larp_rt_tokens_total") >= counter(before.text, "larp_rt_tokens_total") + 64
    assert counter(after, "larp_rt_requests_total", outcome="ok") >= 1
    assert counter(after, "larp_rt_http_requests_total", route="/v1/generate", outcome="ok") >= 1
    assert counter(after, "larp_rt_http_requests_total", route="/v1/generate", outcome="rejected") >= 1
    assert counter(after, "larp_rt_tokens_per_second") > 0


def test_32_concurrent_clients_match_offline(main, ref):
    """Mixed parameters and output modes, arrivals spread over the run: none lost, each equals Engine.generate."""
    rng = np.random.default_rng(0)
    modes = [{"cfg_scale": 1.0}, {"cfg_scale": 2.0}, {"temperature": 0.0, "cfg_scale": 1.0},
             {"temperature": 0.0, "cfg_scale": 1.5}, {"top_k": 5}, {"top_p": 0.8, "cfg_scale": 1.0},
             {"top_k": 50, "top_p": 0.9, "cfg_scale": 1.5, "temperature": 0.7}, {}]  # {}: the bundle's defaults
    bodies = []
    for i in range(32):
        body = {"class_ids": rng.integers(0, 8, size=int(rng.integers(1, 4))).tolist(), **modes[i % len(modes)]}
        if i % 5:  # every fifth request lets the server draw the seed (it reports it)
            body["seed"] = int(rng.integers(0, 2**40))
        bodies.append((body, i % 3 == 0, 0.02 * int(rng.integers(0, 40))))  # (body, stream?, arrival delay)
    steps0 = main.scheduler.stats()["steps"]

    def client(job):
        body, stream, delay = job
        time.sleep(delay)
        with main.client() as c:
            if not stream:
                r = c.post("/v1/generate", json=body)
                assert r.status_code == 200, r.text
                return r.json(), None
            with c.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                events = list(read_sse(r))
            assert events[0][0] == "accepted" and events[-1][0] == "result", events[-1]
            return events[-1][1], events

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(client, bodies))
    n_rows = 0
    for (body, stream, _), (out, events) in zip(bodies, results, strict=True):
        seed = out["params"]["seed"]
        assert out["seeds"] == [seed] * len(body["class_ids"]) and out["class_ids"] == body["class_ids"]
        if "seed" in body:
            assert seed == body["seed"]
        assert np.array_equal(np.array(out["tokens"]), expected(ref, body, seed)), body
        if stream:
            steps = [d for e, d in events if e == "progress"]
            assert steps and max(d["step"] for d in steps) == 64
            assert {d["index"] for d in steps} == set(range(len(body["class_ids"])))
        n_rows += len(body["class_ids"])
    # they shared the batch: far fewer steps than one generation loop per class id would take
    assert main.scheduler.stats()["steps"] - steps0 < n_rows * 64 * 0.7


class StepGate(Observer):
    """Wraps a running scheduler's observer (the server's metrics still see every call): records each step's
    (rows, requests) and holds the loop thread after its ``at``-th step until ``release()``, so that a request
    queued meanwhile joins at the next step, deterministically."""

    def __init__(self, inner: Observer, at: int):
        self.inner, self.at, self.steps = inner, at, []
        self.reached, self._release = threading.Event(), threading.Event()

    def on_queue(self, depth):
        self.inner.on_queue(depth)

    def on_request(self, outcome, seconds):
        self.inner.on_request(outcome, seconds)

    def on_step(self, rows, requests, seconds, tokens):
        self.inner.on_step(rows, requests, seconds, tokens)
        self.steps.append((rows, requests))
        if len(self.steps) == self.at:
            self.reached.set()
            self._release.wait(WAIT)

    def release(self):
        self._release.set()


def test_a_request_joins_a_running_one_at_a_known_step(start, ref):
    """A (one row) runs alone; the loop is held after A's step 20 while B (guided: two rows) arrives over HTTP; B
    joins at A's step 21, each at its own position, and both responses hold exactly their offline tokens."""
    srv = start(max_batch=4)
    gate = StepGate(srv.scheduler.observer, at=21)
    srv.scheduler.observer = gate  # the loop reads its observer at every step
    a = {"class_ids": [1], "seed": 21, "cfg_scale": 1.0, "top_k": 20}
    b = {"class_ids": [6], "seed": 22, "cfg_scale": 2.0, "top_p": 0.9}
    try:
        with ThreadPoolExecutor(2) as pool, srv.client() as c:
            fa = pool.submit(c.post, "/v1/generate", json=a)
            assert gate.reached.wait(WAIT), "A never ran 21 steps"
            fb = pool.submit(c.post, "/v1/generate", json=b)
            wait_for(lambda: srv.scheduler.stats()["queue_depth"] == 1, "B to queue")
            gate.release()
            ra, rb = fa.result(timeout=WAIT), fb.result(timeout=WAIT)
    finally:
        gate.release()
    assert ra.status_code == 200 and rb.status_code == 200, (ra.text, rb.text)
    assert gate.steps == [(1, 1)] * 21 + [(3, 2)] * 43 + [(2, 1)] * 21  # B runs steps 21 .. 84 of the loop, A 0 .. 63
    np.testing.assert_array_equal(ra.json()["tokens"], expected(ref, a, 21))
    np.testing.assert_array_equal(rb.json()["tokens"], expected(ref, b, 22))


def test_bad_requests_get_their_4xx_beside_good_ones(main, ref, tmp_path):
    good = {"class_ids": [2, 5], "seed": 11, "top_k": 20}
    bad = [
        (dict(json={"class_ids": [99]}), 400, "class_ids must be in [0, 7]"),
        (dict(json={"class_ids": [1], "top_p": 1.5}), 400, "SamplingParams.top_p must be in (0, 1]"),
        (dict(json={"class_ids": [1], "top_k": 2.5}), 400, "SamplingParams.top_k"),
        (dict(json={"class_ids": "1"}), 400, "class_ids must be a non-empty list"),
        (dict(json={"class_ids": [1], "colour": "red"}), 400, "unknown field"),
        (dict(json={"class_ids": [1], "stream": "yes"}), 400, "stream must be true or false"),
        (dict(json={"class_ids": [1], "format": "avi"}), 400, "format must be"),
        (dict(content=b'{"class_ids": [1,', headers={"content-type": "application/json"}), 400, "malformed JSON"),
        (dict(content=b"[1, 2]", headers={"content-type": "application/json"}), 400, "must be a JSON object"),
        (dict(content=b'{"class_ids": [1]}'), 415, "Content-Type: application/json"),  # JSON under no JSON type
        (dict(content=b'{"class_ids": [1]}', headers={"content-type": "text/plain"}), 415, "application/json"),
        (dict(content=b'{"class_ids": [1], "cfg_scale": NaN}', headers={"content-type": "application/json"}), 400,
         "SamplingParams.cfg_scale must be a finite number"),
        (dict(content=b'{"class_ids": [1], "temperature": -Infinity}', headers={"content-type": "application/json"}),
         400, "SamplingParams.temperature must be a finite number"),
        (dict(json={"class_ids": [1, True]}), 400, "class_ids[1] must be an int"),
        (dict(json={"class_ids": [1], "seed": "7"}), 400, "SamplingParams.seed must be"),
        (dict(json={"class_ids": [1], "seed": 2**64}), 400, "SamplingParams.seed must be"),
        (dict(json={}), 400, "class_ids is required"),
        # finite in float64, not in the float32 kernels: refused with the bound, never a 500 for the whole step
        (dict(json={"class_ids": [1], "cfg_scale": 3.5e38}), 400, "SamplingParams.cfg_scale must be a finite number "
         "in [0, 10000]"),
        (dict(json={"class_ids": [1], "cfg_scale": 1e308}), 400, "SamplingParams.cfg_scale must be"),
        (dict(json={"class_ids": [1], "temperature": 1e308}), 400, "or in [0.0001, 10000]"),
        (dict(json={"class_ids": [1], "temperature": 1e-5}), 400, "SamplingParams.temperature must be"),
        (dict(json={"class_ids": [1], "top_p": 1e-300}), 400, "the smallest normal float32"),
        (dict(json={"class_ids": [1], "top_p": 5e-324}), 400, "SamplingParams.top_p must be"),
        (dict(content=b"", headers={"content-type": "application/json"}), 400, "the request body is empty"),
        (dict(content=b"x" * (LIMIT + 1)), 413, "request body too large"),
    ]

    def post_good(_):
        with main.client() as c:
            r = c.post("/v1/generate", json=good)
            assert r.status_code == 200, r.text
            return np.array(r.json()["tokens"])

    with ThreadPoolExecutor(4) as pool, main.client() as c:
        futures = [pool.submit(post_good, i) for i in range(4)]
        for kw, status, msg in bad:
            r = c.post("/v1/generate", **kw)
            assert r.status_code == status and msg in r.json()["error"], (kw, r.status_code, r.text)
        # a chunked body (no Content-Length) is stopped by the bytes actually read
        r = c.post("/v1/generate", content=iter([b" " * (LIMIT + 1)]))
        assert r.status_code == 413 and "too large" in r.json()["error"]
        # an unreadable upload, and an upload in the wrong encoding
        r = c.post("/v1/encode", files={"file": ("clip.mp4", b"this is not a video", "video/mp4")})
        assert r.status_code == 400 and "unreadable upload 'clip.mp4'" in r.json()["error"], r.text
        assert "/tmp" not in r.json()["error"]  # the server's temporary path is not shown
        r = c.post("/v1/encode", content=b"--xyz\r\ngarbage", headers={"content-type": "multipart/form-data"})
        assert r.status_code == 400, r.text  # no boundary: the form parser refuses it
        r = c.post("/v1/encode", content=b"raw bytes")
        assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]
        r = c.post("/v1/encode", files={"video": ("clip.mp4", b"abc", "video/mp4")})
        assert r.status_code == 400 and "field 'file'" in r.json()["error"]
        r = c.post("/v1/decode", json={"tokens": [[5000] * 64]})
        assert r.status_code == 400 and "tokens must be in [0, 1023]" in r.json()["error"]
        r = c.post("/v1/decode", json={"tokens": [[1, 2], [3]]})
        assert r.status_code == 400 and "equal length" in r.json()["error"]
        r = c.post("/v1/decode?format=webm", json={"tokens": [[1] * 64]})
        assert r.status_code == 400 and "format must be" in r.json()["error"]
        assert c.get("/nope").status_code == 404
        results = [f.result(timeout=WAIT) for f in futures]
        # nothing was disturbed: good requests got the offline tokens, the server is idle and ready
        want = expected(ref, good, 11)
        assert all(np.array_equal(t, want) for t in results)
        wait_for(lambda: main.scheduler.stats()["active_requests"] == 0, "the batch to empty")
        assert c.get("/health").status_code == 200


def test_content_length_over_the_limit_is_refused_before_the_body(main):
    # raw socket: the server answers from the headers alone, without waiting for a body it will never read
    port = int(main.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000000000\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 413") and b"1000000000 bytes" in data


def test_full_queue_gives_429_with_retry_after(start, ref):
    srv = start(max_batch=1, max_queue=1)
    holder = Holder(srv.scheduler)  # takes the one batch slot and holds the loop
    try:
        with ThreadPoolExecutor(1) as pool, srv.client() as c:
            body = {"class_ids": [3], "seed": 5, "cfg_scale": 1.0}
            queued = pool.submit(c.post, "/v1/generate", json=body)  # takes the one queue slot
            wait_for(lambda: srv.scheduler.stats()["queue_depth"] == 1, "the request to queue")
            r = c.post("/v1/generate", json={"class_ids": [4], "seed": 6, "cfg_scale": 1.0})
            assert r.status_code == 429 and "queue is full" in r.json()["error"]
            assert int(r.headers["Retry-After"]) >= 1
            # more than the queue can ever hold (every id is queued before any runs): 400, never a 429 to retry
            r = c.post("/v1/generate", json={"class_ids": [4, 5], "seed": 6})
            assert r.status_code == 400 and "at most 1 class ids per request (the scheduler's queue" in \
                r.json()["error"]
            holder.release()
            r = queued.result(timeout=WAIT)
            assert r.status_code == 200 and np.array_equal(r.json()["tokens"], expected(ref, body, 5))
            text = c.get("/metrics").text
        assert counter(text, "larp_rt_http_requests_total", route="/v1/generate", outcome="queue_full") == 1
    finally:
        holder.release()


def test_disconnected_clients_free_their_rows(start, ref):
    srv = start(max_batch=8, max_queue=8)
    sched = srv.scheduler
    holder = Holder(sched)
    try:
        # mid-SSE: read the first event, then close the connection
        with srv.client() as c, c.stream("POST", "/v1/generate", json={"class_ids": [1, 2], "stream": True}) as r:
            first = next(read_sse(r))
            assert first[0] == "accepted"
            wait_for(lambda: sched.stats()["queue_depth"] + sched.stats()["active_requests"] == 3, "the rows")
        # a plain request whose client gives up waiting
        with srv.client(timeout=httpx.Timeout(WAIT, read=0.3)) as c, pytest.raises(httpx.ReadTimeout):
            c.post("/v1/generate", json={"class_ids": [3]})

        def disconnected():
            with srv.client() as c:
                return counter(c.get("/metrics").text, "larp_rt_http_requests_total", route="/v1/generate",
                               outcome="disconnected")

        wait_for(lambda: disconnected() == 2, "the server to see both disconnects")
        holder.release()
        wait_for(lambda: sched.stats()["active_rows"] == 0 and sched.stats()["queue_depth"] == 0,
                 "the cancelled rows to leave the batch")
        st = sched.stats()
        assert (st["active_rows"], st["active_requests"], st["queue_depth"]) == (0, 0, 0)
        assert st["outcomes"] == {"ok": 1, "cancelled": 3}
        # the others ran on: the holder got exactly its offline tokens
        np.testing.assert_array_equal(holder.req.result(timeout=WAIT).tokens,
                                      ref.generate([0], [SamplingParams(cfg_scale=1.0, seed=1)]).tokens)
        # the freed rows serve again: all 8 of them at once (guided: 2 rows each), each one its offline tokens
        body = {"class_ids": [1, 2, 3, 4], "seed": 9, "cfg_scale": 2.0}
        with srv.client() as c:
            r = c.post("/v1/generate", json=body)
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(r.json()["tokens"], expected(ref, body, 9))
        st = sched.stats()
        assert (st["active_rows"], st["active_requests"], st["queue_depth"]) == (0, 0, 0)
        assert st["outcomes"] == {"ok": 5, "cancelled": 3}
    finally:
        holder.release()


def test_request_timeout_gives_504(start):
    srv = start(request_timeout=0.2)
    holder = Holder(srv.scheduler)
    try:
        with ThreadPoolExecutor(2) as pool, srv.client() as c:
            plain = pool.submit(c.post, "/v1/generate", json={"class_ids": [1], "seed": 1})

            def streamed():
                with c.stream("POST", "/v1/generate", json={"class_ids": [2], "seed": 2, "stream": True}) as r:
                    return list(read_sse(r))

            sse = pool.submit(streamed)
            wait_for(lambda: srv.scheduler.stats()["queue_depth"] == 2, "both requests to queue")
            time.sleep(0.3)  # past their deadline while the loop is held
            holder.release()
            r = plain.result(timeout=WAIT)
            assert r.status_code == 504 and "request timeout" in r.json()["error"]
            event, data = sse.result(timeout=WAIT)[-1]
            assert event == "error" and data["status"] == 504
            assert srv.scheduler.stats()["outcomes"].get("timeout", 0) == 2
    finally:
        holder.release()


def test_shutdown_drains_requests_in_flight(start, ref):
    srv = start()
    holder = Holder(srv.scheduler)
    bodies = [{"class_ids": [i, 7 - i], "seed": 100 + i, "top_p": 0.9} for i in range(3)]
    try:
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(lambda b: httpx.post(srv.url + "/v1/generate", json=b, timeout=WAIT), b)
                       for b in bodies]
            wait_for(lambda: srv.scheduler.stats()["queue_depth"] == 6, "the requests to queue")
            srv.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's SIGTERM handler runs
            assert srv.server.state.draining and not srv.server.state.ready
            time.sleep(0.3)  # uvicorn's main loop notices should_exit within 0.1 s and stops listening
            try:
                late = httpx.post(srv.url + "/v1/generate", json=bodies[0], timeout=2.0).status_code
            except httpx.TransportError:
                late = "refused"
            assert late in (503, "refused")
            holder.release()
            for b, f in zip(bodies, futures, strict=True):
                r = f.result(timeout=WAIT)
                assert r.status_code == 200 and np.array_equal(r.json()["tokens"], expected(ref, b, b["seed"]))
        srv.thread.join(WAIT)
        assert not srv.thread.is_alive()  # the server exited once the work was done
        assert not srv.scheduler.accepting and holder.req.outcome == "ok"
        assert srv.scheduler.stats()["outcomes"].get("ok", 0) == 7
    finally:
        holder.release()


def test_api_key(start, ref):
    srv = start(api_key="  s3cret ")  # the surrounding spaces (an env var, a config file) are not part of it
    how = "API key: send the header 'Authorization: Bearer KEY' with the server's --api-key (or LARP_RT_API_KEY)"
    with srv.client() as c:
        assert c.get("/health").status_code == 200  # probes need no key
        for headers, why in (({}, "missing"), ({"Authorization": "Bearer wrong"}, "wrong"),
                             ({"Authorization": "s3cret"}, "wrong"), ({"Authorization": "Bearer  s3cret"}, None)):
            if why is None:  # the spaces around the token are not part of it either
                assert c.get("/v1/models", headers=headers).status_code == 200
                continue
            for r in (c.get("/v1/models", headers=headers), c.post("/v1/generate", json={"class_ids": [1]},
                                                                   headers=headers)):
                assert (r.status_code, r.json()) == (401, {"error": f"{why} {how}", "status": 401}), headers
                assert r.headers["WWW-Authenticate"] == "Bearer"
        r = c.get("/metrics")
        assert (r.status_code, r.json()["error"]) == (401, f"missing {how}")
        ok = {"Authorization": "Bearer s3cret"}
        models = c.get("/v1/models", headers=ok)
        assert models.status_code == 200 and models.json()["parts"] == ["tokenizer", "generator"]
        body = {"class_ids": [1, 4], "seed": 0, "top_k": 7}
        r = c.post("/v1/generate", json=body, headers=ok)
        assert r.status_code == 200, r.text
        out = r.json()
        np.testing.assert_array_equal(out["tokens"], expected(ref, body, 0))
        params = {f: getattr(ref.default_params, f) for f in ("cfg_scale", "temperature", "top_p")}
        assert out["seeds"] == [0, 0] and out["class_ids"] == [1, 4]
        assert out["params"] == {**params, "top_k": 7, "seed": 0}
        text = c.get("/metrics", headers=ok).text
    assert counter(text, "larp_rt_http_requests_total", route="/v1/models", outcome="unauthorized") == 3


def test_encode_upload_and_decode_round_trip(main, ref, tmp_path):
    path = write_video(tmp_path / "clip.mp4", moving_square(), fps=10)
    with main.client() as c:
        r = c.post("/v1/encode", files={"file": ("clip.mp4", path.read_bytes(), "video/mp4")})
        assert r.status_code == 200, r.text
        out = r.json()
        frames, _ = read_video(path)
        clip, _ = fit_clip(frames[:8], 8, 32, 32)
        want = ref.encode(clip[None])
        assert np.array_equal(out["tokens"], want)
        assert any("kept the first 8 frames" in n for n in out["notes"])
        assert any("centre-cropped to 32x32" in n for n in out["notes"])
        assert out["input"]["height"] == 40 and out["model_input"] == {"frames": 8, "height": 32, "width": 32}
        r = c.post("/v1/decode", json={"tokens": out["tokens"], "format": "npy"})
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-npy"
        video = np.load(__import__("io").BytesIO(r.content), allow_pickle=False)
        assert video.shape == (1, 3, 8, 32, 32) and np.allclose(video, ref.decode(want), atol=1e-6)
        want_frames = grid(ref.decode(want), pad=0)  # (8, 32, 32, 3) uint8: what the server encodes
        for fmt, query in (("mp4", ""), ("gif", "?format=gif")):
            body = {"tokens": out["tokens"][0]} | ({} if query else {"format": fmt})
            r = c.post("/v1/decode" + query, json=body)
            assert r.status_code == 200 and r.headers["content-type"] == {"mp4": "video/mp4", "gif": "image/gif"}[fmt]
            (tmp_path / f"back.{fmt}").write_bytes(r.content)
            back, _ = read_video(tmp_path / f"back.{fmt}")
            # Pillow merges identical consecutive GIF frames (this untrained decoder's video barely moves)
            assert back.shape[1:] == (32, 32, 3) and (back.shape[0] == 8 or fmt == "gif")
        back_mp4 = assert_mp4_frames(tmp_path / "back.mp4", want_frames, tmp_path)
        # the written mp4 encodes again (over HTTP) to exactly the Engine's tokens of the frames read back from it
        r = c.post("/v1/encode", files={"file": ("back.mp4", (tmp_path / "back.mp4").read_bytes(), "video/mp4")})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(r.json()["tokens"], ref.encode(fit_clip(back_mp4, 8, 32, 32)[0][None]))
        # generate straight to a video: the two decoded samples side by side (pad 2), each pixel doubled
        r = c.post("/v1/generate", json={"class_ids": [1, 2], "seed": 4, "format": "mp4", "scale": 2})
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4" and r.headers["X-Larp-Seed"] == "4"
        (tmp_path / "gen.mp4").write_bytes(r.content)
        gen_tokens = expected(ref, {"class_ids": [1, 2]}, 4)
        assert_mp4_frames(tmp_path / "gen.mp4", grid(ref.decode(gen_tokens), pad=2, scale=2), tmp_path)


def assert_mp4_frames(path, want: np.ndarray, tmp_path) -> np.ndarray:
    """The frames of the mp4 at ``path`` match those of ``want`` (T, H, W, 3) uint8 written by the same encoder here
    (the server's 8 fps default). H.264 is deterministic for the same frames but amplifies one-level differences,
    and the decoder's float output is not bit-stable from run to run (ONNX Runtime's threaded reductions: the npy
    check above is allclose for that reason): a pixel rounded the other way moved 39% of the encoded pixels by up
    to 28 levels in one CI run. So every frame's mean absolute difference to the local encoding is bounded: 0 in
    most runs, up to 3.8 measured in 1 of 5, against 30-48 for swapped colour channels. Returns the frames read."""
    got, _ = read_video(path)
    local, _ = read_video(write_video(tmp_path / f"want-{path.stem}.mp4", want, fps=8))
    assert got.shape == want.shape == local.shape, (got.shape, want.shape, local.shape)
    per_frame = np.abs(got.astype(np.int16) - local).reshape(len(got), -1).mean(1)
    assert per_frame.max() <= 8, per_frame
    # and against the frames themselves (the encoder's own faults): per frame and channel, the mean level survives
    # H.264 within 4 of 255 on these noisy decoder outputs (measured <= 2), though single pixels do not
    level = lambda f: f.reshape(len(f), -1, 3).mean(1)  # noqa: E731
    assert np.abs(level(got) - level(want)).max() <= 4
    return got


def test_generator_only_bundle_refuses_video_with_a_clear_400(start, bundles):
    srv = start(bundle=bundles[1])
    with srv.client() as c:
        r = c.post("/v1/generate", json={"class_ids": [1], "format": "mp4"})
        assert r.status_code == 400 and "needs a tokenizer" in r.json()["error"]
        r = c.post("/v1/decode", json={"tokens": [[1] * 64]})
        assert r.status_code == 400 and "needs a tokenizer" in r.json()["error"]
        assert c.post("/v1/generate", json={"class_ids": [1]}).status_code == 200
        assert c.get("/v1/models").json()["parts"] == ["generator"]


def test_cli_serve_exits_on_sigterm(bundles):
    """`larp-rt serve` in a subprocess: the API key from the environment, /health, SIGTERM -> a clean exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LARP_RT_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-m", "larp_rt.cli", "serve", str(bundles[0]), "--port", str(port),
                             "--threads", "1", "--log-level", "warning"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            try:
                return httpx.get(url + "/health", timeout=1.0).status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                return False

        wait_for(up, "larp-rt serve to answer /health", timeout=60)
        r = httpx.post(url + "/v1/generate", json={"class_ids": [0], "seed": 0},
                       headers={"Authorization": "Bearer k"}, timeout=WAIT)
        assert r.status_code == 200
        assert httpx.get(url + "/v1/models", timeout=WAIT).status_code == 401
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=WAIT)
        # uvicorn re-raises the signal after its graceful shutdown, as a supervisor expects
        assert proc.returncode in (0, -signal.SIGTERM), out
        assert "serving" in out and "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)


def test_host_allow_list_and_server_errors_in_metrics(start, main):
    """No key: only the loopback names (a page elsewhere that rebinds its name to 127.0.0.1 gets a 400); a 500
    counts as an error in /metrics, not as a client that went away; a 400 names the bundle, not its path."""
    with main.client() as c:
        for host in ("127.0.0.1", "localhost:8000", "LOCALHOST", "[::1]:80"):
            assert c.get("/health", headers={"Host": host}).status_code == 200, host
        r = c.get("/v1/models", headers={"Host": "evil.example:8000"})
        assert r.status_code == 400 and "Host 'evil.example:8000' is not one this server answers" in r.json()["error"]
        assert "--allowed-hosts" in r.json()["error"]
    open_srv = start(allowed_hosts="*.example.com, 127.0.0.1")
    with open_srv.client() as c:
        assert c.get("/health", headers={"Host": "api.example.com"}).status_code == 200
        assert c.get("/health", headers={"Host": "example.org"}).status_code == 400
        st = open_srv.server.app.state.larp
        real = st.models
        st.models = lambda: 1 / 0  # a bug in a route: the client gets a 500
        try:
            assert c.get("/v1/models").status_code == 500
        finally:
            st.models = real
        text = c.get("/metrics").text
        assert counter(text, "larp_rt_http_requests_total", route="/v1/models", outcome="error") == 1
        assert counter(text, "larp_rt_http_requests_total", route="/v1/models", outcome="disconnected") == 0
    keyed = start(api_key="k")  # with a key any Host is answered: a page elsewhere cannot authenticate
    with keyed.client() as c:
        assert c.get("/health", headers={"Host": "lb.internal"}).status_code == 200


def test_default_server_refuses_what_its_queue_can_never_hold(main):
    with main.client() as c:
        r = c.post("/v1/generate", json={"class_ids": [0] * 65, "seed": 1})
        assert r.status_code == 400 and "at most 64 class ids per request" in r.json()["error"], r.text
        assert c.get("/v1/models").json()["limits"]["max_classes_per_request"] == 64


def test_errors_name_the_bundle_not_its_path(start, bundles):
    srv = start(bundles[1])  # generator only
    with srv.client() as c:
        r = c.post("/v1/decode", json={"tokens": [[1] * 64]})
    assert r.status_code == 400 and str(bundles[1]) not in r.text
