"""benchmarks/report.py quant: both quantization figures drawn from small synthetic JSONs (schema of
bench_quant.py and of the quality benchmark), the trade-off skipped with a message when the quality file is absent,
and a speed JSON without per-step timings refused."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
ROOT = Path(__file__).resolve().parents[1]


def _report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _speed() -> dict:
    steps, results = [], []
    variants = [("onnxruntime", w, kv) for w in ("fp32", "int8", "int4") for kv in ("fp32", "int8")]
    variants.append(("authors", "fp32", "fp32"))
    for i, (path, w, kv) in enumerate(variants):
        for pos in (1, 512, 1023):
            steps.append({"path": path, "weights": w, "kv": kv, "batch": 1, "rows": 2, "pos": pos,
                          "ms": 3.0 + i + pos / 500, "fp32_weight_floor_ms": 4.5,
                          "own_bytes_floor_ms": 1.0 + pos / 1000, "bandwidth_gbs": 28.0,
                          "x_fp32_weight_floor": (3.0 + i + pos / 500) / 4.5,
                          "x_own_bytes_floor": (3.0 + i + pos / 500) / (1.0 + pos / 1000)})
        results.append({"path": path, "weights": w, "kv": kv, "batch": 1, "ms_per_token": 4.0 + i})
    return {"bench": "quant_speed", "machine": "test machine", "preset": "small", "steps": steps,
            "results": results}


def _quality() -> dict:
    v = []
    for w in ("fp32", "int8", "int4"):
        for kv in ("fp32", "fp16", "int8"):
            ok = kv != "fp16"
            v.append({"weights": w, "kv": kv, "status": "ok" if ok else "skipped: not built",
                      "class_accuracy_cfg2": 0.9 if w != "int4" else 0.8, "class_accuracy_nocfg": 0.5,
                      "fd_cfg2": 1.0, "fd_nocfg": 2.0, "val_loss": 5.0 + (w == "int4"), "val_loss_rel": 0.0,
                      "passes": w != "int4"})
    return {"variants": v, "bounds": {"class_accuracy_points": 1.0, "val_loss_rel": 0.02}}


def _is_png(p: Path) -> bool:
    return p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_draws_both_figures(tmp_path, capsys):
    (tmp_path / "s.json").write_text(json.dumps(_speed()))
    (tmp_path / "q.json").write_text(json.dumps(_quality()))
    drawn = _report().quant(["--speed", str(tmp_path / "s.json"), "--quality", str(tmp_path / "q.json"),
                             "--out-dir", str(tmp_path)])
    assert [p.name for p in drawn] == ["quant_step_position.png", "quant_tradeoff.png"]
    assert all(_is_png(p) for p in drawn)
    out = capsys.readouterr().out  # the README's tables: every variant, the authors' row with all 8 columns
    assert "| 1 (2) | int4 | int8 | 9.00 |" in out
    row = next(line for line in out.splitlines() if line.startswith("| 1 (2) | authors' loop"))
    assert row.count("|") == 9
    assert "| int8 / fp32 | 5.00 (" in out


def test_tradeoff_skipped_without_quality_file(tmp_path, capsys):
    (tmp_path / "s.json").write_text(json.dumps(_speed()))
    drawn = _report().quant(["--speed", str(tmp_path / "s.json"), "--quality", str(tmp_path / "none.json"),
                             "--out-dir", str(tmp_path)])
    assert [p.name for p in drawn] == ["quant_step_position.png"]
    assert not (tmp_path / "quant_tradeoff.png").exists()
    assert "skipped the speed-quality plot" in capsys.readouterr().out


def test_refuses_speed_json_without_steps(tmp_path):
    old = {"bench": "quant_speed", "results": [{"weights": "fp32", "kv": "fp32", "batch": 1, "ms_per_step": 7.0}]}
    (tmp_path / "s.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit, match="no per-step timings"):
        _report().quant(["--speed", str(tmp_path / "s.json"), "--out-dir", str(tmp_path)])


def test_tradeoff_needs_a_common_variant(tmp_path):
    q = _quality()
    for v in q["variants"]:
        v["status"] = "skipped: nothing measured"
    with pytest.raises(ValueError, match="both a speed"):
        _report().plot_tradeoff(_speed(), q, tmp_path / "t.png")
