"""A soak: 16 clients against one server on loopback for a bounded time, a mix of good and hostile requests,
clients that disconnect mid-stream and clients that give up (time out) mid-request.

Nothing is lost: every good request gets exactly its offline tokens; no response is a 5xx; the scheduler's rows
return to zero; memory is flat (RSS sampled every 0.25 s; its slope over the second half is reported and bounded).
The short version runs in CI; the ``slow`` one runs for LARP_RT_SOAK_S seconds (default 600) for the notes.
"""

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

httpx = pytest.importorskip("httpx", reason="the [serve] extra is not installed (pip install 'larp_rt[serve]')")
pytest.importorskip("fastapi", reason="the [serve] extra is not installed (pip install 'larp_rt[serve]')")
torch = pytest.importorskip("torch")

from test_serving_http import WAIT, Running, bundles, expected, new_engine, read_sse, wait_for  # noqa: E402, F401

GOOD = [
    {"class_ids": [1], "seed": 1, "cfg_scale": 1.0},
    {"class_ids": [2, 5], "seed": 2, "cfg_scale": 2.0, "top_k": 20},
    {"class_ids": [7], "seed": 3, "temperature": 0.0, "cfg_scale": 1.5},
    {"class_ids": [0, 3, 6], "seed": 4, "top_p": 0.8, "temperature": 0.7},
]
HOSTILE = [
    dict(json={"class_ids": [99]}),
    dict(json={"class_ids": [1], "top_p": 1.5}),
    dict(json={"class_ids": [1], "colour": "red"}),
    dict(json={"class_ids": [0] * 500}),
    dict(content=b'{"class_ids": [1, ', headers={"content-type": "application/json"}),
    dict(content=b'{"class_ids": [1], "cfg_scale": NaN}', headers={"content-type": "application/json"}),
    dict(content=b"[" * 5000 + b"]" * 5000, headers={"content-type": "application/json"}),
    dict(content=b'{"class_ids": [1]}', headers={"content-type": "text/plain"}),
    dict(content=b"x" * (40 << 10), headers={"content-type": "application/json"}),
]
HOSTILE_OTHER = [
    ("/v1/decode", dict(json={"tokens": [[5000] * 64]})),
    ("/v1/decode", dict(json={"tokens": [[1] * 64], "fps": 0.001, "format": "gif"})),
    ("/v1/encode", dict(files={"file": ("x.mp4", b"not a video")})),
    ("/v1/score", dict(json={"tokens": [[1] * 64]})),  # this bundle has no prior: a 400 that says so
    ("/nope", dict(json={})),
]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def soak(bundle, ref, seconds: float, clients: int = 16, seed: int = 0) -> dict:
    want = [expected(ref, b, b["seed"]) for b in GOOD]
    srv = Running(new_engine(bundle), max_batch=8, max_queue=64)
    stats = {"good": 0, "hostile": 0, "disconnects": 0, "timeouts": 0, "5xx": 0, "lost": 0, "retried_429": 0}
    why_lost = []
    lock, stop = threading.Lock(), threading.Event()
    samples = []

    def count(key, n=1):
        with lock:
            stats[key] += n

    def sampler():
        t0 = time.monotonic()
        while not stop.is_set():
            samples.append((time.monotonic() - t0, rss_bytes()))
            stop.wait(0.25)

    def client(i):
        rng = np.random.default_rng(seed * 1000 + i)
        deadline = time.monotonic() + seconds
        with srv.client() as c:
            while time.monotonic() < deadline:
                kind = rng.choice(["good", "stream", "hostile", "other", "disconnect", "timeout"],
                                  p=[0.35, 0.15, 0.2, 0.1, 0.1, 0.1])
                k = int(rng.integers(len(GOOD)))
                if kind == "good":
                    for _ in range(50):  # a good client honours 429 + Retry-After (the queue is shared by 16)
                        r = c.post("/v1/generate", json=GOOD[k])
                        if r.status_code != 429:
                            break
                        count("retried_429")
                        time.sleep(0.05)
                    ok = r.status_code == 200 and np.array_equal(np.array(r.json()["tokens"]), want[k])
                    count("good")
                    if not ok:
                        count("lost")
                        why_lost.append((r.status_code, r.text[:300]))
                        count("5xx", r.status_code >= 500)
                elif kind == "stream":
                    for _ in range(50):
                        with c.stream("POST", "/v1/generate", json={**GOOD[k], "stream": True}) as r:
                            status = r.status_code
                            events = list(read_sse(r)) if status == 200 else [("status", r.read().decode()[:300])]
                        if status != 429:
                            break
                        count("retried_429")
                        time.sleep(0.05)
                    count("good")
                    if not events or events[-1][0] != "result" or \
                            not np.array_equal(np.array(events[-1][1]["tokens"]), want[k]):
                        count("lost")
                        why_lost.append((status, str(events[-1:])[:300]))
                elif kind == "hostile":
                    j = int(rng.integers(len(HOSTILE)))
                    count("hostile")
                    try:
                        r = c.post("/v1/generate", **HOSTILE[j])
                    except httpx.TransportError:
                        # the over-limit body: the server answers 413 from its headers and closes while the client
                        # is still sending, which the client may see as a reset before it reads the 413
                        assert j == len(HOSTILE) - 1, HOSTILE[j]
                        continue
                    count("5xx", r.status_code >= 500)
                elif kind == "other":
                    path, kw = HOSTILE_OTHER[int(rng.integers(len(HOSTILE_OTHER)))]
                    r = c.post(path, **kw)
                    count("hostile")
                    count("5xx", r.status_code >= 500)
                elif kind == "disconnect":  # a stream abandoned after its first progress event
                    with srv.client() as c2, c2.stream("POST", "/v1/generate",
                                                       json={**GOOD[k], "stream": True}) as r:
                        for line in r.iter_lines():
                            if line.startswith("event: progress"):
                                break
                    count("disconnects")
                else:  # a client that gives up mid-request
                    with srv.client(timeout=0.02) as c2:
                        try:
                            c2.post("/v1/generate", json={**GOOD[k], "class_ids": GOOD[k]["class_ids"] * 4})
                        except httpx.TimeoutException:
                            pass
                    count("timeouts")

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    try:
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client, range(clients)))
        wait_for(lambda: srv.scheduler.stats()["active_rows"] == 0 and srv.scheduler.stats()["queue_depth"] == 0,
                 "the scheduler's rows to return to zero")
        with srv.client() as c:
            assert c.get("/health").status_code == 200
            metrics = c.get("/metrics").text
    finally:
        stop.set()
        th.join(WAIT)
        srv.stop()
    t = np.array([s[0] for s in samples])
    m = np.array([s[1] for s in samples]) / 2**20
    half = t >= t[-1] / 2
    slope = float(np.polyfit(t[half], m[half], 1)[0]) * 60 if half.sum() >= 4 else 0.0
    stats.update(seconds=seconds, clients=clients, rss_start_mib=round(float(m[0]), 1),
                 rss_peak_mib=round(float(m.max()), 1), rss_final_mib=round(float(m[-1]), 1),
                 rss_slope_mib_per_min=round(slope, 2),
                 server_5xx=sum(float(x.rpartition(" ")[2]) for x in metrics.splitlines()
                                if x.startswith("larp_rt_http_requests_total") and 'outcome="error"' in x))
    stats["why_lost"] = why_lost[:5]
    print("soak:", json.dumps(stats))
    return stats


@pytest.fixture(scope="module")
def ref(bundles):  # noqa: F811
    return new_engine(bundles[0])


def check(stats, slope_bound: float | None = None, growth_bound: float | None = None):
    assert stats["lost"] == 0 and stats["5xx"] == 0 and stats["server_5xx"] == 0, stats
    assert stats["good"] > 0 and stats["hostile"] > 0 and stats["disconnects"] > 0 and stats["timeouts"] > 0, stats
    if slope_bound is not None:
        assert stats["rss_slope_mib_per_min"] < slope_bound, stats
    if growth_bound is not None:
        assert stats["rss_peak_mib"] - stats["rss_start_mib"] < growth_bound, stats


def test_soak_short(bundles, ref):  # noqa: F811
    # 15 s is all warm-up (arenas, first allocations): its slope says nothing, so the growth is bounded instead
    # (about 100 MiB seen alone and beside the whole suite); the long run bounds the slope
    check(soak(bundles[0], ref, seconds=15), growth_bound=400.0)


@pytest.mark.slow
def test_soak_long(bundles, ref):  # noqa: F811
    check(soak(bundles[0], ref, seconds=float(os.environ.get("LARP_RT_SOAK_S", "600"))), slope_bound=5.0)
