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


SAMPLERS = ["fused", "kernel", "graph", "reference"] if HAVE_ORT_OP else ["graph", "reference"]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_staggered_arrivals_equal_offline_generation(models_and_bundle, sampler):  # noqa: F811
    eng = Engine(models_and_bundle[2], backend="onnxruntime", sampler=sampler)
    rec = Recorder()
    reqs = []
    with Scheduler(eng, max_batch=6, max_queue=32, observer=rec) as sched:
        for i in range(12):  # arrivals spread over the run: some join mid-video, some wait for rows
            reqs.append(sched.submit(i % 8, MIXED[i % len(MIXED)]))
            time.sleep(0.002 * (i % 3))
        results = [r.result(timeout=60) for r in reqs]
    for i, (r, g) in enumerate(zip(reqs, results, strict=True)):
        assert r.outcome == "ok" and g.tokens.shape == (1, 64) and g.seeds == [MIXED[i % len(MIXED)].seed]
        np.testing.assert_array_equal(g.tokens[0], alone(eng, i % 8, MIXED[i % len(MIXED)]), err_msg=f"request {i}")
    assert max(rows for rows, _, _ in rec.steps) <= 6 and rec.outcomes == ["ok"] * 12
    assert any(n > 1 for _, n, _ in rec.steps)  # requests shared steps
    assert sum(t for _, _, t in rec.steps) == 12 * 64


def test_torch_backend_and_streams(models_and_bundle):  # noqa: F811
    eng = Engine(models_and_bundle[2], backend="torch")
    with Scheduler(eng, max_batch=4) as sched:
        reqs = [sched.submit(c, SP(seed=9, cfg_scale=1.25), stream=i) for i, c in enumerate([1, 2, 3])]
        late = sched.submit(5, SP(seed=4, temperature=0.0))
        got = [r.result(timeout=60).tokens[0] for r in reqs]
        np.testing.assert_array_equal(late.result(timeout=60).tokens[0], alone(eng, 5, SP(seed=4, temperature=0.0)))
    # the HTTP server's mapping: one SamplingParams for class ids [1, 2, 3] = streams 0, 1, 2 of one seed
    np.testing.assert_array_equal(np.stack(got), eng.generate([1, 2, 3], SP(seed=9, cfg_scale=1.25)).tokens)


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
