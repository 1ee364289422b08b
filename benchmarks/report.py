"""Turn a pytest-benchmark JSON of test_bench_engine.py into a markdown table and results/engine_cpu.json.

    python benchmarks/report.py benchmarks/results/engine_cpu_raw.json
"""

import json
import sys
from pathlib import Path


def main(raw_path: str) -> None:
    raw = json.loads(Path(raw_path).read_text())
    rows = []
    for b in raw["benchmarks"]:
        e = b["extra_info"]
        row = {k: e[k] for k in ("preset", "batch", "path", "op")}
        row["median_ms"] = 1e3 * b["stats"]["median"]
        if e["op"] == "step":
            row.update(floor_ms=e["floor_ms"], floor_ratio=row["median_ms"] / e["floor_ms"],
                       bandwidth_gbs=e["bandwidth_gbs"], weight_read_bytes=e["weight_read_bytes"])
        rows.append(row)
    machine = raw["benchmarks"][0]["extra_info"]["machine"]
    steps = {(r["preset"], r["batch"], r["path"]): r for r in rows if r["op"] == "step"}
    print(f"machine: {machine}\n")
    print("| preset | batch (CFG rows) | ONNX Runtime | torch eager | authors' loop | ORT vs authors | floor "
          "| ORT / floor |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (preset, batch, path), r in sorted(steps.items()):
        if path != "onnxruntime":
            continue
        t, a = steps.get((preset, batch, "torch")), steps.get((preset, batch, "authors"))
        print(f"| {preset} | {batch} ({2 * batch}) | {r['median_ms']:.2f} ms | {t['median_ms']:.2f} ms | "
              f"{a['median_ms']:.2f} ms | {a['median_ms'] / r['median_ms']:.1f}x | {r['floor_ms']:.2f} ms | "
              f"{r['floor_ratio']:.2f} |")
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
    print(json.dumps({"machine": machine, "results": rows}))


if __name__ == "__main__":
    main(sys.argv[1])
