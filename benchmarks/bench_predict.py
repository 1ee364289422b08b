"""Frame prediction on this CPU (ONNX Runtime): the multi-token prefill of a 1025-token prefix against 1025 single
decode steps, and the whole prediction's latency at batch 1.

    .venv/bin/python benchmarks/bench_predict.py [--repeats 3] [--out benchmarks/results/predict_cpu.json]

Shapes (random weights, exported once and cached under .benchmarks/bundles/):

* generator: the ``small`` preset (512 wide, 8 layers, 8 heads; V 8192) as a frame-prediction generator of the
  authors' geometry (prefix 1024 tokens + the separator = 1025 = ``cls_token_num``, position table 2048);
* tokenizer: ``larp-s`` (512 wide, 6 + 6 layers; 16x128x128 clips, 1024 tokens, codebook 8192).

Timed (medians of ``--repeats`` after a warm-up):

* ``prefill``: one run of ``prefix_prefill.onnx`` over the 1025-token prefix + the writes of its entries into the
  runner's cache (``StepRunner.prefill``), against ``steps``: the same prefix as 1025 decode steps (positions
  0..1024, each writing its entry), on the same runner;
* ``predict``: ``Engine.predict`` of one clip (5 conditioning frames): encode + prefill + 1024 sampled tokens +
  decode, with each part also timed alone.

Ends with one JSON line (also written to ``--out``).
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

from conftest import CACHE  # noqa: E402

from larp_rt import Engine, GeneratorConfig, SamplingParams, TokenizerConfig, __version__, save_pretrained  # noqa: E402
from larp_rt.bench import machine_name, time_runs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def fp_bundle() -> Path:
    from larp_rt.export import export_bundle

    from larp_rt.bundle import Bundle, BundleError
    from larp_rt.models import LARPGenerator, LARPTokenizer

    out = CACHE / "predict-small"
    if (out / "manifest.json").exists():
        try:
            if "prefix_prefill" in Bundle(out).graphs:
                return out
        except BundleError as e:
            print(f"rebuilding the cached bundle: {e}", file=sys.stderr)
    torch.manual_seed(0)
    tok = LARPTokenizer(TokenizerConfig.from_name("larp-s"))
    gen = LARPGenerator(GeneratorConfig.from_name("small", frame_prediction=True, cls_token_num=1025,
                                                  class_dropout_prob=0.0))
    torch.nn.init.normal_(tok.final_layer.linear.weight, std=0.02)
    torch.nn.init.normal_(gen.output.weight, std=0.02)
    ck = CACHE / "predict-small-ckpt"
    save_pretrained(tok, ck / "tokenizer")
    save_pretrained(gen, ck / "generator")
    return export_bundle(ck / "tokenizer", ck / "generator", out, overwrite=True, onnx_only=True,
                         printer=lambda s: None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "predict_cpu.json"))
    args = ap.parse_args()
    load_before = os.getloadavg()
    t_build = time.perf_counter()
    bundle = fp_bundle()
    build_s = time.perf_counter() - t_build
    eng = Engine(bundle, backend="onnxruntime", device="cpu", threads=args.threads)
    tc, gc = eng.tokenizer_config, eng.generator_config
    P, N = gc.cls_token_num, gc.max_seq_len
    rng = np.random.default_rng(0)
    frames = (rng.random((1, 5) + (tc.height, tc.width, 3)) * 255).astype(np.uint8)
    prefix = eng.cond_tokens(frames)  # (1, 1025)
    be = eng.backend
    runner = be.new_runner(1)
    rows = np.zeros(1, np.int64)

    def prefill():
        runner.prefill(rows, prefix)

    def steps():
        pos = np.zeros(1, np.int64)
        for p in range(P):
            pos[0] = p
            runner.run(prefix[:, p], pos)

    prefill()
    steps()  # warm-up (and the windowed cache grown to its full width)
    t_prefill, all_prefill = time_runs(prefill, args.repeats)
    t_steps, all_steps = time_runs(steps, max(1, min(args.repeats, 2)))
    # both paths write the same cache entries (the step loop's last logits = the prefill's)
    pos = np.zeros(1, np.int64)
    for p in range(P):
        pos[0] = p
        last = runner.run(prefix[:, p], pos).copy()
    same = float(np.abs(last - runner.prefill(rows, prefix)).max())
    runner.close()

    clip = np.concatenate([frames, np.repeat(frames[:, -1:], tc.frames - 5, axis=1)], axis=1)
    params = SamplingParams(temperature=1.0, seed=0)
    eng.predict(frames, params)  # warm-up
    t_predict, all_predict = time_runs(lambda: eng.predict(frames, params), args.repeats)
    t_encode, _ = time_runs(lambda: eng.encode(clip), args.repeats)
    toks = eng.predict_iter(frames, params)
    gen_times = []
    t = time.perf_counter()
    for ev in toks:
        now = time.perf_counter()
        gen_times.append(now - t)
        t = now
        if ev.step == N - 1:
            break
    toks.close()
    t_decode, _ = time_runs(lambda: eng.decode(prefix[:, :N]), args.repeats)
    step0 = gen_times[0]  # the prefill + token 0 (predict_iter encodes the conditioning before it)
    per_token = statistics.median(gen_times[1:])
    out = {
        "bench": "predict", "larp_rt": __version__, "machine": f"{machine_name()}, python {platform.python_version()}",
        "threads": args.threads, "loadavg_before": [round(x, 2) for x in load_before],
        "generator": f"small FP (dim {gc.dim}, {gc.n_layer} layers, {gc.n_head} heads, V {gc.vocab_size}, prefix {P}, "
                     f"{gc.num_positions} positions), random weights, fp32",
        "tokenizer": f"larp-s ({tc.enc_dim} wide, {tc.enc_depth}+{tc.dec_depth} layers, "
                     f"{tc.frames}x{tc.height}x{tc.width}), random weights, fp32",
        "prefix_tokens": P,
        "prefill_ms": round(t_prefill * 1e3, 2), "prefill_runs_ms": [round(x * 1e3, 2) for x in all_prefill],
        "single_steps_ms": round(t_steps * 1e3, 1), "single_steps_runs_ms": [round(x * 1e3, 1) for x in all_steps],
        "prefill_speedup": round(t_steps / t_prefill, 2),
        "prefill_vs_steps_max_abs_logits": same,
        "predict_b1_s": round(t_predict, 3), "predict_b1_runs_s": [round(x, 3) for x in all_predict],
        "encode_ms": round(t_encode * 1e3, 1), "decode_ms": round(t_decode * 1e3, 1),
        "first_token_ms": round(step0 * 1e3, 1), "per_token_ms": round(per_token * 1e3, 2),
        "bundle_build_s": round(build_s, 1), "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
