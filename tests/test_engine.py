import json
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from _authors import NO_TORCH, write_authors_folders
from larp_rt.export import ExportError, export_bundle, onnx_export, trace

from larp_rt import (
    Bundle,
    BundleError,
    Engine,
    GeneratorConfig,
    SamplingParams,
    TokenizerConfig,
    kernels,
    save_pretrained,
)
from larp_rt.models import LARPGenerator, LARPTokenizer

HAVE_ORT_OP = kernels.ort_custom_op_library() is not None


def tiny_models(seed=0, **gen_overrides):
    torch.manual_seed(seed)
    tok = LARPTokenizer(TokenizerConfig.from_name("tiny"))
    torch.nn.init.normal_(tok.final_layer.linear.weight, std=0.05)
    torch.nn.init.constant_(tok.final_layer.linear.bias, 0.5)
    gen = LARPGenerator(GeneratorConfig.from_name("tiny", **gen_overrides))
    torch.nn.init.normal_(gen.output.weight, std=0.3)  # peaked enough that greedy has no near-ties
    return tok.eval(), gen.eval()


@pytest.fixture(scope="module")
def models_and_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("eng")
    tok, gen = tiny_models()
    save_pretrained(tok, root / "tok")
    save_pretrained(gen, root / "gen")
    bundle = export_bundle(root / "tok", root / "gen", root / "bundle", printer=lambda s: None,
                           fused_sampler=HAVE_ORT_OP)
    return tok, gen, bundle


@pytest.fixture(scope="module")
def ort_engine(models_and_bundle):
    return Engine(models_and_bundle[2], backend="onnxruntime")


@pytest.fixture(scope="module")
def torch_engine(models_and_bundle):
    return Engine(models_and_bundle[2], backend="torch")


def greedy_reference(gen: LARPGenerator, classes, cfg_scale: float) -> np.ndarray:
    """The PyTorch model's greedy tokens: prefill + one step at a time, CFG rows, float32 mix, argmax."""
    cfg = gen.config
    B = len(classes)
    use_cfg = cfg_scale != 1.0
    cond = torch.tensor(classes + ([cfg.null_class] * B if use_cfg else []))
    out = []
    with torch.no_grad():
        gen.setup_caches(len(cond))
        logits = gen.prefill(cond)
        rows = torch.empty(0, dtype=torch.int64)
        for k in range(cfg.max_seq_len):
            if k:
                logits = gen.decode_one_token(rows.view(-1, 1), torch.tensor([k]))
            c = logits[:B]
            mixed = logits[B:] + (c - logits[B:]) * torch.tensor(cfg_scale, dtype=torch.float32) if use_cfg else c
            tok = mixed.argmax(-1)
            out.append(tok)
            rows = torch.cat([tok, tok]) if use_cfg else tok
        gen.clear_caches()
    return torch.stack(out, 1).numpy()


# ------------------------------------------------------------------------------------------------
# export -> ONNX Runtime parity
# ------------------------------------------------------------------------------------------------
def test_every_graph_matches_pytorch(models_and_bundle):
    tok, gen, bundle = models_and_bundle
    b = Bundle(bundle)
    assert set(b.graphs) == {"encoder", "decoder", "decode", "sample"} | ({"decode_sample"} if HAVE_ORT_OP else set())
    so = ort.SessionOptions()
    run = lambda name, feeds: ort.InferenceSession(str(b.graph_path(name)), so).run(None, feeds)  # noqa: E731
    video = torch.rand(3, *tok.config.video_shape, generator=torch.Generator().manual_seed(5))
    idx, z = run("encoder", {"video": video.numpy()})
    assert np.array_equal(idx, tok.encode(video).numpy())
    assert np.abs(z - tok.quantize(tok.encode_latents(video)).z.detach().numpy()).max() < 1e-5
    tokens = torch.randint(0, 1024, (3, 64))
    (vid,) = run("decoder", {"indices": tokens.numpy()})
    assert np.abs(vid - tok.decode(tokens).numpy()).max() < 1e-5
    # decode step: a whole cached generation step by step against the model (teacher-forced tokens)
    seq = torch.randint(0, 1024, (2, 10))
    with torch.no_grad():
        full = gen(torch.tensor([1, 8]), seq)  # (2, 11, V)
    S = b.kv_cache_spec.max_seq
    caches = [np.zeros((2, 4, S, 32), np.float32) for _ in range(4)]
    feeds_tok = np.array([[1024 + 1], [1024 + 8]])  # prefill: class tokens at position 0
    for pos in range(11):
        feeds = {"token": feeds_tok, "pos": np.array([pos])}
        feeds.update({f"past_{kv}_{i}": caches[2 * i + (kv == "v")] for i in range(2) for kv in "kv"})
        logits, *present = run("decode", feeds)
        assert np.abs(logits - full[:, pos].numpy()).max() < 1e-4
        for j, p in enumerate(present):
            caches[j][:, :, pos] = p[:, :, 0]
        if pos < 10:
            feeds_tok = seq[:, pos : pos + 1].numpy()


