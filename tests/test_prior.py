"""The tokenizer's AR prior in bundles: prior.onnx / prior_score.onnx / prior_fused.onnx (the step with
larp_rt::DecodeAttention), Engine.prior_logprobs / prior_nll / prior_generate, the `score` and `prior-generate`
verbs."""

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _authors import tokenizer_config_json, tokenizer_keys
from larp_rt.export import export_bundle
from larp_rt.export.prior_export import prior_reference_logits
from larp_rt.export.prior_graph import PriorStepGraph
from safetensors.torch import save_file

from larp_rt import Bundle, Engine, SamplingParams, TokenizerConfig, kernels, save_pretrained
from larp_rt.bundle import BundleError
from larp_rt.cli import main
from larp_rt.models import LARPTokenizer

REPO_TINY = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny" / "tokenizer"
quiet = {"printer": lambda s: None}


def tiny_prior_tokenizer(seed=0, **prior_overrides) -> LARPTokenizer:
    torch.manual_seed(seed)
    tok = LARPTokenizer(TokenizerConfig.from_name("tiny").with_prior("tiny", **prior_overrides))
    torch.nn.init.normal_(tok.prior_model.head.weight, std=0.5)  # predictions far from the origin: peaked logits
    return tok.eval()


@pytest.fixture(scope="module")
def prior_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("prior")
    tok = tiny_prior_tokenizer(latent_ce_temperature=0.1)
    save_pretrained(tok, root / "tok")
    return tok, export_bundle(root / "tok", None, root / "bundle", **quiet)


@pytest.fixture(scope="module")
def engines(prior_bundle):
    return {b: Engine(prior_bundle[1], backend=b) for b in ("onnxruntime", "torch")}


def reference_logprobs(tok: LARPTokenizer, tokens: np.ndarray) -> np.ndarray:
    """log p(token t | tokens < t), float64, written from the state dict's key names (``_authors_prior_logprobs``):
    no larp_rt model or export code, so it is independent of what every backend (torch's "full" included) runs."""
    cfg = tok.prior_model.config
    with torch.no_grad():
        return _authors_prior_logprobs(tok.state_dict(), cfg.heads, cfg.latent_ce_temperature,
                                       torch.from_numpy(tokens)).numpy()


