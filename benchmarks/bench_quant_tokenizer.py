"""The int8 tokenizer (export/quantize_tokenizer.py) against float32 on ONNX Runtime (CPU): LARP-S encode and decode
(random weights, 16x128x128 clips, 1024 tokens), every variant tried side by side, interleaved in one run; and the
quality of each on the trained tiny tokenizer's held-out clips (PSNR/SSIM against the clips and against float32's
reconstruction, encoder index agreement with float32).

    .venv/bin/python benchmarks/bench_quant_tokenizer.py [--repeats 5] [--batch4-repeats 3] [--variants all]
        [--json benchmarks/results/quant_tokenizer.json] [--note "quiet machine"] [--gap 0.1]

Runtime: about 3 min on the near-idle 2-core host, 6.5 min when it is loaded (the first run also exports LARP-S in
float32 and int8, ~3 min more, cached under .benchmarks/bundles); `--variants fp32,int8 --batch4-repeats 0` is the
quick one (~1 min).
Ends with one JSON line.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from conftest import CACHE, cached_bundle  # noqa: E402
from larp_rt.export.quantize_tokenizer import SPLIT_QKV  # noqa: E402

from larp_rt.bench import machine_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "checkpoints/tiny/tokenizer"
PRESET = "larp-s"
PSNR_BOUND_DB = 0.5  # the bound for a recommended tokenizer variant


def tokenizer_bundles(preset: str, tok_dir: Path | None, name: str) -> dict[str, Path]:
    """{"fp32", "int8"}: tokenizer-only bundles, cached (random weights as benchmarks/conftest.py makes them when
    ``tok_dir`` is None)."""
    from larp_rt.export import export_bundle

    from larp_rt import TokenizerConfig, save_pretrained
    from larp_rt.bundle import Bundle
    from larp_rt.models import LARPTokenizer

    if tok_dir is None:
        tok_dir = CACHE / f"{name}-ckpt" / "tokenizer"
        if not (tok_dir / "model.safetensors").exists():
            torch.manual_seed(0)
            tok = LARPTokenizer(TokenizerConfig.from_name(preset))
            torch.nn.init.normal_(tok.final_layer.linear.weight, std=0.02)
            save_pretrained(tok, tok_dir)
    out = {}
    for p in ("fp32", "int8"):
        path = CACHE / f"{name}-{p}"
        b = cached_bundle(path)
        stale = p == "int8" and b is not None and (Bundle(b).manifest["tokenizer"].get("quantization") or {}).get(
            "split_qkv") != SPLIT_QKV  # exported by an older int8 path
        if b is None or stale:
            print(f"exporting {name} tokenizer ({p}) to {path}", flush=True)
            export_bundle(tok_dir, None, path, tokenizer_precision=p, onnx_only=True, overwrite=True,
                          printer=lambda s: None)
        out[p] = path
    return out


def variant_graphs(bundles: dict[str, Path], tok_dir: Path, names: list[str], calib: dict) -> dict[str, dict]:
    """{variant: {"encoder": path, "decoder": path}}: the shipped fp32/int8 graphs and each explored variant
    (built from the fp32 bundle's graphs, cached beside it, rebuilt when the fp32 graphs change)."""
    import onnx
    from larp_rt.export import quantize_tokenizer as QT

    from larp_rt import load_pretrained
    from larp_rt.bundle import Bundle

    b32 = Bundle(bundles["fp32"])
    out = {p: {g: Bundle(bundles[p]).graph_path(g) for g in ("encoder", "decoder")} for p in ("fp32", "int8")}
    vdir = bundles["fp32"].with_name(bundles["fp32"].name + "-variants")
    vdir.mkdir(exist_ok=True)
    stamp = {g: b32.files[b32.graph(g).file] for g in ("encoder", "decoder")}
    stamp["split_qkv"] = QT.SPLIT_QKV  # how the fused variants are traced
    stamp_path = vdir / "stamp.json"
    if not stamp_path.exists() or json.loads(stamp_path.read_text()) != stamp:
        for f in vdir.glob("*.onnx"):
            f.unlink()
        stamp_path.write_text(json.dumps(stamp))
    todo = [v for v in names if v not in out and not all((vdir / f"{g}.{v}.onnx").exists()
                                                          for g in ("encoder", "decoder"))]
    if todo:
        tok = load_pretrained(tok_dir, kind="tokenizer").eval()
        fused = dict(zip(("encoder", "decoder"), QT.trace_fused(tok, 17), strict=True))
        packed = dict(zip(("encoder", "decoder"), QT.trace_fused(tok, 17, split_qkv=False), strict=True))
        plain = {g: onnx.load(str(b32.graph_path(g))) for g in ("encoder", "decoder")}
        for v in todo:
            for g in ("encoder", "decoder"):
                t = time.perf_counter()
                m = QT.build_variant(v, plain[g], fused[g], tok.config.code_dim, calib[g], packed=packed[g])
                onnx.save_model(m, str(vdir / f"{g}.{v}.onnx"))
                print(f"  built {g}.{v} ({time.perf_counter() - t:.1f} s)", flush=True)
    for v in names:
        if v not in out:
            out[v] = {g: vdir / f"{g}.{v}.onnx" for g in ("encoder", "decoder")}
    return out


def cpu_flags() -> list[str]:
    """The CPU features the int8/bf16 choice depends on (from /proc/cpuinfo)."""
    try:
        flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
            if f in flags]


