"""The step-level scheduler (larp_rt/serving/scheduler.py) and the thread-safe Engine.

Oracle: ``Engine.generate`` of each request alone with the same seed and stream. Requests arrive while others
run (rows join and leave at step boundaries, every row at its own position), with mixed parameters; each one's
tokens must equal its offline generation, on ONNX Runtime (every sampler) and on torch.
"""

import threading
import time

import numpy as np
import pytest

from larp_rt import Engine, SamplingParams
from larp_rt.bundle import BundleError
from larp_rt.serving import Observer, QueueFull, RequestCancelled, Scheduler, SchedulerClosed

torch = pytest.importorskip("torch")

from test_engine import HAVE_ORT_OP, models_and_bundle  # noqa: E402, F401  (the module-scoped tiny bundle)

SP = SamplingParams
MIXED = [SP(seed=1), SP(seed=2, cfg_scale=2.0, top_k=10), SP(seed=3, top_p=0.8, temperature=0.7),
         SP(seed=4, temperature=0.0), SP(seed=5, cfg_scale=1.5, top_k=3, top_p=0.9), SP(seed=6, temperature=0.0,
                                                                                         cfg_scale=1.25)]


def alone(eng: Engine, class_id: int, p: SamplingParams, stream: int = 0) -> np.ndarray:
    """The offline tokens of one request: row ``stream`` of a batch of one SamplingParams reads stream (seed, row)."""
    if stream == 0:
        return eng.generate([class_id], [p]).tokens[0]
    return eng.generate([class_id] * (stream + 1), p).tokens[stream]


class Recorder(Observer):
    def __init__(self):
        self.steps, self.outcomes, self.depths = [], [], []

    def on_queue(self, depth):
        self.depths.append(depth)

    def on_step(self, rows, requests, seconds, tokens):
        self.steps.append((rows, requests, tokens))

    def on_request(self, outcome, seconds):
        self.outcomes.append(outcome)


def expected_steps(arrivals: list[int], rows_needed: list[int], max_batch: int, total: int = 64):
    """The (rows, requests) of every step of a FIFO step-level scheduler, computed by hand: request i is queued
    after global step ``arrivals[i]`` (-1: before the first), joins at the first boundary where the rows are free
    and every earlier request has joined, and leaves after its ``total``-th step. Also each request's first step."""
    steps, joined, active, queue, i, g = [], {}, {}, [], 0, 0
    order = sorted(range(len(arrivals)), key=lambda r: (arrivals[r], r))
    while i < len(order) or queue or active:
        while i < len(order) and arrivals[order[i]] < g:
            queue.append(order[i])
            i += 1
        while queue and max_batch - sum(rows_needed[r] for r in active) >= rows_needed[queue[0]]:
            r = queue.pop(0)
            active[r], joined[r] = 0, g
        if active:
            steps.append((sum(rows_needed[r] for r in active), len(active)))
            for r in list(active):
                active[r] += 1
                if active[r] == total:
                    del active[r]
        g += 1
    return steps, [joined[r] for r in range(len(arrivals))]


SAMPLERS = ["fused", "kernel", "graph", "reference"] if HAVE_ORT_OP else ["graph", "reference"]
# request i (> 0) is submitted by request 0's progress callback after its step ARRIVALS[i] (on the loop thread, at a
# step boundary): no sleeps, so every run joins at the same steps. Some join mid-video, some wait for rows.
ARRIVALS = [-1, 0, 0, 4, 9, 9, 15, 22, 30, 41, 50, 62]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_staggered_arrivals_equal_offline_generation(models_and_bundle, sampler):  # noqa: F811
    eng = Engine(models_and_bundle[2], backend="onnxruntime", sampler=sampler)
    rec = Recorder()
    reqs, first = {}, {}
    params = [MIXED[i % len(MIXED)] for i in range(len(ARRIVALS))]

    def submit(i: int, sched: Scheduler) -> None:
        def on_step(step, total, token):
            if step == 0:
                first[i] = len(rec.steps) - 1  # the observer has seen this step already
            if i == 0:
                for j in (j for j, a in enumerate(ARRIVALS) if a == step):
                    submit(j, sched)
        reqs[i] = sched.submit(i % 8, params[i], on_step=on_step)

    with Scheduler(eng, max_batch=6, max_queue=32, observer=rec) as sched:
        submit(0, sched)
        results = [reqs[i].result(timeout=60) for i in range(len(ARRIVALS))]
    for i, g in enumerate(results):
        assert reqs[i].outcome == "ok" and g.tokens.shape == (1, 64) and g.seeds == [params[i].seed]
        np.testing.assert_array_equal(g.tokens[0], alone(eng, i % 8, params[i]), err_msg=f"request {i}")
    want_steps, want_first = expected_steps(ARRIVALS, [1 + (p.cfg_scale != 1.0) for p in params], 6)
    assert [first[i] for i in range(len(ARRIVALS))] == want_first
    # read off the plan: 3 joins 0, 1 and 2 mid-video; 4 waits for 0's row and the free one, 5 and 6 for 1's and 2's
    assert want_first == [0, 1, 1, 5, 64, 65, 65, 128, 128, 129, 129, 192]
    assert [(r, n) for r, n, _ in rec.steps] == want_steps
    assert all(t == n for _, n, t in rec.steps) and rec.outcomes == ["ok"] * len(ARRIVALS)


