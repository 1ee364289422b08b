"""Serving on this CPU: the step-level ``Scheduler`` under concurrent clients against one-at-a-time serving, per
quantized variant (weights fp32/int8/int4 x KV cache fp32/fp16/int8).

    .venv/bin/python benchmarks/bench_serving.py --wait-quiet 600   # the measurement: small, six variants, ~19 min
    .venv/bin/python benchmarks/bench_serving.py --preset tiny --variants fp32/fp32,int4/fp16 --out /tmp/s.json
                                                                    # smoke run, ~25 s (.benchmarks/ by default)
    .venv/bin/python benchmarks/bench_serving.py --variants all     # all nine variants, ~28 min
    .venv/bin/python benchmarks/report.py serving                   # redraw both figures from the JSON

Duration of the measurement (AMD EPYC, 2 cores, quiet), estimated from the single-variant run of 2026-12-01 (313 s
for fp32/fp32: lone 22 s, sequential 118 s, the cases 106 s, max_batch 8 55 s) scaled per variant by its whole-video
ms/token in results/quant_speed.json (batch 1 for lone/sequential, batch 8 for the 8-client case): fp32/fp32 ~5.2
min, fp32/fp16 ~3.8, int8/fp16 ~2.3, int4/fp16 ~1.8, int8/int8 ~2.2, int4/int8 ~1.8: ~17 min, plus ~2 min the first
time to export the five quantized bundles (~20 s each, cached under .benchmarks/bundles), plus the --wait-quiet wait
(at most 600 s). ``--sequential 8`` saves ~3.5 min; ``--variants all`` adds fp32/int8, int8/fp32, int4/fp32 (~9 min).

Variants (``--variants weights/kv,...``; default fp32/fp32, fp32/fp16, int8/fp16, int4/fp16, int8/int8,
int4/int8): random-weight bundles from ``bench_quant.variant_bundle`` (the preset's ``conftest.build_bundle`` for
fp32/fp32; each exported once and cached under .benchmarks/bundles), each with the fused sampler
(decode_sample.onnx) where the custom-op library is built: the run refuses a bundle whose Engine picks another
sampler there, and records the one it picked. ONNX Runtime on the CPU; every request guided (CFG 1.25: two batch
rows each) with its own seed, class and sampling parameters (a mix of temperature, top-k and top-p), the same
requests for every variant. Every variant runs the whole protocol back to back (one variant's sessions loaded at a
time), in this order, the memory read bandwidth and the 1-minute load probed before and after every phase
(``before``/``after`` in each; a swing shows beside the numbers it hit):

* lone: one request at a time through the scheduler, nothing else running (``--lone`` runs; the median is the
  "lone latency" the ratios use);
* sequential: the requests of the largest case served one at a time at batch 1, ``Engine.generate`` per
  request (the one-at-a-time baseline: its throughput = videos / the summed wall time; ``--sequential N``: the
  first N only); their tokens are compared with the scheduler's for the same requests (batch invariance);
* one case per ``--clients`` count through one ``Scheduler(max_batch=--max-batch)``;
* for the first variant (the baseline; every one with ``--compare-all``) the largest case once more on a scheduler
  of each ``--compare-max-batch`` size (default 8, the Scheduler's default), same requests.

Load model: **closed loop**. Each of the N clients waits an exponential think time (mean ``--think``; default
a tenth of the variant's lone latency), submits the next request, waits for its result, and repeats until the
case's ``--videos`` are done, so at most N requests are in flight and the clients stay busy ~90% of the time.
Closed loop because "N concurrent clients" is then exactly what the scheduler sees: an open-loop Poisson stream
whose rate exceeds what the batch serves only grows the queue, and its latencies would measure the run's length, not
the server (an open loop capped at N in flight is a closed loop with think time 0 while the cap binds).

max_batch defaults to 2 x the largest client count (16): a guided request takes two rows, so 8 clients run at
once only in 16 rows (the Scheduler's default of 8 rows serves 4 of them and queues the rest).

Per case: throughput (videos/min, from the first submission to the last result), request latency (submission to
result, client side) p50/p99 (linear interpolation; with n requests p99 is about the maximum), the batch
occupancy (rows in use / max_batch per step, from an Observer; the mean is weighted by step time; its change points
over time in ``occupancy_timeline``), and the step times. Ratios per variant: throughput at the largest client
count / sequential, and its p50 latency / the lone latency. The issue's goal: at 8 clients >= 4x and <= 2.5x.

The JSON (results/serving_cpu.json for small) keeps the single-bundle fields (lone, sequential, cases,
other_max_batch, ratios, goal, tokens_match_sequential) for the baseline (fp32/fp32, else the first variant) and
adds ``variants`` (each with all of them, its sampler, bundle and quality verdict) and ``best``: the best variant
that passes the quality bounds of results/quant_quality.json (its per-variant ``status``/``passes``; goal met
first, then the most videos/min at the largest client count) and whether it meets the goal. Figures beside it
(report.py, Agg): <stem>_occupancy.png (one panel per variant) and <stem>_throughput.png (videos/min and p50
against clients, one line per variant, its sequential throughput and lone latency dashed). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_quant, conftest, report (run from anywhere)

import report  # noqa: E402
from bench_quant import KVS, WEIGHTS, variant_bundle  # noqa: E402
from conftest import measure_bandwidth  # noqa: E402

from larp_rt import Engine, SamplingParams, kernels  # noqa: E402
from larp_rt.bench import machine_name  # noqa: E402
from larp_rt.bundle import Bundle  # noqa: E402
from larp_rt.serving import Observer, Scheduler  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CFG_SCALE = 1.25
# weights/kv, in the order they run: the fp32 baseline, the fp16 cache at fp32 weights, int8 and int4 weights with
# the fp16 and the int8 cache (--variants all: the nine)
DEFAULT_VARIANTS = "fp32/fp32,fp32/fp16,int8/fp16,int4/fp16,int8/int8,int4/int8"
GOAL_CLIENTS, GOAL_THROUGHPUT, GOAL_P50 = 8, 4.0, 2.5  # at 8 clients: >= 4x one at a time, p50 <= 2.5x lone
# the mix of sampling parameters (each request draws one of each, and its own seed and class)
TEMPERATURES = (1.0, 0.9, 1.1)
TOP_KS = (0, 0, 50, 400)
TOP_PS = (1.0, 1.0, 0.95, 0.8)


def load1() -> float:
    """The 1-minute load average (once this benchmark runs, its own threads count in it too)."""
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


class CpuShare:
    """Cores busy during a phase: this process's (``os.times``) and everyone else's (/proc/stat's busy time minus
    ours), in cores on average; ``other_cores`` well above 0 means another job shared the CPUs."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return float("nan")
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user nice system idle iowait irq softirq steal

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t0
        own = (self._own() - self.own0) / wall
        return {"own_cores": round(own, 3), "other_cores": round((self._busy() - self.busy0) / wall - own, 3)}