def test_manifest_is_self_describing(models_and_bundle):
    b = Bundle(models_and_bundle[2])
    m = b.manifest
    assert m["precision"] == "fp32" and m["created_by"]["opset"] == 17
    assert m["default_sampling"] == {"cfg_scale": 1.25, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    fused = {"fused", "fused@mix"} if HAVE_ORT_OP else set()
    assert {v["graph"] for v in m["verification"]} == {"encoder", "decoder", "decode", "prefill", "join",
                                                        "sample"} | fused
    assert m["format_version"] == 2
    assert b.graph("decode").inputs[1].to_dict() == {"name": "pos", "dtype": "int64", "shape": ["B"]}
    assert m["sampler"]["graph"] == "sample" and ("decode_sample" in b.graphs) == HAVE_ORT_OP
    assert b.checkpoint_dir("generator").is_dir() and b.tokenizer_config == TokenizerConfig.from_name("tiny")
    assert b.graph("decode").input_names[:2] == ["token", "pos"]
    assert all(len(d) == 64 for d in b.files.values())


# ------------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg_scale", [1.0, 1.25])
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_greedy_tokens_equal_the_pytorch_model(models_and_bundle, ort_engine, torch_engine, backend, cfg_scale):
    _, gen, _ = models_and_bundle
    eng = ort_engine if backend == "onnxruntime" else torch_engine
    classes = [0, 5, 7]
    out = eng.generate(classes, SamplingParams(temperature=0.0, cfg_scale=cfg_scale, seed=0))
    assert out.tokens.shape == (3, 64) and out.tokens.dtype == np.int64
    assert np.array_equal(out.tokens, greedy_reference(gen, classes, cfg_scale))


def test_backends_draw_the_same_samples(ort_engine, torch_engine):
    params = [SamplingParams(seed=11, cfg_scale=1.25), SamplingParams(seed=12, top_k=20, top_p=0.9, temperature=0.8)]
    a = ort_engine.generate([2, 3], params)
    b = torch_engine.generate([2, 3], params)
    assert np.array_equal(a.tokens, b.tokens)


def test_seeded_sampling_is_reproducible_and_batch_independent(ort_engine):
    p = SamplingParams(seed=5, cfg_scale=1.25, top_k=50)
    alone = ort_engine.generate([3], p).tokens
    assert np.array_equal(alone, ort_engine.generate([3], p).tokens)
    mixed = ort_engine.generate([1, 3, 6], [SamplingParams(seed=9), p, SamplingParams(seed=2, cfg_scale=3.0)]).tokens
    assert np.array_equal(mixed[1], alone[0])
    # one SamplingParams for a batch: row i draws from (seed, i): identical classes give distinct samples...
    same = ort_engine.generate([4, 4, 4], SamplingParams(seed=7)).tokens
    assert len({tuple(r) for r in same}) == 3
    # ... and row 2's stream is (7, 2) whatever the other rows hold
    other = ort_engine.generate([0, 1, 4], SamplingParams(seed=7)).tokens
    assert np.array_equal(other[2], same[2])


def test_fresh_seed_is_reported_and_reproduces(ort_engine):
    out = ort_engine.generate([1, 2], SamplingParams(seed=None))
    assert out.seeds[0] == out.seeds[1]
    again = ort_engine.generate([1, 2], SamplingParams(seed=out.seeds[0]))
    assert np.array_equal(out.tokens, again.tokens)


def test_progress_callback_and_iterator(ort_engine):
    seen = []
    ort_engine.generate([1], SamplingParams(seed=0), progress=lambda k, n: seen.append((k, n)))
    assert seen == [(k, 64) for k in range(1, 65)]
    it = ort_engine.generate_iter([1], SamplingParams(seed=0))
    events = list(it)
    assert [e.step for e in events] == list(range(64)) and events[0].tokens.shape == (1,)


def test_encode_decode_and_generate_video(ort_engine, torch_engine, models_and_bundle):
    tok = models_and_bundle[0]
    rng = np.random.default_rng(0)
    video = rng.random((2, 3, 8, 32, 32), dtype=np.float32)
    tokens = ort_engine.encode(video)
    assert np.array_equal(tokens, torch_engine.encode(video))
    assert np.array_equal(tokens, tok.encode(torch.from_numpy(video)).numpy())
    out = ort_engine.decode(tokens)
    assert out.shape == video.shape and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    # uint8 frames (B, T, H, W, C) are accepted too
    frames = (video.transpose(0, 2, 3, 4, 1) * 255).round().astype(np.uint8)
    assert ort_engine.encode(frames).shape == (2, 64)
    vids, gen = ort_engine.generate_video([1, 2], SamplingParams(seed=3))
    assert vids.shape == (2, 3, 8, 32, 32) and gen.tokens.shape == (2, 64)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "video, message",
    [
        (np.zeros((1, 3, 8, 32), np.float32), r"float video must have shape \(B, 3, 8, 32, 32\)"),
        (np.zeros((3, 8, 32, 32), np.float32), r"video\[None\]"),
        (np.zeros((1, 8, 32, 32, 3), np.int32), r"video must be float in \[0, 1\].*or uint8"),
        (np.full((1, 3, 8, 32, 32), 2.0, np.float32), r"video values must be finite and in \[0, 1\]"),
        (np.full((1, 3, 8, 32, 32), np.nan, np.float32), r"finite"),
        (np.zeros((1, 8, 32, 32, 4), np.uint8), r"uint8 video must have shape \(B, 8, 32, 32, 3\)"),
    ],
)
def test_bad_video(ort_engine, video, message):
    with pytest.raises(ValueError, match=message):
        ort_engine.encode(video)


