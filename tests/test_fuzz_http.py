"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (Schemathesis over Hypothesis).

For every operation of ``/openapi.json``: no input gets a 5xx, the server stays healthy after each case, and a good
request after each bad one still equals its offline result. Fixed seed (derandomized) and a modest example count
here; ``LARP_RT_FUZZ_EXAMPLES`` sets it, and the ``slow`` run takes 200.
"""

import os

import numpy as np
import pytest

httpx = pytest.importorskip("httpx", reason="the [serve] extra is not installed (pip install 'larp_rt[serve]')")
pytest.importorskip("fastapi", reason="the [serve] extra is not installed (pip install 'larp_rt[serve]')")
schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install 'larp_rt[dev]')")
torch = pytest.importorskip("torch")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from test_serving_http import Running, bundles, new_engine  # noqa: E402, F401

from larp_rt import SamplingParams  # noqa: E402

EXAMPLES = int(os.environ.get("LARP_RT_FUZZ_EXAMPLES", "25"))
GOOD = {"class_ids": [2], "seed": 5, "cfg_scale": 1.5, "top_k": 20}


@pytest.fixture(scope="module")
def fuzz_server(bundles):  # noqa: F811
    r = Running(new_engine(bundles[0]), max_batch=4, max_queue=16, max_body_bytes=1 << 20, max_video_pixels=1 << 20)
    yield r
    r.stop()


@pytest.fixture(scope="module")
def good_tokens(bundles):  # noqa: F811
    eng = new_engine(bundles[0])
    want = eng.generate(GOOD["class_ids"], SamplingParams(cfg_scale=1.5, top_k=20, seed=5)).tokens
    eng.close()
    return want


MODES = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_no_input_gets_a_5xx_and_good_requests_stay_exact(fuzz_server, good_tokens, mode):
    """Every operation, valid inputs (positive) and inputs that break the schema (negative)."""
    fuzz_all(fuzz_server, good_tokens, mode, EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_fuzz_long(fuzz_server, good_tokens, mode):
    """The longer run (200 examples per operation and mode, ~10 min on 2 cores): pytest -m slow."""
    fuzz_all(fuzz_server, good_tokens, mode, max(EXAMPLES, 200))


def fuzz_all(fuzz_server, good_tokens, mode, examples: int):
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in ops} >= {
        "POST /v1/generate", "POST /v1/predict", "POST /v1/encode", "POST /v1/decode", "POST /v1/score"}
    seen = {}
    for op in ops:
        check_operation(op, mode, fuzz_server, good_tokens, seen, examples)
    assert all(n > 0 for n in seen.values()), seen


def check_operation(op, mode, fuzz_server, good_tokens, seen, examples: int):
    seen[op.label] = 0

    @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def check(case):
        seen[op.label] += 1
        response = case.call(timeout=60)
        assert response.status_code < 500, (case.method, case.path, case.body, response.status_code,
                                            response.text[:500])
        ctype = response.headers.get("content-type", "")
        ctype = ctype[0] if isinstance(ctype, list) else ctype
        if response.status_code >= 400 and ctype.startswith("application/json"):
            body = response.json()  # every error has the documented shape
            assert set(body) == {"error", "status"} and body["status"] == response.status_code, body
        with fuzz_server.client() as c:
            assert c.get("/health").status_code == 200
            r = c.post("/v1/generate", json=GOOD)
            assert r.status_code == 200, r.text
            assert np.array_equal(np.array(r.json()["tokens"]), good_tokens)

    try:
        check()
    except Unsatisfiable:
        if mode is schemathesis.GenerationMode.POSITIVE or op.body or list(op.iter_parameters()):
            raise
        seen.pop(op.label)  # a GET with no input has nothing to break