# ------------------------------------------------------------------------------------------------
# the graphs
# ------------------------------------------------------------------------------------------------
def test_cached_step_equals_full_causal_forward_float64():
    tok = tiny_prior_tokenizer().double()
    step = PriorStepGraph(tok).eval()
    N, K = tok.config.num_tokens, tok.config.codebook_size
    B, H, hd = 3, step.heads, step.head_dim
    tokens = torch.randint(0, K, (B, N), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = prior_reference_logits(tok, tokens)  # (B, N-1, K) float64
        past = [torch.randn(B, H, N, hd, dtype=torch.float64) for _ in range(2 * tok.prior_model.config.depth)]
        got = torch.zeros_like(ref)
        rows = torch.arange(B)
        for j in range(N - 1 + 2 * (B - 1)):  # row b starts at global step 2b: every step mixes positions
            p = j - 2 * rows
            live = (p >= 0) & (p < N - 1)
            pp = torch.where(live, p, torch.zeros_like(p))  # idle rows at position 0; the cache holds noise beyond
            logits, *new = step(tokens[rows, pp].view(-1, 1), pp, *past)
            for c, n in zip(past, new, strict=True):
                c[rows[live], :, pp[live]] = n[live, :, 0]
            got[rows[live], pp[live]] = logits[live]
    assert ref.dtype == torch.float64 and (got - ref).abs().max().item() <= 1e-10


def test_export_manifest_and_verification(prior_bundle):
    _, path = prior_bundle
    b = Bundle(path)
    m = b.manifest
    assert {"prior", "prior_score"} <= set(b.graphs)
    entry = b.prior_spec
    assert entry.graph == "prior" and entry.score_graph == "prior_score" and entry.codebook_size == 1024
    assert entry.kv_cache.to_dict() == {"layers": 2, "heads": 4, "head_dim": 16, "max_seq": 64, "dtype": "fp32"}
    assert entry.latent_ce_temperature == 0.1 and b.tokenizer_config.prior.latent_ce_temperature == 0.1
    g = b.graph("prior")
    assert g.input_names[:2] == ["token", "pos"] and g.inputs[1].shape == ("B",)
    assert g.output_names[0] == "logits" and g.outputs[0].shape == ("B", 1024)
    assert b.graph("prior_score").outputs[0].to_dict() == {"name": "logprobs", "dtype": "float32", "shape": ["B", 63]}
    checks = {(c["graph"], c["output"]): c for c in m["verification"]}
    for key in (("prior", "logits"), ("prior_score", "logprobs")):
        assert checks[key]["max_abs"] <= checks[key]["tol"] == 1e-3


def test_tokenizer_without_prior_exports_as_before(tmp_path, capsys):
    torch.manual_seed(0)
    save_pretrained(LARPTokenizer(TokenizerConfig.from_name("tiny")), tmp_path / "tok")
    path = export_bundle(tmp_path / "tok", None, tmp_path / "b", onnx_only=True, **quiet)
    b = Bundle(path)
    assert b.manifest["tokenizer"]["prior"] is None and b.prior_spec is None
    assert set(b.graphs) == {"encoder", "decoder"}
    eng = Engine(path)
    tokens = np.zeros((1, 64), np.int64)
    for call in (lambda: eng.prior_logprobs(tokens), lambda: eng.prior_nll(tokens),
                 lambda: eng.prior_generate(tokens[:, :4])):
        with pytest.raises(ValueError, match="has no AR prior"):
            call()
    np.save(tmp_path / "t.npy", tokens)
    assert main(["score", str(path), str(tmp_path / "t.npy")]) == 2
    assert "has no AR prior" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_prior_logprobs_full_and_steps_equal_the_reference(prior_bundle, engines, backend):
    tok, _ = prior_bundle
    tokens = np.random.default_rng(2).integers(0, 1024, (3, 64))
    want = reference_logprobs(tok, tokens)
    eng = engines[backend]
    for method in ("auto", "full", "steps"):
        lp = eng.prior_logprobs(tokens, method=method)
        assert lp.shape == (3, 63) and lp.dtype == np.float32
        assert np.abs(lp - want).max() < 2e-4, method
    nll = eng.prior_nll(tokens)
    assert nll.shape == (3,) and np.allclose(nll, -want.mean(1), atol=2e-4)


def _authors_prior_logprobs(sd: dict, heads: int, temperature: float, tokens: torch.Tensor) -> torch.Tensor:
    """The authors' GPTC forward + ``calculate_logits_and_ar_pred_cont``, written from their key names over the raw
    state dict (no larp_rt module), float64: log-softmax of linear(normalised prediction, normalised codebook) / T."""
    w = {k.removeprefix("prior_model."): v.double() for k, v in sd.items() if k.startswith("prior_model.")}
    emb = F.normalize(sd["bottleneck.regularizer.embedding.weight"].double(), dim=-1)  # get_emb()
    x = F.embedding(tokens, emb)[:, :-1]  # ar_predict: x[:, :-1]
    h = F.linear(x, w["input_proj.weight"], w["input_proj.bias"]) + w["pos_emb"][:, : x.shape[1]]
    B, L, E = h.shape
    depth = len({k.split(".")[1] for k in w if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        a = F.layer_norm(h, (E,), w[p + "ln1.weight"], w[p + "ln1.bias"])
        q, k, v = (F.linear(a, w[p + f"attn.{n}.weight"], w[p + f"attn.{n}.bias"])
                   .view(B, L, heads, E // heads).transpose(1, 2) for n in ("query", "key", "value"))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, L, E)
        h = h + F.linear(y, w[p + "attn.proj.weight"], w[p + "attn.proj.bias"])
        m = F.layer_norm(h, (E,), w[p + "ln2.weight"], w[p + "ln2.bias"])
        h = h + F.linear(F.gelu(F.linear(m, w[p + "mlp.0.weight"], w[p + "mlp.0.bias"])), w[p + "mlp.2.weight"],
                         w[p + "mlp.2.bias"])
    pred = F.linear(F.layer_norm(h, (E,), w["ln_f.weight"], w["ln_f.bias"]), w["head.weight"], w["head.bias"])
    full = F.normalize(torch.cat([x[:, :1], pred], dim=1), p=2, dim=-1)  # l2_normalized ar_predict
    logits = F.linear(full, emb)[:, 1:] * (1 / temperature)
    return torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]


def test_prior_logprobs_equal_the_authors_formula_on_their_layout(tmp_path):
    cfg_json = tokenizer_config_json(prior_args={"max_seq_len": 16})
    cfg_json["prior_model"]["latent_ce_temperature"] = 0.2
    torch.manual_seed(3)
    src = LARPTokenizer(TokenizerConfig(
        num_tokens=16, frames=4, height=16, width=16, temporal_patch=2, patch=4, enc_dim=32, enc_depth=2, enc_heads=2,
        dec_dim=32, dec_depth=2, dec_heads=2, codebook_size=64).with_prior("gptc-xxs", max_seq_len=16))
    sd = {k: v.detach().clone() for k, v in src.state_dict().items()}
    for k in sd:
        if k.startswith("prior_model.") and k.endswith("bias"):
            sd[k].normal_(std=0.1)  # non-zero biases: the q/k/v/bias folding is exercised
    spec = tokenizer_keys(D=32, enc_depth=2, dec_depth=2, N=16, P=32, K=64, patch=(2, 4, 4), prior=(256, 6, 16))
    assert {k: tuple(v.shape) for k, v in sd.items()} == spec  # the authors' names, independently written
    folder = tmp_path / "authors-tok"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg_json))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    path = export_bundle(folder, None, tmp_path / "b", onnx_only=True, **quiet)
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = _authors_prior_logprobs(sd, heads=4, temperature=0.2, tokens=tokens).numpy()
    assert want.std() > 0.5  # peaked enough that the temperature matters
    eng = Engine(path)
    for method in ("full", "steps"):
        assert np.abs(eng.prior_logprobs(tokens.numpy(), method=method) - want).max() < 1e-4, method


# ------------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------------
def torch_greedy(tok: LARPTokenizer, prefix: np.ndarray) -> np.ndarray:
    """The PyTorch prior's greedy continuation: the full causal forward over the tokens so far, argmax."""
    N = tok.config.num_tokens
    t = torch.from_numpy(prefix)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~60 tiny forwards: on 2 busy cores the thread pool only adds waits
    try:
        with torch.no_grad():
            while t.shape[1] < N:
                nxt = prior_reference_logits(tok, torch.cat([t, t[:, :1]], dim=1))[:, -1].argmax(-1)  # of t[len]
                t = torch.cat([t, nxt[:, None]], dim=1)
    finally:
        torch.set_num_threads(threads)
    return t.numpy()


@pytest.fixture(scope="module")
def greedy_case(prior_bundle):
    prefix = np.random.default_rng(5).integers(0, 1024, (3, 10))
    return prefix, torch_greedy(prior_bundle[0], prefix)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_greedy_prior_generate_equals_pytorch_greedy(engines, greedy_case, backend):
    prefix, want = greedy_case
    got = engines[backend].prior_generate(prefix, SamplingParams(temperature=0.0))
    assert got.tokens.shape == (3, 64) and np.array_equal(got.tokens, want)
    assert np.array_equal(engines[backend].prior_generate(prefix, SamplingParams(top_k=1, seed=9)).tokens, want)


def test_seeded_sampling_is_reproducible_batch_independent_and_backend_independent(engines):
    eng = engines["onnxruntime"]
    prefix = np.random.default_rng(6).integers(0, 1024, (3, 8))
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=11)
    a = eng.prior_generate(prefix, p)
    assert a.seeds == [11, 11, 11] and np.array_equal(a.tokens, eng.prior_generate(prefix, p).tokens)
    assert not np.array_equal(a.tokens[0, 8:], a.tokens[1, 8:])  # rows draw from their own streams
    assert np.array_equal(a.tokens, engines["torch"].prior_generate(prefix, p).tokens)
    # a list: one stream (seed_i, 0) per row, so a row's tokens are those it gets alone
    plist = [SamplingParams(seed=s, top_k=50) for s in (1, 2, 3)]
    batch = eng.prior_generate(prefix, plist)
    for i, q in enumerate(plist):
        assert np.array_equal(batch.tokens[i], eng.prior_generate(prefix[i:i + 1], q).tokens[0])
    fresh = eng.prior_generate(prefix[:1])  # params=None: temperature 1 with a fresh seed, reported
    assert np.array_equal(fresh.tokens, eng.prior_generate(prefix[:1], SamplingParams(seed=fresh.seeds[0])).tokens)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_concurrent_prior_calls_return_what_they_return_alone(engines, backend):
    from concurrent.futures import ThreadPoolExecutor

    eng = engines[backend]
    prefixes = [np.random.default_rng(20 + i).integers(0, 1024, (2, 6)) for i in range(4)]
    alone = [eng.prior_generate(x, SamplingParams(seed=i)).tokens for i, x in enumerate(prefixes)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda a: eng.prior_generate(a[1], SamplingParams(seed=a[0])).tokens,
                                 enumerate(prefixes)))
    assert all(np.array_equal(a, b) for a, b in zip(alone, together, strict=True))


