"""`larp-rt triton`: the repository it writes, served by the real tritonserver (nvidia-pytriton wheel) on loopback.

The server tests skip with a reason when tritonserver or tritonclient is missing; the repository-writing tests
always run. One server for the module, stopped in a finally (SIGINT, then SIGKILL) whatever the tests do.
"""

import dataclasses
import json
import os
import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from larp_rt.export import export_bundle  # noqa: E402

from larp_rt import Engine, GeneratorConfig, SamplingParams, TokenizerConfig, save_pretrained  # noqa: E402
from larp_rt.cli import main as cli_main  # noqa: E402
from larp_rt.models import LARPGenerator, LARPTokenizer  # noqa: E402
from larp_rt.triton import LocalServer, find_tritonserver, write_repository  # noqa: E402

WAIT = 60.0


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    torch.manual_seed(0)
    tok = LARPTokenizer(TokenizerConfig.from_name("tiny")).eval()
    gen = LARPGenerator(GeneratorConfig.from_name("tiny")).eval()
    torch.nn.init.normal_(gen.output.weight, std=0.3)
    save_pretrained(tok, root / "tok")
    save_pretrained(gen, root / "gen")
    quiet = dict(printer=lambda s: None, onnx_only=True, verify=False)
    full = export_bundle(root / "tok", root / "gen", root / "bundle", **quiet)
    tok_only = export_bundle(root / "tok", None, root / "tok_only", **quiet)
    return root, full, tok_only


# -- writing the repository (no server needed) ---------------------------------------------------
def test_configs_are_complete(bundles, tmp_path):
    _, full, _ = bundles
    repo = write_repository(full, tmp_path / "repo", instances=2, max_batch=4, max_queue_delay_us=500,
                            printer=lambda s: None)
    names = sorted(p.name for p in repo.iterdir() if p.is_dir())
    assert names == ["larp_decode", "larp_encode", "larp_generate", "larp_generate_stream", "larp_video"]
    gen = (repo / "larp_generate" / "config.pbtxt").read_text()
    for want in ('backend: "python"', "max_batch_size: 4", 'name: "CLASS_ID" data_type: TYPE_INT64 dims: [ 1 ]',
                 'name: "TOKENS" data_type: TYPE_INT64 dims: [ 64 ]', "max_queue_delay_microseconds: 500",
                 "instance_group [ { count: 2 kind: KIND_CPU } ]", "version_policy: { latest: { num_versions: 1 } }",
                 f'key: "bundle" value: {{ string_value: "{full}" }}', 'key: "larp_rt_path"'):
        assert want in gen, want
    assert "decoupled: true" in (repo / "larp_generate_stream" / "config.pbtxt").read_text()
    enc = (repo / "larp_encode" / "config.pbtxt").read_text()
    assert 'name: "VIDEO" data_type: TYPE_UINT8 dims: [ 8, 32, 32, 3 ]' in enc
    assert (repo / "larp_generate" / "1" / "model.py").is_file()
    assert "NGC" in (repo / "README.md").read_text()


