"""Train a tiny frame-prediction generator (the authors' ``LARP-L-long-AR-FP`` recipe at the synthetic scale).

    python -m larp_rt.training.train_fp --out checkpoints/tiny/fp_generator      # ~10 min on 2 CPU cores

The synthetic clips move a shape at a constant velocity, so the future frames are predictable from the first ones.
Recipe (the authors' ``sample.py``): the first ``cond_frames`` frames of a clip, padded to the tokenizer's T by
repeating the last, are encoded (deterministic SVQ) to N tokens; the separator (index codebook size) follows: a
prefix of N + 1 tokens (``cls_token_num``). The generator is trained teacher-forced (cross-entropy) on the N tokens
of the whole clip after that prefix; at test time it samples them and the tokenizer decodes the whole clip.

Metrics on held-out clips (another data seed), written to ``metrics.json`` beside the checkpoint: PSNR of the
predicted frames after the conditioning ones against the truth (greedy and temperature-1 sampling), the same PSNR
for the baseline that repeats the last conditioning frame, and the tokenizer's reconstruction of those frames (the
ceiling at this tokenizer's quality).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import load_pretrained, save_pretrained
from ..config import GeneratorConfig
from ..models import LARPGenerator
from .data import SyntheticVideos

__all__ = ["train_fp", "pad_cond", "fp_prefix", "predict_tokens", "evaluate_fp"]

DEFAULTS = {"tokenizer": "checkpoints/tiny/tokenizer", "cond_frames": 5, "clips": 6000, "val_clips": 256,
            "steps": 1300, "batch_size": 48, "lr": 2e-3, "warmup": 80, "min_lr_ratio": 0.1, "weight_decay": 0.05,
            "grad_clip": 1.0, "seed": 0, "data_seed": 0, "model": "tiny", "threads": 2}


def pad_cond(video: torch.Tensor, n: int, frames: int | None = None) -> torch.Tensor:
    """(B, C, t, H, W) -> (B, C, T, H, W): the first n frames, the n-th repeated up to T = ``frames`` (default t)
    (the authors' conditioning clip)."""
    T = video.shape[2] if frames is None else frames
    return torch.cat([video[:, :, :n], video[:, :, n - 1:n].expand(-1, -1, T - n, -1, -1)], dim=2)


def fp_prefix(tok, video: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N + 1) int64: the deterministic tokens of the padded conditioning clip + the separator."""
    idx = tok.encode(pad_cond(video, n, tok.config.frames))
    return torch.cat([idx, torch.full_like(idx[:, :1], tok.config.codebook_size)], dim=1)


@torch.no_grad()
def predict_tokens(gen: LARPGenerator, prefix: torch.Tensor, *, temperature: float = 0.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The PyTorch model's cached sampling: prefill on the prefix, then N - 1 steps (greedy at temperature 0)."""
    B, N = len(prefix), gen.config.max_seq_len
    gen.setup_caches(B, gen.config.num_positions)
    try:
        out = torch.empty(B, N, dtype=torch.long)
        logits = gen.prefill(prefix)
        for k in range(N):
            if temperature == 0:
                t = logits.argmax(-1)
            else:
                t = torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=generator)[:, 0]
            out[:, k] = t
            if k + 1 < N:
                pos = torch.tensor([gen.config.cls_token_num + k])
                logits = gen.decode_one_token(t.view(-1, 1), pos)
    finally:
        gen.clear_caches()
    return out


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def evaluate_fp(tok, gen: LARPGenerator, videos: torch.Tensor, n: int, *, batch: int = 64, seed: int = 0) -> dict:
    """Held-out PSNR (dB, mean over clips) of frames n.. : greedy and sampled prediction, the repeat-last-frame
    baseline, and the tokenizer's reconstruction of the true clip."""
    gen.eval()
    g = torch.Generator().manual_seed(seed)
    res: dict[str, list[torch.Tensor]] = {"greedy": [], "sampled_t1": [], "repeat_last_frame": [], "reconstruction": []}
    for s in range(0, len(videos), batch):
        v = videos[s:s + batch]
        fut = v[:, :, n:]
        prefix = fp_prefix(tok, v, n)
        for name, temp in (("greedy", 0.0), ("sampled_t1", 1.0)):
            pred = tok.decode(predict_tokens(gen, prefix, temperature=temp, generator=g)).clamp(0, 1)
            res[name].append(_psnr(pred[:, :, n:], fut))
        res["repeat_last_frame"].append(_psnr(v[:, :, n - 1:n].expand_as(fut), fut))
        res["reconstruction"].append(_psnr(tok.decode(tok.encode(v)).clamp(0, 1)[:, :, n:], fut))
    return {f"psnr_{k}": round(float(torch.cat(x).mean()), 3) for k, x in res.items()} | {
        "clips": len(videos), "cond_frames": n, "predicted_frames": int(videos.shape[2] - n)}


