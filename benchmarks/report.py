"""Turn a pytest-benchmark JSON of test_bench_engine.py into markdown tables and results/engine_cpu.json.

    python benchmarks/report.py benchmarks/results/engine_cpu_raw.json
"""

import json
import sys
from pathlib import Path

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


if __name__ == "__main__":
    main(sys.argv[1])
