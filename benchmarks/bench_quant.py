"""Quantized generators against float32 on ONNX Runtime and against the authors' PyTorch loop (`small`, random
weights), side by side in one run: weights fp32 / int8 / int4 x KV cache fp32 / fp16 / int8.

    .venv/bin/python benchmarks/bench_quant.py --json benchmarks/results/quant_speed.json   # full run
    .venv/bin/python benchmarks/bench_quant.py --quick --json /tmp/quant_speed.json         # smoke run

Measured, every variant interleaved (round-robin, so the shared host's swings hit all alike):

* one decode step at positions 1, 512 and 1023 (the cache filled to that position with random entries), batch 1
  and 8 with CFG (2 and 16 rows), sampling included, as the engine runs it (the runner's ``run`` on the fused
  decode_sample graph: one ONNX Runtime run per token); the median of repeated steps;
* whole videos (``Engine.generate``, batch 1 and 8, CFG 2.0), ms per token;
* the authors' loop (``authors_loop.py``, their eager PyTorch step / whole ``generate`` on the same float32
  model) as the reference beside them; for whole videos it runs before and after ours in every round
  (``authors_runs`` in its record), and its figure is the median of both;
* beside the default float32 bundle (its fused ``decode_sample.onnx``: DecodeAttention + PackedMatMul + Sample),
  the same bundle's portable ``decode.onnx`` with the C++ kernel sampler (path ``onnxruntime-standard``): what
  machines without the custom-op library run, and what an export without flags ran before the fused step became
  the default.

This is the run the README's speed tables come from (``benchmarks/report.py quant`` prints them).

Ratios: to the float32 weight-read floor (float32 weight bytes / read bandwidth probed in the same run) and to the
variant's own bytes' floor (its weight bytes + the K/V bytes a step at that position must read: ``pos`` slots of
every layer, row and head, in the variant's KV dtype, int8 with its float32 per-(token, head) scales); for whole
videos the floor is summed over every position of the video.

Variants whose bundle cannot be built here (``export_bundle`` without ``kv_dtype``, no custom-op library) are
listed with ``status: "skipped: ..."`` and no numbers. Bundles are exported once and cached under
.benchmarks/bundles (the first run adds 1-2 min per variant). Runtime once cached (AMD EPYC Zen 4, 2 cores):
full 16 min and --quick 10 min measured on the shared, loaded host (a third of it loading the ten bundles under
disk contention); estimated 10-12 min and 4-5 min quiet. Ends with one JSON line; --json PATH also writes it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
from conftest import CACHE, build_bundle, cached_bundle, measure_bandwidth

from larp_rt import Engine, SamplingParams
from larp_rt.backends.base import ContinuousBatch, Sequence, StepSample
from larp_rt.bench import machine_name
from larp_rt.bundle import Bundle
from larp_rt.sampling import RowParams, resolve_params

GATHERED = ("table", "abs_pe")  # embedding rows gathered per step: not read whole
WEIGHTS = ("fp32", "int8", "int4")
KVS = ("fp32", "fp16", "int8")
KV_ELEM_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
KV_SCALE_BYTES = {"fp32": 0, "fp16": 0, "int8": 4}  # int8: one float32 scale per (token, head), K and V each
AUTHORS = ("authors", "fp32", "fp32")  # (path, weights, kv)
CFG = 2.0
POSITIONS = (1, 512, 1023)


STANDARD = ("onnxruntime-standard", "fp32", "fp32")  # the default bundle's portable decode.onnx + the C++ sampler


def variant_name(path: str, weights: str, kv: str) -> str:
    if path == "authors":
        return "authors' loop (torch, fp32)"
    if path == STANDARD[0]:
        return "fp32 standard-ops decode.onnx + kernel sampler"
    return f"w {weights} / kv {kv}"


def variant_bundle(preset: str, weights: str, kv: str) -> Path | str:
    """The cached bundle of a variant, exported on first use; a string saying why not when it cannot be built."""
    from larp_rt import kernels

    base = build_bundle(preset)
    if weights == "fp32" and kv == "fp32":
        return base
    out = CACHE / (f"{preset}-{weights}" + ("" if kv == "fp32" else f"-kv{kv}"))
    if cached_bundle(out) is None:
        from larp_rt.export import export_bundle

        fused = kernels.ort_custom_op_library() is not None
        kw = {} if kv == "fp32" else {"kv_dtype": kv}
        if kv != "fp32" and not fused:
            return "skipped: the narrow KV cache needs the ONNX Runtime custom-op library (pip install -e .)"
        ck = CACHE / f"{preset}-ckpt"
        try:
            export_bundle(ck / "tokenizer", ck / "generator", out, precision=weights, overwrite=True, onnx_only=True,
                          printer=lambda s: None, fused_sampler=fused, **kw)
        except TypeError as e:
            if "kv_dtype" in str(e):
                return "skipped: kv_dtype not on this branch"
            raise
    got = Bundle(out).kv_cache_spec.dtype or "fp32"
    if got != kv:
        raise RuntimeError(f"bundle {out} records KV dtype {got!r}, not {kv!r}: delete it and re-run")
    return out


def weight_bytes(bundle: Path) -> int:
    """Bytes of the decode graph's initializers read every step (all but the gathered embedding tables)."""
    import onnx

    b = Bundle(bundle)
    g = onnx.load(str(b.graph_path("decode")), load_external_data=True).graph
    return sum(len(t.raw_data) or t.ByteSize() for t in g.initializer
               if not any(t.name == n or t.name.endswith("." + n) for n in GATHERED) and len(t.raw_data) > 4096)


