"""Peak memory of ``larp-rt serve`` under concurrent worst-case requests within its documented limits.

    .venv/bin/python benchmarks/bench_server_memory.py                  # the tiny trained pair, ~1 min
    .venv/bin/python benchmarks/bench_server_memory.py --bundle DIR --concurrency 8 --out results.json

The server runs in its own process (`larp-rt serve` on 127.0.0.1, a free port, default limits); its resident set
is read from /proc (VmRSS while it runs, VmHWM: the kernel's high-water mark). Each case sends ``--concurrency``
requests at once, each as large as the limits allow:

* decode_mp4 / decode_gif / decode_npy: POST /v1/decode with the most token rows (256) at the largest scale that
  fits ``--max-video-mpixels`` (a GIF counts 4x; npy ignores scale);
* generate_gif: POST /v1/generate of the most class ids a request may hold that fit the video budget, as a GIF;
* encode_4k: POST /v1/encode of a 3840x2160 clip (the largest frame the default upload limit admits) with T + 1
  frames;
* mixed: all of the above at once, ``--concurrency`` of each.

Requests beyond the server's video jobs in flight (8 by default) get 429: that is the limit working, and counted.
The figure is the server's peak resident set over its idle resident set after start-up.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from larp_rt import __version__  # noqa: E402
from larp_rt.bench import machine_name  # noqa: E402


def proc_mib(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, port: int, threads: int):
    cmd = [sys.executable, "-m", "larp_rt.cli", "serve", str(bundle), "--port", str(port), "--threads", str(threads),
           "--log-level", "warning", "--max-body-mb", "256"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start within 120 s")


def cases(models: dict, tmp: Path) -> dict:
    from larp_rt.video import write_video

    tok = models["tokenizer"]["config"]
    T, H, W = tok["frames"], tok["height"], tok["width"]
    N, K = tok["num_tokens"], tok["codebook_size"]
    limits = models["limits"]
    budget, gif_cost, rows = limits["max_video_pixels"], limits["gif_cost"], limits["max_token_rows"]
    per = T * H * W
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, K, (rows, N)).tolist()

    def scale_for(n, cost=1):
        return max(1, min(16, math.isqrt(budget // (n * per * cost)))) if n * per * cost <= budget else None

    out = {}
    for fmt, cost in (("mp4", 1), ("gif", gif_cost)):
        n = rows
        while scale_for(n, cost) is None:
            n //= 2
        out[f"decode_{fmt}"] = ("/v1/decode", {"json": {"tokens": tokens[:n], "format": fmt,
                                                        "scale": scale_for(n, cost)}})
    out["decode_npy"] = ("/v1/decode", {"json": {"tokens": tokens, "format": "npy"}})
    ids = min(limits["max_classes_per_request"], budget // (per * gif_cost))
    out["generate_gif"] = ("/v1/generate", {"json": {"class_ids": [0] * ids, "format": "gif", "seed": 1,
                                                    "cfg_scale": 1.0}})
    frames = (rng.random((T + 1, 2160, 3840, 3)) * 255).astype(np.uint8)
    clip = write_video(tmp / "4k.mp4", frames, fps=8).read_bytes()
    out["encode_4k"] = ("/v1/encode", {"files": {"file": ("4k.mp4", clip)}})
    return out


def run_case(url: str, pid: int, reqs: list, timeout: float) -> dict:
    peak, stop = [0.0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc_mib(pid, "VmRSS"))
            stop.wait(0.05)

    def send(item):
        path, kw = item
        with httpx.Client(base_url=url, timeout=timeout) as c:
            r = c.post(path, **kw)
            return r.status_code, len(r.content)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(reqs)) as pool:
        results = list(pool.map(send, reqs))
    seconds = time.monotonic() - t0
    stop.set()
    th.join()
    statuses = [s for s, _ in results]
    return {"requests": len(reqs), "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
            "response_mib": round(max(n for _, n in results) / 2**20, 2), "peak_rss_mib": round(peak[0], 1),
            "seconds": round(seconds, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=None, help="a bundle (default: the committed tiny pair, exported)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "server_memory.json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="larp_rt-mem-") as d:
        tmp = Path(d)
        bundle = args.bundle
        if bundle is None:
            from larp_rt.export import export_bundle

            tiny = ROOT / "checkpoints" / "tiny"
            bundle = export_bundle(tiny / "tokenizer", tiny / "generator", tmp / "bundle", printer=lambda s: None,
                                   onnx_only=True, verify=False)
        proc, url = start_server(bundle, free_port(), args.threads)
        try:
            models = httpx.get(url + "/v1/models", timeout=30).json()
            todo = cases(models, tmp)
            time.sleep(1.0)
            idle = proc_mib(proc.pid, "VmRSS")
            report = {"bench": "server_memory", "larp_rt": __version__,
                      "machine": f"{machine_name()}, python {platform.python_version()}",
                      "bundle": models["id"], "limits": models["limits"], "concurrency": args.concurrency,
                      "idle_rss_mib": round(idle, 1), "cases": {}}
            for name, req in todo.items():
                report["cases"][name] = run_case(url, proc.pid, [req] * args.concurrency, args.timeout)
                print(name, json.dumps(report["cases"][name]), flush=True)
            mixed = [req for req in todo.values() for _ in range(args.concurrency)]
            report["cases"]["mixed"] = run_case(url, proc.pid, mixed, args.timeout)
            print("mixed", json.dumps(report["cases"]["mixed"]), flush=True)
            report["peak_rss_mib"] = round(proc_mib(proc.pid, "VmHWM"), 1)
            report["peak_over_idle_mib"] = round(report["peak_rss_mib"] - idle, 1)
            report["server_5xx"] = sum(n for c in report["cases"].values() for s, n in c["statuses"].items()
                                       if s.startswith("5"))
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"idle {report['idle_rss_mib']} MiB, peak {report['peak_rss_mib']} MiB "
          f"(+{report['peak_over_idle_mib']}), 5xx {report['server_5xx']}; wrote {args.out}")
    return 0 if report["server_5xx"] == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
