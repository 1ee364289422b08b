"""Eager PyTorch baselines of the model code paths (CPU by default).

    .venv/bin/python -m pytest benchmarks/test_bench_torch_models.py --benchmark-only

Medians after warm-up; the engine/backends suite (ONNX Runtime vs torch vs the authors' loop) builds on these.
"""

import platform

import pytest
import torch

from larp_rt import GeneratorConfig, TokenizerConfig
from larp_rt.models import LARPGenerator, LARPTokenizer

torch.set_grad_enabled(False)


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


@pytest.fixture(scope="module", params=["tiny", "small"])
def tokenizer(request):
    torch.manual_seed(0)
    return LARPTokenizer(TokenizerConfig.from_name(request.param)).eval()


@pytest.fixture(scope="module", params=["tiny", "small"])
def generator(request):
    torch.manual_seed(0)
    return LARPGenerator(GeneratorConfig.from_name(request.param)).eval()


def test_tokenizer_encode(benchmark, tokenizer):
    video = torch.rand(1, *tokenizer.config.video_shape)
    benchmark.extra_info["machine"] = machine()
    benchmark(tokenizer.encode, video)


def test_tokenizer_decode(benchmark, tokenizer):
    tokens = torch.randint(0, tokenizer.config.codebook_size, (1, tokenizer.config.num_tokens))
    benchmark.extra_info["machine"] = machine()
    benchmark(tokenizer.decode, tokens)


@pytest.mark.parametrize("batch", [1, 8])
def test_generator_decode_step_cfg(benchmark, generator, batch):
    """One cached decode step with CFG rows (2 * batch rows) at position 512 of the sequence."""
    rows = 2 * batch
    generator.setup_caches(rows)
    generator.prefill(torch.zeros(rows, dtype=torch.int64))
    token = torch.zeros(rows, 1, dtype=torch.int64)
    pos = torch.tensor([min(512, generator.config.max_seq_len - 1)])
    benchmark.extra_info["machine"] = machine()
    benchmark.extra_info["weight_bytes"] = sum(p.numel() * p.element_size() for p in generator.parameters())
    benchmark(generator.decode_one_token, token, pos)
