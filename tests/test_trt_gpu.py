"""The TensorRT backend on a GPU: plan outputs against ONNX Runtime, greedy tokens against the ONNX Runtime
backend, CUDA-graph replay against the eager step, weight-stripped plans. Marked ``gpu`` and ``tensorrt``; they
skip with a reason where there is no usable GPU or no TensorRT (they never ran on the CPU-only build machine)."""

import importlib.util
import os
import shutil

import numpy as np
import pytest
import torch
from larp_rt.export import export_bundle, trt_build

from larp_rt import Bundle, Engine, GeneratorConfig, SamplingParams, TokenizerConfig, save_pretrained
from larp_rt.backends.tensorrt import probe_gpus
from larp_rt.models import LARPGenerator, LARPTokenizer

HAVE_TRT = any(importlib.util.find_spec(m) is not None for m in ("tensorrt_rtx", "tensorrt"))
GPUS, WHY = probe_gpus() if HAVE_TRT else ([], "")
pytestmark = [
    pytest.mark.gpu, pytest.mark.tensorrt,
    pytest.mark.skipif(not HAVE_TRT, reason="needs TensorRT-RTX or TensorRT: pip install 'larp_rt[tensorrt]'"),
    pytest.mark.skipif(HAVE_TRT and not GPUS, reason=f"needs a usable NVIDIA GPU for plan execution ({WHY})"),
]
# max |TensorRT - ONNX Runtime| (float32 plans; TensorRT may reorder reductions and use TF32 off by default)
TOL = {"logits": 2e-3, "video": 1e-3, "present": 1e-3}


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    root = tmp_path_factory.mktemp("trtgpu")
    torch.manual_seed(0)
    tok = LARPTokenizer(TokenizerConfig.from_name("tiny"))
    gen = LARPGenerator(GeneratorConfig.from_name("tiny"))
    torch.nn.init.normal_(gen.output.weight, std=0.3)  # peaked: greedy has no near-ties
    save_pretrained(tok.eval(), root / "tok")
    save_pretrained(gen.eval(), root / "gen")
    b = export_bundle(root / "tok", root / "gen", root / "b", onnx_only=True, printer=lambda s: None)
    flavour = "rtx" if importlib.util.find_spec("tensorrt_rtx") else "tensorrt"
    trt_build.build_plans(b, trt=flavour, batch="1,2,4", compute_capability=None, printer=lambda s: None)
    return b


def test_plan_outputs_match_onnx_runtime(planned):
    # sampler="reference": the runner returns the step's logits (the device sampler would return tokens)
    trt = Engine(planned, backend="tensorrt", sampler="reference")
    ort = Engine(planned, backend="onnxruntime", device="cpu")
    rng = np.random.default_rng(0)
    cfg = trt.tokenizer_config
    tokens = rng.integers(0, cfg.codebook_size, (3, cfg.num_tokens))
    np.testing.assert_allclose(trt.decode(tokens), ort.decode(tokens), atol=TOL["video"])
    video = ort.decode(tokens)
    assert (trt.encode(video) == ort.encode(video)).mean() > 0.99  # argmax over cosines: near-ties may differ
    # one decode step, rows at their own positions, against decode.onnx
    be = trt.backend
    r_trt, r_ort = be.new_runner(4), ort.backend.new_runner(4)
    V = trt.generator_config.vocab_size
    tok = np.array([V + 1, V + 2, 5, 7], np.int64)
    pos = np.zeros(4, np.int64)
    assert not r_trt.samples
    np.testing.assert_allclose(r_trt.run(tok, pos).copy(), r_ort.run(tok, pos), atol=TOL["logits"])
    # a second step: rows at different positions read the slots the first step wrote on the device
    tok2, pos2 = np.array([3, 4, V + 3, 9], np.int64), np.array([1, 1, 0, 1], np.int64)
    np.testing.assert_allclose(r_trt.run(tok2, pos2).copy(), r_ort.run(tok2, pos2), atol=TOL["logits"])


def test_greedy_tokens_equal_the_onnx_runtime_backend(planned):
    p = SamplingParams(seed=0, temperature=0.0, cfg_scale=1.0)
    want = Engine(planned, backend="onnxruntime", device="cpu").generate([1, 2, 3], p).tokens
    got = Engine(planned, backend="tensorrt").generate([1, 2, 3], p).tokens
    np.testing.assert_array_equal(got, want)


def test_seeded_sampling_equals_the_onnx_runtime_backend(planned):
    p = SamplingParams(seed=3, temperature=1.0, top_k=20, top_p=0.9, cfg_scale=1.0)
    want = Engine(planned, backend="onnxruntime", device="cpu").generate([0, 4], p).tokens
    got = Engine(planned, backend="tensorrt").generate([0, 4], p).tokens
    assert (got == want).mean() > 0.95  # same Philox draws; a draw at a near-tie of the CDF may flip


def test_cuda_graph_replay_equals_the_eager_step(planned, monkeypatch):
    p = SamplingParams(seed=5, temperature=0.0, cfg_scale=1.0)
    graphs = Engine(planned, backend="tensorrt").generate([1, 2], p).tokens
    monkeypatch.setenv("LARP_RT_TRT_CUDA_GRAPHS", "0")
    eager = Engine(planned, backend="tensorrt").generate([1, 2], p).tokens
    np.testing.assert_array_equal(graphs, eager)


def test_chunked_generation_equals_the_per_step_loop(planned, monkeypatch):
    p = SamplingParams(seed=6, temperature=1.0, top_k=30, cfg_scale=1.0)
    chunked = Engine(planned, backend="tensorrt").generate([1, 2, 3], p).tokens
    monkeypatch.setenv("LARP_RT_TRT_CHUNK", "0")
    per_step = Engine(planned, backend="tensorrt").generate([1, 2, 3], p).tokens
    np.testing.assert_array_equal(chunked, per_step)


def test_strip_weights_plans_are_smaller_than_their_weights(planned, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(planned, dst)
    plans = trt_build.build_plans(dst, batch="1", strip_weights=True, printer=lambda s: None, graphs=["decode"])
    e = plans["decode"]
    assert e["weights"] == "stripped" and e["size"] < e["onnx_bytes"]
    assert Bundle(dst).manifest["plans"]["decode"]["weights"] == "stripped"
    p = SamplingParams(seed=0, temperature=0.0, cfg_scale=1.0)
    want = Engine(planned, backend="onnxruntime", device="cpu").generate([1], p).tokens
    got = Engine(dst, backend="tensorrt").generate([1], p).tokens  # refitted at load from decode.onnx
    np.testing.assert_array_equal(got, want)
    assert os.path.getsize(dst / e["file"]) == e["size"]
