"""Turn a pytest-benchmark JSON of test_bench_engine.py into markdown tables and results/engine_cpu.json; draw
the quantization figures from bench_quant.py's (and the quality helper's) JSON and the serving figures from
bench_serving.py's.

    python benchmarks/report.py benchmarks/results/engine_cpu_raw.json
    python benchmarks/report.py quant [--speed benchmarks/results/quant_speed.json]
        [--quality benchmarks/results/quant_quality.json] [--out-dir benchmarks/results]
    python benchmarks/report.py serving [--json benchmarks/results/serving_cpu.json] [--out-dir DIR]

``quant`` draws (matplotlib, pip install -e '.[bench]'):

* quant_step_position.png: step time against position per variant (batch 1, CFG), the float32 weight-read floor
  as a black line and each variant's own-bytes floor (its weights + the K/V it reads there) dashed in its colour;
* quant_tradeoff.png: ms per token (whole videos, batch 1) against validation loss and class accuracy (CFG 2.0)
  per variant, the variants that pass the quality bounds filled. Skipped, with a message, without the quality file.

``serving`` draws, beside the JSON (or in --out-dir), without re-running anything:

* <stem>_occupancy.png: one panel per variant, the batch occupancy (rows in use / max_batch) over each case's time,
  one line per client count (the other max_batch runs dotted);
* <stem>_throughput.png: videos/min against the number of clients, one line per variant, its one-at-a-time
  (sequential) throughput as a dashed line in its colour; beside it p50 latency against clients, the lone latency
  dashed.
"""

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
WEIGHT_COLOURS = {"fp32": ("#08306b", "#2171b5", "#6baed6"), "int8": ("#67000d", "#cb181d", "#fb6a4a"),
                  "int4": ("#00441b", "#238b45", "#74c476")}  # one hue per weight type, one shade per KV dtype
KV_ORDER = ("fp32", "fp16", "int8")
KV_MARKERS = {"fp32": "o", "fp16": "s", "int8": "^"}
AUTHORS_COLOUR = "#6a3d9a"

STEP_KEYS = ("pos", "max_seq", "sampler", "weight_read_bytes", "weights_kv_bytes", "param_bytes", "floor_ms",
             "floor_ratio", "floor_ratio_range", "weights_kv_bytes_ratio", "param_bytes_ratio", "bandwidth_gbs",
             "bandwidth_range_gbs", "blocks")