def test_bad_tokens_classes_and_params(ort_engine):
    with pytest.raises(ValueError, match=r"tokens must be in \[0, 1023\]"):
        ort_engine.decode(np.full((1, 64), 1024))
    with pytest.raises(ValueError, match=r"tokens must have shape \(B, 64\)"):
        ort_engine.decode(np.zeros((1, 63), np.int64))
    with pytest.raises(ValueError, match="tokens must be integers"):
        ort_engine.decode(np.zeros((1, 64), np.float32))
    with pytest.raises(ValueError, match=r"class_ids must be in \[0, 7\].*\[8, -1\]"):
        ort_engine.generate([1, 8, -1], SamplingParams(seed=0))
    with pytest.raises(ValueError, match="non-empty"):
        ort_engine.generate([], SamplingParams(seed=0))
    for kw, msg in (({"top_k": -1}, "top_k"), ({"top_k": 1025}, "vocabulary size 1024"), ({"top_p": 0}, "top_p"),
                    ({"top_p": 1.01}, "top_p"), ({"temperature": -1}, "temperature"),
                    ({"cfg_scale": -0.5}, "cfg_scale")):
        with pytest.raises(ValueError, match=msg):
            ort_engine.generate([1], SamplingParams(**kw))


def test_cfg_needs_a_null_class(tmp_path):
    _, gen = tiny_models(class_dropout_prob=0.0)
    save_pretrained(gen, tmp_path / "g")
    bundle = export_bundle(None, tmp_path / "g", tmp_path / "b", printer=lambda s: None)
    eng = Engine(bundle)
    assert eng.default_params.cfg_scale == 1.0
    assert eng.generate([1], SamplingParams(seed=0)).tokens.shape == (1, 64)
    with pytest.raises(ValueError, match="needs a generator trained with class dropout"):
        eng.generate([1], SamplingParams(cfg_scale=1.5))
    with pytest.raises(ValueError, match="has no tokenizer"):
        eng.encode(np.zeros((1, 3, 8, 32, 32), np.float32))


def test_bundle_integrity_errors(models_and_bundle, tmp_path):
    import shutil

    src = models_and_bundle[2]
    b = tmp_path / "b"
    shutil.copytree(src, b)
    with open(b / "decoder.onnx", "r+b") as f:  # flip one byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(BundleError, match=r"decoder.onnx' was altered \(sha256 mismatch"):
        Engine(b)
    os.remove(b / "decoder.onnx")
    with pytest.raises(BundleError, match=r"decoder.onnx' is missing; re-export"):
        Engine(b)
    m = json.loads((src / "manifest.json").read_text())
    shutil.rmtree(b)
    shutil.copytree(src, b)
    (b / "manifest.json").write_text(json.dumps({**m, "format_version": 7}))
    with pytest.raises(BundleError, match="format_version 7.*upgrade larp_rt or re-export"):
        Engine(b)
    (b / "manifest.json").write_text("{")
    with pytest.raises(BundleError, match="not valid JSON"):
        Engine(b)
    with pytest.raises(BundleError, match="does not exist"):
        Engine(tmp_path / "nothing")
    with pytest.raises(ValueError, match="backend must be one of"):
        Engine(src, backend="tensorflow")


