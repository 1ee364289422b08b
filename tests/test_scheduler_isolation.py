"""Failure isolation in the generation loop: a request whose step fails (NaN/Inf logits, a kernel refusal) fails
alone; every other request of that step completes with exactly its offline tokens, and the freed rows serve again.

Two kinds of failure: the loop's test hook (``larp_rt.backends.base.inject_faults``: NaN logits for host samplers,
a refused row for the fused graph's op) injected into a running batch, and real NaN logits from the model (a
bundle whose class 7 embedding is NaN). Joins are driven by the requests' own progress callbacks (on the loop
thread, at step boundaries), never by sleeps.
"""

import threading

import numpy as np
import pytest

from larp_rt import Engine, SamplingParams
from larp_rt.backends.base import inject_faults
from larp_rt.serving import Observer, Scheduler

torch = pytest.importorskip("torch")

from test_engine import HAVE_ORT_OP, models_and_bundle, tiny_models  # noqa: E402, F401

SP = SamplingParams
ENGINES = [("onnxruntime", s) for s in (["fused", "kernel", "graph", "reference"] if HAVE_ORT_OP
                                        else ["graph", "reference"])] + [("torch", "auto")]


def engine(bundle, backend, sampler):
    if backend == "torch":
        return Engine(bundle, backend="torch")
    return Engine(bundle, backend="onnxruntime", sampler=sampler)


def offline(eng, class_id, p):
    return eng.generate([class_id], [p]).tokens[0]


def run_scenario(eng, poisoned_class: int, fault=None):
    """A (guided) and B run from step 0; P (guided, the one that fails) joins at A's step 11, C at A's step 14; P
    fails (the hook at its step 5, or its own NaN logits); D (guided) is submitted when P ends and takes P's freed
    rows. Returns the requests {name: (request, class, params)}, P's error, the scheduler's stats after the run and
    its steps' (requests, tokens drawn)."""
    specs = {"A": (1, SP(seed=1, cfg_scale=2.0, top_k=10)), "B": (2, SP(seed=3, top_p=0.8, temperature=0.7)),
             "P": (poisoned_class, SP(seed=5, cfg_scale=1.5)), "C": (4, SP(seed=4, temperature=0.0)),
             "D": (6, SP(seed=6, cfg_scale=2.0, top_k=3, top_p=0.9)), "E": (3, SP(seed=8, cfg_scale=1.25))}
    reqs: dict = {}
    done_d = threading.Event()
    steps = []

    class Steps(Observer):
        def on_step(self, rows, requests, seconds, tokens):
            steps.append((requests, tokens))

    sched = Scheduler(eng, max_batch=6, max_queue=8, observer=Steps())

    def submit(name, **kw):
        c, p = specs[name]
        reqs[name] = (sched.submit(c, p, **kw), c, p)
        return reqs[name][0]

    def on_a(step, total, token):  # on the loop thread: the joins happen at known steps of A
        if step == 10:
            p = submit("P")
            p.add_done_callback(lambda r: (submit("D"), done_d.set()))
        elif step == 14:
            submit("C")

    submit("A", on_step=on_a)
    submit("B")
    with inject_faults(fault):
        sched.start()
        try:
            assert reqs["A"][0].result(timeout=120) is not None
            assert done_d.wait(60)
            for name in ("B", "C", "D"):
                reqs[name][0].result(timeout=120)
            with pytest.raises(ValueError) as err:
                reqs["P"][0].result(timeout=60)
            stats = sched.stats()
            assert stats["active_rows"] == 0 and stats["active_requests"] == 0
            e = submit("E")  # a new request after the failure, on the same runner
            e.result(timeout=120)
        finally:
            sched.stop()
    # P failed in a step it shared with A and B (and C, when it failed after C joined): one token short
    p, d = reqs["P"][0].seq, reqs["D"][0].seq
    assert (d.row, d.null_row) == (p.row, p.null_row)  # D ran on P's freed rows
    return reqs, err.value, sched.stats(), steps


def check_good(eng, reqs):
    for name in ("A", "B", "C", "D", "E"):
        req, c, p = reqs[name]
        assert req.outcome == "ok", name
        np.testing.assert_array_equal(req.result().tokens[0], offline(eng, c, p), err_msg=f"request {name}")