def main(raw_path: str) -> None:
    raw = json.loads(Path(raw_path).read_text())
    rows = []
    for b in raw["benchmarks"]:
        e = b["extra_info"]
        row = {k: e[k] for k in ("preset", "batch", "path", "op")}
        row["median_ms"] = 1e3 * b["stats"]["median"]
        if e["op"] == "step":
            row.update({k: e[k] for k in STEP_KEYS if k in e})
        rows.append(row)
    machine = raw["benchmarks"][0]["extra_info"]["machine"]
    steps = {(r["preset"], r["batch"], r["path"], r["pos"]): r for r in rows if r["op"] == "step"}
    mids = {(p, b, path): r for (p, b, path, pos), r in steps.items() if 2 * pos == r["max_seq"]}
    print(f"machine: {machine}\n")
    print("| preset | batch (CFG rows) | ONNX Runtime | torch eager | authors' loop | ORT vs authors | floor "
          "| ORT / floor (range over blocks) | ORT / (weights + KV) | ORT / (all parameters) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (preset, batch, path), r in sorted(mids.items()):
        if path != "onnxruntime":
            continue
        t, a = mids.get((preset, batch, "torch")), mids.get((preset, batch, "authors"))
        lo, hi = r["floor_ratio_range"]
        print(f"| {preset} | {batch} ({2 * batch}) | {r['median_ms']:.2f} ms | {t['median_ms']:.2f} ms | "
              f"{a['median_ms']:.2f} ms | {a['median_ms'] / r['median_ms']:.1f}x | {r['floor_ms']:.2f} ms | "
              f"{r['floor_ratio']:.2f} ({lo:.2f}-{hi:.2f}) | {r['weights_kv_bytes_ratio']:.2f} | "
              f"{r['param_bytes_ratio']:.2f} |")
    print("\n| ONNX Runtime step, batch 1 | position | median | bandwidth (range) | ORT / floor (range) "
          "| ORT / (weights + KV) | ORT / (all parameters) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (preset, batch, path, pos), r in sorted(steps.items()):
        if path == "onnxruntime" and batch == 1:
            (blo, bhi), (lo, hi) = r["bandwidth_range_gbs"], r["floor_ratio_range"]
            print(f"| {preset} | {pos} | {r['median_ms']:.2f} ms | {r['bandwidth_gbs']:.0f} GB/s "
                  f"({blo:.0f}-{bhi:.0f}) | {r['floor_ratio']:.2f} ({lo:.2f}-{hi:.2f}) | "
                  f"{r['weights_kv_bytes_ratio']:.2f} | {r['param_bytes_ratio']:.2f} |")
    print("\n| preset | op | batch | ONNX Runtime | torch eager |")
    print("| --- | --- | --- | --- | --- |")
    tok = {(r["preset"], r["op"], r["batch"], r["path"]): r["median_ms"] for r in rows if r["op"] != "step"}
    for preset, op, batch, path in sorted(tok):
        if path == "onnxruntime":
            print(f"| {preset} | {op} | {batch} | {tok[(preset, op, batch, path)]:.1f} ms | "
                  f"{tok.get((preset, op, batch, 'torch'), float('nan')):.1f} ms |")
    out = Path(raw_path).with_name("engine_cpu.json")
    out.write_text(json.dumps({"machine": machine, "results": rows}, indent=1) + "\n")
    print(f"\nwrote {out}")


STANDARD_PATH = "onnxruntime-standard"  # bench_quant.py: the portable decode.onnx + the C++ kernel sampler
STANDARD_COLOUR = "#b15928"


def _label(r: dict) -> str:
    if r["path"] == STANDARD_PATH:
        return "fp32 standard-ops decode.onnx + kernel sampler"
    return "authors' loop (torch fp32)" if r["path"] == "authors" else f"weights {r['weights']}, KV {r['kv']}"


def _colour(r: dict) -> str:
    if r["path"] == "authors":
        return AUTHORS_COLOUR
    if r["path"] == STANDARD_PATH:
        return STANDARD_COLOUR
    return WEIGHT_COLOURS[r["weights"]][KV_ORDER.index(r["kv"])]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        sys.exit("report.py quant draws with matplotlib: pip install -e '.[bench]'")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_step_position(speed: dict, out: Path, batch: int = 1) -> Path:
    """Step time against position per variant at ``batch`` (CFG rows), the floors as lines."""
    plt = _pyplot()
    steps = [r for r in speed["steps"] if r["batch"] == batch]
    if not steps:
        raise ValueError(f"{speed.get('command', 'the speed JSON')} has no step timings at batch {batch}")
    keys = list(dict.fromkeys((r["path"], r["weights"], r["kv"]) for r in steps))
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    floor32 = sorted((r["pos"], r["fp32_weight_floor_ms"]) for r in steps if r["path"] == "onnxruntime"
                     and (r["weights"], r["kv"]) == ("fp32", "fp32"))
    for k in keys:
        rows = sorted((r for r in steps if (r["path"], r["weights"], r["kv"]) == k), key=lambda r: r["pos"])
        c, pos = _colour(rows[0]), [r["pos"] for r in rows]
        ax.plot(pos, [r["ms"] for r in rows], color=c, marker=KV_MARKERS.get(k[2], "o"), lw=1.8,
                label=_label(rows[0]))
        ax.plot(pos, [r["own_bytes_floor_ms"] for r in rows], color=c, ls="--", lw=1, alpha=0.8)
    if floor32:
        ax.plot(*zip(*floor32, strict=True), color="black", lw=2.2, label="fp32 weight-read floor")
    ax.plot([], [], color="grey", ls="--", lw=1, label="own-bytes floor (weights + KV read), dashed per variant")
    ax.set_yscale("log")
    ax.set_xlabel("position (cache slots filled)")
    ax.set_ylabel("ms per step (log)")
    bw = sorted(r["bandwidth_gbs"] for r in steps)
    ax.set_title(f"{speed.get('preset', '')} decode step, batch {batch} with CFG ({2 * batch} rows), fused sampler\n"
                 f"{speed.get('machine', '')}; read bandwidth {bw[0]:.0f}-{bw[-1]:.0f} GB/s", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_tradeoff(speed: dict, quality: dict, out: Path, batch: int = 1) -> Path:
    """x: ms per token of whole videos at ``batch``; y: validation loss and class accuracy (CFG 2.0) of the same
    variant; passing variants filled, failing hollow, skipped or unmeasured ones left out (named in the title)."""
    plt = _pyplot()
    ms = {(r["weights"], r["kv"]): r["ms_per_token"] for r in speed["results"]
          if r.get("path", "onnxruntime") == "onnxruntime" and r["batch"] == batch}
    points, missing = [], []
    for q in quality.get("variants", []):
        k = (q["weights"], q["kv"])
        if q.get("status") != "ok" or k not in ms:
            missing.append(f"{k[0]}/{k[1]}")
            continue
        points.append((q, ms[k]))
    if not points:
        raise ValueError("no variant has both a speed (whole videos, batch 1) and a quality result")
    rel = all(q.get("val_loss_rel") is not None for q, _ in points)  # relative to fp32, in %: readable
    panels = [("val_loss_rel", "validation loss vs fp32 (%)", 100.0) if rel else
              ("val_loss", "validation loss (nats/token)", 1.0),
              ("class_accuracy_cfg2", "class accuracy, CFG 2.0 (%)", 100.0)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, (field, name, scale) in zip(axes, panels, strict=True):
        for q, x in points:
            if q.get(field) is None:
                continue
            r = {"path": "onnxruntime", **q}
            c = _colour(r)
            ax.scatter([x], [scale * q[field]], s=70, marker=KV_MARKERS[q["kv"]], zorder=3, edgecolors=c,
                       color=c if q.get("passes") else "white", linewidths=1.8,
                       label=_label(r) + (" (passes)" if q.get("passes") else " (fails)"))
        ax.set_xlabel(f"ms per token (whole video, batch {batch}, CFG)")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    title = (f"speed ({speed.get('preset', '')}, random weights, {speed.get('machine', '')}) against quality "
             f"({quality.get('preset', '?')}); filled = passes the bounds (accuracy within 1 point, val loss within "
             "2% of fp32)")
    if missing:
        title += "\nnot plotted (skipped or not measured): " + ", ".join(missing)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def quant_tables(speed: dict) -> str:
    """The README's markdown tables of a bench_quant.py JSON: whole videos, then steps per position."""
    def name(r):
        if r["path"] == STANDARD_PATH:
            return f"{r['weights']} (standard-ops decode.onnx + kernel sampler) | {r['kv']}"
        return ("authors' loop (torch, " + r["weights"] + ")" if r["path"] == "authors" else r["weights"]) + \
            f" | {r['kv']}"

    def x(v):
        return "-" if v is None else f"{v:.2f}"

    lines = [f"machine: {speed.get('machine', '?')}; {speed.get('note', '')}".rstrip("; "), "",
             "| batch (rows) | weights | KV | ms / token | vs fp32 ORT | vs authors | x fp32 weight floor "
             "| x own bytes' floor |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in speed["results"]:
        lines.append(f"| {r['batch']} ({r.get('rows', 2 * r['batch'])}) | {name(r)} | {r['ms_per_token']:.2f} | "
                     f"{x(r.get('vs_fp32'))} | {x(r.get('vs_authors'))} | {x(r.get('x_fp32_weight_floor'))} | "
                     f"{x(r.get('x_own_bytes_floor'))} |")
    pos = sorted({r["pos"] for r in speed["steps"]})
    for B in sorted({r["batch"] for r in speed["steps"]}):
        lines += ["", f"| step, batch {B} with CFG | " + " | ".join(f"pos {p}: ms (x fp32 floor, x own)" for p in pos)
                  + " |", "| --- " * (len(pos) + 1) + "|"]
        by = {}
        for r in speed["steps"]:
            if r["batch"] == B:
                by.setdefault(name(r), {})[r["pos"]] = r
        for n, cells in by.items():
            lines.append(f"| {n.replace(' | ', ' / ')} | " + " | ".join(
                f"{c['ms']:.2f} ({c['x_fp32_weight_floor']:.2f}, {c['x_own_bytes_floor']:.2f})" if c else "-"
                for c in (cells.get(p) for p in pos)) + " |")
    return "\n".join(lines)


def quant(argv: list[str]) -> list[Path]:
    ap = argparse.ArgumentParser(prog="report.py quant", description="draw the quantization figures")
    ap.add_argument("--speed", default=str(RESULTS / "quant_speed.json"))
    ap.add_argument("--quality", default=str(RESULTS / "quant_quality.json"))
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    speed_path = Path(args.speed)
    if not speed_path.exists():
        sys.exit(f"no {speed_path}: run benchmarks/bench_quant.py --json {speed_path} first")
    speed = json.loads(speed_path.read_text())
    if "steps" not in speed:
        sys.exit(f"{speed_path} has no per-step timings (written by an older bench_quant.py): re-run it")
    print(quant_tables(speed) + "\n")
    drawn = [plot_step_position(speed, out_dir / "quant_step_position.png")]
    print(f"wrote {drawn[-1]}")
    quality_path = Path(args.quality)
    if quality_path.exists():
        drawn.append(plot_tradeoff(speed, json.loads(quality_path.read_text()), out_dir / "quant_tradeoff.png"))
        print(f"wrote {drawn[-1]}")
    else:
        print(f"skipped the speed-quality plot: no {quality_path} (written by the quality benchmark)")
    return drawn


def _serving_variants(result: dict) -> list[dict]:
    """The variants of a bench_serving.py JSON; an older one (no ``variants``) is its fp32 baseline alone."""
    if result.get("variants"):
        return result["variants"]
    return [{"name": "fp32/fp32", "weights": "fp32", "kv": "fp32", **{k: result[k] for k in (
        "lone", "sequential", "cases", "other_max_batch", "ratios") if k in result}}]


def _serving_colour(v: dict) -> str:
    return WEIGHT_COLOURS.get(v["weights"], ("#444444",) * 3)[KV_ORDER.index(v["kv"]) if v["kv"] in KV_ORDER else 0]


def _case_label(c: dict) -> str:
    return f"{c['clients']} client{'s' * (c['clients'] > 1)}, max_batch {c['max_batch']}"


def plot_serving_occupancy(result: dict, out: Path) -> Path:
    """One panel per variant: occupancy over seconds into each case, one colour per client count (other max_batch
    runs dotted)."""
    plt = _pyplot()
    variants = _serving_variants(result)
    if not any(c.get("occupancy_timeline") for v in variants for c in v.get("cases", [])):
        raise ValueError("the serving JSON has no occupancy_timeline per case (an older bench_serving.py): re-run it")
    fig, axes = plt.subplots(len(variants), 1, figsize=(9.5, 2.1 * len(variants) + 0.9), squeeze=False,
                             sharex=True)
    counts = sorted({c["clients"] for v in variants for c in v.get("cases", []) + v.get("other_max_batch", [])})
    palette = plt.get_cmap("tab10")
    colour = {n: palette(i % 10) for i, n in enumerate(counts)}  # one colour per client count in every panel
    best = (result.get("best") or {}).get("name")
    for ax, v in zip(axes[:, 0], variants, strict=True):
        runs = [(c, "-") for c in v.get("cases", [])] + [(c, ":") for c in v.get("other_max_batch", [])]
        for c, ls in runs:
            tl = c.get("occupancy_timeline") or []
            if not tl:
                continue
            t, o = [x[0] for x in tl], [x[1] for x in tl]
            ax.step(t, o, where="post", lw=1.2, ls=ls, color=colour[c["clients"]],
                    label=f"{_case_label(c)}: mean {c['mean_occupancy']:.2f}, {c['throughput_vpm']:.3g} videos/min")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("occupancy")
        r = v.get("ratios") or {}
        title = f"weights {v['weights']}, KV {v['kv']}" + (" (best)" if v.get("name") == best else "")
        if r:
            title += (f": at {r['clients']} clients {r['throughput_vs_sequential']:.2f}x one-at-a-time throughput, "
                      f"p50 {r['p50_vs_lone']:.2f}x lone")
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axes[-1, 0].set_xlabel("seconds into the case")
    s = result.get("settings", {})
    fig.suptitle(f"{s.get('preset', '')}, {result.get('machine', '')}: batch occupancy (rows in use / max_batch) "
                 "per step", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_serving_throughput(result: dict, out: Path) -> Path:
    """Left: videos/min against clients per variant, its sequential throughput dashed in its colour; right: p50
    latency against clients, its lone latency dashed. The goal's client count marked."""
    plt = _pyplot()
    variants = [v for v in _serving_variants(result) if v.get("cases")]
    if not variants:
        raise ValueError("the serving JSON has no cases to plot")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for v in variants:
        c, m = _serving_colour(v), KV_MARKERS.get(v["kv"], "o")
        cases = sorted(v["cases"], key=lambda x: x["clients"])
        x = [k["clients"] for k in cases]
        name = f"weights {v['weights']}, KV {v['kv']}"
        ax.plot(x, [k["throughput_vpm"] for k in cases], color=c, marker=m, lw=1.8, label=name)
        if v.get("sequential"):
            ax.axhline(v["sequential"]["throughput_vpm"], color=c, ls="--", lw=1, alpha=0.8)
        ax2.plot(x, [k["p50_s"] for k in cases], color=c, marker=m, lw=1.8, label=name)
        if v.get("lone"):
            ax2.axhline(v["lone"]["median_s"], color=c, ls="--", lw=1, alpha=0.8)
    ax.plot([], [], color="grey", ls="--", lw=1, label="one at a time (sequential), dashed per variant")
    ax2.plot([], [], color="grey", ls="--", lw=1, label="lone request, dashed per variant")
    goal = result.get("goal") or {}
    for a in (ax, ax2):
        if goal.get("clients"):
            a.axvline(goal["clients"], color="black", lw=0.8, alpha=0.4)
        a.set_xlabel("concurrent clients (closed loop)")
        a.set_xticks(sorted({k["clients"] for v in variants for k in v["cases"]}))
        a.grid(True, alpha=0.3)
        a.set_ylim(bottom=0)
    ax.set_ylabel("throughput (videos/min)")
    ax2.set_ylabel("p50 request latency (s)")
    ax.legend(fontsize=7, loc="best", framealpha=0.85)
    ax2.legend(fontsize=7, loc="best", framealpha=0.85)
    s, best = result.get("settings", {}), result.get("best") or {}
    title = (f"{s.get('preset', '')} ({s.get('tokens_per_video', '?')} tokens per video, CFG), max_batch "
             f"{s.get('max_batch', '?')}, {result.get('machine', '')}")
    if best.get("name"):
        title += (f"\nbest passing variant {best['name']}: {best['throughput_vs_sequential']:.2f}x one-at-a-time, "
                  f"p50 {best['p50_vs_lone']:.2f}x lone at {best['clients']} clients (goal >= "
                  f"{goal.get('throughput_at_least', '?')}x, <= {goal.get('p50_at_most', '?')}x): "
                  + ("met" if best.get("goal_met") else "not met"))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def serving_paths(json_path: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Where the serving figures of ``json_path`` go: <stem>_occupancy.png and <stem>_throughput.png beside it."""
    d = out_dir or json_path.parent
    return d / f"{json_path.stem}_occupancy.png", d / f"{json_path.stem}_throughput.png"


def serving(argv: list[str]) -> list[Path]:
    ap = argparse.ArgumentParser(prog="report.py serving", description="draw the serving figures from the JSON")
    ap.add_argument("--json", default=str(RESULTS / "serving_cpu.json"))
    ap.add_argument("--out-dir", default=None, help="default: beside the JSON")
    args = ap.parse_args(argv)
    path = Path(args.json)
    if not path.exists():
        sys.exit(f"no {path}: run benchmarks/bench_serving.py first")
    result = json.loads(path.read_text())
    occ, thr = serving_paths(path, Path(args.out_dir) if args.out_dir else None)
    drawn = [plot_serving_occupancy(result, occ), plot_serving_throughput(result, thr)]
    for p in drawn:
        print(f"wrote {p}")
    return drawn


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "quant":
        quant(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "serving":
        serving(sys.argv[2:])
    elif len(sys.argv) == 2:
        main(sys.argv[1])
    else:
        sys.exit(__doc__)
