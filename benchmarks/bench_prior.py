"""The tokenizer's AR prior on this CPU (ONNX Runtime): scoring throughput and per-step sampling latency, beside the
generator's step at the same batch.

    .venv/bin/python benchmarks/bench_prior.py [--repeats 3] [--batches 1,8] [--out benchmarks/results/prior_cpu.json]

Two shapes:

* ``tiny``: the committed trained tiny tokenizer (checkpoints/tiny/, prior 64 wide, 2 layers, 64 tokens, K 1024)
  beside the committed tiny generator;
* ``larp``: ``larp-l``'s prior shape (GPTC-S: 384 wide, 12 layers, 6 heads, 21.7M; 1024 tokens, K 8192) with random
  weights, on a tokenizer of larp-l's token geometry (16x128x128 clips) whose encoder/decoder are shrunk (they are
  not timed), beside the ``small`` generator (36M, V 8192, 1024 tokens; the CPU benchmark generator) with random
  weights.

Scoring (``Engine.prior_logprobs``): ``full`` = one causal forward over the whole sequence (prior_score.onnx),
``steps`` = N - 1 cached single steps of the engine's prior step graph; videos/s. Sampling:
``Engine.prior_generate`` from a 1-token prefix (N - 1 steps: prior step + host sampler) through each prior step
graph, ``prior_fused.onnx`` (larp_rt::DecodeAttention; the default where the kernels are built) and ``prior.onnx``
(standard ops, cache windows), and ``Engine.generate`` without guidance (N steps, the bundle's default sampler),
each as ms per step averaged over a whole video (every cache length 0 .. N-1), timed interleaved (fused, standard,
generator, fused, ...) so that load drifts hit all three alike. Medians of ``--repeats`` timed runs after a
warm-up. Ends with one JSON line. JSON fields per row: ``prior_step_ms`` (the engine's default graph, named by
``prior_graph``), ``prior_fused_step_ms`` (None when the bundle has no fused graph or the kernels are not built),
``prior_standard_step_ms``, ``generator_step_ms`` and their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import CACHE, build_bundle  # noqa: E402

from larp_rt import Engine, SamplingParams, TokenizerConfig, __version__, save_pretrained  # noqa: E402
from larp_rt.bench import machine_name, time_runs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "checkpoints" / "tiny"


def _bundle(name: str, tokenizer_dir: Path, generator_dir: Path | None) -> Path:
    from larp_rt.export import export_bundle

    from larp_rt import kernels
    from larp_rt.bundle import Bundle, BundleError

    out = CACHE / name
    if (out / "manifest.json").exists():
        try:
            prior = Bundle(out).prior_spec
            # a bundle cached before prior_fused.onnx existed is re-exported where the kernels can build it
            if prior is not None and (prior.fused_graph or kernels.ort_custom_op_library() is None):
                return out
        except BundleError:
            pass
    return export_bundle(tokenizer_dir, generator_dir, out, overwrite=True, onnx_only=True, printer=lambda s: None)


def bundles() -> dict[str, tuple[Path, Path]]:
    """name -> (prior bundle, generator bundle)."""
    from larp_rt.models import LARPTokenizer

    tiny = _bundle("prior-tiny", TINY / "tokenizer", TINY / "generator")
    ck = CACHE / "prior-larp-ckpt"
    if not (ck / "config.json").exists():
        torch.manual_seed(0)
        cfg = TokenizerConfig.from_name("larp-l", enc_dim=64, enc_depth=1, enc_heads=1, dec_dim=64, dec_depth=1,
                                        dec_heads=1).with_prior("larp")
        save_pretrained(LARPTokenizer(cfg), ck)
    return {"tiny": (tiny, tiny), "larp": (_bundle("prior-larp", ck, None), build_bundle("small"))}


def _warm_generate(eng: Engine, B: int) -> None:
    it = eng.generate_iter([0] * B, SamplingParams(cfg_scale=1.0, seed=0))
    for _ in range(4):
        next(it)
    it.close()


def _interleaved(fns: dict[str, object], repeats: int) -> dict[str, tuple[float, list[float]]]:
    """Each of ``fns`` timed ``repeats`` times, in turn (a, b, c, a, b, c, ...) -> name -> (median s, every run)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(time_runs(fn, 1)[0])
    return {k: (statistics.median(v), v) for k, v in times.items()}