def kv_slot_bytes(cfg, kv: str, rows: int) -> int:
    """K/V bytes of one cache slot (position) over every layer, row and head, scales included."""
    return cfg.n_layer * 2 * rows * cfg.n_head * (cfg.head_dim * KV_ELEM_BYTES[kv] + KV_SCALE_BYTES[kv])


def touch(runner) -> None:
    """Write every buffer of a runner once, so that a step reads real pages (np.zeros maps untouched pages to the
    kernel's one zero page, which a step would "read" from cache): float buffers get N(0, 0.25) entries, integer
    caches small random codes, scales (any float buffer whose name says so) positive values."""
    rng = np.random.default_rng(0)

    def fill(a: np.ndarray, name: str) -> None:
        if np.issubdtype(a.dtype, np.floating):
            v = rng.standard_normal(a.size, dtype=np.float32).reshape(a.shape) * 0.5
            scales = "scale" in name or name.endswith("_s")  # int8 caches' per-slot scales (flat_s, new_s)
            a[...] = (np.abs(v) / 64 + 1e-3 if scales else v).astype(a.dtype)
        elif a.dtype == np.int8:
            a[...] = rng.integers(-127, 128, a.shape, dtype=np.int8)

    for name, val in vars(runner).items():
        if name in ("token", "pos", "sample_rows", "params", "sample_step", "tokens", "logprobs", "logits"):
            continue  # inputs and outputs the step binds: not the cache
        if isinstance(val, np.ndarray):
            fill(val, name)
        elif isinstance(val, list | tuple) and "views" not in name:  # views: of the flat buffers
            for a in val:
                if isinstance(a, np.ndarray):
                    fill(a, name)