def wait_quiet(max_wait: float, below: float = 0.5, poll: float = 30.0) -> dict:
    """Wait up to ``max_wait`` s for the 1-minute load average to drop below ``below`` (other engineers' test runs
    share these cores); returns the load seen first and last and whether it got quiet."""
    t0, first = time.monotonic(), load1()
    now = first
    while now >= below and time.monotonic() - t0 < max_wait:
        time.sleep(min(poll, max(0.0, max_wait - (time.monotonic() - t0))))
        now = load1()
        print(f"  load {now:.2f} after {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return {"load1_first": first, "load1_before": now, "waited_s": round(time.monotonic() - t0, 1),
            "quiet": now < below, "quiet_threshold": below}


def make_requests(n: int, num_classes: int, seed: int) -> list[tuple[int, SamplingParams]]:
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(num_classes)),
             SamplingParams(cfg_scale=CFG_SCALE, temperature=float(rng.choice(TEMPERATURES)),
                            top_k=int(rng.choice(TOP_KS)), top_p=float(rng.choice(TOP_PS)),
                            seed=int(rng.integers(2**63))))
            for _ in range(n)]


class StepLog(Observer):
    """Every decode step: (end time, rows in use, requests, seconds)."""

    def __init__(self):
        self.steps: list[tuple[float, int, int, float]] = []

    def on_step(self, rows: int, requests: int, seconds: float, tokens: int) -> None:
        self.steps.append((time.perf_counter(), rows, requests, seconds))