def bench(name: str, prior_bundle: Path, gen_bundle: Path, batches: list[int], repeats: int) -> list[dict]:
    pe = Engine(prior_bundle, backend="onnxruntime", device="cpu")  # prior_graph "auto": fused where it runs
    ps = Engine(prior_bundle, backend="onnxruntime", device="cpu", prior_graph="standard")  # prior.onnx
    has_fused = pe.prior_graph_name != ps.prior_graph_name
    ge = pe if gen_bundle == prior_bundle else Engine(gen_bundle, backend="onnxruntime", device="cpu")
    cfg, pc = pe.tokenizer_config, pe.tokenizer_config.prior
    N, K = cfg.num_tokens, cfg.codebook_size
    rows = []
    for B in batches:
        tokens = np.random.default_rng(B).integers(0, K, (B, N))
        r = {"shape": name, "batch": B, "prior": f"{pc.dim}x{pc.depth} ({pc.heads} heads)", "N": N, "K": K,
             "generator": f"{ge.generator_config.dim}x{ge.generator_config.n_layer}",
             "generator_sampler": ge.sampler_name, "prior_graph": pe.prior_graph_name}
        for method in ("full", "steps"):
            pe.prior_logprobs(tokens, method=method)  # warm-up: sessions, buffers
            t, ts = time_runs(lambda m=method, x=tokens: pe.prior_logprobs(x, method=m), repeats)
            r[f"score_{method}_videos_per_s"] = B / t
            r[f"score_{method}_times_s"] = ts
        r["score_full_vs_steps"] = r["score_full_videos_per_s"] / r["score_steps_videos_per_s"]
        prefix = tokens[:, :1]
        p = SamplingParams(seed=0)  # temperature 1, no top-k/top-p
        priors = {"fused": pe, "standard": ps} if has_fused else {"standard": ps}
        for e in priors.values():
            e.prior_generate(tokens[:, : N - 4], p)  # warm-up: sessions, buffers
        _warm_generate(ge, B)
        fns = {f"prior_{k}": (lambda e=e, x=prefix, q=p: e.prior_generate(x, q)) for k, e in priors.items()}
        fns["generator"] = lambda b=B: ge.generate([0] * b, SamplingParams(cfg_scale=1.0, seed=0))
        timed = _interleaved(fns, repeats)
        for k in ("fused", "standard"):
            t, ts = timed.get(f"prior_{k}", (None, None))
            r[f"prior_{k}_step_ms"] = None if t is None else 1e3 * t / (N - 1)
            r[f"prior_{k}_video_times_s"] = ts
        default = "fused" if has_fused else "standard"  # what Engine(bundle) runs here
        r["prior_step_ms"] = r[f"prior_{default}_step_ms"]
        r["prior_video_times_s"] = r[f"prior_{default}_video_times_s"]
        t, ts = timed["generator"]
        r["generator_step_ms"] = 1e3 * t / ge.generator_config.max_seq_len
        r["generator_video_times_s"] = ts
        r["prior_vs_generator_step"] = r["prior_step_ms"] / r["generator_step_ms"]
        r["prior_standard_vs_generator_step"] = r["prior_standard_step_ms"] / r["generator_step_ms"]
        fused_ms = r["prior_fused_step_ms"]
        r["prior_fused_vs_generator_step"] = None if fused_ms is None else fused_ms / r["generator_step_ms"]
        r["prior_fused_vs_standard_step"] = None if fused_ms is None else fused_ms / r["prior_standard_step_ms"]
        fused_txt = "n/a" if fused_ms is None else f"{fused_ms:.3f} ms (x{r['prior_fused_vs_generator_step']:.2f})"
        print(f"{name} B={B}: score full {r['score_full_videos_per_s']:.1f} videos/s, steps "
              f"{r['score_steps_videos_per_s']:.2f} videos/s (full x{r['score_full_vs_steps']:.1f}); step: prior "
              f"fused {fused_txt}, standard {r['prior_standard_step_ms']:.3f} ms "
              f"(x{r['prior_standard_vs_generator_step']:.2f}), generator {r['generator_step_ms']:.3f} ms",
              flush=True)
        rows.append(r)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--shapes", default="tiny,larp")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prior_cpu.json"))
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    load0 = os.getloadavg()
    built = bundles()
    results = []
    for name in args.shapes.split(","):
        results += bench(name, *built[name], batches, args.repeats)
    load1 = os.getloadavg()
    import onnxruntime

    out = {
        "machine": f"{machine_name()}, python {platform.python_version()}",
        "versions": {"larp_rt": __version__, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
        "loadavg_before": load0, "loadavg_after": load1,
        "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats, "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("machine", "loadavg_before", "loadavg_after")}
                     | {"results": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                                     if not k.endswith("_times_s")} for r in results]}))


if __name__ == "__main__":
    main()
