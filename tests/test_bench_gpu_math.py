"""The roofline arithmetic of benchmarks/bench_gpu.py (larp_rt.bench) and a CPU smoke run of the harness."""

import json
import sys
from pathlib import Path

import pytest
import torch

from larp_rt import GeneratorConfig, TokenizerConfig
from larp_rt.bench import (
    copy_bandwidth,
    decoder_flops,
    floor_ratio,
    generator_step_weight_bytes,
    kv_cache_step_bytes,
    weight_read_floor,
)
from larp_rt.models import LARPGenerator, LARPTokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_step_weight_bytes_by_hand_for_the_released_generator():
    cfg = GeneratorConfig.from_name("ar-lp")
    per_layer = 3 * 1280 * 1280 + 1280 * 1280 + 3 * 1280 * 3584 + 2 * 1280  # wqkv, wo, w1/w3/w2, two norms
    params = 30 * per_layer + 1280 + 8192 * 1280 + 2 * 1280 + 1280  # norm, output, 2 embedding rows, 1 position row
    assert generator_step_weight_bytes(cfg, rows=2) == 2 * params == 1_240_104_960
    assert generator_step_weight_bytes(cfg, rows=64, bytes_per_param=4) == 4 * (params + 62 * 1280)
    with pytest.raises(ValueError, match="rows"):
        generator_step_weight_bytes(cfg, rows=-1)


def test_step_weight_bytes_match_the_model_parameters():
    with torch.device("meta"):
        gen = LARPGenerator(GeneratorConfig.from_name("ar-lp"))
    gathered = {"tok_embeddings.weight", "cls_embedding.embedding_table.weight", "abs_pe"}  # one row per use
    full = sum(p.numel() for n, p in gen.named_parameters() if n not in gathered)
    D = gen.config.dim
    assert generator_step_weight_bytes(gen.config, rows=8, bytes_per_param=2) == 2 * (full + 8 * D + D)
    total = sum(p.numel() for p in gen.parameters())
    assert 631e6 < total < 633e6  # the released 632M generator


def test_kv_cache_bytes_floor_and_bandwidth():
    cfg = GeneratorConfig.from_name("ar-lp")
    assert kv_cache_step_bytes(cfg, rows=2, cache_len=1024) == 2 * 30 * 2 * 1024 * 1280 * 2 == 314_572_800
    assert copy_bandwidth(1 << 30, 1e-3) == 2 * (1 << 30) / 1e-3  # read + write
    assert weight_read_floor(10**9, 2e12) == pytest.approx(5e-4)
    assert floor_ratio(1e-3, 10**9, 2e12) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="bandwidth"):
        weight_read_floor(1, 0.0)
    with pytest.raises(ValueError, match="seconds"):
        copy_bandwidth(1, 0.0)


def test_decoder_flops_match_torch_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    tok = LARPTokenizer(TokenizerConfig.from_name("tiny")).eval()
    idx = torch.randint(0, 1024, (2, 64))
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as fc:  # math SDPA: counted matmuls
        tok.decode(idx)
    assert fc.get_total_flops() == decoder_flops(tok.config, batch=2)
    N, P, D, L = 1024, 1024, 768, 2048  # larp-l by hand: 12 blocks over 2048 tokens, width 768
    want = 2 * N * 16 * D + 12 * (24 * L * D * D + 4 * L * L * D) + 2 * P * D * (4 * 8 * 8 * 3)
    assert decoder_flops(TokenizerConfig.from_name("larp-l"), batch=8) == 8 * want


def test_harness_runs_on_the_cpu(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_gpu
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    threads = torch.get_num_threads()
    try:
        res = bench_gpu.main(["--device", "cpu", "--preset", "tiny", "--batches", "1,2", "--decode-batch", "2",
                              "--decode-repeats", "2", "--bw-mib", "16", "--json", str(tmp_path / "out.json")])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["cases"] == res["cases"] and [c["batch"] for c in saved["cases"]] == [1, 2]
    for case in saved["cases"]:
        for path in ("fast", "authors"):
            r = case[path]
            for key in ("step_ms_p50", "step_ms_p90", "ttft_ms", "tokens_per_s", "s_per_video", "achieved_GBps",
                        "floor_ratio", "floor_ms", "weight_bytes"):
                assert r[key] > 0, (path, key)
        assert case["speedup_step"] > 0 and case["fast"]["rows"] == 2 * case["batch"]
    assert saved["decode"]["tflops"] > 0 and saved["bandwidth"]["GBps"] > 0
    assert saved["device"] == "cpu" and saved["torch"] == torch.__version__
    last = capsys.readouterr().out.strip().splitlines()[-1]
    line = json.loads(last)
    assert line["bench"] == "gpu_generation" and set(line["floor_ratio"]) == {"1", "2"}