def session(path: Path):
    so = ort.SessionOptions()  # as the ONNX Runtime backend: all graph optimisations, every core
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def calibration(fp32: dict[str, Path], cfg, n: int, seed: int) -> dict[str, list[dict]]:
    """Feeds for the static variant: the float32 decoder's clips of random tokens (encoder) and the float32
    encoder's tokens of those clips (decoder)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, cfg.codebook_size, (n, cfg.num_tokens)).astype(np.int64)
    dec, enc = session(fp32["decoder"]), session(fp32["encoder"])
    clips = [dec.run(["video"], {"indices": idx[i:i + 1]})[0] for i in range(n)]
    toks = [enc.run(["indices"], {"video": c})[0] for c in clips]
    return {"encoder": [{"video": c} for c in clips], "decoder": [{"indices": t} for t in toks]}


def speed(graphs: dict[str, dict], cfg, batch: int, repeats: int, variants: list[str], gap: float = 0.1) -> list[dict]:
    """Interleaved medians; ``gap`` seconds idle before each run: an ONNX Runtime session's worker threads spin
    after its run and would take the cores from the next variant's (measured on one attention block: ~2x)."""
    rng = np.random.default_rng(batch)
    C, T, H, W = cfg.video_shape
    feeds = {"encoder": {"video": rng.random((batch, C, T, H, W), dtype=np.float32)},
             "decoder": {"indices": rng.integers(0, cfg.codebook_size, (batch, cfg.num_tokens)).astype(np.int64)}}
    rows = []
    for g in ("encoder", "decoder"):
        sess = {v: session(graphs[v][g]) for v in variants}
        for s in sess.values():  # warm-up: buffers, thread pools
            s.run(None, feeds[g])
        times = {v: [] for v in variants}
        for _ in range(repeats):
            for v in variants:  # interleaved: the host's swings hit every variant alike
                time.sleep(gap)
                t = time.perf_counter()
                sess[v].run(None, feeds[g])
                times[v].append(time.perf_counter() - t)
        ref = statistics.median(times["fp32"])
        for v in variants:
            med = statistics.median(times[v])
            rows.append({"graph": g, "batch": batch, "variant": v, "median_ms": 1e3 * med,
                         "speedup_vs_fp32": ref / med, "runs_ms": [round(1e3 * t, 1) for t in times[v]]})
            print(f"  {PRESET} {g} batch {batch} {v:<13} {1e3 * med:8.1f} ms  x{ref / med:.2f} vs fp32", flush=True)
        del sess
    return rows


def quality(graphs: dict[str, dict], variants: list[str], n: int) -> list[dict]:
    """Each variant on the tiny tokenizer's held-out clips (the training recipe's synthetic val set)."""
    from larp_rt.training.data import SyntheticVideos
    from larp_rt.training.evaluate import psnr, ssim

    cfg = json.loads((ROOT / "checkpoints/tiny/train_config.json").read_text())["tokenizer"]
    ds = SyntheticVideos(cfg["val_size"], seed=cfg["data_seed"] + 1, frames=8, height=32, width=32,
                         num_classes=cfg["num_classes"])
    n = min(n, len(ds))
    clips = np.stack([ds[i][0].numpy() for i in range(n)])
    gt = torch.from_numpy(clips)
    out, ref = [], None
    for v in variants:
        enc, dec = session(graphs[v]["encoder"]), session(graphs[v]["decoder"])
        idx = np.concatenate([enc.run(["indices"], {"video": clips[i:i + 64]})[0] for i in range(0, n, 64)])
        rec = np.concatenate([dec.run(["video"], {"indices": idx[i:i + 64]})[0] for i in range(0, n, 64)])
        r = torch.from_numpy(rec)
        if ref is None:
            ref = (idx, r)
        row = {"variant": v, "clips": n, "psnr_db": float(psnr(r, gt).mean()), "ssim": float(ssim(r, gt).mean()),
               "psnr_vs_fp32_recon_db": float(psnr(r, ref[1]).mean()) if v != "fp32" else None,
               "indices_agreement": float((idx == ref[0]).mean())}
        out.append(row)
    base = out[0]["psnr_db"]
    for row in out:
        row["psnr_drop_db"] = base - row["psnr_db"]
        row["within_bound"] = row["psnr_drop_db"] <= PSNR_BOUND_DB
        print(f"  tiny {row['variant']:<13} PSNR {row['psnr_db']:.2f} dB (drop {row['psnr_drop_db']:+.3f}), SSIM "
              f"{row['ssim']:.4f}, vs fp32 recon {row['psnr_vs_fp32_recon_db'] or float('inf'):.1f} dB, indices "
              f"agree {row['indices_agreement']:.4f}", flush=True)
    return out


