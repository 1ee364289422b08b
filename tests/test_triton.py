"""`larp-rt triton`: the repository it writes, served by the real tritonserver (nvidia-pytriton wheel) on loopback.

The server tests skip with a reason when tritonserver or tritonclient is missing; the repository-writing tests
always run. One server for the module, stopped in a finally (SIGINT, then SIGKILL) whatever the tests do.
"""

import dataclasses
import os
import re
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
    srv = LocalServer(repo)
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

    return TritonClient(server.http_url, timeout=WAIT)


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
            assert isinstance(g, InferenceServerException) and "class_ids must be in [0, 7]" in str(g)
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