def test_torch_backend_and_streams(models_and_bundle):  # noqa: F811
    """On torch, rows join mid-run at known steps (each row at its own position) and every request equals its
    offline tokens. A (guided, stream 0) runs alone; its callback after step 9 submits B (guided, stream 1): B joins
    at step 10; after step 30, L (greedy): it joins at step 31; B's callback after its step 40 submits C (guided,
    stream 2), which waits for rows until A leaves (it joins at step 64)."""
    eng = Engine(models_and_bundle[2], backend="torch")
    rec, reqs, first = Recorder(), {}, {}
    g, greedy = SP(seed=9, cfg_scale=1.25), SP(seed=4, temperature=0.0)
    plan = {"A": (1, g, 0), "B": (2, g, 1), "L": (5, greedy, 0), "C": (3, g, 2)}
    triggers = {("A", 9): "B", ("A", 30): "L", ("B", 40): "C"}

    def submit(name: str, sched: Scheduler) -> None:
        def on_step(step, total, token):
            if step == 0:
                first[name] = len(rec.steps) - 1
            if (name, step) in triggers:
                submit(triggers[name, step], sched)
        c, p, stream = plan[name]
        reqs[name] = sched.submit(c, p, stream=stream, on_step=on_step)

    with Scheduler(eng, max_batch=5, observer=rec) as sched:
        submit("A", sched)
        got = {n: reqs[n].result(timeout=60).tokens[0] for n in "ABLC"}  # each one exists once the one before ends
    assert first == {"A": 0, "B": 10, "L": 31, "C": 64}
    assert [(r, n) for r, n, _ in rec.steps] == ([(2, 1)] * 10 + [(4, 2)] * 21 + [(5, 3)] * 43 + [(3, 2)] * 21
                                                  + [(2, 1)] * 33)
    np.testing.assert_array_equal(got["L"], alone(eng, 5, greedy))
    # the HTTP server's mapping: one SamplingParams for class ids [1, 2, 3] = streams 0, 1, 2 of one seed
    np.testing.assert_array_equal(np.stack([got[n] for n in "ABC"]), eng.generate([1, 2, 3], g).tokens)


def test_cancel_timeout_queue_full_and_progress(models_and_bundle):  # noqa: F811
    eng = Engine(models_and_bundle[2], backend="onnxruntime")
    seen, at_10, gate = [], threading.Event(), threading.Event()

    def progress(s, n, t):
        seen.append((s, n, t))
        if s == 10:  # hold the loop at a step boundary (the callback runs on its thread) while the test acts
            at_10.set()
            gate.wait(30)

    with Scheduler(eng, max_batch=2, max_queue=1) as sched:
        a = sched.submit(1, SP(seed=1, cfg_scale=1.25), on_step=progress)
        assert at_10.wait(30)  # a runs on both rows
        b = sched.submit(2, SP(seed=2))  # waits: a holds both rows
        with pytest.raises(QueueFull) as e:
            sched.submit(3, SP(seed=3))
        assert e.value.retry_after >= 1
        assert b.cancel()
        gate.set()
        with pytest.raises(RequestCancelled):
            b.result(timeout=30)
        ga = a.result(timeout=30)
        assert [s for s, _, _ in seen] == list(range(64)) and [t for *_, t in seen] == ga.tokens[0].tolist()
        slow = sched.submit(4, SP(seed=4), timeout=1e-3)
        with pytest.raises(TimeoutError, match="timeout"):
            slow.result(timeout=30)
        c = sched.submit(5, SP(seed=5))  # the rows freed by the cancelled and timed-out requests serve again
        np.testing.assert_array_equal(c.result(timeout=30).tokens[0], alone(eng, 5, SP(seed=5)))
        st = sched.stats()
        assert st["outcomes"] == {"ok": 2, "cancelled": 1, "timeout": 1} and st["active_rows"] == 0
    with pytest.raises(SchedulerClosed):
        sched.submit(1, SP(seed=1))