def brief(c: dict, *keys: str) -> dict:
    return {k: round(c[k], 4) if isinstance(c[k], float) else c[k] for k in keys}


def percentiles(xs: list[float]) -> dict:
    p50, p99 = np.percentile(xs, [50, 99])
    return {"p50_s": float(p50), "p99_s": float(p99), "mean_s": float(np.mean(xs)), "min_s": float(min(xs)),
            "max_s": float(max(xs))}


def occupancy_changes(timeline: list[tuple[float, float]]) -> list[list[float]]:
    """The (seconds, occupancy) points where the occupancy changes, and the last step: the same step plot as every
    step's (drawn ``where="post"``) in a few dozen points instead of thousands."""
    out: list[list[float]] = []
    for i, (t, o) in enumerate(timeline):
        if not out or o != out[-1][1] or i == len(timeline) - 1:
            out.append([round(t, 3), round(o, 4)])
    return out


def run_case(sched: Scheduler, log: StepLog, requests, clients: int, think: float, seed: int) -> dict:
    """``clients`` closed-loop clients share ``requests`` (each takes the next one when its think time is over)."""
    nxt, lock = iter(enumerate(requests)), threading.Lock()
    lat: list[float] = [0.0] * len(requests)
    tokens: list[np.ndarray | None] = [None] * len(requests)
    submitted: list[float] = []
    done: list[float] = []
    errors: list[str] = []
    start = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        rng = np.random.default_rng([seed, c])
        start.wait()
        while True:
            time.sleep(rng.exponential(think) if think > 0 else 0.0)
            with lock:
                item = next(nxt, None)
            if item is None:
                return
            i, (cls, params) = item
            t0 = time.perf_counter()
            try:
                gen = sched.submit(cls, params).result(timeout=3600)
            except Exception as e:  # noqa: BLE001 - a failed request is reported, not fatal
                errors.append(f"{type(e).__name__}: {e}")
                continue
            t1 = time.perf_counter()
            with lock:
                submitted.append(t0)
                done.append(t1)
            lat[i], tokens[i] = t1 - t0, gen.tokens[0]

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    first_step = len(log.steps)
    t_start, cpu = time.perf_counter(), CpuShare()
    start.wait()
    for t in threads:
        t.join()
    share = cpu.stop()
    steps = log.steps[first_step:]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, the first: {errors[0]}")
    wall = max(done) - min(submitted)
    rows = np.array([s[1] for s in steps], float)
    secs = np.array([s[3] for s in steps], float)
    occ = rows / sched.max_batch
    return {
        "clients": clients, "videos": len(requests), "wall_s": wall,
        "throughput_vpm": 60.0 * len(requests) / wall,
        **percentiles(lat),
        "steps": len(steps), "mean_step_ms": 1e3 * float(secs.mean()),
        "step_busy_fraction": float(secs.sum() / wall),  # the rest: the loop's own work, idle gaps
        "mean_occupancy": float((occ * secs).sum() / secs.sum()),
        "mean_rows": float((rows * secs).sum() / secs.sum()),
        "step_ms_by_rows": {int(r): round(1e3 * float(np.median(secs[rows == r])), 3) for r in np.unique(rows)},
        "latencies_s": [round(x, 4) for x in lat],
        **share,
        "occupancy_timeline": occupancy_changes([(s[0] - t_start, s[1] / sched.max_batch) for s in steps]),
        "_tokens": tokens,
    }