def ort_step(eng: Engine, batch: int, pos: int):
    """One ONNX Runtime step at ``pos`` for ``batch`` guided requests (2 * batch rows: the requests, then their
    null-class rows, as ``Engine.generate`` lays them out), sampling included, on the engine's sampler (the fused
    decode_sample graph: ``runner.run`` returns the tokens; else the decode graph + the backend's sampler)."""
    be, cfg = eng.backend, eng.generator_config
    params = resolve_params(SamplingParams(seed=0, cfg_scale=CFG), batch)
    runner = be.runner(2 * batch)
    cb = ContinuousBatch(be, runner)
    fields = RowParams.__dataclass_fields__
    for i in range(batch):
        one = RowParams(**{f: getattr(params, f)[i:i + 1] for f in fields})
        cb.admit(Sequence(i % cfg.num_classes, one, cfg.max_seq_len), (i, batch + i))
    cb.step()  # prefill: binds the runner's rows and caches
    touch(runner)
    R = 2 * batch
    tokens, positions = np.zeros(R, np.int64), np.full(R, pos, np.int64)
    k = pos - cfg.cls_token_num + 1  # the sampling step whose token the step at position ``pos`` draws
    steps = np.full(batch, k, np.int64)
    if runner.samples:
        sample = StepSample(np.arange(R, dtype=np.int64), params, steps, version=-1)
        return lambda: runner.run(tokens, positions, sample)
    from larp_rt.sampling import uniform_table

    extra = {"u": uniform_table(params, k + 1)[:, k]} if be.sampler_takes_uniform else {}

    def step():
        logits = runner.run(tokens, positions)
        return be.sampler(logits[:batch], logits[batch:R], params, steps, **extra)

    return step


def authors_step(gen, batch: int, pos: int):
    """The authors' eager step (their CFG doubling, mix and sampling) on the torch model, caches random."""
    import torch
    from authors_loop import authors_decode_one_token

    gen.setup_caches(2 * batch)
    gen.prefill(torch.arange(2 * batch) % gen.config.num_classes)
    g = torch.Generator().manual_seed(0)
    for layer in gen.layers:
        for buf in (layer.attention.kv_cache.k_cache, layer.attention.kv_cache.v_cache):
            buf.copy_(torch.randn(buf.shape, generator=g) * 0.5)
    x, p = torch.zeros(batch, 1, dtype=torch.int64), torch.tensor([pos])
    return lambda: authors_decode_one_token(gen, x, p, CFG, temperature=1.0, top_k=0, top_p=1.0)


def _authors_worker(conn, generator_dir: str) -> None:
    """The authors' loop in a process of its own, as they run it (a torch process): in the benchmark's process,
    ONNX Runtime's thread pools would hold the cores torch's threads need (torch steps there ran up to 5x
    slower). Commands: ("step", B, pos) builds a step; ("block", k) times k of them after an untimed one;
    ("video", ids, n, seed) times a whole ``authors_generate``; ("stop",)."""
    import torch
    from authors_loop import authors_generate

    from larp_rt import load_pretrained

    torch.set_grad_enabled(False)
    gen = load_pretrained(generator_dir).eval()
    step = None
    conn.send("ready")
    while True:
        cmd, *a = conn.recv()
        if cmd == "stop":
            return
        if cmd == "step":
            step = authors_step(gen, *a)
            step()
            conn.send(None)
        elif cmd == "block":
            step()
            times = []
            for _ in range(a[0]):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            conn.send(times)
        elif cmd == "video":
            ids, n, seed = a
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            authors_generate(gen, torch.tensor(ids), n, cfg_scale=CFG)
            conn.send(time.perf_counter() - t0)


class AuthorsProcess:
    """Client of ``_authors_worker`` (spawned once; idle, blocked on its pipe, while the other variants run)."""

    def __init__(self, generator_dir: Path):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_authors_worker, args=(child, str(generator_dir)), daemon=True)
        self.proc.start()
        if self.conn.recv() != "ready":
            raise RuntimeError("the authors' worker did not start")

    def call(self, *cmd):
        self.conn.send(cmd)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(("stop",))
        self.proc.join(30)


def settle() -> None:
    """A short idle gap between variants: ONNX Runtime's (and torch's) worker threads spin for a while after a
    run and would steal the next variant's cores."""
    time.sleep(0.05)