def test_cancel_mid_generation_frees_rows(models_and_bundle):  # noqa: F811
    eng = Engine(models_and_bundle[2], backend="onnxruntime")
    with Scheduler(eng, max_batch=2) as sched:
        started = threading.Event()
        a = sched.submit(1, SP(seed=1), on_step=lambda s, n, t: started.set() if s == 5 else None)
        assert started.wait(30)
        a.cancel()
        with pytest.raises(RequestCancelled):
            a.result(timeout=30)
        assert 5 <= a.steps_done < 64
        deadline = time.monotonic() + 10
        while sched.stats()["active_rows"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sched.stats()["active_rows"] == 0


def test_bad_requests_and_stop(models_and_bundle):  # noqa: F811
    eng = Engine(models_and_bundle[2], backend="onnxruntime")
    sched = Scheduler(eng, max_batch=1).start()
    with pytest.raises(ValueError, match=r"class_ids must be in \[0, 7\]"):
        sched.submit(8)
    with pytest.raises(ValueError, match="top_p"):
        sched.submit(1, SP(top_p=0.0))
    with pytest.raises(ValueError, match="needs 2 batch rows"):
        sched.submit(1, SP(cfg_scale=2.0))
    with pytest.raises(ValueError, match="class_id must be an int"):
        sched.submit("1")
    with pytest.raises(ValueError, match="timeout"):
        sched.submit(1, timeout=0)
    running = [sched.submit(i, SP(seed=i)) for i in range(3)]  # one runs, two wait
    sched.stop(drain=True)  # drains: all three finish
    assert [r.outcome for r in running] == ["ok"] * 3 and not sched.ready
    sched = Scheduler(eng, max_batch=1).start()
    running = [sched.submit(i, SP(seed=i)) for i in range(3)]
    sched.stop(drain=False)
    assert all(r.done() for r in running) and "cancelled" in [r.outcome for r in running]
    with pytest.raises(ValueError, match="max_batch"):
        Scheduler(eng, max_batch=0)


def test_engine_threads_equal_their_lone_calls(models_and_bundle):  # noqa: F811
    """8 threads share one Engine: generate (own seeds), encode and decode; each result equals the call alone."""
    eng = Engine(models_and_bundle[2], backend="onnxruntime")
    cfg = eng.tokenizer_config
    rng = np.random.default_rng(0)
    video = rng.random((2, *cfg.video_shape), dtype=np.float32)
    tokens = rng.integers(0, cfg.codebook_size, (2, cfg.num_tokens))
    want_gen = {i: eng.generate([i % 8, (i + 3) % 8], SP(seed=i, cfg_scale=1.25)).tokens for i in range(8)}
    want_enc, want_dec = eng.encode(video), eng.decode(tokens)
    errors, got = [], {}

    def work(i: int) -> None:
        try:
            for _ in range(2):
                got[("gen", i)] = eng.generate([i % 8, (i + 3) % 8], SP(seed=i, cfg_scale=1.25)).tokens
                got[("enc", i)] = eng.encode(video)
                got[("dec", i)] = eng.decode(tokens)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i in range(8):
        np.testing.assert_array_equal(got[("gen", i)], want_gen[i])
        np.testing.assert_array_equal(got[("enc", i)], want_enc)
        np.testing.assert_array_equal(got[("dec", i)], want_dec)


def test_old_bundles_ask_for_a_re_export(models_and_bundle, tmp_path):  # noqa: F811
    import json
    import shutil

    b = tmp_path / "old"
    shutil.copytree(models_and_bundle[2], b)
    m = json.loads((b / "manifest.json").read_text())
    (b / "manifest.json").write_text(json.dumps({**m, "format_version": 1}))
    with pytest.raises(BundleError, match="format_version 1, older.*one per row.*re-export it with `larp-rt export`"):
        Engine(b)
