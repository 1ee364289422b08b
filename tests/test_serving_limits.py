"""The server's resource budgets, each refused with its status and a message that names it: one video response's
pixels (413, before any work), an upload's frame size (400, before decoding), fps bounds (400), video jobs in
flight (429), connections (uvicorn's limit_concurrency) and the deadline on a request's headers (slowloris)."""

import socket
import threading
import time

import pytest

httpx = pytest.importorskip("httpx", reason="the [serve] extra is not installed (pip install 'larp_rt[serve]')")
pytest.importorskip("fastapi", reason="the [serve] extra is not installed (pip install 'larp_rt[serve]')")
torch = pytest.importorskip("torch")

from test_serving_http import WAIT, Running, bundles, moving_square, new_engine  # noqa: E402, F401

from larp_rt.video import write_video  # noqa: E402

PIXELS = 8 * 32 * 32  # one tiny video: 8 frames of 32x32


@pytest.fixture
def start(bundles):  # noqa: F811
    running = []

    def _start(**kw):
        running.append(Running(new_engine(bundles[0]), **kw))
        return running[-1]

    yield _start
    for r in running:
        r.stop()


def test_video_budget_is_refused_before_any_work(start):
    srv = start(max_video_pixels=4 * PIXELS * 4)  # e.g. 4 videos at scale 2, or 16 at scale 1
    tokens = [[1] * 64] * 16
    with srv.client() as c:
        assert c.post("/v1/decode", json={"tokens": tokens, "format": "mp4"}).status_code == 200  # at the limit
        r = c.post("/v1/decode", json={"tokens": tokens, "format": "mp4", "scale": 2})
        assert r.status_code == 413 and "16 video(s) x 8 frames x 64x64 pixels = 524288 pixel units" in \
            r.json()["error"] and "--max-video-mpixels" in r.json()["error"], r.text
        r = c.post("/v1/decode", json={"tokens": tokens, "format": "gif"})  # a GIF counts 4x
        assert r.status_code == 413 and "a GIF counts 4x" in r.json()["error"]
        assert c.post("/v1/decode", json={"tokens": tokens[:4], "format": "gif"}).status_code == 200
        # npy ignores scale (it is the float32 array): 16 rows fit
        assert c.post("/v1/decode", json={"tokens": tokens, "format": "npy", "scale": 4}).status_code == 200
        steps = srv.scheduler.stats()["steps"]
        r = c.post("/v1/generate", json={"class_ids": [1] * 5, "format": "gif", "seed": 1})
        assert r.status_code == 413 and "5 video(s)" in r.json()["error"]
        assert srv.scheduler.stats()["steps"] == steps  # refused before generating anything
        limits = c.get("/v1/models").json()["limits"]
    assert limits["max_video_pixels"] == 4 * PIXELS * 4 and limits["gif_cost"] == 4


def test_fps_bounds(start):
    srv = start()
    with srv.client() as c:
        for fps in (0.001, 0.0015, 0.5, 121, 1e308):
            for fmt in ("mp4", "gif"):
                r = c.post("/v1/decode", json={"tokens": [[1] * 64], "format": fmt, "fps": fps})
                assert r.status_code == 400 and "fps must be a number in [1, 120]" in r.json()["error"], (fps, r.text)
        for fps in (1, 120):
            for fmt in ("mp4", "gif"):
                r = c.post("/v1/decode", json={"tokens": [[1] * 64], "format": fmt, "fps": fps})
                assert r.status_code == 200 and len(r.content) > 100, (fps, fmt)


def test_upload_frame_size_is_refused_before_decoding(start, tmp_path):
    srv = start(max_upload_pixels=40 * 50)
    big = write_video(tmp_path / "big.mp4", moving_square(12, 40, 56), fps=8).read_bytes()
    small = write_video(tmp_path / "small.mp4", moving_square(12, 40, 48), fps=8).read_bytes()
    with srv.client() as c:
        r = c.post("/v1/encode", files={"file": ("big.mp4", big)})
        assert r.status_code == 400 and "frames of 56x40 (2240 pixels) are larger than the limit of 2000" in \
            r.json()["error"], r.text
        assert c.post("/v1/encode", files={"file": ("small.mp4", small)}).status_code == 200


def test_video_jobs_in_flight_beyond_the_limit_get_429(start):
    srv = start(max_media_jobs=1)
    st = srv.server.app.state.larp
    entered, release = threading.Event(), threading.Event()
    real = st.render

    def slow_render(*args):
        entered.set()
        release.wait(WAIT)
        return real(*args)

    st.render = slow_render
    body = {"tokens": [[1] * 64], "format": "npy"}
    with srv.client() as c, srv.client() as c2:
        first = threading.Thread(target=lambda: c2.post("/v1/decode", json=body))
        first.start()
        try:
            assert entered.wait(WAIT)
            r = c.post("/v1/decode", json=body)
            assert r.status_code == 429 and "1 video jobs are in flight" in r.json()["error"]
            assert r.headers["Retry-After"] == "1"
        finally:
            release.set()
            first.join(WAIT)
        st.render = real
        assert c.post("/v1/decode", json=body).status_code == 200  # the slot came back


def test_headers_must_arrive_within_the_deadline(start):
    srv = start(header_timeout=0.5, max_connections=64)
    assert srv.server.config.limit_concurrency == 64
    port = int(srv.url.rsplit(":", 1)[1])
    slow = []
    t0 = time.monotonic()
    for _ in range(4):  # open, never finish the headers; one trickles a byte every 0.1 s
        s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        slow.append(s)
    try:
        with srv.client() as c:  # a good request meanwhile
            assert c.get("/health").status_code == 200
        closed = []
        for i, s in enumerate(slow):
            if i == 0:
                for _ in range(30):
                    try:
                        s.sendall(b"X")
                    except OSError:
                        break
                    time.sleep(0.1)
            s.settimeout(WAIT)
            closed.append(s.recv(1024) == b"")
        assert all(closed) and time.monotonic() - t0 < 5, closed
        # a connection that finishes its headers in time is answered, and a keep-alive one gets its deadline anew
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            data = b""
            while not data.endswith(b"}"):
                data += s.recv(4096)
            assert data.startswith(b"HTTP/1.1 200")
            time.sleep(0.8)
            s.settimeout(WAIT)
            assert s.recv(1024) == b""  # no next request's headers within 0.5 s: closed
    finally:
        for s in slow:
            s.close()


def test_a_stalled_body_gets_408(start):
    srv = start(body_timeout=0.5)
    port = int(srv.url.rsplit(":", 1)[1])
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"class_ids\": [")
        data = b""
        while not data.endswith(b"}"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 408") and b"the request body stalled" in data, data
    assert time.monotonic() - t0 < 5
    with srv.client() as c:
        assert c.post("/v1/generate", json={"class_ids": [1], "seed": 0}).status_code == 200


def test_budgets_are_checked_at_start(bundles):  # noqa: F811
    from larp_rt.serving.app import build_server

    for kw, msg in (({"max_video_pixels": 0}, "max_video_pixels must be a positive int"),
                    ({"max_media_jobs": 1.5}, "max_media_jobs must be a positive int"),
                    ({"max_connections": 0}, "max_connections must be a positive int"),
                    ({"header_timeout": 0}, "header_timeout must be a number of seconds > 0"),
                    ({"body_timeout": -1}, "body_timeout must be a number of seconds > 0")):
        with pytest.raises(ValueError, match=msg):
            build_server(new_engine(bundles[0]), port=0, **kw)