def test_token_index_is_the_step_counter(engines):
    """Token t is drawn with the Philox step t: a continuation from a longer prefix that agrees with a shorter
    run's tokens draws the same tokens after it (the draws do not depend on where the prefix ended)."""
    eng = engines["onnxruntime"]
    prefix = np.random.default_rng(7).integers(0, 1024, (2, 5))
    p = SamplingParams(seed=21)
    short = eng.prior_generate(prefix, p).tokens
    longer = eng.prior_generate(short[:, :30], p).tokens
    assert np.array_equal(longer, short)
    whole = eng.prior_generate(short, p)  # a full-length prefix: nothing to sample
    assert np.array_equal(whole.tokens, short)


def test_bad_input_gets_a_clear_error(engines):
    eng = engines["onnxruntime"]
    ok = np.zeros((2, 64), np.int64)
    cases = [
        (lambda: eng.prior_logprobs(np.full((1, 64), 1024)), r"tokens must be in \[0, 1023\]"),
        (lambda: eng.prior_logprobs(ok[:, :10]), r"shape \(B, 64\)"),
        (lambda: eng.prior_logprobs(ok, method="fast"), "method must be"),
        (lambda: eng.prior_generate(np.full((1, 4), -1)), r"prefix_tokens must be in \[0, 1023\]"),
        (lambda: eng.prior_generate(np.zeros((1, 0), np.int64)), "empty"),
        (lambda: eng.prior_generate(np.zeros((1, 65), np.int64)), "more than the tokenizer's N = 64"),
        (lambda: eng.prior_generate(np.zeros(8, np.int64)), "add a batch axis"),
        (lambda: eng.prior_generate(ok[:, :4].astype(np.float32)), "must be integers"),
        (lambda: eng.prior_generate(ok[:, :4], SamplingParams(cfg_scale=1.5)), "cfg_scale must be 1.0 for the prior"),
        (lambda: eng.prior_generate(ok[:, :4], SamplingParams(top_k=1025)), "top_k"),
        (lambda: eng.prior_generate(ok[:, :4], [SamplingParams()]), "params has 1 SamplingParams for 2"),
    ]
    for call, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call()