def test_failed_export_writes_nothing(models_and_bundle, tmp_path, monkeypatch):
    root = models_and_bundle[2].parent
    monkeypatch.setitem(onnx_export.TOLERANCES, "fp32", {k: 0.0 for k in onnx_export.TOLERANCES["fp32"]})
    with pytest.raises(ExportError, match="verification failed.*nothing was written"):
        export_bundle(root / "tok", root / "gen", tmp_path / "b", printer=lambda s: None)
    assert os.listdir(tmp_path) == []
    with pytest.raises(BundleError, match="already exists"):
        export_bundle(root / "tok", None, models_and_bundle[2], printer=lambda s: None)


def test_fp16_bundle_runs(models_and_bundle, tmp_path):
    root = models_and_bundle[2].parent
    bundle = export_bundle(root / "tok", root / "gen", tmp_path / "b16", precision="fp16", onnx_only=True,
                           printer=lambda s: None)
    eng = Engine(bundle)
    assert Bundle(bundle).checkpoint_dir("generator") is None
    out = eng.generate([1, 2], SamplingParams(seed=0, temperature=0.0))
    ref = Engine(models_and_bundle[2]).generate([1, 2], SamplingParams(seed=0, temperature=0.0))
    assert (out.tokens == ref.tokens).mean() > 0.5  # fp16 drifts from fp32 but stays close at first
    with pytest.raises(BundleError, match="carries no PyTorch tokenizer checkpoint"):
        Engine(bundle, backend="torch")


def test_authors_hub_folders_export_unchanged(tmp_path):
    write_authors_folders(tmp_path)
    bundle = export_bundle(tmp_path / "tok", tmp_path / "gen", tmp_path / "b", printer=lambda s: None)
    eng = Engine(bundle)
    assert eng.generate([4], SamplingParams(seed=1)).tokens.shape == (1, 16)
    assert eng.encode(np.random.default_rng(0).random((1, 3, 4, 16, 16), dtype=np.float32)).shape == (1, 16)