def _timed(fn, k: int) -> list[float]:
    fn()  # untimed: the variant's buffers back in cache, its threads awake
    times = []
    for _ in range(k):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def bench_steps(variants: dict, batches, positions, rounds: int, block: int, printer) -> list[dict]:
    """Per-step times: for each (batch, position) every variant's step is built, then ``rounds`` rounds run a
    block of ``block`` timed steps per variant in turn (one untimed step first), the bandwidth probed per round."""
    out = []
    for B in batches:
        for pos in positions:
            blocks = {}
            for key, v in variants.items():
                if key == AUTHORS:
                    v["proc"].call("step", B, pos)
                    blocks[key] = lambda k, p=v["proc"]: p.call("block", k)
                else:
                    fn = ort_step(v["engine"], B, pos)
                    blocks[key] = lambda k, fn=fn: _timed(fn, k)
            times = {key: [] for key in blocks}
            bws = [measure_bandwidth()]
            for _ in range(rounds):
                for key, run in blocks.items():
                    settle()
                    times[key] += run(block)
                bws.append(measure_bandwidth())
            del blocks
            gc.collect()
            bw = statistics.median(bws) * 1e9
            for key in variants:
                out.append({"batch": B, "rows": 2 * B, "pos": pos, "times_ms": [1e3 * t for t in times[key]],
                            "bandwidth_gbs": bw / 1e9, "bandwidth_range_gbs": [min(bws), max(bws)],
                            **dict(zip(("path", "weights", "kv"), key, strict=True))})
            printer(f"steps batch {B} pos {pos}: " + ", ".join(
                f"{variant_name(*k)} {1e3 * statistics.median(t):.2f} ms" for k, t in times.items()))
    return out


def bench_videos(variants: dict, batches, videos: int, n: int, C: int, printer) -> list[dict]:
    """Whole videos per variant, interleaved, the bandwidth probed around each; the authors' ``generate``."""
    out = []
    for B in batches:
        for key, v in variants.items():  # warm-up: sessions, this batch's runner, its pages
            if key == AUTHORS:
                v["proc"].call("video", list(range(B)), 8, 0)
            else:
                it = v["engine"].generate_iter(list(range(B)), SamplingParams(seed=0, cfg_scale=CFG))
                for _ in range(8):
                    next(it)
                it.close()
                touch(v["engine"].backend.runner(2 * B))
        times = {key: [] for key in variants}
        bws = []
        # the authors' loop runs before and after ours in every round (their figure is the median of both)
        order = [AUTHORS] * (AUTHORS in variants) + [k for k in variants if k != AUTHORS] \
            + [AUTHORS] * (AUTHORS in variants)
        authors_when = []
        for i in range(videos):
            for j, key in enumerate(order):
                v = variants[key]
                if key == AUTHORS:
                    authors_when.append("before" if j == 0 else "after")
                ids = [(i + j) % C for j in range(B)]
                b0 = measure_bandwidth()
                if key == AUTHORS:
                    dt = v["proc"].call("video", ids, n, i)
                else:
                    t = time.perf_counter()
                    v["engine"].generate(ids, SamplingParams(seed=i, cfg_scale=CFG))
                    dt = time.perf_counter() - t
                times[key].append(dt / n)
                bws += [b0, measure_bandwidth()]
        bw = statistics.median(bws) * 1e9
        for key in variants:
            out.append({"batch": B, "rows": 2 * B, "per_token_ms": [1e3 * t for t in times[key]],
                        "bandwidth_gbs": bw / 1e9, "bandwidth_range_gbs": [min(bws), max(bws)],
                        **({"authors_runs": authors_when} if key == AUTHORS else {}),
                        **dict(zip(("path", "weights", "kv"), key, strict=True))})
        printer(f"videos batch {B}: " + ", ".join(
            f"{variant_name(*k)} {1e3 * statistics.median(t):.2f} ms/token" for k, t in times.items()))
    return out


def references(rows: list[dict], field: str, **case) -> dict:
    """The median ms of float32 ONNX Runtime ("fp32") and of the authors' loop ("authors") in the same case."""
    ref = {}
    for x in rows:
        if all(x[k] == v for k, v in case.items()):
            if (x["path"], x["weights"], x["kv"]) == ("onnxruntime", "fp32", "fp32"):
                ref["fp32"] = statistics.median(x[field])
            elif x["path"] == "authors":
                ref["authors"] = statistics.median(x[field])
    return ref


