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


def cached_bundle(out: Path) -> Path | None:
    """``out`` when it holds a bundle this larp_rt reads; None when there is none or it is refused (an older format
    version, altered files: it is rebuilt, never used)."""
    from larp_rt.bundle import Bundle, BundleError

    if not (out / "manifest.json").exists():
        return None
    try:
        Bundle(out)
        return out
    except BundleError as e:
        print(f"rebuilding the cached bundle {out}: {e}", file=sys.stderr)
        return None


def build_bundle(preset: str) -> Path:
    """Random-weight tokenizer + generator of a preset, exported once (output layers given weights) and reused
    while this larp_rt reads it (a cached bundle it refuses, e.g. of an older format version, is rebuilt)."""
    from larp_rt.export import export_bundle

    from larp_rt import GeneratorConfig, TokenizerConfig, save_pretrained
    from larp_rt.models import LARPGenerator, LARPTokenizer

    out = CACHE / preset
    if cached_bundle(out) is not None:
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


def measure_bandwidth(repeats: int = 5, nbytes: int = 1 << 27) -> float:
    """Memory read bandwidth (GB/s): torch's multi-threaded sum over ``nbytes`` (128 MiB: ~4x the L3 here, about
    the small generator's weights), median of ``repeats`` after one warm-up.

    Idle gaps before and after: ONNX Runtime's worker threads spin for a while after a run and torch's after a
    reduction; either would steal the other's cores. Idle sessions are collected first for the same reason."""
    import gc

    gc.collect()
    time.sleep(0.1)
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    del x
    time.sleep(0.1)
    return nbytes / statistics.median(times) / 1e9


class BlockedFloor:
    """A step's floor ratio, robust to this host's bandwidth swings (it flips between ~33 and ~55 GB/s from one
    second to the next): pytest-benchmark times the rounds; this ``setup`` hook probes the bandwidth before every
    block of ``block`` rounds (then runs ``warm`` untimed steps so that no thread pool starts cold) and ``finish``
    probes once more after the last. Each block's median step time is set against the mean of the probes around
    it: ratio = time / (bytes / bandwidth). Reported: the median over blocks, their range, and every block.
    """

    def __init__(self, step, read_bytes: int, *, block: int = 10, warm: int = 3, **other_bytes: int):
        """read_bytes: the weights a step reads (-> floor_ratio); other_bytes: more byte counts to set the time
        against, each reported as ``<name>_ratio`` (e.g. weights + KV, or every parameter)."""
        self.step, self.read_bytes, self.block, self.warm = step, read_bytes, block, warm
        self.other_bytes = other_bytes
        self.probes: list[float] = []
        self.rounds = 0

    def setup(self) -> None:
        if self.rounds % self.block == 0:
            self.probes.append(measure_bandwidth())
            for _ in range(self.warm):
                self.step()
        self.rounds += 1

    def finish(self, times: list[float]) -> dict:
        if len(times) != self.rounds:
            raise RuntimeError(f"{len(times)} timings for {self.rounds} rounds: was the benchmark disabled?")
        self.probes.append(measure_bandwidth())
        blocks = []
        for j, start in enumerate(range(0, len(times), self.block)):
            bw = (self.probes[j] + self.probes[j + 1]) / 2
            t = statistics.median(times[start:start + self.block])
            blocks.append({"bandwidth_gbs": round(bw, 2), "median_ms": round(1e3 * t, 4),
                           "floor_ratio": round(t / (self.read_bytes / (bw * 1e9)), 4)})
        ratios = [b["floor_ratio"] for b in blocks]
        bw = statistics.median(self.probes)
        out = {"bandwidth_gbs": bw, "bandwidth_range_gbs": [min(self.probes), max(self.probes)],
               "floor_ms": 1e3 * self.read_bytes / (bw * 1e9), "floor_ratio": statistics.median(ratios),
               "floor_ratio_range": [min(ratios), max(ratios)], "blocks": blocks}
        for name, nbytes in self.other_bytes.items():
            out[name] = nbytes
            out[f"{name}_ratio"] = statistics.median(
                b["median_ms"] / 1e3 / (nbytes / (b["bandwidth_gbs"] * 1e9)) for b in blocks)
        return out


@pytest.fixture(scope="session")
def bandwidth() -> float:
    return measure_bandwidth()


@pytest.fixture(scope="session")
def param_bytes(bundles):
    """Bytes of every generator parameter, embedding tables included: the issue's "fp32 weight-read floor" for
    ``small`` (36M parameters, ~5 ms at 28-35 GB/s) counts these."""
    from larp_rt import load_pretrained

    out = {}
    for preset, path in bundles.items():
        gen = load_pretrained(path / "torch" / "generator")
        out[preset] = sum(p.numel() * p.element_size() for p in gen.parameters())
    return out


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