@pytest.mark.parametrize("backend, sampler", ENGINES, ids=[f"{b}-{s}" for b, s in ENGINES])
def test_a_failing_row_fails_only_its_request(models_and_bundle, backend, sampler):  # noqa: F811
    eng = engine(models_and_bundle[2], backend, sampler)
    at = {}

    def fault(seq):  # P's step 5: it has drawn 5 tokens in a batch of four requests
        req = seq.tag
        if req is not None and req.params.seed == 5 and seq.step == 5:
            at["step"] = seq.step
            return True
        return False

    reqs, err, stats, steps = run_scenario(eng, poisoned_class=7, fault=fault)
    assert (4, 3) in steps  # P failed in a step it shared with A, B and C: the three others drew their tokens
    assert at["step"] == 5 and reqs["P"][0].steps_done == 5 and reqs["P"][0].outcome == "error"
    fused = backend == "onnxruntime" and sampler == "fused"
    assert isinstance(err, ValueError)
    assert ("temperature[" in str(err) and "] = nan" in str(err)) if fused else "NaN/Inf" in str(err), str(err)
    assert stats["outcomes"] == {"ok": 5, "error": 1} and stats["active_rows"] == 0
    check_good(eng, reqs)


@pytest.fixture(scope="module")
def nan_class_bundle(tmp_path_factory):
    """A bundle whose generator's class 7 embedding is NaN: every request of class 7 has NaN logits (and writes
    NaN cache entries at its prefill); the other classes are untouched (rows never mix)."""
    from larp_rt.export import export_bundle

    from larp_rt import save_pretrained

    root = tmp_path_factory.mktemp("nan7")
    _, gen = tiny_models()
    with torch.no_grad():
        gen.cls_embedding.embedding_table.weight[7] = float("nan")
    save_pretrained(gen, root / "gen")
    return export_bundle(None, root / "gen", root / "bundle", verify=False, printer=lambda s: None,
                         fused_sampler=HAVE_ORT_OP)


@pytest.mark.parametrize("backend, sampler", ENGINES, ids=[f"{b}-{s}" for b, s in ENGINES])
def test_real_nan_logits_fail_only_their_request_and_leave_clean_rows(nan_class_bundle, backend, sampler):
    eng = engine(nan_class_bundle, backend, sampler)
    reqs, err, stats, steps = run_scenario(eng, poisoned_class=7)
    assert (3, 2) in steps  # P failed at its prefill, in a step it shared with A and B
    assert reqs["P"][0].steps_done == 0 and "NaN/Inf" in str(err), str(err)
    assert stats["outcomes"] == {"ok": 5, "error": 1}
    check_good(eng, reqs)  # D ran on P's rows (cleared): its tokens are its offline tokens


@pytest.mark.parametrize("backend, sampler", ENGINES, ids=[f"{b}-{s}" for b, s in ENGINES])
def test_offline_generate_names_the_failed_row(models_and_bundle, backend, sampler):  # noqa: F811
    eng = engine(models_and_bundle[2], backend, sampler)
    if backend == "torch":
        eng.backend.fast_path = False  # the hook lives in the shared loop (the fast path: test_fastpath's NaN test)
    ps = [SP(seed=1), SP(seed=2, cfg_scale=2.0), SP(seed=3, temperature=0.0)]
    want = eng.generate([0, 3, 5], ps).tokens
    with inject_faults(lambda seq: seq.params.seed[0] == 2 and seq.step == 7):
        with pytest.raises(ValueError, match=r"row 1 of the batch \(class id 3\) failed at step 7: ") as e:
            eng.generate([0, 3, 5], ps)
    fused = backend == "onnxruntime" and sampler == "fused"
    assert ("temperature[1] = nan" in str(e.value)) if fused else "NaN/Inf" in str(e.value)
    np.testing.assert_array_equal(eng.generate([0, 3, 5], ps).tokens, want)  # the runner serves on


def test_nan_bundle_offline_errors_name_the_row(nan_class_bundle):
    eng = Engine(nan_class_bundle, backend="onnxruntime")
    with pytest.raises(ValueError, match=r"row 1 of the batch \(class id 7\) failed at step 0: .*NaN/Inf"):
        eng.generate([2, 7], SP(seed=0))
    assert eng.generate([2], [SP(seed=0)]).tokens.shape == (1, 64)


