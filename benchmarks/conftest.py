"""Shared fixtures of the benchmark suites: bundles (built once, cached under .benchmarks/), the machine's
name and its memory read bandwidth measured in the same run."""

import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # authors_loop

from larp_rt.bench import machine_name  # noqa: E402

CACHE = Path(__file__).resolve().parents[1] / ".benchmarks" / "bundles"


def build_bundle(preset: str) -> Path:
    """Random-weight tokenizer + generator of a preset, exported once (output layers given weights)."""
    from larp_rt.export import export_bundle

    from larp_rt import GeneratorConfig, TokenizerConfig, save_pretrained
    from larp_rt.models import LARPGenerator, LARPTokenizer

    out = CACHE / preset
    if (out / "manifest.json").exists():
        return out
    torch.manual_seed(0)
    tok = LARPTokenizer(TokenizerConfig.from_name(preset))
    gen = LARPGenerator(GeneratorConfig.from_name(preset))
    torch.nn.init.normal_(tok.final_layer.linear.weight, std=0.02)
    torch.nn.init.normal_(gen.output.weight, std=0.02)
    ck = CACHE / f"{preset}-ckpt"
    save_pretrained(tok, ck / "tokenizer")
    save_pretrained(gen, ck / "generator")
    from larp_rt import kernels

    return export_bundle(ck / "tokenizer", ck / "generator", out, overwrite=True, printer=lambda s: None,
                         fused_sampler=kernels.ort_custom_op_library() is not None)


@pytest.fixture(scope="session")
def bundles():
    return {p: build_bundle(p) for p in ("tiny", "small")}


@pytest.fixture(scope="session")
def machine():
    return f"{machine_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def measure_bandwidth(repeats: int = 7) -> float:
    """Memory read bandwidth (GB/s): multi-threaded sum over 1 GiB, median of ``repeats`` after warm-up.

    Idle ONNX Runtime sessions are collected first: their spinning worker threads would steal the cores."""
    import gc

    gc.collect()
    time.sleep(0.2)
    x = torch.ones(1 << 28, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times) / 1e9


@pytest.fixture(scope="session")
def bandwidth() -> float:
    return measure_bandwidth()


@pytest.fixture(scope="session")
def weight_bytes(bundles):
    """Bytes of generator weights one decode step reads (embedding tables only give one row: excluded)."""
    from larp_rt import load_pretrained

    out = {}
    for preset, path in bundles.items():
        gen = load_pretrained(path / "torch" / "generator")
        gathered = {"tok_embeddings.weight", "cls_embedding.embedding_table.weight", "abs_pe"}
        out[preset] = sum(p.numel() * p.element_size() for n, p in gen.named_parameters() if n not in gathered)
    return out
