"""benchmarks/report.py serving: both serving figures drawn from a small synthetic JSON (schema of
bench_serving.py with variants), an old single-bundle JSON still drawing its throughput, and bench_serving.py's
pure helpers: the variant list, the quality file's pass/fail, the goal and the choice of the best variant."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _report():
    return _load("bench_report", "report.py")


def _case(clients: int, vpm: float, p50: float, max_batch: int = 16) -> dict:
    occ = min(1.0, 2 * clients / max_batch)
    return {"clients": clients, "videos": 2 * clients, "max_batch": max_batch, "throughput_vpm": vpm, "p50_s": p50,
            "p99_s": 1.1 * p50, "mean_occupancy": 0.9 * occ,
            "occupancy_timeline": [[0.01, occ / 2], [0.5, occ], [3.0, occ / 2], [3.2, occ / 2]]}


def _variant(w: str, kv: str, speed: float, goal_met: bool = False) -> dict:
    cases = [_case(1, 7 * speed, 8 / speed), _case(4, 17 * speed, 13 / speed), _case(8, 22 * speed, 19 / speed)]
    return {"name": f"{w}/{kv}", "weights": w, "kv": kv, "sampler": "fused", "lone": {"median_s": 7.5 / speed},
            "sequential": {"throughput_vpm": 8 * speed}, "cases": cases,
            "other_max_batch": [_case(8, 17 * speed, 25 / speed, max_batch=8)] if w == "fp32" else [],
            "ratios": {"clients": 8, "throughput_vs_sequential": 22 / 8, "p50_vs_lone": 19 / 7.5},
            "goal": {"met": goal_met}}


def _result() -> dict:
    variants = [_variant("fp32", "fp32", 1.0), _variant("int8", "fp16", 1.6), _variant("int4", "int8", 1.9)]
    return {"machine": "test machine", "settings": {"preset": "small", "tokens_per_video": 1024, "max_batch": 16},
            "goal": {"clients": 8, "throughput_at_least": 4.0, "p50_at_most": 2.5}, "variants": variants,
            "best": {"name": "int4/int8", "clients": 8, "throughput_vs_sequential": 2.75, "p50_vs_lone": 2.53,
                     "goal_met": False}}


def _is_png(p: Path) -> bool:
    return p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_draws_both_serving_figures(tmp_path):
    (tmp_path / "serving.json").write_text(json.dumps(_result()))
    drawn = _report().serving(["--json", str(tmp_path / "serving.json"), "--out-dir", str(tmp_path / "figs")])
    assert [p.name for p in drawn] == ["serving_occupancy.png", "serving_throughput.png"]
    assert all(p.parent == tmp_path / "figs" and _is_png(p) for p in drawn)


def test_old_single_bundle_json(tmp_path):
    """A JSON of the single-bundle bench_serving.py (no variants, no timelines): the throughput figure from its
    baseline fields; the occupancy figure refused with what to do."""
    v = _variant("fp32", "fp32", 1.0)
    for c in v["cases"]:
        del c["occupancy_timeline"]
    old = {"machine": "m", "settings": {"preset": "small"}, **{k: v[k] for k in ("lone", "sequential", "cases",
                                                                                 "ratios")}}
    rep = _report()
    assert _is_png(rep.plot_serving_throughput(old, tmp_path / "t.png"))
    with pytest.raises(ValueError, match="re-run"):
        rep.plot_serving_occupancy(old, tmp_path / "o.png")


@pytest.fixture(scope="module")
def bench():
    """bench_serving.py as a module. It imports bench_quant, which imports benchmarks/conftest.py by the name
    ``conftest`` (torch), a name tests/conftest.py holds in this process: set aside while loading, then restored,
    with sys.path as it was."""
    pytest.importorskip("torch")
    path, saved = list(sys.path), sys.modules.pop("conftest", None)
    try:
        return _load("bench_serving_helpers", "bench_serving.py")
    finally:
        sys.modules.pop("conftest", None)
        if saved is not None:
            sys.modules["conftest"] = saved
        sys.path[:] = path


def test_parse_variants(bench):
    assert bench.parse_variants("fp32/fp32, int4/fp16") == [("fp32", "fp32"), ("int4", "fp16")]
    assert len(bench.parse_variants("all")) == 9
    assert bench.parse_variants(bench.DEFAULT_VARIANTS)[0] == ("fp32", "fp32")
    for bad, msg in (("int3/fp16", "weights/kv"), ("fp32", "weights/kv"), ("int8/fp16,int8/fp16", "twice"),
                     ("", "no variant")):
        with pytest.raises(ValueError, match=msg):
            bench.parse_variants(bad)


def test_goal_and_best(bench, tmp_path):
    q = {"preset": "tiny", "variants": [
        {"weights": "fp32", "kv": "fp32", "status": "ok", "passes": True},
        {"weights": "int8", "kv": "fp16", "status": "ok", "passes": True},
        {"weights": "int4", "kv": "int8", "status": "ok", "passes": False},
        {"weights": "int4", "kv": "fp16", "status": "skipped: not built", "passes": True}]}
    (tmp_path / "q.json").write_text(json.dumps(q))
    quality = bench.read_quality(tmp_path / "q.json")
    assert quality[("int8", "fp16")]["passes"] and not quality[("int4", "fp16")]["passes"]
    assert bench.read_quality(tmp_path / "none.json") == {}

    g = bench.goal_of({"clients": 8, "throughput_vs_sequential": 4.2, "p50_vs_lone": 2.4})
    assert g["met"] and g["throughput_at_least"] == 4.0 and g["p50_at_most"] == 2.5
    assert not bench.goal_of({"clients": 8, "throughput_vs_sequential": 4.2, "p50_vs_lone": 2.6})["met"]
    assert not bench.goal_of({"clients": 4, "throughput_vs_sequential": 5.0, "p50_vs_lone": 1.0})["met"]

    variants = [_variant("fp32", "fp32", 1.0), _variant("int8", "fp16", 1.6), _variant("int4", "int8", 1.9),
                _variant("int8", "int8", 1.2)]
    best = bench.pick_best(variants, quality, tmp_path / "q.json")
    assert best["name"] == "int8/fp16"  # int4/int8 is faster but fails; int8/int8 is not in the file
    assert set(best["not_eligible"]) == {"int4/int8", "int8/int8"}
    assert best["throughput_vs_fp32_baseline_at_clients"] == pytest.approx(1.6)
    variants[0]["goal"]["met"] = True  # meeting the goal ranks before speed
    assert bench.pick_best(variants, quality, tmp_path / "q.json")["name"] == "fp32/fp32"
    assert bench.pick_best(variants, {}, tmp_path / "q.json")["name"] is None