def main() -> None:
    from larp_rt.export.quantize_tokenizer import VARIANTS

    from larp_rt.bundle import Bundle

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per variant and graph at batch 1")
    ap.add_argument("--batch4-repeats", type=int, default=3, help="timed runs of fp32 and int8 at batch 4 (0: skip)")
    ap.add_argument("--variants", default="all", help=f"fp32,int8 and any of {','.join(VARIANTS)} (default all)")
    ap.add_argument("--gap", type=float, default=0.1, help="idle seconds before each timed run (spinning threads)")
    ap.add_argument("--clips", type=int, default=256, help="held-out clips of the tiny tokenizer for quality")
    ap.add_argument("--json", help="also write the result to this file (benchmarks/results/quant_tokenizer.json)")
    ap.add_argument("--note", default="", help="how the machine was loaded while measuring (recorded in the JSON)")
    args = ap.parse_args()
    names = ["fp32", "int8", *VARIANTS] if args.variants == "all" else args.variants.split(",")
    if names[:2] != ["fp32", "int8"]:
        names = ["fp32", "int8", *[v for v in names if v not in ("fp32", "int8")]]
    bad = [v for v in names if v not in ("fp32", "int8", *VARIANTS)]
    if bad:
        ap.error(f"unknown variants {bad}; known: fp32, int8, {', '.join(VARIANTS)}")
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    # LARP-S: speed
    big = tokenizer_bundles(PRESET, None, f"tok-{PRESET}")
    cfg = Bundle(big["fp32"]).tokenizer_config
    calib = calibration({g: Bundle(big["fp32"]).graph_path(g) for g in ("encoder", "decoder")}, cfg, 2, 0) \
        if "static" in names else {"encoder": None, "decoder": None}
    graphs = variant_graphs(big, CACHE / f"tok-{PRESET}-ckpt" / "tokenizer", names, calib)
    print(f"{PRESET} tokenizer ({cfg.num_tokens} tokens, {cfg.frames}x{cfg.height}x{cfg.width}), ONNX Runtime "
          f"{ort.__version__} CPU, {machine_name()}", flush=True)
    rows = speed(graphs, cfg, 1, args.repeats, names, args.gap)
    if args.batch4_repeats > 0:
        rows += speed(graphs, cfg, 4, args.batch4_repeats, ["fp32", "int8"], args.gap)
    # tiny: quality
    tiny = tokenizer_bundles("tiny", TINY, "tok-tiny")
    calib_t = {"encoder": None, "decoder": None}
    if "static" in names:
        from larp_rt.training.data import SyntheticVideos

        train = SyntheticVideos(64, seed=0, frames=8, height=32, width=32, num_classes=8)  # training clips
        clips = [train[i][0].numpy()[None] for i in range(16)]
        enc = session(Bundle(tiny["fp32"]).graph_path("encoder"))
        calib_t = {"encoder": [{"video": c} for c in clips],
                   "decoder": [{"indices": enc.run(["indices"], {"video": c})[0]} for c in clips]}
    tgraphs = variant_graphs(tiny, TINY, names, calib_t)
    qual = quality(tgraphs, names, args.clips)
    b1 = {(r["graph"], r["variant"]): r for r in rows if r["batch"] == 1}
    goal = {g: b1[(g, "int8")]["speedup_vs_fp32"] >= 2.0 for g in ("encoder", "decoder")}
    out = {"bench": "quant_tokenizer", "machine": machine_name(), "cpu_flags": cpu_flags(),
           "onnxruntime": ort.__version__,
           "torch_threads": torch.get_num_threads(), "note": args.note,
           "loadavg_start": [round(x, 2) for x in load0], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
           "preset": PRESET, "gap_s": args.gap, "shipped": "int8 = fused+dyn-pc",
           "variants": {"fp32": "as exported", "int8": "shipped", **VARIANTS},
           "speed": rows, "quality_tiny": qual, "psnr_bound_db": PSNR_BOUND_DB,
           "goal_2x_met": goal, "wall_s": round(time.perf_counter() - t0, 1)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
