"""The HTTP API's schema and its prediction and scoring routes: ``/openapi.json`` and ``/docs``, ``POST /v1/predict``
and ``POST /v1/score`` under concurrent load with bad requests interleaved, each good answer equal to the offline
Engine's. One tiny bundle serves them all: a tokenizer with its AR prior and a frame-prediction generator.
"""

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

httpx = pytest.importorskip("httpx", reason="the [serve] extra is not installed (pip install 'larp_rt[serve]')")
pytest.importorskip("fastapi", reason="the [serve] extra is not installed (pip install 'larp_rt[serve]')")
torch = pytest.importorskip("torch")

from larp_rt.export import export_bundle  # noqa: E402
from test_serving_http import WAIT, Running, moving_square, read_sse, wait_for  # noqa: E402

from larp_rt import Engine, GeneratorConfig, TokenizerConfig, save_pretrained  # noqa: E402
from larp_rt.models import LARPGenerator, LARPTokenizer  # noqa: E402
from larp_rt.video import fit_clip, read_video, write_video  # noqa: E402

N_TOK = 64  # the tiny tokenizer's tokens; the frame-prediction prefix is 64 + the separator


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("routes")
    torch.manual_seed(0)
    tok = LARPTokenizer(TokenizerConfig.from_name("tiny").with_prior("tiny", latent_ce_temperature=0.1))
    torch.nn.init.normal_(tok.final_layer.linear.weight, std=0.05)
    torch.nn.init.constant_(tok.final_layer.linear.bias, 0.5)
    torch.nn.init.normal_(tok.prior_model.head.weight, std=0.5)
    cfg = GeneratorConfig.from_name("tiny", frame_prediction=True, cls_token_num=N_TOK + 1, class_dropout_prob=0.0)
    gen = LARPGenerator(cfg)
    torch.nn.init.normal_(gen.output.weight, std=0.3)
    save_pretrained(tok.eval(), root / "tok")
    save_pretrained(gen.eval(), root / "gen")
    return export_bundle(root / "tok", root / "gen", root / "bundle", printer=lambda s: None, onnx_only=True,
                         verify=False)


@pytest.fixture(scope="module")
def ref(bundle):
    return Engine(bundle, backend="onnxruntime", threads=1)