def test_onnxruntime_engine_works_without_torch(models_and_bundle):
    code = NO_TORCH + (
        "import numpy as np\n"
        "from larp_rt import Engine, SamplingParams\n"
        f"eng = Engine({str(models_and_bundle[2])!r})\n"
        "assert eng.backend_name == 'onnxruntime'\n"
        "out = eng.generate([1, 2], SamplingParams(seed=0, cfg_scale=1.25))\n"
        "video = eng.decode(out.tokens)\n"
        "assert eng.encode(video).shape == (2, 64)\n"
        "assert 'torch' not in sys.modules\n"
        "try:\n"
        f"    Engine({str(models_and_bundle[2])!r}, backend='torch')\n"
        "except ImportError as e:\n"
        "    print('torch backend:', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "the torch backend needs PyTorch" in r.stdout


def test_external_data_and_nan_logits(tmp_path, monkeypatch):
    _, gen = tiny_models()
    with torch.no_grad():
        gen.output.weight[3, :] = float("nan")
    save_pretrained(gen, tmp_path / "g")
    monkeypatch.setattr(trace, "EXTERNAL_DATA_BYTES", 0)  # force the external-data layout
    with pytest.raises(ExportError, match="verification failed"):  # NaN never verifies
        export_bundle(None, tmp_path / "g", tmp_path / "b", printer=lambda s: None)
    bundle = export_bundle(None, tmp_path / "g", tmp_path / "b", verify=False, printer=lambda s: None,
                           fused_sampler=HAVE_ORT_OP)
    b = Bundle(bundle)
    assert "decode.onnx.data" in b.files and (bundle / "decode.onnx.data").stat().st_size > 1e5
    if HAVE_ORT_OP:  # the fused graph holds its weights packed in panels (PackedMatMul): a weights file of its own
        assert b.manifest["sampler"]["fused_matmul"] == "larp_rt::PackedMatMul"
        assert b.manifest["graphs"]["decode_sample"]["data"] == ["decode_sample.onnx.data"]
        assert (bundle / "decode_sample.onnx").stat().st_size < 1e5 and len(list(bundle.glob("*.data"))) == 2
        assert "decode_sample.onnx.data" in b.files
    for sampler in ("fused", "kernel", "graph", "reference") if HAVE_ORT_OP else ("graph", "reference"):
        with pytest.raises(ValueError, match="NaN/Inf"):
            Engine(bundle, sampler=sampler).generate([1], SamplingParams(seed=0))
    with pytest.raises(ValueError, match="NaN/Inf"):
        Engine(bundle, backend="torch").generate([1], SamplingParams(seed=0))


def test_cuda_device_without_a_gpu_provider_says_how_to_fix(models_and_bundle):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(RuntimeError, match=r"device='cuda' needs onnxruntime-gpu.*larp_rt\[gpu\]"):
        Engine(models_and_bundle[2], backend="onnxruntime", device="cuda")
    with pytest.raises(ValueError, match="device must be"):
        Engine(models_and_bundle[2], device="tpu")


def test_fused_kernel_and_reference_sampler_give_the_same_tokens(models_and_bundle):
    from larp_rt import kernels

    if not kernels.available()["cpu"]:
        pytest.skip(f"the CPU sampling kernel is not built: {kernels.available()['errors']}")
    params = [SamplingParams(seed=1), SamplingParams(seed=2, top_k=10, cfg_scale=2.0),
              SamplingParams(seed=3, top_p=0.8, temperature=0.7), SamplingParams(seed=4, temperature=0.0)]
    fast = Engine(models_and_bundle[2], sampler="kernel")
    assert fast.backend.sampler is kernels.sample_numpy and fast.sampler_name == "kernel"
    a = fast.generate([1, 2, 3, 4], params).tokens
    with kernels.force_fallback():
        b = Engine(models_and_bundle[2]).generate([1, 2, 3, 4], params).tokens
        c = Engine(models_and_bundle[2], backend="torch").generate([1, 2, 3, 4], params).tokens
    d = Engine(models_and_bundle[2], backend="torch").generate([1, 2, 3, 4], params).tokens  # torch op
    assert np.array_equal(a, b) and np.array_equal(a, c) and np.array_equal(a, d)


@pytest.mark.parametrize("sampler", ["fused", "kernel", "graph", "reference", "torch-kernel", "torch-reference"])
def test_every_sampler_draws_the_same_tokens(models_and_bundle, sampler):
    """The fused graph, the C++ kernel, the standard-ops graph and the numpy reference: the same draws, including
    a batch where only some requests use guidance (the fused graph then runs 2B rows) and greedy rows."""
    if sampler in ("fused", "kernel", "torch-kernel") and not HAVE_ORT_OP:
        pytest.skip(f"the kernels are not built: {kernels.available()['errors']}")
    backend = "torch" if sampler.startswith("torch-") else "onnxruntime"
    sampler = sampler.removeprefix("torch-")
    params = [SamplingParams(seed=1), SamplingParams(seed=2, top_k=10, cfg_scale=2.0),
              SamplingParams(seed=3, top_p=0.8, temperature=0.7), SamplingParams(seed=4, temperature=0.0),
              SamplingParams(seed=5, top_k=3, top_p=0.5, cfg_scale=1.5, temperature=1.3)]
    eng = Engine(models_and_bundle[2], backend=backend, sampler=sampler)
    assert eng.sampler_name == sampler
    got = eng.generate([1, 2, 3, 4, 0], params).tokens
    with kernels.force_fallback():
        want = Engine(models_and_bundle[2], sampler="reference").generate([1, 2, 3, 4, 0], params).tokens
    assert np.array_equal(got, want)
    one = SamplingParams(seed=8, cfg_scale=1.25, top_k=40)  # one SamplingParams: streams (8, i)
    with kernels.force_fallback():
        want = Engine(models_and_bundle[2], sampler="reference").generate([6, 6], one).tokens
    assert np.array_equal(eng.generate([6, 6], one).tokens, want)


def test_default_export_carries_the_fused_step_and_the_engine_picks_it(tmp_path, caplog):
    """The default export writes decode_sample.onnx (DecodeAttention over the float32 cache + Sample) beside the
    portable standard-ops decode.onnx whenever the kernels are built; Engine(auto) picks it and says so."""
    _, gen = tiny_models()
    save_pretrained(gen, tmp_path / "g")
    notes: list[str] = []
    bundle = export_bundle(None, tmp_path / "g", tmp_path / "b", verify=False, printer=notes.append)
    b = Bundle(bundle)
    if not HAVE_ORT_OP:
        assert "decode_sample" not in b.graphs
        assert any("decode_sample.onnx" in n and "left out" in n for n in notes)
        return
    assert {"decode", "decode_sample"} <= set(b.graphs)
    assert b.manifest["sampler"]["fused"] == "decode_sample"
    assert b.manifest["sampler"]["fused_attention"] == "larp_rt::DecodeAttention"
    assert b.kv_cache_spec.attention == "standard"  # decode.onnx stays the portable graph
    import onnx

    ops = {n.op_type for n in onnx.load(str(bundle / "decode.onnx"), load_external_data=False).graph.node}
    assert "DecodeAttention" not in ops and "Softmax" in ops
    ops = {n.op_type for n in onnx.load(str(bundle / "decode_sample.onnx"), load_external_data=False).graph.node}
    assert {"DecodeAttention", "Sample"} <= ops
    with caplog.at_level("INFO", logger="larp_rt"):
        eng = Engine(bundle)
    assert eng.sampler_name == "fused" and "decode_sample.onnx" in eng.sampler_reason
    assert any("sampler fused" in r.getMessage() for r in caplog.records)
    with kernels.force_fallback(), caplog.at_level("WARNING", logger="larp_rt"):
        caplog.clear()
        assert Engine(bundle).sampler_name == "reference"
    assert any("not used" in r.getMessage() and "disabled" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "c").exists()
    export_bundle(None, tmp_path / "g", tmp_path / "c", verify=False, printer=lambda s: None, fused_sampler=False)
    assert "decode_sample" not in Bundle(tmp_path / "c").graphs


def test_engine_prefaults_the_first_requests_caches(models_and_bundle):
    """The caches of one guided request are allocated and their pages written at start-up (np.zeros would map
    the zero page lazily and the first request would pay every page fault); preallocate=0 defers them."""
    from larp_rt.backends import onnxruntime as ort_backend

    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    n = 64 << 20
    before = resident()
    lazy = np.zeros(n, np.uint8)
    assert resident() - before < n // 4  # np.zeros: nothing mapped yet
    before = resident()
    touched = ort_backend.prefaulted(n, np.uint8)
    assert resident() - before > n * 3 // 4 and not touched.any()
    del lazy, touched
    calls = []
    real = ort_backend.prefaulted
    ort_backend.prefaulted = lambda size, dt: calls.append(size) or real(size, dt)
    try:
        eng = Engine(models_and_bundle[2])
    finally:
        ort_backend.prefaulted = real
    runner = eng.backend._runner
    assert runner is not None and runner.capacity == 2
    cfg = eng.generator_config
    assert len(calls) == 2 * cfg.n_layer and set(calls) == {2 * cfg.n_head * runner.S * cfg.head_dim}
    assert Engine(models_and_bundle[2], preallocate=0).backend._runner is None
    assert Engine(models_and_bundle[2], preallocate=5).backend._runner.capacity == 8
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="preallocate must be a non-negative int"):
            Engine(models_and_bundle[2], preallocate=bad)