def ratios(row: dict, ms: float, w32: int, own_w: int, kv_bytes: float, ref: dict) -> dict:
    """The row's ratios: ms against the fp32 ORT and the authors' figures of the same case and the two floors."""
    bw = row["bandwidth_gbs"] * 1e9
    f32, own = w32 / bw, (own_w + kv_bytes) / bw
    return {"fp32_weight_floor_ms": 1e3 * f32, "own_bytes_floor_ms": 1e3 * own,
            "x_fp32_weight_floor": ms / 1e3 / f32, "x_own_bytes_floor": ms / 1e3 / own,
            "vs_fp32": ms / ref["fp32"] if ref.get("fp32") else None,
            "vs_authors": ms / ref["authors"] if ref.get("authors") else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 1 only, fewer repeats (about 3 min once cached)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batches", help="comma-separated batch sizes (default 1,8; --quick: 1)")
    ap.add_argument("--videos", type=int, help="whole videos per variant and batch (default 1)")
    ap.add_argument("--rounds", type=int, help="rounds of step blocks per variant (default 4; --quick: 2)")
    ap.add_argument("--block", type=int, help="timed steps per block (default 8; --quick: 4)")
    ap.add_argument("--no-authors", action="store_true", help="leave the authors' loop out")
    ap.add_argument("--json", help="also write the result to this file")
    ap.add_argument("--note", default="", help="how the machine was loaded while measuring (recorded in the JSON)")
    args = ap.parse_args()
    batches = [int(x) for x in (args.batches or ("1" if args.quick else "1,8")).split(",")]
    videos = args.videos or 1
    rounds = args.rounds or (2 if args.quick else 4)
    block = args.block or (4 if args.quick else 8)
    t_start = time.perf_counter()
    load_before = os.getloadavg()

    listed, variants = [], {}
    for w in WEIGHTS:
        for kv in KVS:
            got = variant_bundle(args.preset, w, kv)
            entry = {"path": "onnxruntime", "weights": w, "kv": kv}
            if isinstance(got, str):
                listed.append({**entry, "status": got})
                print(f"{variant_name('onnxruntime', w, kv)}: {got}", flush=True)
                continue
            eng = Engine(got, backend="onnxruntime", device="cpu")
            nb = weight_bytes(got)
            variants[("onnxruntime", w, kv)] = {"engine": eng, "weight_bytes": nb}
            listed.append({**entry, "status": "ok", "sampler": eng.sampler_name, "weight_bytes": nb,
                           "bundle": str(got.relative_to(CACHE.parents[1]))})
    base = variants[("onnxruntime", "fp32", "fp32")]
    cfg = base["engine"].generator_config
    if base["engine"].sampler_name != "kernel":  # the same bundle's portable graph: what a no-flags user got before
        eng = Engine(variant_bundle(args.preset, "fp32", "fp32"), backend="onnxruntime", device="cpu", sampler="kernel")
        variants[STANDARD] = {"engine": eng, "weight_bytes": base["weight_bytes"]}
        listed.append({"path": STANDARD[0], "weights": "fp32", "kv": "fp32", "status": "ok", "sampler": "kernel",
                       "weight_bytes": base["weight_bytes"], "bundle": listed[0].get("bundle")})
    if not args.no_authors:
        proc = AuthorsProcess(CACHE / f"{args.preset}-ckpt" / "generator")
        variants[AUTHORS] = {"proc": proc, "weight_bytes": base["weight_bytes"]}
        listed.append({"path": "authors", "weights": "fp32", "kv": "fp32", "status": "ok", "sampler": "torch",
                       "weight_bytes": base["weight_bytes"]})
    w32 = base["weight_bytes"]
    n, C = cfg.max_seq_len, cfg.num_classes
    positions = [p for p in POSITIONS if p < n] or [1, n // 2, n - 1]
    print(f"{args.preset}: {n} tokens per video; " + "; ".join(
        f"{variant_name(*k)}: {v['weight_bytes'] / 1e6:.1f} MB weights/step" for k, v in variants.items()), flush=True)

    step_rows = bench_steps(variants, batches, positions, rounds, block, lambda s: print(s, flush=True))
    video_rows = bench_videos(variants, batches, videos, n, C, lambda s: print(s, flush=True))

    def key(r):
        return (r["path"], r["weights"], r["kv"])

    steps = []
    for r in step_rows:
        ms = statistics.median(r["times_ms"])
        ref = references(step_rows, "times_ms", batch=r["batch"], pos=r["pos"])
        kv_b = r["pos"] * kv_slot_bytes(cfg, r["kv"], r["rows"])
        own_w = variants[key(r)]["weight_bytes"]
        steps.append({"preset": args.preset, "cfg_scale": CFG, **{k: r[k] for k in ("path", "weights", "kv")},
                      "batch": r["batch"], "rows": r["rows"], "pos": r["pos"], "ms": ms,
                      "ms_range": [min(r["times_ms"]), max(r["times_ms"])], "repeats": len(r["times_ms"]),
                      "weight_bytes": own_w, "kv_bytes": kv_b, "bandwidth_gbs": r["bandwidth_gbs"],
                      "bandwidth_range_gbs": r["bandwidth_range_gbs"], **ratios(r, ms, w32, own_w, kv_b, ref)})
    results = []
    for r in video_rows:
        ms = statistics.median(r["per_token_ms"])
        ref = references(video_rows, "per_token_ms", batch=r["batch"])
        kv_b = kv_slot_bytes(cfg, r["kv"], r["rows"]) * (n - 1) / 2  # mean over positions 0..n-1 of pos slots
        own_w = variants[key(r)]["weight_bytes"]
        q = ratios(r, ms, w32, own_w, kv_b, ref)
        results.append({"preset": args.preset, "batch": r["batch"], "rows": r["rows"], "cfg_scale": CFG,
                        **{k: r[k] for k in ("path", "weights", "kv")}, "ms_per_token": ms, "ms_per_step": ms,
                        "per_token_ms_all": r["per_token_ms"], "videos": len(r["per_token_ms"]),
                        **({"authors_runs": r["authors_runs"]} if "authors_runs" in r else {}),
                        "weight_bytes": own_w, "kv_bytes_mean": kv_b, "bandwidth_gbs": r["bandwidth_gbs"],
                        "bandwidth_range_gbs": r["bandwidth_range_gbs"], **q,
                        "x_own_weight_floor": ms / 1e3 / (own_w / (r["bandwidth_gbs"] * 1e9))})
    if AUTHORS in variants:
        variants[AUTHORS]["proc"].close()
    total = time.perf_counter() - t_start
    for r in steps:
        print(f"step b{r['batch']} pos {r['pos']:>4} {variant_name(r['path'], r['weights'], r['kv']):<28} "
              f"{r['ms']:7.2f} ms  x{r['x_fp32_weight_floor']:.2f} fp32 floor  x{r['x_own_bytes_floor']:.2f} own "
              f"bytes  ({r['bandwidth_gbs']:.1f} GB/s)")
    for r in results:
        print(f"video b{r['batch']} {variant_name(r['path'], r['weights'], r['kv']):<28} {r['ms_per_token']:7.2f} "
              f"ms/token  x{r['x_fp32_weight_floor']:.2f} fp32 floor  x{r['x_own_bytes_floor']:.2f} own bytes")
    out = {"bench": "quant_speed", "schema": 2, "machine": machine_name(), "note": args.note,
           "mode": "quick" if args.quick else "full", "preset": args.preset, "cfg_scale": CFG,
           "command": "benchmarks/bench_quant.py" + (" --quick" if args.quick else ""),
           "duration_s": round(total, 1), "positions": positions, "batches": batches,
           "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
           "floors": "fp32_weight_floor = fp32 decode weight bytes / probed read bandwidth; own_bytes_floor = "
                     "(variant weight bytes + K/V bytes of pos slots in its KV dtype, int8 scales included) / "
                     "bandwidth; whole videos: the mean over positions 0..n-1",
           "variants": listed, "steps": steps, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"total {total:.0f} s", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