class _GraphRunner:
    """A fake runner that samples in its graph: token = (seed + 7 * step) % V per request; a poisoned row (NaN
    temperature) makes the whole run raise without naming a row ("raise"), or is marked -2 ("mark"). It writes
    row r's cache slot pos[r] after a successful run only, as the real runners do, and counts its runs."""

    samples = True

    def __init__(self, mode, capacity=8, V=16):
        self.mode, self.capacity, self.V = mode, capacity, V
        self.cache = np.full((capacity, 80), -1, np.int64)
        self.runs = 0

    def run(self, tokens, pos, sample):
        self.runs += 1
        bad = np.isnan(sample.params.temperature)
        if bad.any() and self.mode == "raise":
            raise ValueError("the graph refused its batch")
        out = ((sample.params.seed.astype(np.int64) + 7 * sample.steps) % self.V).astype(np.int64)
        out[bad] = -2
        self.cache[np.arange(len(tokens)), pos] = tokens
        return out

    def clear_rows(self, rows):
        self.cache[rows] = -1


@pytest.mark.parametrize("mode", ["raise", "mark"])
def test_in_graph_sampler_failures_are_found_by_bisection_or_marks(mode):
    from larp_rt.backends.base import Backend, ContinuousBatch, Sequence
    from larp_rt.config import GeneratorConfig
    from larp_rt.sampling import resolve_params

    cfg = GeneratorConfig.from_name("tiny")
    runner = _GraphRunner(mode)
    class LoopOnly(Backend):  # the shared loop and its host sampler only (the runner is the fake above)
        new_runner = None

    batch = ContinuousBatch(LoopOnly(None, cfg), runner)
    seqs = [Sequence(i, resolve_params(SP(seed=10 * i, cfg_scale=2.0 if i % 3 == 0 else 1.0), 1), 12)
            for i in range(5)]
    for s in seqs:
        batch.admit(s)
    poisoned = {1, 3}  # fail at steps 4 and 6
    with inject_faults(lambda s: (s.class_id == 1 and s.step == 4) or (s.class_id == 3 and s.step == 6)):
        runs = []
        while batch.sequences:
            before = runner.runs
            batch.step()
            runs.append(runner.runs - before)
    for s in seqs:
        if s.class_id in poisoned:
            assert s.error is not None and s.step == (4 if s.class_id == 1 else 6)
            assert ("refused its batch" in s.error) if mode == "raise" else "outside the bounds" in s.error
            rows = [r for r in (s.row, s.null_row) if r >= 0]  # cleared (then idle rows: slot 0 only, never read)
            assert (runner.cache[rows, 1:] == -1).all()
        else:
            assert s.error is None and s.step == 12
            np.testing.assert_array_equal(s.tokens, (10 * s.class_id + 7 * np.arange(12)) % 16)
    # one run per step, but for the two failing steps: bisection over 5 requests costs a few runs, marks none
    extra = sorted(r for r in runs if r > 1)
    assert (len(extra) == 2 and max(extra) <= 6) if mode == "raise" else not extra, runs


AT_BOUNDS = [SP(seed=11, cfg_scale=1e4, temperature=1e-4, top_p=float(np.finfo(np.float32).tiny)),
             SP(seed=12, temperature=1e4, top_k=5), SP(seed=13, cfg_scale=0.0, temperature=1e4, top_p=0.5)]


def test_values_at_the_bounds_run_on_every_sampler_and_past_them_are_refused(models_and_bundle):  # noqa: F811
    """The bound values through Engine.generate and the Scheduler on every sampler: the reference sampler's
    tokens; the hostile values of issue 24 are refused at submit, naming the bound (nothing reaches a kernel)."""
    want = engine(models_and_bundle[2], "onnxruntime", "reference").generate([1, 2, 3], AT_BOUNDS).tokens
    for backend, sampler in ENGINES:
        eng = engine(models_and_bundle[2], backend, sampler)
        np.testing.assert_array_equal(eng.generate([1, 2, 3], AT_BOUNDS).tokens, want, err_msg=sampler)
        with Scheduler(eng, max_batch=6) as sched:
            for field, value in (("cfg_scale", 3.5e38), ("cfg_scale", 1e308), ("temperature", 1e308),
                                 ("top_p", 1e-300), ("top_p", 5e-324)):
                with pytest.raises(ValueError, match=rf"SamplingParams\.{field} must be .*\d\].*, got"):
                    sched.submit(1, SP(**{field: value}))
            reqs = [sched.submit(c, p) for c, p in zip([1, 2, 3], AT_BOUNDS, strict=True)]
            got = np.stack([r.result(timeout=60).tokens[0] for r in reqs])
        np.testing.assert_array_equal(got, want, err_msg=f"{backend}-{sampler} scheduler")