def _render(ds: SyntheticVideos, n: int) -> torch.Tensor:
    return torch.stack([torch.from_numpy(ds.render(i)) for i in range(n)])


def train_fp(out: str | Path, **overrides) -> dict:
    opts = {**DEFAULTS, **overrides}
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    torch.set_num_threads(int(opts["threads"]))
    out = Path(out)
    t0 = time.perf_counter()
    tok = load_pretrained(opts["tokenizer"], kind="tokenizer", with_prior=False).eval()
    tc = tok.config
    n = int(opts["cond_frames"])
    if not 1 <= n < tc.frames:
        raise ValueError(f"cond_frames must be in [1, {tc.frames - 1}] (the tokenizer has {tc.frames} frames)")
    common = {"frames": tc.frames, "height": tc.height, "width": tc.width, "num_classes": 8}
    train_ds = SyntheticVideos(opts["clips"], seed=opts["data_seed"], **common)
    val_ds = SyntheticVideos(opts["val_clips"], seed=opts["data_seed"] + 7, **common)  # held out: another seed
    prefixes, targets = [], []
    with torch.no_grad():
        for s in range(0, len(train_ds), 128):
            v = torch.stack([torch.from_numpy(train_ds.render(i)) for i in range(s, min(len(train_ds), s + 128))])
            prefixes.append(fp_prefix(tok, v, n))
            targets.append(tok.encode(v))
    prefixes, targets = torch.cat(prefixes), torch.cat(targets)  # (M, N + 1), (M, N)
    t_tokens = time.perf_counter() - t0

    cfg = GeneratorConfig.from_name(opts["model"], vocab_size=tc.codebook_size, max_seq_len=tc.num_tokens,
                                    frame_prediction=True, cls_token_num=tc.num_tokens + 1, class_dropout_prob=0.0)
    torch.manual_seed(opts["seed"])
    gen = LARPGenerator(cfg)
    decay = [p for name, p in gen.named_parameters() if p.ndim >= 2 and name != "abs_pe"]
    rest = [p for name, p in gen.named_parameters() if not (p.ndim >= 2 and name != "abs_pe")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": opts["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}], lr=opts["lr"], betas=(0.9, 0.95))
    rng = torch.Generator().manual_seed(opts["seed"] + 101)
    steps, B = int(opts["steps"]), int(opts["batch_size"])
    log = []
    gen.train()
    t1 = time.perf_counter()
    for step in range(steps):
        w, mr = opts["warmup"], opts["min_lr_ratio"]
        mult = (step + 1) / w if step < w else mr + (1 - mr) * 0.5 * (1 + math.cos(math.pi * (step - w) / (steps - w)))
        for g in opt.param_groups:
            g["lr"] = opts["lr"] * mult
        idx = torch.randint(0, len(targets), (B,), generator=rng)
        tgt = targets[idx]
        logits = gen(prefixes[idx], tgt[:, :-1])  # (B, N, V): row j predicts token j
        loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gen.parameters(), opts["grad_clip"])
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            rate = (step + 1) / (time.perf_counter() - t1)
            log.append({"step": step + 1, "loss": round(float(loss.detach()), 4), "steps_per_s": round(rate, 3)})
            print(json.dumps(log[-1]), flush=True)
    train_s = time.perf_counter() - t1
    gen.eval()
    videos = _render(val_ds, len(val_ds))
    with torch.no_grad():
        vp, vt = fp_prefix(tok, videos, n), tok.encode(videos)
        val_loss = float(F.cross_entropy(gen(vp, vt[:, :-1]).float().flatten(0, 1), vt.flatten()))
    t2 = time.perf_counter()
    metrics = evaluate_fp(tok, gen, videos, n, seed=opts["seed"])
    metrics.update(val_loss=round(val_loss, 4), eval_wall_s=round(time.perf_counter() - t2, 1))
    wall = time.perf_counter() - t0
    timing = {"token_wall_s": round(t_tokens, 1), "train_wall_s": round(train_s, 1), "wall_s": round(wall, 1),
              "steps_per_s": round(steps / train_s, 3), "threads": opts["threads"]}
    save_pretrained(gen, out, extra={"training": {**opts, "command": "python -m larp_rt.training.train_fp --out "
                                                  + str(out)}, "steps": steps, "val": metrics, "timing": timing,
                                     "num_cond_frames": n})
    (out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    result = {"metrics": metrics, "timing": timing, "options": opts,
              "beats_baseline": metrics["psnr_greedy"] > metrics["psnr_repeat_last_frame"]}
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m larp_rt.training.train_fp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="checkpoints/tiny/fp_generator")
    for k, v in DEFAULTS.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    a = vars(ap.parse_args(argv))
    out = a.pop("out")
    train_fp(out, **a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
