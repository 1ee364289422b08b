"""TensorRT plan builds on this CPU (TensorRT-RTX ahead of time, no GPU): build time and plan size per graph and
precision, beside the ONNX graph's size.

    .venv/bin/python benchmarks/bench_trt_build.py [--presets tiny,small] [--precisions fp32,fp16] \
        [--batch 1,2,4,8,16] [--out benchmarks/results/trt_build_cpu.json]

Presets: ``tiny`` and ``small`` (random weights, the benchmark bundles of benchmarks/conftest.py, cached under
.benchmarks/bundles), and ``authors``: the authors' released shapes, a ``larp-l`` tokenizer (172M) with an
``ar-lp`` generator (632M), random weights (exports ~3 GB of ONNX per precision; minutes and ~16 GB of memory on
2 cores). Each build runs on a copy of the bundle with the default profile set (one per batch bucket, KV length
1..max_seq), one build per graph, so the times include parsing. GPU execution speed is not measured here (no GPU).
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import CACHE, build_bundle, cached_bundle  # noqa: E402

from larp_rt.bench import machine_name  # noqa: E402


def _bundle(preset: str, precision: str) -> Path:
    """The cached random-weight bundle of ``preset`` at ``precision`` (fp32 from conftest; others exported from the
    same checkpoints)."""
    from larp_rt.export import export_bundle

    from larp_rt import GeneratorConfig, TokenizerConfig, save_pretrained
    from larp_rt.models import LARPGenerator, LARPTokenizer

    if preset != "authors" and precision == "fp32":
        return build_bundle(preset)
    out = CACHE / f"{preset}-{precision}"
    if cached_bundle(out) is not None:
        return out
    ck = CACHE / f"{preset}-ckpt"
    if not (ck / "generator" / "config.json").exists():
        if preset != "authors":
            build_bundle(preset)
        else:
            torch.manual_seed(0)
            save_pretrained(LARPTokenizer(TokenizerConfig.from_name("larp-l")), ck / "tokenizer")
            save_pretrained(LARPGenerator(GeneratorConfig.from_name("ar-lp")), ck / "generator")
    return export_bundle(ck / "tokenizer", ck / "generator", out, precision=precision, onnx_only=True, verify=False,
                         overwrite=True, printer=lambda s: None)


def main() -> None:
    from larp_rt.export import trt_build

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--precisions", default="fp32,fp16")
    ap.add_argument("--batch", default="1,2,4,8,16")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "trt_build_cpu.json"))
    args = ap.parse_args()
    trt = trt_build.import_trt("rtx")
    rows = []
    load0 = os.getloadavg()
    t_all = time.perf_counter()
    for preset in args.presets.split(","):
        for prec in args.precisions.split(","):
            src = _bundle(preset, prec)
            with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
                dst = Path(tmp) / "b"
                shutil.copytree(src, dst)
                plans = trt_build.build_plans(dst, trt="rtx", batch=args.batch, printer=print)
            for name, e in plans.items():
                rows.append({"preset": preset, "precision": prec, "graph": name, "build_s": e["build_seconds"],
                             "plan_mb": round(e["size"] / 1e6, 2), "onnx_mb": round(e["onnx_bytes"] / 1e6, 2),
                             "profiles": len(e["profiles"])})
    print(f"\n{'preset':<8} {'prec':<5} {'graph':<12} {'build s':>8} {'plan MB':>9} {'onnx MB':>9} {'plan/onnx':>9}")
    for r in rows:
        print(f"{r['preset']:<8} {r['precision']:<5} {r['graph']:<12} {r['build_s']:8.2f} {r['plan_mb']:9.2f} "
              f"{r['onnx_mb']:9.2f} {r['plan_mb'] / max(r['onnx_mb'], 1e-9):9.2f}")
    out = {
        "bench": "trt_build_cpu", "machine": f"{machine_name()}, python {platform.python_version()}",
        "builder": f"tensorrt-rtx {trt.__version__} (CPU-only ahead-of-time build, no GPU)",
        "batch_buckets": args.batch, "rows": rows, "total_s": round(time.perf_counter() - t_all, 1),
        "loadavg_before": load0, "loadavg_after": os.getloadavg(),
        "gpu_execution": "unmeasured (no GPU on this machine)",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("bench", "machine", "builder", "total_s")}))


if __name__ == "__main__":
    main()