def test_native_and_copy(bundles, tmp_path):
    _, full, _ = bundles
    repo = write_repository(full, tmp_path / "native", native=True, copy_bundle=True, kind="gpu", gpus=[0, 1],
                            printer=lambda s: None)
    enc = (repo / "larp_encode" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in enc and "kind: KIND_GPU gpus: [ 0, 1 ]" in enc
    assert 'name: "indices" data_type: TYPE_INT64 dims: [ 64 ]' in enc
    assert (repo / "larp_encode" / "1" / "model.onnx").resolve() == (full / "encoder.onnx").resolve()
    assert (repo / "bundle" / "manifest.json").is_file()
    assert f'string_value: "{repo / "bundle"}"' in (repo / "larp_generate" / "config.pbtxt").read_text()
    assert not (repo / "larp_video").exists()


def test_cli_bad_input(bundles, tmp_path, capsys):
    _, full, tok_only = bundles
    repo = tmp_path / "r"
    assert cli_main(["triton", str(tok_only), str(repo)]) == 0
    out = capsys.readouterr().out
    assert "no generator: wrote larp_encode and larp_decode only" in out
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == ["larp_decode", "larp_encode"]
    assert cli_main(["triton", str(full), str(repo)]) == 2  # not empty: refused, untouched
    assert "not empty; pass --force" in capsys.readouterr().err
    assert not (repo / "larp_generate").exists()
    assert cli_main(["triton", str(full), str(repo), "--force"]) == 0
    assert (repo / "larp_generate").is_dir()
    assert cli_main(["triton", str(full), str(tmp_path / "x"), "--max-batch", "0"]) == 2
    assert "max_batch must be an int >= 1" in capsys.readouterr().err
    assert cli_main(["triton", str(tmp_path / "nope"), str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_failure_leaves_nothing(bundles, tmp_path, monkeypatch):
    _, full, _ = bundles
    from larp_rt.triton import repository

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(repository, "_readme", boom)
    with pytest.raises(OSError, match="disk full"):
        write_repository(full, tmp_path / "repo", printer=lambda s: None)
    assert list(tmp_path.iterdir()) == []


# -- the real server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(bundles):
    if find_tritonserver() is None:
        pytest.skip("tritonserver is not installed (pip install --no-deps nvidia-pytriton==0.7.0; setup.sh does)")
    pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (pip install 'larp_rt[triton]')")
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
    root, full, _ = bundles
    repo = write_repository(full, root / "repo", max_batch=8, threads=1, stream_every=16, printer=lambda s: None)
    ctl = Ctl(root / "ctl")  # the isolation tests' hooks (no-ops until a test sets them)
    for name in ("larp_generate", "larp_generate_stream", "larp_decode"):
        cfg = (repo / name / "config.pbtxt").read_text()
        if name != "larp_generate_stream":  # a 0.1 s batching window: the isolation tests' batches form surely
            cfg = cfg.replace("max_queue_delay_microseconds: 1000\n", "max_queue_delay_microseconds: 100000\n")
        cfg += f'parameters: {{ key: "hooks" value: {{ string_value: "{ctl.hooks}" }} }}\n'
        (repo / name / "config.pbtxt").write_text(cfg)
    srv = LocalServer(repo)
    srv.ctl = ctl
    try:
        srv.start(timeout=WAIT)
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def ref(bundles):
    return Engine(bundles[1], backend="onnxruntime", threads=1)


@pytest.fixture(scope="module")
def http(server):
    from larp_rt.triton_client import TritonClient

    with TritonClient(server.http_url, timeout=WAIT) as c:  # closed: an open connection delays the server's exit
        yield c


def test_generate_equals_engine(server, http, ref):
    from larp_rt.triton_client import TritonClient

    out = http.generate([0, 3, 5], seed=[1, 2, 3], cfg_scale=1.25, top_k=[0, 50, 0], top_p=0.9)
    want = ref.generate([0, 3, 5], [SamplingParams(cfg_scale=1.25, top_k=k, top_p=0.9, seed=s)
                                    for k, s in ((0, 1), (50, 2), (0, 3))])
    assert out.seeds == [1, 2, 3]
    np.testing.assert_array_equal(out.tokens, want.tokens)
    with TritonClient(server.grpc_url, protocol="grpc") as g:
        o = g.generate(4, seed=9, temperature=0.0)
    greedy = dataclasses.replace(ref.default_params, temperature=0.0, seed=9)  # unset fields: the bundle's defaults
    np.testing.assert_array_equal(o.tokens, ref.generate([4], [greedy]).tokens)
    fresh = http.generate([1])  # no seed: one is drawn and reported, and it reproduces the tokens
    again = ref.generate([1], [dataclasses.replace(ref.default_params, seed=fresh.seeds[0])])
    np.testing.assert_array_equal(fresh.tokens, again.tokens)


def test_concurrent_requests(server, ref):
    from larp_rt.triton_client import TritonClient

    cases = [(c % 10, 100 + c, 1.25 if c % 2 else 1.0, [0, 20][c % 2]) for c in range(8)]

    def one(case):
        c, seed, cfg, k = case
        with TritonClient(server.http_url, timeout=WAIT) as cl:
            return cl.generate([c], seed=seed, cfg_scale=cfg, top_k=k).tokens

    with ThreadPoolExecutor(len(cases)) as ex:
        got = list(ex.map(one, cases))
    for (c, seed, cfg, k), tokens in zip(cases, got, strict=True):
        want = ref.generate([c], [dataclasses.replace(ref.default_params, cfg_scale=cfg, top_k=k, seed=seed)]).tokens
        np.testing.assert_array_equal(tokens, want)


def test_stream(server, ref):
    from larp_rt.triton_client import TritonClient

    with TritonClient(server.grpc_url, protocol="grpc") as g:
        events = list(g.generate_stream(2, seed=7, cfg_scale=1.25))
    N = ref.generator_config.max_seq_len
    assert [e.step for e in events] == list(range(16, N, 16)) + [N]
    want = ref.generate([2], [dataclasses.replace(ref.default_params, cfg_scale=1.25, seed=7)]).tokens
    np.testing.assert_array_equal(events[-1].tokens, want)
    assert events[-1].seed == 7
    assert [e.token for e in events[:-1]] == [int(want[0, e.step - 1]) for e in events[:-1]]


def test_encode_decode_video(http, ref):
    from larp_rt.triton.frames import to_frames

    gen = ref.generate([1, 6], SamplingParams(seed=3))
    frames = http.decode(gen.tokens)
    np.testing.assert_array_equal(frames, to_frames(ref.decode(gen.tokens)))
    tokens = http.encode(frames)  # a video round trip: frames -> tokens -> frames
    np.testing.assert_array_equal(tokens, ref.encode(frames))
    np.testing.assert_array_equal(http.decode(tokens), to_frames(ref.decode(ref.encode(frames))))
    vid, g = http.video([1, 6], seed=[3, 4])
    want = ref.generate([1, 6], [dataclasses.replace(ref.default_params, seed=s) for s in (3, 4)]).tokens
    np.testing.assert_array_equal(g.tokens, want)
    np.testing.assert_array_equal(vid, to_frames(ref.decode(want)))
    assert vid.dtype == np.uint8 and vid.shape == (2, 8, 32, 32, 3)


def test_concurrent_videos(server, ref):
    """Concurrent larp_video requests (batched into one BLS generate), one of them bad: only it fails."""
    from tritonclient.utils import InferenceServerException

    from larp_rt.triton.frames import to_frames
    from larp_rt.triton_client import TritonClient

    def one(c):
        with TritonClient(server.http_url, timeout=WAIT) as cl:
            try:
                return cl.video([c], seed=20 + c, temperature=0.5 if c % 2 else None)[1].tokens
            except InferenceServerException as e:
                return e

    cases = [0, 1, 2, 99, 3]
    with ThreadPoolExecutor(len(cases)) as ex:
        got = list(ex.map(one, cases))
    for c, g in zip(cases, got, strict=True):
        if c == 99:
            assert isinstance(g, InferenceServerException) and "[400] class_ids must be in [0, 7]" in str(g)
            continue
        p = dataclasses.replace(ref.default_params, seed=20 + c, **({"temperature": 0.5} if c % 2 else {}))
        np.testing.assert_array_equal(g, ref.generate([c], [p]).tokens)
    assert to_frames(ref.decode(got[0])).shape == (1, 8, 32, 32, 3)


def _metrics(server) -> dict:
    """Triton's counters by (name, model), summed over the other labels (failures carry a reason)."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    out: dict = {}
    for name, labels, v in re.findall(r'^(nv_inference_\w+)\{([^}]*)\} (\d+)', text, re.M):
        model = re.search(r'model="([^"]+)"', labels)
        if model:
            out[name, model.group(1)] = out.get((name, model.group(1)), 0) + int(v)
    return out


def test_bad_input_and_metrics(server, http, ref):
    from tritonclient.utils import InferenceServerException

    before = _metrics(server)
    with pytest.raises(InferenceServerException, match=r"\[400\] class_ids must be in \[0, 7\].*\[12\]"):
        http.generate([12])
    with pytest.raises(InferenceServerException, match="CLASS_ID"):  # wrong dtype: Triton names input and types
        http.infer("larp_generate", {"CLASS_ID": np.zeros((1, 1), np.float32)}, ["TOKENS"])
    with pytest.raises(InferenceServerException, match="TOKENS"):  # wrong shape
        http.infer("larp_decode", {"TOKENS": np.zeros((1, 63), np.int64)}, ["FRAMES"])
    with pytest.raises(InferenceServerException, match=r"tokens must be in \[0, 1023\]"):
        http.decode(np.full((1, 64), 5000, np.int64))
    with pytest.raises(InferenceServerException, match="top_p"):
        http.generate([1], seed=0, top_p=1.5)
    out = http.generate([3, 4], seed=11)  # still serving
    want = ref.generate([3, 4], [dataclasses.replace(ref.default_params, seed=11)] * 2).tokens
    np.testing.assert_array_equal(out.tokens, want)
    after = _metrics(server)

    def delta(name, model):
        return after.get((name, model), 0) - before.get((name, model), 0)

    # a request answered with the model's error response counts as a success in Triton 2.51's statistics; one that
    # Triton rejects before the model (dtype, shape) is not counted per model
    assert delta("nv_inference_request_success", "larp_generate") == 3
    assert delta("nv_inference_request_success", "larp_decode") == 1
    assert delta("nv_inference_count", "larp_generate") == 1 + 1 + 2  # batch entries (rows)


def test_server_stops(bundles, tmp_path):
    """stop() ends the process even when it is alive and busy-free; a second stop is harmless."""
    if find_tritonserver() is None:
        pytest.skip("tritonserver is not installed")
    repo = write_repository(bundles[2], tmp_path / "repo", threads=1, printer=lambda s: None)
    srv = LocalServer(repo)
    try:
        srv.start(timeout=WAIT)
        pid = srv.proc.pid
    finally:
        srv.close()
    assert srv.proc.poll() is not None
    srv.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# -- isolation: the models in process, over a stand-in for the stub's triton_python_backend_utils ---------------
# What the server tests below cannot make deterministic (a full queue, a batch of exactly these requests, a
# response sender that blocks or fails) runs here against the real Engine and Scheduler; the server tests check
# the same behaviour end to end through tritonserver.

HOOKS = r'''
"""Test hooks for larp_rt.triton.models (its "hooks" parameter); driven by CTL/config.json, logging to log.jsonl."""
import json, os, threading, time

CTL = os.path.dirname(os.path.abspath(__file__))
_lock = threading.Lock()
_gates = {}


def _cfg():
    try:
        with open(os.path.join(CTL, "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def log(**rec):
    rec["t"] = time.time()
    with _lock, open(os.path.join(CTL, "log.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")


def _wait(cond, timeout=20.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.005)
    return bool(cond())


def _go(name):
    return lambda: os.path.exists(os.path.join(CTL, name + ".go"))


def hook(event, model, **info):
    cfg = _cfg()
    if event == "step":
        if cfg.get("log_steps") == model:
            log(event="step", model=model, rows=info["rows"], requests=info["requests"])
        time.sleep(cfg.get("step_delay", {}).get(model, 0))
        g = cfg.get("gate")  # hold the loop after the gate's `after`-th step with a request running
        if g and g["model"] == model:
            st = _gates.setdefault(g["id"], {"steps": 0, "done": False})
            stats = info["stats"]()
            if not st["done"] and stats["active_requests"]:
                st["steps"] += 1
                if st["steps"] == g["after"]:
                    st["done"] = True
                    log(event="paused", model=model, gate=g["id"], stats=stats)
                    if "queued" in g:
                        ok = _wait(lambda: info["stats"]()["queue_depth"] >= g["queued"])
                    else:
                        ok = _wait(_go(g["id"]))
                    log(event="released", model=model, gate=g["id"], ok=ok, stats=info["stats"]())
    elif event == "send":
        log(event="send", model=model, rid=info["request_id"], kind=info["kind"],
            thread=threading.current_thread().name)
        time.sleep(cfg.get("slow_send", {}).get(info["request_id"], 0))
    elif event == "execute":
        log(event="execute", model=model, requests=info["requests"])
    elif event == "run":
        first = [int(x.reshape(len(x), -1)[i, 0]) for x in info["inputs"] for i in range(len(x))]
        log(event="run", model=model, sizes=[len(x) for x in info["inputs"]], first=first)
        h = cfg.get("hold_run")
        if h and h["model"] == model and h["first"] in first:
            _wait(_go(h["id"]))
        f = cfg.get("fail_run")
        if f and f["model"] == model and f["first"] in first:
            raise RuntimeError("injected failure")
'''


class Ctl:
    """The hooks file, its config.json and log.jsonl in one folder."""

    def __init__(self, path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        (path / "hooks.py").write_text(HOOKS)
        self.set()

    @property
    def hooks(self) -> str:
        return str(self.path / "hooks.py")

    def set(self, **cfg) -> None:
        tmp = self.path / "config.json.tmp"
        tmp.write_text(json.dumps(cfg))
        os.replace(tmp, self.path / "config.json")  # the hook never reads half a file

    def go(self, gate: str) -> None:
        (self.path / f"{gate}.go").write_text("")

    def log(self) -> list[dict]:
        try:
            return [json.loads(line) for line in (self.path / "log.jsonl").read_text().splitlines()]
        except FileNotFoundError:
            return []

    def clear(self) -> None:
        self.set()
        (self.path / "log.jsonl").unlink(missing_ok=True)


def _wait_for(cond, timeout: float, what: str):
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.01)


class _PbError:
    INVALID_ARG, INTERNAL, UNAVAILABLE, CANCELLED, UNKNOWN = "INVALID_ARG", "INTERNAL", "UNAVAILABLE", "CANCELLED", "?"

    def __init__(self, msg, code="INTERNAL"):
        self._msg, self._code = msg, code

    def message(self):
        return self._msg

    def code(self):
        return self._code


class _PbResponse:
    def __init__(self, output_tensors=(), error=None):
        self.outputs, self.error = dict(output_tensors), error


class _Req:
    """A stand-in for pb_utils.InferenceRequest: its inputs, id, cancellation and response sender."""

    def __init__(self, rid="", sender=None, cancelled=False, **inputs):
        self.inputs = {k: np.asarray(v) for k, v in inputs.items()}
        self.rid, self.sender, self.cancelled = rid, sender, cancelled

    def is_cancelled(self):
        return self.cancelled

    def request_id(self):
        return self.rid

    def get_response_sender(self):
        return self.sender


class _Sender:
    """A response sender that records what it sends and from which thread; ``delay`` s per send (a slow client),
    ``fail``: every send raises (a broken connection), ``gone_after``: is_cancelled() after that many sends."""

    def __init__(self, delay=0.0, fail=False, gone_after=None):
        self.delay, self.fail, self.gone_after = delay, fail, gone_after
        self.sent, self.threads, self.polls = [], [], 0
        self.finished = threading.Event()
        self.t0 = time.monotonic()
        self.t_final = None

    def send(self, response=None, flags=0):
        self.threads.append(threading.current_thread().name)
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("the client has gone")
        self.sent.append((response, flags))
        if flags:
            self.t_final = time.monotonic() - self.t0
            self.finished.set()

    def is_cancelled(self):
        self.polls += 1
        return self.gone_after is not None and len(self.sent) >= self.gone_after

    @property
    def last(self):
        return self.sent[-1][0]


@pytest.fixture
def pbm(monkeypatch):
    """larp_rt.triton.models imported over a stand-in pb_utils; tensors are plain (name, array) pairs."""
    import sys
    import types

    import larp_rt.triton

    fake = types.ModuleType("triton_python_backend_utils")
    fake.TritonError, fake.InferenceResponse = _PbError, _PbResponse
    fake.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    fake.Logger = types.SimpleNamespace(log_warn=lambda msg: None)

    def no_metrics(**kw):
        raise NotImplementedError("no custom metrics here")

    fake.MetricFamily = no_metrics
    fake.MetricFamily.GAUGE = fake.MetricFamily.COUNTER = 0
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    monkeypatch.delitem(sys.modules, "larp_rt.triton.models", raising=False)
    monkeypatch.setattr(larp_rt.triton, "models", None, raising=False)  # undone: the attribute goes again
    import importlib

    models = importlib.import_module("larp_rt.triton.models")
    monkeypatch.setattr(models, "_out", lambda name, arr: (name, np.array(arr)))
    monkeypatch.setattr(models, "_in", lambda req, name: req.inputs.get(name))
    opened = []
    yield models, opened
    for m in opened:
        m.finalize()
    sys.modules.pop("larp_rt.triton.models", None)


def _model(pbm, cls: str, bundle, ctl: Ctl | None = None, **params):
    models, opened = pbm
    p = {"bundle": str(bundle), "threads": "1", "scheduler_rows": "16", "cancel_poll_ms": "20", **params}
    if ctl is not None:
        p["hooks"] = ctl.hooks
    m = getattr(models, cls)()
    m.initialize({"model_config": json.dumps({"parameters": {k: {"string_value": str(v)} for k, v in p.items()}}),
                  "model_name": cls.lower(), "model_instance_name": cls.lower() + "_0"})
    opened.append(m)
    return m


def _gen_req(ids, **cols):
    B = len(ids)
    inputs = {"CLASS_ID": np.asarray(ids, np.int64).reshape(B, 1)}
    for name, dtype in (("SEED", np.int64), ("TOP_K", np.int32), ("TOP_P", np.float32), ("CFG_SCALE", np.float32),
                        ("TEMPERATURE", np.float32)):
        if name in cols:
            inputs[name] = np.broadcast_to(np.asarray(cols[name], dtype).reshape(-1), (B,)).reshape(B, 1)
    return _Req(**inputs)


def _want(ref, ids, seeds, **kw):
    cols = {k: (v if isinstance(v, list) else [v] * len(ids)) for k, v in kw.items()}
    return ref.generate(ids, [dataclasses.replace(ref.default_params, seed=s, **{k: v[i] for k, v in cols.items()})
                              for i, s in enumerate(seeds)]).tokens


def _alone(ref, ids, **cols) -> np.ndarray:
    """Each row of a larp_generate request generated alone by the Engine: its own (float32, as Triton carries them)
    parameters; SEED / TOP_K < 0 and NaN floats are the bundle's defaults, as in the model."""
    rows = []
    for i, c in enumerate(ids):
        kw = {}
        for name, v in cols.items():
            x = np.asarray(v).reshape(-1)[i]
            if name in ("SEED", "TOP_K"):
                if int(x) >= 0:
                    kw[name.lower()] = int(x)
            elif not np.isnan(x):
                kw[name.lower()] = float(np.float32(x))
        rows.append(ref.generate([c], [dataclasses.replace(ref.default_params, **kw)]).tokens[0])
    return np.stack(rows)


# rows that differ in every parameter (one row on the bundle's defaults: TOP_K -1, NaN floats), two requests
PER_ROW = [dict(ids=[0, 3, 5, 2], SEED=[1, 2, 3, 4], TOP_K=[0, 50, 3, -1], TOP_P=[1.0, 0.9, 0.8, np.nan],
                TEMPERATURE=[1.0, 0.7, 1.3, np.nan], CFG_SCALE=[1.0, 1.25, 2.0, np.nan]),
           dict(ids=[7, 7], SEED=[5, 6], TOP_K=[20, 2], TOP_P=[0.95, 1.0], TEMPERATURE=[0.0, 0.9],
                CFG_SCALE=[1.5, 1.0])]


def test_rows_keep_their_own_parameters_in_process(pbm, bundles, ref):
    """One execute of two larp_generate requests whose rows each give their own SEED, TOP_K, TOP_P, TEMPERATURE and
    CFG_SCALE: every row equals the Engine's generation of that row alone (a parameter read from row 0, or from the
    first request, for every row fails it)."""
    m = _model(pbm, "Generate", bundles[1])
    out = m.execute([_gen_req(**case) for case in PER_ROW])
    for case, r in zip(PER_ROW, out, strict=True):
        assert r.error is None, r.error and r.error.message()
        want = _alone(ref, **case)
        assert r.outputs["TOKENS"].shape == want.shape
        for i in range(len(want)):
            np.testing.assert_array_equal(r.outputs["TOKENS"][i], want[i], err_msg=f"{case}, row {i}")


def test_generate_join_mid_run_in_process(pbm, bundles, ref, tmp_path):
    """larp_generate's scheduler: request B (two rows, one guided) is admitted at a known step of A (the hook holds
    the loop after A's 20th step until B's rows wait): the step log shows B joining at step 20, every row at its
    own position, and every row equals the Engine alone."""
    ctl = Ctl(tmp_path / "ctl")
    ctl.set(gate={"model": "generate", "id": "join", "after": 20, "queued": 2}, log_steps="generate")
    m = _model(pbm, "Generate", bundles[1], ctl)
    a = dict(ids=[1], SEED=[21], TOP_K=[3], TOP_P=[1.0], TEMPERATURE=[1.0], CFG_SCALE=[1.0])
    b = dict(ids=[6, 2], SEED=[22, 23], TOP_K=[50, 0], TOP_P=[0.9, 1.0], TEMPERATURE=[0.8, 1.0],
             CFG_SCALE=[1.0, 1.25])
    with ThreadPoolExecutor(2) as ex:
        fa = ex.submit(m.execute, [_gen_req(**a)])
        _wait_for(lambda: _events(ctl, "paused", gate="join"), WAIT, "A at its 20th step")
        fb = ex.submit(m.execute, [_gen_req(**b)])
        [ra], [rb] = fa.result(WAIT), fb.result(WAIT)
    [released] = _events(ctl, "released", gate="join")
    assert released["ok"] and released["stats"]["queue_depth"] == 2
    steps = [(e["rows"], e["requests"]) for e in _events(ctl, "step")]
    assert steps == [(1, 1)] * 20 + [(4, 3)] * 44 + [(3, 2)] * 20  # B's rows run the loop's steps 20 .. 83
    for case, r in ((a, ra), (b, rb)):
        assert r.error is None
        np.testing.assert_array_equal(r.outputs["TOKENS"], _alone(ref, **case))


def test_refused_row_withdraws_its_request(pbm, bundles, ref):
    """A later row refused (a full queue: UNAVAILABLE; a bad parameter: INVALID_ARG naming the row) withdraws the
    request's earlier rows; the request gets one error; the other requests of the batch are served."""
    from larp_rt.serving import Scheduler

    m = _model(pbm, "Generate", bundles[1])
    m.scheduler.stop(drain=False)
    m.scheduler = Scheduler(m.engine, max_batch=4, max_queue=2)  # not started: its queue fills, deterministically
    [resp] = m.execute([_gen_req([0, 1, 2], SEED=[1, 2, 3])])
    assert resp.error.code() == "UNAVAILABLE" and "queue is full" in resp.error.message()
    assert m.scheduler.stats()["queue_depth"] == 2  # rows 0 and 1, withdrawn: dropped at the first boundary
    m.scheduler.start()
    _wait_for(lambda: m.scheduler.stats()["outcomes"].get("cancelled") == 2, 5, "the withdrawn rows cancelled")
    s = m.scheduler.stats()
    assert (s["queue_depth"], s["active_requests"], s["active_rows"], s["steps"]) == (0, 0, 0, 0)  # never ran

    m.scheduler.stop(drain=False)
    m.scheduler = Scheduler(m.engine, max_batch=16, max_queue=64).start()
    good = _gen_req([0, 3], SEED=[4, 5], TOP_K=[0, 20])
    bad = _gen_req([1, 2, 4], SEED=7, TOP_P=[0.9, 1.5, 0.9])
    good2 = _gen_req([5], SEED=6, CFG_SCALE=1.25)
    r1, r2, r3 = m.execute([good, bad, good2])
    assert r2.error.code() == "INVALID_ARG" and "CLASS_ID row 1" in r2.error.message() and "top_p" in r2.error.message()
    assert r1.error is None and r3.error is None
    np.testing.assert_array_equal(r1.outputs["TOKENS"], _want(ref, [0, 3], [4, 5], top_k=[0, 20]))
    np.testing.assert_array_equal(r3.outputs["TOKENS"], _want(ref, [5], [6], cfg_scale=1.25))
    _wait_for(lambda: m.scheduler.stats()["active_rows"] == 0, 5, "every row freed")
    s = m.scheduler.stats()
    assert s["outcomes"] == {"ok": 3, "cancelled": 1} and s["queue_depth"] == 0


def test_generate_client_cancel(pbm, bundles, tmp_path):
    """A larp_generate request whose client cancelled it (request.is_cancelled()) has its rows cancelled."""
    ctl = Ctl(tmp_path / "ctl")
    ctl.set(step_delay={"generate": 0.005})  # 64 steps >= 0.3 s; the first poll is after 20 ms
    m = _model(pbm, "Generate", bundles[1], ctl)
    t0 = time.monotonic()
    [resp] = m.execute([_Req(cancelled=True, CLASS_ID=np.array([[1], [2]], np.int64))])
    assert resp.error.code() == "CANCELLED" and time.monotonic() - t0 < 0.25
    _wait_for(lambda: m.scheduler.stats()["active_rows"] == 0, 5, "its rows freed")
    assert m.scheduler.stats()["outcomes"] == {"cancelled": 2}


def _stream_req(c, seed, sender, rid="", **cols):
    r = _gen_req([c], SEED=seed, **cols)
    r.inputs = {k: v.reshape(-1) for k, v in r.inputs.items()}  # the stream model is unbatched
    r.rid, r.sender = rid, sender
    return r


def test_stream_senders_in_process(pbm, bundles, ref, tmp_path):
    """The loop thread never sends: a client that takes 0.15 s per response holds one sender thread, while another
    stream finishes at the loop's pace; a client that has gone (is_cancelled) or whose send fails has its
    request cancelled; every stream ends with exactly one final response."""
    ctl = Ctl(tmp_path / "ctl")
    ctl.set(step_delay={"generatestream": 0.004})  # 64 steps ~ 0.3 s
    m = _model(pbm, "GenerateStream", bundles[1], ctl, stream_every=16)
    slow, fast, gone, broken = _Sender(delay=0.15), _Sender(), _Sender(gone_after=1), _Sender(fail=True)
    m.execute([_stream_req(2, 7, slow, "slow", CFG_SCALE=1.25), _stream_req(3, 8, fast, "fast", TOP_K=20),
               _stream_req(4, 9, gone, "gone"), _stream_req(5, 10, broken, "broken")])
    for s in (slow, fast, gone):
        assert s.finished.wait(10)
    _wait_for(lambda: m.scheduler.stats()["active_rows"] == 0, 5, "every row freed")
    assert fast.t_final < slow.t_final - 0.3  # the slow client's 4 x 0.15 s of sends never held the loop
    for s, c, seed, kw in ((slow, 2, 7, {"cfg_scale": 1.25}), (fast, 3, 8, {"top_k": 20})):
        assert [f for _, f in s.sent] == [0, 0, 0, 1]
        assert [int(r.outputs["STEP"][0]) for r, _ in s.sent] == [16, 32, 48, 64]
        np.testing.assert_array_equal(s.last.outputs["TOKENS"].reshape(1, -1), _want(ref, [c], [seed], **kw))
    assert gone.last.error.code() == "CANCELLED" and gone.sent[-1][1] == 1 and len(gone.sent) == 2
    assert broken.threads and all(f == 0 for _, f in broken.sent)  # its one send failed; the final flag tried
    threads = {t for s in (slow, fast, gone, broken) for t in s.threads}
    assert threads and all(t.startswith("larp-rt-sender-") for t in threads), threads
    assert m.scheduler.stats()["outcomes"] == {"ok": 2, "cancelled": 2}
    assert m.senders.open_streams == 0


def test_senders_never_wait_for_a_busy_one(pbm):
    """_Senders alone: while one stream's send blocks (1 s), every event of another stream goes out at once (the
    watcher's wake-ups never swallow a sender's)."""
    models, _ = pbm
    release, sent = threading.Event(), []

    def send(s, event):
        if s.rid == "slow":
            release.wait(5)
        sent.append((s.rid, event[1], time.monotonic()))
        return event[0] == "final"

    hub = models._Senders(send, workers=2, poll=0.02)
    try:
        slow, other = hub.open(_Sender(), "slow"), hub.open(_Sender(), "other")
        hub.push(slow, ("partial", 0))
        _wait_for(lambda: slow.busy, 2, "the slow send started")
        for i in range(20):
            t = time.monotonic()
            hub.push(other, ("partial", i))
            _wait_for(lambda n=i + 1: len(sent) == n, 2, f"event {i} sent")
            assert sent[-1][2] - t < 0.2
        hub.push(other, ("final", 99), final=True)
        _wait_for(lambda: hub.open_streams == 1, 2, "the other stream closed")
        release.set()
        hub.push(slow, ("final", 1), final=True)
        _wait_for(lambda: hub.open_streams == 0, 2, "the slow stream closed")
        assert [x[1] for x in sent if x[0] == "slow"] == [0, 1]
    finally:
        release.set()
        hub.stop()


def test_stream_refusals_in_process(pbm, bundles):
    """Bad input answers at once with one final error response; nothing is left queued."""
    m = _model(pbm, "GenerateStream", bundles[1])
    two, bad = _Sender(), _Sender()
    r = _Req(CLASS_ID=np.array([1, 2], np.int64), sender=two)
    m.execute([r, _stream_req(1, 0, bad, TOP_P=1.5)])
    for s in (two, bad):
        assert s.finished.wait(5) and len(s.sent) == 1 and s.sent[0][1] == 1
        assert s.last.error.code() == "INVALID_ARG"
    assert "one CLASS_ID per request" in two.last.error.message() and "top_p" in bad.last.error.message()
    assert m.scheduler.stats()["queue_depth"] == 0 and m.senders.open_streams == 0


def _marked(ref, first: int, seed: int) -> np.ndarray:
    """One valid token row whose first token is ``first`` (the hooks' marker)."""
    t = ref.generate([seed % 8], SamplingParams(seed=seed)).tokens.copy()
    t[0, 0] = first
    return t


def test_tokenizer_batch_in_process(pbm, bundles, ref, tmp_path):
    """One batch of decode requests: a bad one gets INVALID_ARG with its message, an input the Engine fails on
    (injected) INTERNAL, and the good ones the Engine's frames; the valid ones ran as one call first."""
    from larp_rt.triton.frames import to_frames

    ctl = Ctl(tmp_path / "ctl")
    ctl.set(fail_run={"model": "decode", "first": 777})
    m = _model(pbm, "Decode", bundles[1], ctl)
    good, good2, poisoned = _marked(ref, 1, 1), _marked(ref, 2, 2), _marked(ref, 777, 3)
    bad = np.full((1, 64), 5000, np.int64)
    out = m.execute([_Req(TOKENS=good), _Req(TOKENS=bad), _Req(TOKENS=poisoned), _Req(TOKENS=good2)])
    assert out[1].error.code() == "INVALID_ARG" and "tokens must be in [0, 1023]" in out[1].error.message()
    assert out[2].error.code() == "INTERNAL" and "injected failure" in out[2].error.message()
    for r, t in ((out[0], good), (out[3], good2)):
        assert r.error is None
        np.testing.assert_array_equal(r.outputs["FRAMES"], to_frames(ref.decode(t)))
    assert [e["first"] for e in ctl.log() if e["event"] == "run"] == [[1, 777, 2], [1], [777], [2]]
    ctl.set()
    both = m.execute([_Req(TOKENS=good), _Req(TOKENS=good2)])  # no failure: one joint call, split back
    np.testing.assert_array_equal(both[1].outputs["FRAMES"], to_frames(ref.decode(good2)))
    assert ctl.log()[-1]["sizes"] == [1, 1]


# -- isolation through the real server -------------------------------------------------------------------------
@pytest.fixture
def ctl(server):
    server.ctl.clear()
    yield server.ctl
    server.ctl.clear()


def _scrape(server) -> list[tuple[str, dict, float]]:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    out = []
    for name, labels, v in re.findall(r'^(\w+)\{([^}]*)\} (\S+)$', text, re.M):
        out.append((name, dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(v)))
    return out


def _metric(server, name: str, model: str, **labels) -> float:
    """A metric of ``model`` summed over the labels not given (0 when absent)."""
    return sum(v for n, lab, v in _scrape(server)
               if n == name and lab.get("model") == model and all(lab.get(k) == w for k, w in labels.items()))


def _idle(server, model: str) -> bool:
    return all(_metric(server, f"larp_scheduler_{k}", model) == 0 for k in ("queue_depth", "active_requests",
                                                                              "active_rows"))


def _events(ctl, event: str, **match) -> list[dict]:
    return [e for e in ctl.log() if e["event"] == event and all(e.get(k) == v for k, v in match.items())]


def _call(fn, *a, **kw):
    from tritonclient.utils import InferenceServerException

    try:
        return fn(*a, **kw)
    except InferenceServerException as e:
        return e


def test_server_refused_row(server, ref, ctl):
    """larp_generate: a request whose last row is refused (TOP_P 1.5) gets one 400 naming the row; its earlier rows
    are cancelled (not left running), and the request batched with it (same execute) gets the Engine's tokens."""
    from tritonclient.utils import InferenceServerException

    from larp_rt.triton_client import TritonClient

    def gen(ids, **kw):
        with TritonClient(server.http_url, timeout=WAIT) as c:
            return _call(c.generate, ids, **kw)

    cancelled = _metric(server, "larp_scheduler_requests_total", "larp_generate", outcome="cancelled")
    ctl.set(gate={"model": "larp_generate", "id": "refused", "after": 2})  # holds the instance: a batch queues
    with ThreadPoolExecutor(3) as ex:
        blocker = ex.submit(gen, [6], seed=30)
        _wait_for(lambda: _events(ctl, "paused", gate="refused"), WAIT, "the gate")
        # the same optional inputs in both: Triton batches only requests that give the same ones
        bad = ex.submit(gen, [0, 1, 2], seed=[1, 2, 3], top_k=0, top_p=[0.9, 0.9, 1.5])
        good = ex.submit(gen, [3, 4], seed=[5, 6], top_k=[0, 20], top_p=[1.0, 0.9])
        _wait_for(lambda: _metric(server, "nv_inference_pending_request_count", "larp_generate") == 2, WAIT,
                  "both requests queued in Triton")
        ctl.go("refused")
        blocker, bad, good = blocker.result(WAIT), bad.result(WAIT), good.result(WAIT)
    assert isinstance(bad, InferenceServerException)
    assert re.search(r"\[400\] CLASS_ID row 2: .*top_p must be in \(0, 1\]", str(bad)), str(bad)
    np.testing.assert_array_equal(good.tokens, _want(ref, [3, 4], [5, 6], top_k=[0, 20], top_p=[1.0, 0.9]))
    np.testing.assert_array_equal(blocker.tokens, _want(ref, [6], [30]))
    assert [e["requests"] for e in _events(ctl, "execute")] == [1, 2]  # bad and good shared one execute
    _wait_for(lambda: _metric(server, "larp_scheduler_requests_total", "larp_generate", outcome="cancelled")
              == cancelled + 2, 5, "rows 0 and 1 of the refused request cancelled")
    _wait_for(lambda: _idle(server, "larp_generate"), 5, "nothing queued or running")


def test_server_stream_disconnect(server, ref, ctl):
    """A stream client that leaves mid-stream has its request cancelled within a bounded time (the rows freed, the
    request closed); a concurrent stream still gets every token, equal to Engine.generate."""
    from larp_rt.triton_client import TritonClient

    ctl.set(step_delay={"larp_generate_stream": 0.02})  # 64 steps >= 1.3 s
    cancelled = _metric(server, "larp_scheduler_requests_total", "larp_generate_stream", outcome="cancelled")
    with TritonClient(server.grpc_url, protocol="grpc") as g1, TritonClient(server.grpc_url, protocol="grpc") as g2, \
            ThreadPoolExecutor(1) as ex:
        stays = ex.submit(lambda: list(g2.generate_stream(2, seed=7, cfg_scale=1.25, request_id="stays")))
        leaves = g1.generate_stream(3, seed=5, top_k=20, request_id="leaves")
        assert next(leaves).step == 16
        t0 = time.monotonic()
        leaves.close()  # stop_stream(cancel_requests=True): the gRPC stream is cancelled
        _wait_for(lambda: _metric(server, "larp_scheduler_requests_total", "larp_generate_stream",
                                  outcome="cancelled") == cancelled + 1, 10, "the departed client's request cancelled")
        dt = time.monotonic() - t0
        events = stays.result(WAIT)
    assert dt < 3.0, dt  # ~0.1-0.3 s: one poll of is_cancelled(), one step boundary, one metrics sample
    assert [e.step for e in events] == [16, 32, 48, 64]
    np.testing.assert_array_equal(events[-1].tokens, _want(ref, [2], [7], cfg_scale=1.25))
    kinds = [e["kind"] for e in _events(ctl, "send", rid="leaves")]
    assert kinds[-1] == "error" and "final" not in kinds and len(kinds) <= 3, kinds
    _wait_for(lambda: _idle(server, "larp_generate_stream")
              and _metric(server, "larp_stream_open", "larp_generate_stream") == 0, 5, "no row or stream left")


def test_server_slow_receiver(server, ref, ctl):
    """A receiver that takes 0.5 s per response (its sender sleeps in the hook; its reader sleeps too) does not
    stall another stream: that one completes in a fraction of the slow one's time; no response is ever sent from
    the scheduler thread."""
    from larp_rt.triton_client import TritonClient

    ctl.set(slow_send={"slow": 0.5})

    def slow():
        out = []
        with TritonClient(server.grpc_url, protocol="grpc") as g:
            for ev in g.generate_stream(1, seed=3, top_k=5, request_id="slow"):
                out.append(ev)
                time.sleep(0.1)
        return out

    with ThreadPoolExecutor(1) as ex, TritonClient(server.grpc_url, protocol="grpc") as g:
        t_slow = time.monotonic()
        fut = ex.submit(slow)
        _wait_for(lambda: _events(ctl, "send", rid="slow"), WAIT, "the slow stream sending")
        t0 = time.monotonic()
        fast = list(g.generate_stream(4, seed=11, temperature=0.7, request_id="fast"))
        t_fast = time.monotonic() - t0
        slow_events = fut.result(WAIT)
        t_slow = time.monotonic() - t_slow
    assert t_slow >= 2.0 and t_fast < 1.0 and t_fast < t_slow / 2, (t_fast, t_slow)  # 4 x 0.5 s; ~0.1 s
    np.testing.assert_array_equal(fast[-1].tokens, _want(ref, [4], [11], temperature=0.7))
    np.testing.assert_array_equal(slow_events[-1].tokens, _want(ref, [1], [3], top_k=5))
    assert [e.step for e in slow_events] == [16, 32, 48, 64]
    threads = {e["thread"] for e in _events(ctl, "send")}
    assert threads and all(t.startswith("larp-rt-sender-") for t in threads), threads


def test_server_stream_join_mid_run(server, ref, ctl):
    """A stream admitted at a known step of another (the gate holds the loop after A's 20th step until B waits),
    each with its own TOP_K / temperature: both equal Engine.generate alone."""
    from larp_rt.triton_client import TritonClient

    ctl.set(gate={"model": "larp_generate_stream", "id": "join", "after": 20, "queued": 1},
            log_steps="larp_generate_stream")
    with TritonClient(server.grpc_url, protocol="grpc") as ga, TritonClient(server.grpc_url, protocol="grpc") as gb, \
            ThreadPoolExecutor(1) as ex:
        a = ex.submit(lambda: list(ga.generate_stream(1, seed=21, top_k=3, request_id="a")))
        _wait_for(lambda: _events(ctl, "paused", gate="join"), WAIT, "A at its 20th step")
        b = list(gb.generate_stream(6, seed=22, top_k=50, temperature=0.8, request_id="b"))
        a = a.result(WAIT)
    [paused], [released] = _events(ctl, "paused", gate="join"), _events(ctl, "released", gate="join")
    assert paused["stats"]["active_requests"] == 1 and released["ok"] and released["stats"]["queue_depth"] == 1
    steps = [(e["rows"], e["requests"]) for e in _events(ctl, "step")]
    r = 1 + (ref.default_params.cfg_scale != 1.0)  # each one's rows (the bundle's default cfg_scale: guided or not)
    assert steps == [(r, 1)] * 20 + [(2 * r, 2)] * 44 + [(r, 1)] * 20  # B joined at the loop's step 20
    np.testing.assert_array_equal(a[-1].tokens, _want(ref, [1], [21], top_k=3))
    np.testing.assert_array_equal(b[-1].tokens, _want(ref, [6], [22], top_k=50, temperature=0.8))


def test_server_decode_batch(server, ref, ctl):
    """One Triton batch of larp_decode requests (held until all four queue): the bad one gets 400 with its message,
    the one the Engine fails on (injected) 500, the good ones the Engine's frames."""
    from tritonclient.utils import InferenceServerException

    from larp_rt.triton.frames import to_frames
    from larp_rt.triton_client import TritonClient

    ctl.set(hold_run={"model": "larp_decode", "id": "dec", "first": 999},
            fail_run={"model": "larp_decode", "first": 777})

    def dec(t):
        with TritonClient(server.http_url, timeout=WAIT) as c:
            return _call(c.decode, t)

    good, good2, poisoned, holder = (_marked(ref, 1, 1), _marked(ref, 2, 2), _marked(ref, 777, 3),
                                     _marked(ref, 999, 4))
    bad = np.full((1, 64), 5000, np.int64)
    with ThreadPoolExecutor(5) as ex:
        hold = ex.submit(dec, holder)
        _wait_for(lambda: _events(ctl, "run", model="larp_decode"), WAIT, "the holding request running")
        futs = [ex.submit(dec, t) for t in (good, bad, poisoned, good2)]
        _wait_for(lambda: _metric(server, "nv_inference_pending_request_count", "larp_decode") == 4, WAIT,
                  "four requests queued in Triton")
        ctl.go("dec")
        out = [f.result(WAIT) for f in futs]
        hold.result(WAIT)
    assert isinstance(out[1], InferenceServerException) and "[400] tokens must be in [0, 1023]" in str(out[1])
    assert isinstance(out[2], InferenceServerException) and re.search(r"\[500\].*injected failure", str(out[2]))
    np.testing.assert_array_equal(out[0], to_frames(ref.decode(good)))
    np.testing.assert_array_equal(out[3], to_frames(ref.decode(good2)))
    runs = [sorted(e["first"]) for e in _events(ctl, "run", model="larp_decode")]
    assert runs[:2] == [[999], [1, 2, 777]] and sorted(runs[2:]) == [[1], [2], [777]], runs  # joint, then alone
