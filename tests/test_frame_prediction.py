"""Frame prediction (the authors' LARP-L-long-AR-FP): the multi-token prefill graph, Engine.predict on both
backends, the authors' FP key layout, bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _authors import generator_config_json, generator_keys
from larp_rt.export.onnx_export import export_bundle
from larp_rt.export.prefill_graph import PREFILL_GRAPH, PrefillGraph, reference_prefill
from larp_rt.training.train_fp import fp_prefix, pad_cond, predict_tokens

from larp_rt import Engine, SamplingParams
from larp_rt.checkpoint import load_pretrained, save_pretrained
from larp_rt.config import GeneratorConfig, TokenizerConfig
from larp_rt.models import LARPGenerator, LARPTokenizer

N_TOK = 64  # the tiny tokenizer's tokens: prefix = 64 + the separator


def fp_models(seed=0, **overrides):
    torch.manual_seed(seed)
    tok = LARPTokenizer(TokenizerConfig.from_name("tiny"))
    torch.nn.init.normal_(tok.final_layer.linear.weight, std=0.05)
    torch.nn.init.constant_(tok.final_layer.linear.bias, 0.5)
    cfg = GeneratorConfig.from_name("tiny", frame_prediction=True, cls_token_num=N_TOK + 1, class_dropout_prob=0.0,
                                    **overrides)
    gen = LARPGenerator(cfg)
    torch.nn.init.normal_(gen.output.weight, std=0.3)  # peaked enough that greedy has no near-ties
    return tok.eval(), gen.eval()


@pytest.fixture(scope="module")
def fp_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp")
    tok, gen = fp_models()
    save_pretrained(tok, root / "tok")
    save_pretrained(gen, root / "gen")
    lines: list[str] = []
    bundle = export_bundle(root / "tok", root / "gen", root / "bundle", printer=lines.append)
    return tok, gen, bundle, root, lines


@pytest.fixture(scope="module")
def engines(fp_bundle):
    return {"onnxruntime": Engine(fp_bundle[2], backend="onnxruntime"), "torch": Engine(fp_bundle[2], backend="torch")}


def full_forward_greedy(gen: LARPGenerator, prefix: torch.Tensor) -> np.ndarray:
    """Greedy tokens (B, N) of a float64 copy of ``gen`` by its full causal forward over the prefix and the tokens
    so far, no KV cache, argmax in float64: independent of the cached prefill / step code every backend runs."""
    g = copy.deepcopy(gen).double().eval()
    tokens = prefix.new_zeros((len(prefix), 0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 64 tiny forwards: on 2 busy cores the thread pool only adds waits
    try:
        with torch.no_grad():
            for _ in range(g.config.max_seq_len):
                logits = g(prefix, tokens)[:, -1]  # (B, V) float64: the logits of the next token
                tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    finally:
        torch.set_num_threads(threads)
    return tokens.numpy()


def clip(B=2, t=8, seed=0):
    return np.random.default_rng(seed).random((B, 3, t, 32, 32), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# the prefill graph
# --------------------------------------------------------------------------------------------
def test_prefill_graph_equals_one_full_causal_forward_float64():
    _, gen = fp_models()
    gen = gen.double()
    g = torch.Generator().manual_seed(1)
    B, P = 3, gen.config.cls_token_num
    prefix = torch.randint(0, gen.config.vocab_size, (B, P), generator=g)
    prefix[:, -1] = gen.config.vocab_size  # the separator
    tokens = torch.randint(0, gen.config.vocab_size, (B, 5), generator=g)
    graph = PrefillGraph(gen).eval()
    with torch.no_grad():
        logits, *kv = graph(prefix, torch.arange(P).expand(B, P))
        full = gen(prefix, tokens)  # (B, 6, V): row 0 = the logits of video token 0, after the whole prefix
        ref_logits, ref_kv = reference_prefill(gen, prefix)
        # the cache entries of one full causal forward: k/v of every layer's normalised input, by forward hooks
        seen = []
        hooks = [layer.attention.wqkv.register_forward_hook(lambda m, i, o: seen.append(o))
                 for layer in gen.layers]
        gen(prefix, tokens[:, :0])
        for h in hooks:
            h.remove()
    assert logits.dtype == torch.float64
    assert (logits.double() - full[:, 0]).abs().max() <= 1e-10
    assert (logits.double() - ref_logits).abs().max() <= 1e-10
    H, hd, D = gen.config.n_head, gen.config.head_dim, gen.config.dim
    for i, qkv in enumerate(seen):
        k = qkv[..., D:2 * D].reshape(B, P, H, hd).transpose(1, 2)
        v = qkv[..., 2 * D:].reshape(B, P, H, hd).transpose(1, 2)
        assert (kv[2 * i] - k).abs().max() <= 1e-10 and (kv[2 * i + 1] - v).abs().max() <= 1e-10
        assert (kv[2 * i] - ref_kv[2 * i]).abs().max() <= 1e-10
    # causal by position: a shorter prefix gives the same cache entries for its tokens
    with torch.no_grad():
        _, *kv_short = graph(prefix[:, :10], torch.arange(10).expand(B, 10))
    assert max(float((a - b[:, :, :10]).abs().max()) for a, b in zip(kv_short, kv, strict=True)) <= 1e-10


def test_export_writes_and_verifies_the_prefill_graph(fp_bundle):
    import onnx
    import onnxruntime as ort

    _, gen, bundle, _, lines = fp_bundle
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["format_version"] == 2
    assert m["generator"]["prefill"] == {"graph": PREFILL_GRAPH, "prefix_tokens": N_TOK + 1, "separator": 1024}
    g = m["graphs"][PREFILL_GRAPH]
    assert [i["name"] for i in g["inputs"]] == ["tokens", "pos"] and g["inputs"][0]["shape"] == ["B", "P"]
    assert g["outputs"][1]["shape"] == ["B", gen.config.n_head, "P", gen.config.head_dim]
    assert (bundle / "codebook.npy").is_file()
    checked = {(v["graph"], v["output"]) for v in m["verification"]}
    assert {("prefill", "logits"), ("prefill", "present"), ("prefill@P", "logits")} <= checked
    assert any(line.startswith("  prefill") for line in lines)
    model = onnx.load(str(bundle / f"{PREFILL_GRAPH}.onnx"), load_external_data=False)
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["B", "P"]
    # ONNX Runtime at another batch and prefix length than the export's, against PyTorch
    sess = ort.InferenceSession(str(bundle / f"{PREFILL_GRAPH}.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randint(0, 1024, (3, 20), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(20).expand(3, 20)
    out = sess.run(None, {"tokens": x.numpy(), "pos": pos.numpy()})
    with torch.no_grad():
        ref = PrefillGraph(gen)(x, pos)
    assert np.abs(out[0] - ref[0].numpy()).max() < 1e-4
    assert max(np.abs(o - r.numpy()).max() for o, r in zip(out[1:], ref[1:], strict=True)) < 1e-4


def test_fp16_export_verifies(fp_bundle, tmp_path):
    root = fp_bundle[3]
    b = export_bundle(root / "tok", root / "gen", tmp_path / "b16", precision="fp16", printer=lambda s: None)
    m = json.loads((b / "manifest.json").read_text())
    assert m["graphs"][PREFILL_GRAPH]["outputs"][1]["dtype"] == "float16"
    assert all(v["max_abs"] <= v["tol"] for v in m["verification"] if v["graph"].startswith("prefill"))
    video, gen = Engine(b).predict(clip(1), SamplingParams(temperature=0.0, seed=0))
    assert video.shape == (1, 3, 8, 32, 32) and gen.tokens.shape == (1, N_TOK)


# --------------------------------------------------------------------------------------------
# Engine.predict
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_predict_greedy_equals_the_pytorch_model(fp_bundle, engines, backend):
    tok, gen, *_ = fp_bundle
    eng = engines[backend]
    frames = clip(2, t=7)
    with torch.no_grad():
        prefix = fp_prefix(tok, torch.from_numpy(frames[:, :, :5]), 5)  # the recipe: pad the first 5, encode, sep
        want = full_forward_greedy(gen, prefix)
        assert np.array_equal(predict_tokens(gen, prefix).numpy(), want)  # the model's cached sampling agrees
        want_video = tok.decode(torch.from_numpy(want)).clamp(0, 1).numpy()
    assert np.array_equal(eng.cond_tokens(frames), prefix.numpy())
    video, out = eng.predict(frames, SamplingParams(temperature=0.0, seed=0))
    assert np.array_equal(out.tokens, want)
    assert video.shape == (2, 3, 8, 32, 32) and np.abs(video - want_video).max() < 1e-4
    # uint8 frames channels-last: the same clip
    u8 = (frames * 255).round().astype(np.uint8).transpose(0, 2, 3, 4, 1)
    assert np.array_equal(eng.cond_tokens(u8), eng.cond_tokens(u8.transpose(0, 4, 1, 2, 3) / np.float32(255)))


def test_backends_sample_the_same_and_streaming(engines):
    frames = clip(2, seed=4)
    p = SamplingParams(temperature=1.0, top_k=50, seed=11)
    a = engines["onnxruntime"].predict(frames, p)[1].tokens
    b = engines["torch"].predict(frames, p)[1].tokens
    assert np.array_equal(a, b)
    it = engines["onnxruntime"].predict_iter(frames, p)
    steps = []
    while True:
        try:
            ev = next(it)
        except StopIteration as stop:
            gen = stop.value
            break
        steps.append(ev.step)
        assert np.array_equal(ev.tokens, a[:, ev.step])
    assert steps == list(range(N_TOK)) and np.array_equal(gen.tokens, a)
    seen = []
    engines["onnxruntime"].predict(frames, p, progress=lambda s, t: seen.append((s, t)))
    assert seen[0] == (1, N_TOK) and seen[-1] == (N_TOK, N_TOK)
    # row i of a batch draws from (seed, i): row 0 alone gives the tokens it gets beside another row
    assert np.array_equal(engines["onnxruntime"].predict(frames[:1], p)[1].tokens[0], a[0])


def test_stochastic_conditioning_is_reproducible(engines):
    frames = clip(2, seed=5)
    for eng in engines.values():
        a = eng.cond_tokens(frames, stochastic_cond=True, seed=1)
        assert np.array_equal(a, eng.cond_tokens(frames, stochastic_cond=True, seed=1))
        assert not np.array_equal(a, eng.cond_tokens(frames, stochastic_cond=True, seed=2))
        assert a.shape == (2, N_TOK + 1) and (a[:, -1] == 1024).all() and a[:, :-1].max() < 1024
        det = eng.cond_tokens(frames)
        assert (a[:, :-1] == det[:, :-1]).mean() > 0.2  # draws concentrate on the nearest code
    _, g = engines["torch"].predict(frames, SamplingParams(temperature=0.0, seed=0), stochastic_cond=True, seed=1)
    assert g.tokens.shape == (2, N_TOK)


def test_scheduler_serves_prediction_requests(engines):
    from larp_rt.serving import Scheduler

    eng = engines["onnxruntime"]
    frames = clip(3, seed=6)
    p = SamplingParams(temperature=1.0, seed=21)
    want = [eng.predict(frames[i:i + 1], p)[1].tokens[0] for i in range(3)]
    with Scheduler(eng, max_batch=2) as s:
        reqs = [s.submit_predict(frames[i:i + 1], p) for i in range(3)]
        got = [r.result(timeout=60).tokens[0] for r in reqs]
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g, w)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
def test_bad_prediction_input(engines):
    eng = engines["onnxruntime"]
    cases = [
        (clip(1, t=4), {}, "at least 5"),
        (clip(1)[:, :, :, :16], {}, "float frames must have shape"),
        (clip(1) * 2, {}, r"in \[0, 1\]"),
        (np.zeros((1, 8, 32, 32, 3), np.uint16), {}, "uint8"),
        (np.zeros((1, 8, 16, 32, 3), np.uint8), {}, "uint8 frames must have shape"),
        (clip(1), {"num_cond_frames": 0}, "num_cond_frames"),
        (clip(1), {"num_cond_frames": 9}, "num_cond_frames"),
        (clip(1), {"seed": 3}, "stochastic_cond"),
        (clip(1), {"stochastic_cond": True, "seed": -1}, "seed"),
    ]
    for frames, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            eng.predict(frames, SamplingParams(seed=0), **kw)
    with pytest.raises(ValueError, match="guidance"):
        eng.predict(clip(1), SamplingParams(cfg_scale=2.0, seed=0))
    with pytest.raises(ValueError, match="frame-prediction generator: it has no classes"):
        eng.generate([0], SamplingParams(seed=0))


def test_class_conditional_bundle_cannot_predict_and_fp_bundles_get_the_fused_step(fp_bundle, tmp_path):
    root = fp_bundle[3]
    torch.manual_seed(0)
    save_pretrained(LARPGenerator(GeneratorConfig.from_name("tiny")), tmp_path / "cls")
    b = export_bundle(None, tmp_path / "cls", tmp_path / "b", printer=lambda s: None, verify=False)
    with pytest.raises(ValueError, match="has no tokenizer"):
        Engine(b).predict(clip(1))
    b2 = export_bundle(root / "tok", tmp_path / "cls", tmp_path / "b2", printer=lambda s: None, verify=False)
    with pytest.raises(ValueError, match="class-conditional generator"):
        Engine(b2).predict(clip(1))
    from larp_rt import kernels
    from larp_rt.bundle import Bundle

    if kernels.ort_custom_op_library() is None:
        assert "decode_sample" not in Bundle(fp_bundle[2]).graphs
        return
    # the default export gives a frame-prediction bundle the fused step too; its predictions equal the portable
    # graph's + the kernel sampler's, token for token (greedy and sampled)
    assert "decode_sample" in Bundle(fp_bundle[2]).graphs
    fused, plain = Engine(fp_bundle[2]), Engine(fp_bundle[2], sampler="kernel")
    assert fused.sampler_name == "fused"
    for p in (SamplingParams(seed=3, temperature=0.0), SamplingParams(seed=4, top_k=20)):
        a, b = fused.predict(clip(2), p)[1].tokens, plain.predict(clip(2), p)[1].tokens
        assert np.array_equal(a, b)


# --------------------------------------------------------------------------------------------
# the authors' FP folder
# --------------------------------------------------------------------------------------------
def test_authors_fp_state_dict_loads_strictly_and_exports(tmp_path):
    from safetensors.torch import save_file

    D, L, V, N = 64, 2, 64, 16
    cfg = generator_config_json(dim=D, n_layer=L, n_head=2, vocab_size=V, max_seq_len=N, frame_prediction=True,
                                cls_token_num=N + 1)
    F = 256  # the authors' SwiGLU hidden: round_up(int(2 * 4 * 64 / 3) = 170, multiple_of 256)
    shapes = generator_keys(D=D, L=L, F=F, V=V, positions=2 * N)
    del shapes["cls_embedding.embedding_table.weight"]
    shapes["tok_embeddings.weight"] = (V + 1, D)  # + the separator
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "config.json").write_text(json.dumps(cfg))
    save_file(sd, tmp_path / "gen" / "model.safetensors")
    gen = load_pretrained(tmp_path / "gen", kind="generator")
    assert gen.config.frame_prediction and gen.config.num_positions == 2 * N and gen.cls_embedding is None
    assert set(gen.state_dict()) == set(shapes)
    bundle = export_bundle(None, tmp_path / "gen", tmp_path / "b", printer=lambda s: None)
    m = json.loads((bundle / "manifest.json").read_text())
    assert PREFILL_GRAPH in m["graphs"] and all(v["max_abs"] <= v["tol"] for v in m["verification"])
    bad = dict(sd)
    bad["tok_embeddings.weight"] = bad["tok_embeddings.weight"][:V]  # a class-conditional table: no separator
    save_file(bad, tmp_path / "gen" / "model.safetensors")
    with pytest.raises(ValueError, match="tok_embeddings.weight"):
        load_pretrained(tmp_path / "gen")


def test_pad_cond_repeats_the_last_conditioning_frame():
    v = torch.arange(8.0).view(1, 1, 8, 1, 1).expand(1, 3, 8, 2, 2)
    assert pad_cond(v, 5)[0, 0, :, 0, 0].tolist() == [0, 1, 2, 3, 4, 4, 4, 4]


def test_cli_predict_writes_input_beside_prediction(fp_bundle, tmp_path, capsys):
    from larp_rt.cli import main
    from larp_rt.video import read_video, write_video

    bundle = str(fp_bundle[2])
    rng = np.random.default_rng(0)
    write_video(tmp_path / "in.mp4", (rng.random((10, 40, 48, 3)) * 255).astype(np.uint8), fps=8)
    out = tmp_path / "pred.mp4"
    assert main(["predict", bundle, str(tmp_path / "in.mp4"), "--out", str(out), "--cond-frames", "5",
                 "--temperature", "0", "--seed", "0"]) == 0
    text = capsys.readouterr().out
    assert "resized 48x40" in text and "frames 5..7 are predicted" in text
    frames, _ = read_video(out)
    assert frames.shape[0] == 8 and frames.shape[2] > 2 * 32  # two clips side by side
    assert main(["predict", bundle, str(tmp_path / "in.mp4"), "--out", str(tmp_path / "t.npy"), "--seed", "1"]) == 0
    assert np.load(tmp_path / "t.npy").shape == (1, N_TOK)
    write_video(tmp_path / "short.mp4", (rng.random((3, 32, 32, 3)) * 255).astype(np.uint8), fps=8)
    assert main(["predict", bundle, str(tmp_path / "short.mp4"), "--out", str(out)]) == 2
    assert "needs at least 5" in capsys.readouterr().err
    assert main(["predict", bundle, str(tmp_path / "in.mp4"), "--out", str(tmp_path / "x.txt")]) == 2


TINY_FP = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny" / "fp_generator"


@pytest.mark.skipif(not (TINY_FP / "model.safetensors").is_file(), reason="the tiny FP generator is not committed")
def test_committed_tiny_fp_generator_beats_repeating_the_last_frame(tmp_path, monkeypatch):
    """Through the runtime (ONNX Runtime bundle, greedy): held-out clips, PSNR of the predicted frames against the
    repeat-last-conditioning-frame baseline; and the committed metrics say the same. The demo's tokens are exactly
    the float64 full-forward greedy tokens of the committed checkpoints (wrong prefill positions fail here, however
    good the PSNR)."""
    from larp_rt import demo_predict
    from larp_rt.demo import REPO_TINY

    calls = []

    class Recording(Engine):
        def predict(self, frames, *a, **kw):
            out = super().predict(frames, *a, **kw)
            calls.append((self, frames, kw.get("num_cond_frames", 5), out[1].tokens))
            return out

    monkeypatch.setattr(demo_predict, "Engine", Recording)
    metrics = json.loads((TINY_FP / "metrics.json").read_text())
    m = metrics["metrics"]
    assert metrics["beats_baseline"] and m["psnr_greedy"] > m["psnr_repeat_last_frame"]
    res = demo_predict.run_predict_demo(tmp_path, clips=16, scale=1, printer=lambda s: None)
    [(eng, truth, n, got)] = calls
    tok, gen = load_pretrained(REPO_TINY / "tokenizer"), load_pretrained(TINY_FP)
    with torch.no_grad():
        prefix = fp_prefix(tok.eval(), torch.from_numpy(truth), n)
    assert np.array_equal(eng.cond_tokens(truth, num_cond_frames=n), prefix.numpy())
    np.testing.assert_array_equal(got, full_forward_greedy(gen.eval(), prefix))
    pred = np.mean([r["psnr_prediction"] for r in res["clips"]])
    base = np.mean([r["psnr_repeat_last_frame"] for r in res["clips"]])
    assert pred > base, (pred, base)
    assert (tmp_path / "predict.mp4").stat().st_size > 0


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_a_request_joining_mid_generation_changes_nothing(engines, backend):
    """Continuous batching: B joins (its prefill step, A waiting) while A is mid-video, in a row a finished request
    left stale entries in; both get the tokens they get alone."""
    from larp_rt.backends.base import ContinuousBatch, Sequence
    from larp_rt.sampling import resolve_params

    eng = engines[backend]
    frames = clip(3, seed=9)
    prefix = eng.cond_tokens(frames)
    p = SamplingParams(temperature=1.0, top_k=20, seed=5)
    alone = [eng.predict(frames[i:i + 1], p)[1].tokens[0] for i in range(3)]
    be = eng.backend
    batch = ContinuousBatch(be, be.new_runner(2))
    seqs = [Sequence(0, resolve_params(p, 1, 1024), N_TOK, prefix=prefix[i]) for i in range(3)]
    batch.admit(seqs[0])
    batch.admit(seqs[2])  # row 1: it finishes, then seqs[1] reuses its stale row
    while not seqs[2].done:
        batch.step()
        if seqs[0].step == 10 and seqs[2].step == 10:
            batch.evict(seqs[2])  # leaves early: its row keeps 75 written slots
            break
    batch.admit(seqs[1])
    for _ in range(3 * N_TOK):
        if not batch.sequences:
            break
        batch.step()
    assert seqs[0].done and seqs[1].done
    assert np.array_equal(seqs[0].tokens, alone[0]) and np.array_equal(seqs[1].tokens, alone[1])


def test_prefill_graph_builds_a_tensorrt_plan_with_a_dynamic_prefix(fp_bundle, tmp_path):
    """The TensorRT build gives the multi-token prefill its own profiles (prefix length dynamic up to max_seq)."""
    pytest.importorskip("tensorrt_rtx", reason="the TensorRT-RTX builder is not installed (pip install '.[tensorrt]')")
    import shutil

    from larp_rt.export import trt_build

    from larp_rt.bundle import Bundle

    dst = tmp_path / "bundle"
    shutil.copytree(fp_bundle[2], dst)
    trt_build.build_plans(dst, batch="1,2", printer=lambda *_: None, graphs=[PREFILL_GRAPH])
    b = Bundle(dst)
    e = b.manifest["plans"][PREFILL_GRAPH]
    assert [x["name"] for x in e["inputs"]] == ["tokens", "pos"]
    S = b.kv_cache_spec.max_seq
    assert [p["P"] for p in e["profiles"]] == [[1, S // 2, S]] * 2
    assert [p["B"] for p in e["profiles"]] == [[1, 1, 1], [2, 2, 2]]


def test_quantized_export_of_a_frame_prediction_generator_is_refused(fp_bundle, tmp_path):
    pytest.importorskip("onnxruntime.quantization")
    root = fp_bundle[3]
    with pytest.raises(ValueError, match="class-conditional generators so far"):
        export_bundle(root / "tok", root / "gen", tmp_path / "q", precision="int8")
    assert not (tmp_path / "q").exists()
