"""``larp-rt demo --predict``: the committed tiny frame-prediction generator (checkpoints/tiny/fp_generator) exported
with the tiny tokenizer, predicting held-out synthetic clips from their first frames with ONNX Runtime.

Writes ``predict.mp4`` + ``predict.gif``: one row per clip, the truth (left) beside the prediction (right); prints
each clip's PSNR over the predicted frames against the repeat-last-conditioning-frame baseline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .demo import REPO_TINY
from .engine import Engine
from .sampling import SamplingParams
from .video import grid, write_video

__all__ = ["run_predict_demo"]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 10 * np.log10(1.0 / max(mse, 1e-10))


def run_predict_demo(out: str | Path = "out/demo", tokenizer: str | None = None, generator: str | None = None,
                     seed: int = 0, scale: int = 4, clips: int = 4, printer=print) -> dict:
    from .export import export_bundle

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or str(REPO_TINY / "tokenizer")
    generator = generator or str(REPO_TINY / "fp_generator")
    if not (Path(generator) / "config.json").is_file():
        raise ValueError(f"no frame-prediction generator at {generator!r}: train the tiny one with "
                         "`python -m larp_rt.training.train_fp --out checkpoints/tiny/fp_generator`, or pass "
                         "--generator")
    meta = json.loads((Path(generator) / "config.json").read_text())
    n = int(meta.get("num_cond_frames", 5))
    data_seed = int((meta.get("training") or {}).get("data_seed", 0)) + 7  # train_fp's held-out seed
    printer(f"[1/3] exporting {tokenizer} + {generator} to {out / 'bundle-predict'}")
    bundle = export_bundle(tokenizer, generator, out / "bundle-predict", overwrite=True,
                           printer=lambda s: printer("      " + s))
    eng = Engine(bundle)
    tc = eng.tokenizer_config
    from .training.data import SyntheticVideos

    ds = SyntheticVideos(clips, frames=tc.frames, height=tc.height, width=tc.width, num_classes=8, seed=data_seed)
    truth = np.stack([ds.render(i) for i in range(clips)])  # (B, 3, T, H, W) held-out clips
    printer(f"[2/3] predicting frames {n}..{tc.frames - 1} of {clips} held-out clips from their first {n} "
            f"({eng.backend_name}, greedy)")
    video, _ = eng.predict(truth, SamplingParams(temperature=0.0, seed=seed), num_cond_frames=n)
    rows = []
    for i in range(clips):
        fut = truth[i, :, n:]
        rows.append({"clip": i, "psnr_prediction": round(_psnr(video[i, :, n:], fut), 2),
                     "psnr_repeat_last_frame": round(_psnr(np.repeat(truth[i, :, n - 1:n], tc.frames - n, 1), fut), 2)})
        printer(f"      clip {i}: PSNR of the predicted frames {rows[-1]['psnr_prediction']:.2f} dB "
                f"(repeat-last-frame baseline {rows[-1]['psnr_repeat_last_frame']:.2f} dB)")
    pairs = np.stack([x for i in range(clips) for x in (truth[i], video[i])])
    g = grid(pairs, cols=2, scale=scale)
    paths = [write_video(out / "predict.mp4", g, fps=4), write_video(out / "predict.gif", g, fps=4)]
    printer(f"[3/3] wrote {', '.join(map(str, paths))} (rows: clips; left: the truth, right: the prediction from its "
            f"first {n} frames)")
    return {"bundle": str(bundle), "videos": [str(p) for p in paths], "clips": rows}