@pytest.fixture(scope="module")
def server(bundle):
    r = Running(Engine(bundle, backend="onnxruntime", threads=1), max_batch=4, max_queue=32, max_body_bytes=1 << 20)
    yield r
    r.stop()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Uploads of different sizes and lengths (mp4 / gif): (name, bytes, frames as the server reads them)."""
    root = tmp_path_factory.mktemp("clips")
    out = []
    for i, (T, H, W, ext) in enumerate([(12, 40, 56, "mp4"), (9, 32, 32, "gif"), (20, 64, 48, "mp4")]):
        f = np.roll(moving_square(T, H, W), 7 * i, axis=2)
        path = write_video(root / f"clip{i}.{ext}", f, fps=8)
        frames, _ = read_video(path, max_frames=8)
        out.append((path.name, path.read_bytes(), frames))
    return out


def offline_predict(ref, frames, n, body, seed):
    T, H, W = ref.tokenizer_config.video_shape[1:]
    clip, _ = fit_clip(frames, T, H, W)
    given = {k: float(body[k]) if k != "top_k" else int(body[k]) for k in ("temperature", "top_k", "top_p")
             if k in body}
    params = dataclasses.replace(ref.default_params, cfg_scale=1.0, **given, seed=seed)
    _, gen = ref.predict(clip[None], params, num_cond_frames=n)
    return gen.tokens


def post_predict(client, clip, data, **kw):
    name, raw, _ = clip
    return client.post("/v1/predict", files={"file": (name, raw, "application/octet-stream")},
                       data={k: str(v) for k, v in data.items()}, **kw)


# ------------------------------------------------------------------------------------------------
def test_openapi_schema_and_offline_docs(server):
    with server.client() as c:
        schema = c.get("/openapi.json").json()
        docs = c.get("/docs")
        assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]
        # the interactive docs load their scripts from this server, never from a CDN
        srcs = [s for s in docs.text.split('"') if s.endswith((".js", ".css"))]
        assert srcs and all(s.startswith("/docs-static/") for s in srcs), srcs
        for s in srcs:
            assert c.get(s).status_code == 200, s
        assert "cdn" not in docs.text.lower()
        models = c.get("/v1/models").json()
    paths = schema["paths"]
    for route in ("/v1/generate", "/v1/predict", "/v1/encode", "/v1/decode", "/v1/score"):
        assert "post" in paths[route], route
    for route in ("/health", "/v1/models", "/metrics"):
        assert "get" in paths[route], route
    assert "/" not in paths  # the page is not an API
    comp = schema["components"]["schemas"]
    gen = comp["GenerateRequest"]
    assert gen["additionalProperties"] is False and gen["required"] == ["class_ids"]
    props = gen["properties"]
    top_p = next(x for x in props["top_p"]["anyOf"] if x.get("type") == "number")
    assert top_p["minimum"] == pytest.approx(1.1754943508222875e-38, rel=1e-12) and top_p["maximum"] == 1
    cfg = next(x for x in props["cfg_scale"]["anyOf"] if x.get("type") == "number")
    assert cfg["minimum"] == 0 and cfg["maximum"] == 1e4
    seed = next(x for x in props["seed"]["anyOf"] if x.get("type") == "integer")
    assert seed["minimum"] == 0 and seed["maximum"] == 2**64 - 1
    assert props["class_ids"]["minItems"] == 1 and "SamplingParams.top_p" not in props["top_p"]["description"]
    assert "the smallest normal float32" in props["top_p"]["description"]
    # the multipart and two-content-type bodies are described too
    pred = paths["/v1/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    pred = comp[pred["$ref"].rsplit("/", 1)[1]] if "$ref" in pred else pred
    assert {"file", "num_cond_frames", "seed", "stream"} <= set(pred["properties"])
    score = paths["/v1/score"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(score)
    assert "400" in paths["/v1/generate"]["post"]["responses"]
    assert models["tasks"] == ["predict", "encode", "decode", "score"]


def test_docs_and_schema_sit_behind_the_api_key(bundle):
    r = Running(Engine(bundle, backend="onnxruntime", threads=1), api_key="s3cret", max_batch=2, max_queue=2)
    try:
        with r.client() as c:
            for path in ("/openapi.json", "/docs", "/docs-static/swagger-ui-bundle.js", "/v1/models"):
                got = c.get(path)
                assert got.status_code == 401 and "API key" in got.json()["error"], path
            assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
            auth = {"Authorization": "Bearer s3cret"}
            schema = c.get("/openapi.json", headers=auth).json()
            assert c.get("/docs", headers=auth).status_code == 200
        assert schema["components"]["securitySchemes"]["apiKey"] == {
            "type": "http", "scheme": "bearer", "description": "the server's --api-key"}
        assert schema["paths"]["/v1/predict"]["post"]["security"] == [{"apiKey": []}]
        assert schema["paths"]["/health"]["get"]["security"] == []
    finally:
        r.stop()


def test_predict_clients_with_bad_requests_interleaved(server, ref, clips):
    """Concurrent predictions (json, mp4, streamed) share the batch; bad ones get their 400 beside them and every
    good one equals Engine.predict of the same clip and seed."""
    goods = []
    for i in range(10):
        body = {"num_cond_frames": 1 + i % 5, "seed": 1000 + i}
        body.update([{}, {"temperature": 0.0}, {"top_k": 5}, {"top_p": 0.8, "temperature": 0.7}][i % 4])
        goods.append((clips[i % 3], body, ["json", "stream", "mp4"][i % 3]))
    bad = [
        ({"num_cond_frames": 0}, 400, "num_cond_frames must be an int >= 1"),
        ({"num_cond_frames": 99}, 400, "num_cond_frames must be an int in [1, 8]"),
        ({"num_cond_frames": "five"}, 400, "num_cond_frames must be"),
        ({"cfg_scale": 2.0}, 400, "unknown field(s) ['cfg_scale']"),
        ({"top_p": 0}, 400, "SamplingParams.top_p must be in (0, 1]"),
        ({"temperature": "inf"}, 400, "SamplingParams.temperature must be a finite number"),
        ({"seed": -1}, 400, "SamplingParams.seed must be"),
        ({"top_k": 4096}, 400, "SamplingParams.top_k must be at most the vocabulary size"),
        ({"cond_seed": 3}, 400, "cond_seed seeds the stochastic conditioning draw"),
        ({"format": "webm"}, 400, "format must be one of"),
        ({"format": "mp4", "stream": "true"}, 400, "stream: true sends the tokens in its last event"),
    ]

    def good(job):
        clip, body, mode = job
        with server.client() as c:
            if mode == "stream":
                with c.stream("POST", "/v1/predict", files={"file": (clip[0], clip[1])},
                              data={**{k: str(v) for k, v in body.items()}, "stream": "true"}) as r:
                    assert r.status_code == 200, r.read()
                    events = list(read_sse(r))
                assert events[0][0] == "accepted" and events[0][1]["num_cond_frames"] == body["num_cond_frames"]
                steps = [d["step"] for e, d in events if e == "progress"]
                assert steps == sorted(steps) and steps[-1] == N_TOK
                assert events[-1][0] == "result", events[-1]
                return np.array(events[-1][1]["tokens"]), events[-1][1]
            r = post_predict(c, clip, {**body, "format": "mp4" if mode == "mp4" else "json"})
            assert r.status_code == 200, r.text
            if mode == "mp4":
                assert r.headers["content-type"] == "video/mp4" and r.headers["x-larp-seed"] == str(body["seed"])
                return r.content, None
            return np.array(r.json()["tokens"]), r.json()

    with ThreadPoolExecutor(6) as pool, server.client() as c:
        futures = [pool.submit(good, job) for job in goods]
        for data, status, msg in bad:
            r = post_predict(c, clips[0], data)
            assert r.status_code == status and msg in r.json()["error"], (data, r.status_code, r.text)
        r = post_predict(c, ("two.gif", _gif(2), None), {"num_cond_frames": 5})
        assert r.status_code == 400 and "has 2 frame(s)" in r.json()["error"], r.text
        r = c.post("/v1/predict", files={"file": ("x.mp4", b"not a video")})
        assert r.status_code == 400 and "unreadable upload 'x.mp4'" in r.json()["error"]
        r = c.post("/v1/predict", json={"num_cond_frames": 2})
        assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]
        r = c.post("/v1/predict", data={"num_cond_frames": "2"}, files={"video": ("a.mp4", clips[0][1])})
        assert r.status_code == 400 and "field 'file'" in r.json()["error"]
        r = c.post("/v1/generate", json={"class_ids": [0]})
        assert r.status_code == 400 and "POST /v1/predict" in r.json()["error"]
        results = [f.result(timeout=3 * WAIT) for f in futures]
    for (clip, body, mode), (got, meta) in zip(goods, results, strict=True):
        want = offline_predict(ref, clip[2], body["num_cond_frames"], body, body["seed"])
        if mode == "mp4":
            frames, _ = _frames_of(got)
            T, H, W = ref.tokenizer_config.video_shape[1:]
            assert frames.shape == (T, H, W, 3)
            continue
        assert np.array_equal(got, want), (body, mode)
        assert meta["seed"] == body["seed"] and meta["num_cond_frames"] == body["num_cond_frames"]
        assert meta["params"]["cfg_scale"] == 1.0
        T, H, W = ref.tokenizer_config.video_shape[1:]
        cond = ref.cond_tokens(fit_clip(clip[2], T, H, W)[0][None], num_cond_frames=body["num_cond_frames"])
        assert meta["cond_tokens"] == cond[:, :-1].tolist()
    wait_for(lambda: server.scheduler.stats()["active_requests"] == 0, "the batch to empty")
    with server.client() as c:
        assert c.get("/health").status_code == 200


def _gif(n: int) -> bytes:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        return write_video(Path(d) / "x.gif", moving_square(n, 32, 32), fps=8).read_bytes()


def _frames_of(mp4: bytes):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.mp4"
        p.write_bytes(mp4)
        return read_video(p)


def test_predict_mp4_is_the_decoded_offline_prediction(server, ref, clips):
    body = {"num_cond_frames": 3, "seed": 77, "temperature": 0.0}
    with server.client() as c:
        r = post_predict(c, clips[0], {**body, "format": "npy"})
        assert r.status_code == 400 and "format must be one of" in r.json()["error"]
        tokens = np.array(post_predict(c, clips[0], body).json()["tokens"])
        mp4 = post_predict(c, clips[0], {**body, "format": "mp4", "fps": 4}).content
        via_decode = c.post("/v1/decode", json={"tokens": tokens.tolist(), "format": "mp4", "fps": 4}).content
    assert np.array_equal(tokens, offline_predict(ref, clips[0][2], 3, body, 77))
    assert mp4 == via_decode  # the same tokens, the same writer: the same bytes


def test_score_tokens_and_uploads_with_bad_requests_interleaved(server, ref, clips):
    """Concurrent scoring of token rows (JSON) and of uploaded videos (multipart); bad requests interleaved; every
    good answer equals Engine.prior_nll offline."""
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 1024, (int(rng.integers(1, 4)), N_TOK)).tolist() for _ in range(8)]
    bad = [
        (dict(json={"tokens": [[5000] * N_TOK]}), 400, "tokens must be in [0, 1023]"),
        (dict(json={"tokens": [[1, 2], [3]]}), 400, "equal length"),
        (dict(json={"tokens": [[1] * 10]}), 400, "64"),
        (dict(json={"tokens": [[1] * N_TOK], "method": "beam"}), 400, "method must be one of"),
        (dict(json={"tokens": [[1] * N_TOK], "extra": 1}), 400, "unknown field(s) ['extra']"),
        (dict(json={"tokens": []}), 400, "tokens must be a (B, N) list"),
        (dict(json={"tokens": [[1.5] * N_TOK]}), 400, "tokens must be"),
        (dict(content=b'{"tokens": [[1]', headers={"content-type": "application/json"}), 400, "malformed JSON"),
        (dict(content=b"tokens", headers={"content-type": "text/plain"}), 415, "multipart/form-data"),
        (dict(content=b"", headers={"content-type": "application/json"}), 400, "the request body is empty"),
        (dict(files={"file": ("x.mp4", b"junk")}), 400, "unreadable upload 'x.mp4'"),
        (dict(files={"file": ("x.mp4", b"junk")}, data={"method": "beam"}), 400, "method must be one of"),
        (dict(files={"video": ("x.mp4", b"junk")}), 400, "file"),
    ]

    def good(i):
        with server.client() as c:
            if i % 3 == 2:
                up = [clips[j % 3] for j in range(i % 2 + 1)]
                r = c.post("/v1/score", files=[("file", (n, raw)) for n, raw, _ in up])
                assert r.status_code == 200, r.text
                return ("videos", up), r.json()
            method = ["auto", "steps"][i % 2]
            r = c.post("/v1/score", json={"tokens": rows[i], "method": method})
            assert r.status_code == 200, r.text
            return ("tokens", rows[i], method), r.json()

    with ThreadPoolExecutor(4) as pool, server.client() as c:
        futures = [pool.submit(good, i) for i in range(8)]
        for kw, status, msg in bad:
            r = c.post("/v1/score", **kw)
            assert r.status_code == status and msg in r.json()["error"], (kw, r.status_code, r.text)
        results = [f.result(timeout=3 * WAIT) for f in futures]
    T, H, W = ref.tokenizer_config.video_shape[1:]
    for what, out in results:
        if what[0] == "tokens":
            want = ref.prior_nll(np.array(what[1]), method=what[2])
            assert out["method"] == what[2] and "tokens" not in out
        else:
            tokens = ref.encode(np.stack([fit_clip(read_video_bytes(n, raw), T, H, W)[0] for n, raw, _ in what[1]]))
            assert out["tokens"] == tokens.tolist() and len(out["notes"]) == len(what[1])
            want = ref.prior_nll(tokens)
        np.testing.assert_allclose(out["nll"], want, rtol=1e-6, atol=0)
        assert out["uniform"] == pytest.approx(np.log(1024))
    with server.client() as c:
        assert c.get("/health").status_code == 200


def read_video_bytes(name: str, raw: bytes) -> np.ndarray:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / name
        p.write_bytes(raw)
        return read_video(p, max_frames=9)[0]


def test_form_fields_are_validated_on_encode(server, clips):
    with server.client() as c:
        r = c.post("/v1/encode", files={"file": (clips[0][0], clips[0][1])}, data={"colour": "red"})
        assert r.status_code == 400 and "unknown field(s) ['colour'] for /v1/encode" in r.json()["error"], r.text
        r = c.post("/v1/encode", files={"file": (clips[0][0], clips[0][1])})
        assert r.status_code == 200 and len(r.json()["tokens"][0]) == N_TOK
        assert json.loads(r.text)["model_input"] == {"frames": 8, "height": 32, "width": 32}


def test_work_the_backend_cannot_do_is_a_501(server, clips, monkeypatch):
    """A BackendCapabilityError (a NotImplementedError) from engine work is the server's limit, not a crash: 501 with
    the error body naming what is missing, on a JSON predict, a streamed one (refused before its events) and decode;
    the server goes on serving."""
    from larp_rt.errors import BackendCapabilityError

    backend = server.server.state.engine.backend

    def lacks(what):
        def fail(*a, **k):
            raise BackendCapabilityError(f"backend 'minimal' has no {what}: use backend='onnxruntime'")
        return fail

    monkeypatch.setattr(backend, "encode_latents", lacks("stochastic encoder"))
    monkeypatch.setattr(backend, "decode", lacks("tokenizer decoder"))
    with server.client() as c:
        for stream in ("false", "true"):
            r = post_predict(c, clips[0], {"num_cond_frames": 2, "stochastic_cond": "true", "stream": stream})
            assert r.status_code == 501, r.text
            assert r.json() == {"error": "this server cannot do that: backend 'minimal' has no stochastic encoder: "
                                         "use backend='onnxruntime'", "status": 501}
        r = c.post("/v1/decode", json={"tokens": [[0] * N_TOK], "format": "npy"})
        assert r.status_code == 501 and "has no tokenizer decoder" in r.json()["error"], r.text
        r = post_predict(c, clips[0], {"num_cond_frames": 2, "seed": 5})  # the deterministic encoder still serves
        assert r.status_code == 200, r.text
    wait_for(lambda: server.scheduler.stats()["active_requests"] == 0, "the batch to empty")