# ------------------------------------------------------------------------------------------------
# the committed tiny tokenizer (trained with the prior)
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not REPO_TINY.is_dir(), reason="the committed tiny checkpoint is not in this checkout")
def test_committed_tiny_prior_nll_on_held_out_clips(tmp_path):
    from larp_rt.training.data import SyntheticVideos

    path = export_bundle(REPO_TINY, None, tmp_path / "b", onnx_only=True, **quiet)
    eng = Engine(path)
    cfg = eng.tokenizer_config
    held_out = SyntheticVideos(256, frames=cfg.frames, height=cfg.height, width=cfg.width, num_classes=8, seed=1)
    video = torch.stack([held_out[i][0] for i in range(64)]).numpy()  # data_seed + 1: the training's held-out set
    nll = eng.prior_nll(eng.encode(video))
    log_k = math.log(cfg.codebook_size)  # 6.931: a uniform guess
    # measured: mean 6.078 nats/token (min 5.971, max 6.173); the prior trained 5500 steps on 2 CPU cores
    assert abs(nll.mean() - 6.078) < 0.03 and nll.max() < log_k - 0.7
    shuffled = np.random.default_rng(0).permuted(eng.encode(video), axis=1)  # same tokens, order destroyed
    # measured 6.743 shuffled: the prior models the order, not only the frequencies
    assert eng.prior_nll(shuffled).mean() > nll.mean() + 0.4