def test_auto_sampler_and_bad_sampler_choices(models_and_bundle, tmp_path):
    eng = Engine(models_and_bundle[2])
    assert eng.sampler_name == ("fused" if HAVE_ORT_OP else "reference")
    with pytest.raises(ValueError, match="sampler must be one of"):
        Engine(models_and_bundle[2], sampler="magic")
    with pytest.raises(ValueError, match="runs on the onnxruntime backend"):
        Engine(models_and_bundle[2], backend="torch", sampler="graph")
    _, gen = tiny_models()
    save_pretrained(gen, tmp_path / "g")
    plain = export_bundle(None, tmp_path / "g", tmp_path / "b", verify=False, printer=lambda s: None,
                          fused_sampler=False)
    with pytest.raises(ValueError, match="no decode_sample graph.*--fused-sampler"):
        Engine(plain, sampler="fused")
    if HAVE_ORT_OP:
        assert "no decode_sample.onnx" in Engine(plain).sampler_reason
    with kernels.force_fallback():
        fallback = Engine(models_and_bundle[2])
        assert fallback.sampler_name == "reference"
        assert "disabled" in fallback.sampler_reason and "numpy reference" in fallback.sampler_reason
        with pytest.raises(ValueError, match="sampler='fused' is not available"):
            Engine(models_and_bundle[2], sampler="fused")