def start_scheduler(eng: Engine, max_batch: int, max_queue: int, log: StepLog, seed: int) -> Scheduler:
    """A started Scheduler, warmed up: every row bound for a few steps (then the requests are cancelled)."""
    sched = Scheduler(eng, max_batch=max_batch, max_queue=max_queue, observer=log).start()
    n = eng.generator_config.num_classes
    warm = [sched.submit(c, p) for c, p in make_requests(max_batch // 2, n, seed + 99)]
    while len(log.steps) < 20:
        time.sleep(0.01)
    for r in warm:
        r.cancel()
    while sched.stats()["active_requests"]:
        time.sleep(0.01)
    log.steps.clear()
    return sched


def parse_variants(text: str) -> list[tuple[str, str]]:
    """``weights/kv`` pairs, comma separated ("all": every one of bench_quant.py's nine); the order is the run's."""
    if text.strip() == "all":
        return [(w, kv) for w in WEIGHTS for kv in KVS]
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        w, _, kv = item.partition("/")
        if w not in WEIGHTS or kv not in KVS:
            raise ValueError(f"variant {item!r}: expected weights/kv with weights in {'/'.join(WEIGHTS)} and kv in "
                             f"{'/'.join(KVS)}, e.g. int8/fp16")
        if (w, kv) in out:
            raise ValueError(f"variant {item!r} is listed twice")
        out.append((w, kv))
    if not out:
        raise ValueError("--variants lists no variant")
    return out


def read_quality(path: Path) -> dict:
    """(weights, kv) -> {"passes", "status"} from the quality benchmark's JSON (its per-variant ``passes`` and
    ``status`` fields; a variant passes only with status "ok" and passes true); {} without the file."""
    if not path.exists():
        return {}
    q = json.loads(path.read_text())
    return {(v["weights"], v["kv"]): {"status": v.get("status"), "passes": v.get("status") == "ok" and
                                      v.get("passes") is True, "preset": q.get("preset")}
            for v in q.get("variants", [])}


def probe() -> dict:
    """The memory read bandwidth (GB/s, conftest's probe) and the 1-minute load, taken around every phase."""
    return {"bandwidth_gbs": round(measure_bandwidth(), 2), "load1": load1()}


def open_engine(preset: str, weights: str, kv: str) -> tuple[Engine, Path]:
    """The variant's cached bundle (``bench_quant.variant_bundle``: exported on first use under .benchmarks/bundles)
    in an Engine; where the custom-op library is built its sampler must be the fused decode_sample graph."""
    got = variant_bundle(preset, weights, kv)
    if isinstance(got, str):
        raise RuntimeError(f"variant {weights}/{kv}: {got}")
    bundle = Path(got)
    eng = Engine(bundle, backend="onnxruntime", device="cpu")
    if kernels.ort_custom_op_library() is not None and eng.sampler_name != "fused":
        raise RuntimeError(f"bundle {bundle} (variant {weights}/{kv}) runs the {eng.sampler_name!r} sampler although "
                           "the custom-op library is built: it was exported without decode_sample.onnx; delete the "
                           "folder and re-run (it is re-exported with the fused sampler)")
    return eng, bundle


def run_variant(eng: Engine, args, plan: dict, compare: list[int]) -> dict:
    """The whole protocol on one variant, back to back: lone, sequential, every clients case, then the largest case
    on the ``compare`` scheduler sizes; the bandwidth and load probed around every phase."""
    clients, videos, max_batch = plan["clients"], plan["videos"], plan["max_batch"]
    n_classes = eng.generator_config.num_classes
    log = StepLog()
    queue = max(64, 2 * max(videos))
    t_run = time.perf_counter()
    sched = start_scheduler(eng, max_batch, queue, log, args.seed)
    try:
        eng.generate(*make_requests(1, n_classes, args.seed + 98)[0])  # warm-up: generate's runner

        around = probe()
        lone, cpu = [], CpuShare()
        for c, p in make_requests(args.lone, n_classes, args.seed + 1):
            t0 = time.perf_counter()
            sched.submit(c, p).result(timeout=3600)
            lone.append(time.perf_counter() - t0)
        lone_s = statistics.median(lone)
        lone_ph = {"runs": len(lone), "median_s": lone_s, "latencies_s": [round(x, 4) for x in lone], **cpu.stop(),
                   "before": around, "after": (around := probe())}
        think = lone_s / 10 if args.think is None else args.think
        print(f"  lone request: {lone_s:.2f} s (median of {len(lone)}); think time mean {think:.3f} s", flush=True)

        case_reqs = plan["requests"]
        big = int(np.argmax(clients))
        seq_reqs = case_reqs[big][: plan["sequential"]]
        seq_times, seq_tokens, cpu = [], [], CpuShare()
        for c, p in seq_reqs:
            t0 = time.perf_counter()
            seq_tokens.append(eng.generate([c], p).tokens[0])
            seq_times.append(time.perf_counter() - t0)
        seq = {"videos": len(seq_reqs), "wall_s": sum(seq_times), "throughput_vpm": 60.0 * len(seq_reqs) /
               sum(seq_times), **percentiles(seq_times), "latencies_s": [round(x, 4) for x in seq_times],
               **cpu.stop(), "before": around, "after": (around := probe())}
        print(f"  sequential (Engine.generate, batch 1): {seq['throughput_vpm']:.2f} videos/min, "
              f"{seq['p50_s']:.2f} s per video, other processes {seq['other_cores']:.2f} cores", flush=True)

        cases = []
        for i, (n, reqs) in enumerate(zip(clients, case_reqs, strict=True)):
            c = run_case(sched, log, reqs, n, think, args.seed + 1000 + i)
            c.update(max_batch=max_batch, before=around, after=(around := probe()))
            cases.append(c)
            print(f"  {n} clients: {c['throughput_vpm']:.2f} videos/min, p50 {c['p50_s']:.2f} s, p99 "
                  f"{c['p99_s']:.2f} s, occupancy {c['mean_occupancy']:.2f}, step {c['mean_step_ms']:.2f} ms, "
                  f"other processes {c['other_cores']:.2f} cores", flush=True)
    finally:
        sched.stop(drain=False)
    other = []
    for mb in compare:  # the largest case again, same requests, on a scheduler of another size
        olog = StepLog()
        osched = start_scheduler(eng, mb, queue, olog, args.seed)
        try:
            c = run_case(osched, olog, case_reqs[big], clients[big], think, args.seed + 2000 + mb)
        finally:
            osched.stop(drain=False)
        c.update(max_batch=mb, before=around, after=(around := probe()))
        other.append(c)
        print(f"  {c['clients']} clients, max_batch {mb}: {c['throughput_vpm']:.2f} videos/min, p50 "
              f"{c['p50_s']:.2f} s, p99 {c['p99_s']:.2f} s, occupancy {c['mean_occupancy']:.2f}", flush=True)

    top = cases[big]
    same = sum(int(np.array_equal(a, b)) for a, b in zip(seq_tokens, top["_tokens"], strict=False))
    ratios = {"clients": top["clients"], "throughput_vs_sequential": top["throughput_vpm"] / seq["throughput_vpm"],
              "p50_vs_lone": top["p50_s"] / lone_s}
    return {"sampler": eng.sampler_name, "think_mean_s": think,
            "lone": lone_ph, "sequential": seq,
            "cases": [{k: v for k, v in c.items() if not k.startswith("_")} for c in cases],
            "other_max_batch": [{k: v for k, v in c.items() if not k.startswith("_")} for c in other],
            "ratios": ratios, "goal": goal_of(ratios), "tokens_match_sequential": f"{same}/{len(seq_tokens)}",
            "max_other_cores": max(ph["other_cores"] for ph in (lone_ph, seq, *cases, *other)),
            "duration_s": round(time.perf_counter() - t_run, 1)}


def goal_of(ratios: dict) -> dict:
    """The issue's goal on a variant's ratios: at GOAL_CLIENTS clients >= GOAL_THROUGHPUT x the one-at-a-time
    throughput with p50 <= GOAL_P50 x the lone latency (not met when the largest case has fewer clients)."""
    g = {"clients": GOAL_CLIENTS, "throughput_at_least": GOAL_THROUGHPUT, "p50_at_most": GOAL_P50,
         "measured_at_clients": ratios["clients"],
         "throughput_met": ratios["throughput_vs_sequential"] >= GOAL_THROUGHPUT,
         "p50_met": ratios["p50_vs_lone"] <= GOAL_P50}
    g["met"] = g["throughput_met"] and g["p50_met"] and ratios["clients"] >= GOAL_CLIENTS
    return g


def pick_best(variants: list[dict], quality: dict, quality_path: Path) -> dict:
    """The best variant that passes the quality bounds: those meeting the goal first, then the highest throughput
    at the largest client count. Names the others and why they were not eligible."""
    eligible, left_out = [], {}
    for v in variants:
        q = quality.get((v["weights"], v["kv"]))
        if q is None:
            left_out[v["name"]] = f"not in {quality_path.name}"
        elif not q["passes"]:
            left_out[v["name"]] = f"fails the quality bounds (status {q['status']!r})"
        else:
            eligible.append(v)
    base = {"quality_file": str(quality_path.relative_to(ROOT) if quality_path.is_relative_to(ROOT) else quality_path),
            "quality_preset": next((q["preset"] for q in quality.values()), None),
            "chosen_by": "passes the quality bounds, then meets the goal, then the most videos/min at the largest "
                         "client count",
            "eligible": [v["name"] for v in eligible], "not_eligible": left_out}
    if not eligible:
        return {"name": None, **base, "goal_met": False}
    v = max(eligible, key=lambda v: (v["goal"]["met"], v["cases"][-1]["throughput_vpm"]))
    top = max(v["cases"], key=lambda c: c["clients"])
    baseline = next((b for b in variants if (b["weights"], b["kv"]) == ("fp32", "fp32")), None)
    return {"name": v["name"], "weights": v["weights"], "kv": v["kv"], "sampler": v["sampler"],
            "clients": top["clients"], "throughput_vpm": top["throughput_vpm"], "p50_s": top["p50_s"],
            "sequential_vpm": v["sequential"]["throughput_vpm"], "lone_s": v["lone"]["median_s"],
            "throughput_vs_sequential": v["ratios"]["throughput_vs_sequential"],
            "p50_vs_lone": v["ratios"]["p50_vs_lone"],
            "throughput_vs_fp32_baseline_at_clients": (top["throughput_vpm"] / max(
                baseline["cases"], key=lambda c: c["clients"])["throughput_vpm"]) if baseline else None,
            "goal_met": v["goal"]["met"], "goal": v["goal"], **base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", help="small (the measurement) or tiny (a smoke run)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="weights/kv pairs, comma separated, run in this order ('all': the nine); default "
                         f"{DEFAULT_VARIANTS}")
    ap.add_argument("--clients", default="1,4,8", help="concurrent clients per case")
    ap.add_argument("--videos", default="4,8,16", help="requests per case (one number, or one per case)")
    ap.add_argument("--lone", type=int, default=3, help="lone requests (their median: the lone latency)")
    ap.add_argument("--sequential", type=int, default=0,
                    help="requests served one at a time: the first N of the largest case's (default 0: all)")
    ap.add_argument("--max-batch", type=int, default=None,
                    help="the scheduler's rows (default: 2 x the most clients)")
    ap.add_argument("--compare-max-batch", default="8",
                    help="the baseline's largest case again on schedulers of these sizes (comma list; '' for none)")
    ap.add_argument("--compare-all", action="store_true", help="--compare-max-batch for every variant, not only "
                                                               "the baseline (the first one listed)")
    ap.add_argument("--think", type=float, default=None, help="mean think time, s (default: lone latency / 10)")
    ap.add_argument("--wait-quiet", type=float, default=0.0,
                    help="first wait up to this many seconds for the 1-minute load average to drop below 0.5")
    ap.add_argument("--quality", default=str(ROOT / "benchmarks" / "results" / "quant_quality.json"),
                    help="the quality benchmark's JSON: which variants pass the bounds (for `best`)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default: results/serving_cpu.json for small, else "
                                                ".benchmarks/serving_<preset>.json); the PNGs go beside it")
    args = ap.parse_args()
    try:
        specs = parse_variants(args.variants)
    except ValueError as e:
        ap.error(str(e))
    clients = [int(c) for c in args.clients.split(",")]
    videos = [int(v) for v in args.videos.split(",")]
    if len(videos) == 1:
        videos *= len(clients)
    if len(videos) != len(clients) or min(clients) < 1 or min(videos) < 1:
        ap.error("--videos takes one positive number or one per --clients case")
    if clients != sorted(clients):
        ap.error("--clients must be in increasing order")
    max_batch = args.max_batch or 2 * max(clients)
    compare = [m for m in (int(x) for x in args.compare_max_batch.split(",") if x) if m != max_batch]
    if args.out:
        out = Path(args.out)
    elif args.preset == "small":
        out = ROOT / "benchmarks" / "results" / "serving_cpu.json"
    else:
        out = ROOT / ".benchmarks" / f"serving_{args.preset}.json"
    occ_png, thr_png = report.serving_paths(out)
    quality_path = Path(args.quality)
    quality = read_quality(quality_path)

    import onnxruntime

    t_total = time.perf_counter()
    engines = {}
    for w, kv in specs:  # export (first run) / load every bundle before measuring anything
        engines[(w, kv)] = open_engine(args.preset, w, kv)
        print(f"{w}/{kv}: {engines[(w, kv)][1].name}, sampler {engines[(w, kv)][0].sampler_name}", flush=True)
        engines[(w, kv)][0].close()  # reopened in its turn: one variant's sessions in memory at a time
    load = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else {"load1_before": load1(), "waited_s": 0.0}
    first = engines[specs[0]][0].generator_config
    n_classes, n_tokens = first.num_classes, first.max_seq_len
    requests = [make_requests(v, n_classes, args.seed + 10 + i) for i, v in enumerate(videos)]  # every variant's
    big = int(np.argmax(clients))
    plan = {"clients": clients, "videos": videos, "max_batch": max_batch, "requests": requests,
            "sequential": args.sequential or len(requests[big])}
    print(f"{args.preset}: {len(specs)} variants, {n_tokens} tokens per video, max_batch {max_batch}, "
          f"load {load['load1_before']:.2f}", flush=True)

    variants = []
    for i, (w, kv) in enumerate(specs):
        eng, bundle = open_engine(args.preset, w, kv)
        print(f"variant {w}/{kv} ({i + 1}/{len(specs)}), sampler {eng.sampler_name}", flush=True)
        q = quality.get((w, kv))
        v = {"name": f"{w}/{kv}", "weights": w, "kv": kv,
             "bundle": str(bundle.relative_to(ROOT) if bundle.is_relative_to(ROOT) else bundle),
             "fused_graph": "decode_sample" in Bundle(bundle).graphs,
             "quality": {"passes": q["passes"], "status": q["status"]} if q else None,
             **run_variant(eng, args, plan, compare if (i == 0 or args.compare_all) else [])}
        eng.close()
        del eng
        gc.collect()
        variants.append(v)
        r, g = v["ratios"], v["goal"]
        print(f"  {v['name']}: {r['throughput_vs_sequential']:.2f}x one at a time, p50 {r['p50_vs_lone']:.2f}x "
              f"lone at {r['clients']} clients: {'met' if g['met'] else 'not met'}; tokens equal to sequential: "
              f"{v['tokens_match_sequential']}; {v['duration_s']:.0f} s", flush=True)
    total_s = time.perf_counter() - t_total
    load_after = load1()

    base = next((v for v in variants if (v["weights"], v["kv"]) == ("fp32", "fp32")), variants[0])
    best = pick_best(variants, quality, quality_path)
    other_cores = max(v["max_other_cores"] for v in variants)
    result = {
        "machine": machine_name(), "onnxruntime": onnxruntime.__version__, "date": time.strftime("%Y-%m-%d"),
        "settings": {"preset": args.preset, "tokens_per_video": n_tokens, "backend": "onnxruntime",
                     "sampler": base["sampler"], "ort_spin": os.environ.get("LARP_RT_ORT_SPIN", "1"),
                     "max_batch": max_batch, "cfg_scale": CFG_SCALE,
                     "mix": {"temperature": TEMPERATURES, "top_k": TOP_KS, "top_p": TOP_PS},
                     "load": "closed loop, exponential think time", "think_mean_s": base["think_mean_s"],
                     "clients": clients, "videos": videos, "sequential": plan["sequential"], "lone": args.lone,
                     "compare_max_batch": compare, "seed": args.seed, "variants": [v["name"] for v in variants],
                     "command": "benchmarks/bench_serving.py " + " ".join(sys.argv[1:])},
        "load1_before": load["load1_before"], "load1_after": load_after,
        "quiet_wait": load,
        "max_other_cores": other_cores,  # the most cores other processes used in any phase (0 = had the CPU alone)
        # the baseline (fp32/fp32, else the first variant) in the fields of the single-bundle runs
        "baseline": base["name"],
        **{k: base[k] for k in ("lone", "sequential", "cases", "other_max_batch", "ratios", "goal",
                                "tokens_match_sequential")},
        "variants": variants, "best": best,
        "total_s": total_s,
        "occupancy_png": str(occ_png.relative_to(ROOT) if occ_png.is_relative_to(ROOT) else occ_png),
        "throughput_png": str(thr_png.relative_to(ROOT) if thr_png.is_relative_to(ROOT) else thr_png),
    }
    result["matplotlib"] = draw(result, occ_png, thr_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for v in variants:
        r = v["ratios"]
        print(f"{v['name']:>10}: sequential {v['sequential']['throughput_vpm']:.2f} videos/min, at {r['clients']} "
              f"clients {v['cases'][big]['throughput_vpm']:.2f} ({r['throughput_vs_sequential']:.2f}x, goal >= "
              f"{GOAL_THROUGHPUT}); p50 / lone {r['p50_vs_lone']:.2f}x (goal <= {GOAL_P50}); "
              f"{'met' if v['goal']['met'] else 'not met'}")
    if best["name"]:
        print(f"best passing variant: {best['name']}, goal {'met' if best['goal_met'] else 'not met'}")
    else:
        print(f"no variant eligible for `best`: {best['not_eligible']}")
    print(f"wrote {out}, {occ_png} and {thr_png} in {total_s:.0f} s", file=sys.stderr)
    print(json.dumps({"machine": result["machine"], "preset": args.preset, "max_batch": max_batch,
                      "variants": [{"name": v["name"], "sampler": v["sampler"],
                                    "lone_s": round(v["lone"]["median_s"], 4),
                                    "sequential_vpm": round(v["sequential"]["throughput_vpm"], 3),
                                    "cases": [brief(c, "clients", "throughput_vpm", "p50_s") for c in v["cases"]],
                                    "ratios": {k: round(x, 3) if isinstance(x, float) else x
                                               for k, x in v["ratios"].items()}, "goal_met": v["goal"]["met"]}
                                   for v in variants],
                      "best": best["name"], "best_goal_met": best["goal_met"], "max_other_cores": other_cores,
                      "load1_before": load["load1_before"], "load1_after": load_after, "total_s": round(total_s)}))


def draw(result: dict, occ_png: Path, thr_png: Path) -> str | None:
    """Both figures (report.py's, which also redraws them from the JSON); matplotlib's version, None without it."""
    try:
        import matplotlib
    except ImportError:
        print("no matplotlib: figures skipped (pip install -e '.[bench]'; then report.py serving)", file=sys.stderr)
        return None
    report.plot_serving_occupancy(result, occ_png)
    report.plot_serving_throughput(result, thr_png)
    return matplotlib.__version__


if __name__ == "__main__":
    main()