# ------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------
def test_cli_score_and_prior_generate(prior_bundle, engines, tmp_path, capsys):
    from larp_rt.video import read_video, write_video

    _, path = prior_bundle
    rng = np.random.default_rng(8)
    write_video(tmp_path / "in.mp4", (rng.random((10, 40, 48, 3)) * 255).astype(np.uint8), fps=8)
    tokens = rng.integers(0, 1024, (2, 64))
    np.save(tmp_path / "t.npy", tokens)
    assert main(["score", str(path), str(tmp_path / "in.mp4"), str(tmp_path / "t.npy"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["video"] for r in out["videos"]] == [0, 0, 1] and out["log_codebook"] == pytest.approx(math.log(1024))
    assert np.allclose([r["nll"] for r in out["videos"][1:]], engines["onnxruntime"].prior_nll(tokens), atol=1e-6)
    assert main(["score", str(path), str(tmp_path / "t.npy")]) == 0
    assert "nats/token" in capsys.readouterr().out

    out_mp4 = tmp_path / "cont.mp4"
    assert main(["prior-generate", str(path), str(tmp_path / "in.mp4"), "--keep", "20", "--seed", "1",
                 "--out", str(out_mp4)]) == 0
    assert "seeds: [1]" in capsys.readouterr().out
    frames, _ = read_video(out_mp4)
    assert frames.shape == (8, 32 + 4, 2 * 32 + 6, 3)  # original | continuation, 2 px padding
    assert main(["prior-generate", str(path), str(tmp_path / "t.npy"), "--keep", "20", "--seed", "1",
                 "--out", str(tmp_path / "cont.npy")]) == 0
    cont = np.load(tmp_path / "cont.npy")
    assert cont.shape == (2, 64) and np.array_equal(cont[:, :20], tokens[:, :20])
    assert np.array_equal(cont, engines["onnxruntime"].prior_generate(tokens[:, :20], SamplingParams(seed=1)).tokens)
    capsys.readouterr()
    assert main(["prior-generate", str(path), str(tmp_path / "in.mp4"), "--keep", "65", "--out", str(out_mp4)]) == 2
    assert "--keep must be in [1, 64]" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# the fused step graph (prior_fused.onnx: larp_rt::DecodeAttention)
# ------------------------------------------------------------------------------------------------
needs_ort_lib = pytest.mark.skipif(kernels.ort_custom_op_library() is None,
                                   reason="the ONNX Runtime custom-op library is not built (pip install -e .)")


def test_fused_step_module_matches_the_standard_one_and_is_float32_only():
    tok = tiny_prior_tokenizer()
    std, fused = PriorStepGraph(tok).eval(), PriorStepGraph(tok, fused_attention=True).eval()
    B, S, K = 3, 64, tok.config.codebook_size
    g = torch.Generator().manual_seed(2)
    token, pos = torch.randint(0, K, (B, 1), generator=g), torch.tensor([0, 17, 63])
    past = [torch.randn(B, std.heads, S, std.head_dim, generator=g) for _ in range(2 * std.n_layer)]
    with torch.no_grad():
        for a, b in zip(std(token, pos, *past), fused(token, pos, *past), strict=True):
            assert (a - b).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="fused_attention needs a float32 prior"):
        PriorStepGraph(tiny_prior_tokenizer().half(), fused_attention=True)


@needs_ort_lib
def test_fused_graph_in_the_manifest_and_verified(prior_bundle):
    import onnx

    b = Bundle(prior_bundle[1])
    entry = b.prior_spec
    assert entry.fused_graph == "prior_fused" and entry.fused_attention == "larp_rt::DecodeAttention"
    g = b.graph("prior_fused")
    assert g.inputs == b.graph("prior").inputs and g.outputs == b.graph("prior").outputs
    ops = [n.op_type for n in onnx.load(str(b.graph_path("prior_fused")), load_external_data=False).graph.node
           if n.domain == "larp_rt"]
    assert ops == ["DecodeAttention"] * 2  # one per layer
    check = next(c for c in b.manifest["verification"] if c["graph"] == "prior_fused")
    assert check["output"] == "logits" and check["max_abs"] <= check["tol"] == 1e-3


@needs_ort_lib
def test_fused_runner_with_mixed_positions_equals_the_float64_full_forward(prior_bundle, engines):
    """Rows start 3 steps apart (each step mixes positions) through the fused runner (cache bound at full length,
    unwritten slots never read): the logits equal the float64 full causal forward within the fp32 tolerance."""
    tok, _ = prior_bundle
    be = engines["onnxruntime"].backend
    assert be.prior_graph_name == "prior_fused"
    B, N = 3, tok.config.num_tokens
    tokens = np.random.default_rng(9).integers(0, 1024, (B, N))
    with torch.no_grad():
        ref = prior_reference_logits(copy.deepcopy(tok).double(), torch.from_numpy(tokens)).numpy()  # (B, N-1, K)
    runner = be.prior_runner(B)
    try:
        assert runner.graph_name == "prior_fused" and not runner.windowed
        got = np.zeros_like(ref)
        rows = np.arange(B)
        for j in range(N - 1 + 3 * (B - 1)):
            p = j - 3 * rows
            live = (p >= 0) & (p < N - 1)
            pp = np.where(live, p, 0)  # idle rows at position 0: their slot-0 write is rewritten before it is read
            logits = runner.run(tokens[rows, pp], pp)
            got[live, pp[live]] = logits[live]
            assert runner.width == runner.S  # bound once at full length
    finally:
        runner.close()
    assert np.abs(got - ref).max() <= 1e-3


@needs_ort_lib
def test_fused_and_standard_graphs_score_and_draw_the_same(prior_bundle, engines):
    fused, std = engines["onnxruntime"], Engine(prior_bundle[1], prior_graph="standard")
    assert fused.prior_graph_name == "prior_fused" and std.prior_graph_name == "prior"
    runner = std.backend.prior_runner(1)
    assert runner.graph_name == "prior" and runner.windowed
    runner.close()
    tokens = np.random.default_rng(10).integers(0, 1024, (3, 64))
    a, b = fused.prior_logprobs(tokens, method="steps"), std.prior_logprobs(tokens, method="steps")
    assert np.abs(a - b).max() < 1e-4
    prefix = tokens[:, :7]
    for p in (SamplingParams(temperature=0.0), SamplingParams(seed=3), SamplingParams(seed=4, top_k=50, top_p=0.9),
              [SamplingParams(seed=s, temperature=0.8) for s in (5, 6, 7)]):
        assert np.array_equal(fused.prior_generate(prefix, p).tokens, std.prior_generate(prefix, p).tokens)


@needs_ort_lib
def test_disabled_kernels_fall_back_to_the_standard_graph(prior_bundle, engines, monkeypatch):
    eng = engines["onnxruntime"]
    prefix = np.random.default_rng(11).integers(0, 1024, (2, 5))
    want = eng.prior_generate(prefix, SamplingParams(seed=8)).tokens
    with kernels.force_fallback():
        assert eng.prior_graph_name == "prior"  # decided per run: the same engine
        assert np.array_equal(eng.prior_generate(prefix, SamplingParams(seed=8)).tokens, want)
        with pytest.raises(ValueError, match="prior_graph='fused' is not available: the kernels are disabled"):
            Engine(prior_bundle[1], prior_graph="fused")
    monkeypatch.setenv(kernels.ENV_DISABLE, "1")
    off = Engine(prior_bundle[1])
    assert off.prior_graph_name == "prior"
    assert np.array_equal(off.prior_generate(prefix, SamplingParams(seed=8)).tokens, want)


def test_bundle_without_the_fused_graph_runs_prior_onnx(tmp_path, monkeypatch):
    """An export where the custom-op library is not built (like bundles from before prior_fused.onnx) has no
    fused entry and runs prior.onnx; asking for the fused graph says why it cannot run."""
    save_pretrained(tiny_prior_tokenizer(seed=1), tmp_path / "tok")
    with monkeypatch.context() as m:
        m.setattr(kernels, "ort_custom_op_library", lambda *a, **k: None)
        path = export_bundle(tmp_path / "tok", None, tmp_path / "b", onnx_only=True, **quiet)
    b = Bundle(path)
    assert b.prior_spec.fused_graph is None and "prior_fused" not in b.graphs
    eng = Engine(path)
    assert eng.prior_graph_name == "prior"
    tokens = np.random.default_rng(12).integers(0, 1024, (2, 64))
    assert np.abs(eng.prior_logprobs(tokens, method="steps") - eng.prior_logprobs(tokens, method="full")).max() < 2e-4
    assert eng.prior_generate(tokens[:, :4], SamplingParams(seed=1)).tokens.shape == (2, 64)
    with pytest.raises(ValueError, match="has no fused prior step graph"):
        Engine(path, prior_graph="fused")


def test_fp16_prior_keeps_the_standard_graph(tmp_path):
    save_pretrained(tiny_prior_tokenizer(seed=2), tmp_path / "tok")
    path = export_bundle(tmp_path / "tok", None, tmp_path / "b", precision="fp16", onnx_only=True, verify=False,
                         **quiet)
    b = Bundle(path)
    assert b.prior_spec.kv_cache.dtype == "fp16" and b.prior_spec.fused_graph is None and "prior_fused" not in b.graphs
    assert Engine(path).prior_graph_name == "prior"


@needs_ort_lib
def test_inconsistent_fused_entries_are_refused(prior_bundle, tmp_path):
    src = Path(prior_bundle[1])

    def variant(name, edit):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        m = json.loads((dst / "manifest.json").read_text())
        edit(m)
        (dst / "manifest.json").write_text(json.dumps(m))
        return dst

    def no_graph(m):
        del m["graphs"]["prior_fused"]

    def wrong_op(m):
        m["tokenizer"]["prior"]["fused_attention"] = "com.microsoft::Attention"

    def standard_file(m):  # claims prior.onnx is the fused graph: no DecodeAttention node in it
        m["graphs"]["prior_fused"] = m["graphs"]["prior"]

    def other_io(m):
        m["graphs"]["prior_fused"]["outputs"] = m["graphs"]["prior_fused"]["outputs"][:1]

    for name, edit, msg in [("no_graph", no_graph, "fused_graph 'prior_fused' is not a graph of the bundle"),
                            ("wrong_op", wrong_op, "fused_attention is 'com.microsoft::Attention'"),
                            ("standard_file", standard_file, "but it has no such node"),
                            ("other_io", other_io, "other inputs/outputs than prior.onnx")]:
        with pytest.raises(BundleError, match=msg):
            Bundle(variant(name, edit))


def test_prior_graph_argument_is_checked(prior_bundle):
    with pytest.raises(ValueError, match="prior_graph must be one of auto, fused, standard, got 'fast'"):
        Engine(prior_bundle[1], prior_graph="fast")
    with pytest.raises(ValueError, match="the torch backend takes prior_graph='auto'"):
        Engine(prior_bundle[1], backend="torch", prior_graph="fused")


@needs_ort_lib
def test_fused_graph_shares_prior_onnx_external_weights(tmp_path, monkeypatch):
    """A prior big enough for external data (forced here): prior_fused.onnx reads prior.onnx.data, no second copy."""
    from larp_rt.export import trace

    monkeypatch.setattr(trace, "EXTERNAL_DATA_BYTES", 0)
    save_pretrained(tiny_prior_tokenizer(seed=3), tmp_path / "tok")
    path = export_bundle(tmp_path / "tok", None, tmp_path / "b", onnx_only=True, **quiet)
    b = Bundle(path)
    assert b.manifest["graphs"]["prior"]["data"] == b.manifest["graphs"]["prior_fused"]["data"] == ["prior.onnx.data"]
    assert (path / "prior_fused.onnx").stat().st_size < (path / "prior.onnx.data").stat().st_size / 4
    fused, std = Engine(path), Engine(path, prior_graph="standard")
    assert fused.prior_graph_name == "prior_fused"
    tokens = np.random.default_rng(13).integers(0, 1024, (2, 64))
    lp_fused, lp_std = fused.prior_logprobs(tokens, method="steps"), std.prior_logprobs(tokens, method="steps")
    assert np.abs(lp_fused - lp_std).max() < 1e-4
