"""Training: datasets, trainers (loss goes down, exact resume, DDP world size 1), checkpoints, CLI, evaluation."""

from __future__ import annotations

import json
import math
import os
import socket
import warnings

import numpy as np
import pytest
import torch
from larp_rt.training.config import GeneratorTrainConfig, TokenizerTrainConfig
from larp_rt.training.data import StepBatchSampler, SyntheticVideos, VideoFolder, VideoSkipWarning

from larp_rt import ConfigError, load_pretrained

# a very small tokenizer so that a step takes milliseconds: 4x16x16 clips, 2x4x4 patches (32), 16 tokens
SMALL = {"num_tokens": 16, "frames": 4, "height": 16, "width": 16, "codebook_size": 64, "enc_dim": 32,
         "enc_depth": 1, "enc_heads": 2, "dec_dim": 32, "dec_depth": 1, "dec_heads": 2}
SMALL_PRIOR = {"dim": 32, "depth": 1, "heads": 2}


def tok_cfg(**kw) -> TokenizerTrainConfig:
    base = {"model_overrides": SMALL, "prior_overrides": SMALL_PRIOR, "steps": 6, "batch_size": 4, "lr": 2e-3,
            "warmup_steps": 1, "val_size": 8, "log_every": 1, "ckpt_every": 0, "num_classes": 4}
    return TokenizerTrainConfig.from_dict({**base, **kw})


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def test_synthetic_is_deterministic_by_seed():
    a, b = SyntheticVideos(50, seed=3), SyntheticVideos(50, seed=3)
    c = SyntheticVideos(50, seed=4)
    for i in (0, 7, 49):
        va, la = a[i]
        vb, lb = b[i]
        assert torch.equal(va, vb) and la == lb == i % 8
        assert va.shape == (3, 8, 32, 32) and va.dtype == torch.float32 and 0 <= va.min() and va.max() <= 1
    assert not torch.equal(a[5][0], c[5][0])
    assert torch.equal(a[(5, 123)][0], a[5][0])  # the augmentation key does not change synthetic clips
    odd = SyntheticVideos(4, frames=5, height=24, width=40, num_classes=10)
    assert odd[3][0].shape == (3, 5, 24, 40) and odd[3][1] == 3


def test_synthetic_classes_differ_in_motion():
    ds = SyntheticVideos(16, frames=8, height=32, width=32)
    # the shape's centre of mass moves in the class's direction (class 0: right, class 4: left)
    def drift(v):
        sal = (v - v.mean(dim=(1, 2, 3), keepdim=True)).abs().sum(0)  # (T, H, W)
        xs = torch.arange(32.0)
        cx = (sal.sum(1) * xs).sum(-1) / sal.sum(dim=(1, 2))
        return float(cx[-1] - cx[0])
    assert drift(ds[0][0]) > 2 and drift(ds[4][0]) < -2


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        TokenizerTrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ConfigError, match="does not exist"):
        TokenizerTrainConfig(data="folder", data_root=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="data_root"):
        TokenizerTrainConfig(data="folder")
    with pytest.raises(ConfigError, match="positive int"):
        TokenizerTrainConfig(steps=0)
    with pytest.raises(ConfigError, match="perceptual_weights"):
        TokenizerTrainConfig(perceptual_weight=1.0)
    with pytest.raises(ConfigError, match="tokenizer"):
        GeneratorTrainConfig()
    with pytest.raises(ValueError, match="does not exist"):
        VideoFolder(tmp_path / "missing", frames=4)
    from larp_rt.training.losses import LPIPS, PerceptualError

    with pytest.raises(PerceptualError, match="nothing is downloaded"):
        LPIPS(tmp_path / "vgg.safetensors")


def _write_video(path, frames: int, size=(40, 48), seed=0):
    import av

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = size[1], size[0], "yuv420p"
        for t in range(frames):
            img = np.full((size[0], size[1], 3), 40, np.uint8)
            img[:, : 8 + 4 * t] = rng.integers(0, 255, 3, dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_video_folder_reads_mp4_and_skips_bad_ones(tmp_path):
    root = tmp_path / "ucf"
    for k, cls in enumerate(("Archery", "Biking")):
        (root / cls).mkdir(parents=True)
        _write_video(root / cls / f"v{k}.mp4", frames=10, seed=k)
    (root / "Biking" / "broken.mp4").write_bytes(b"not a video at all")
    _write_video(root / "Archery" / "short.mp4", frames=3)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = VideoFolder(root, frames=6, height=16, width=16, seed=0)
    assert len(ds) == 2 and ds.skipped == 2 and ds.classes == ["Archery", "Biking"]
    assert sum(issubclass(x.category, VideoSkipWarning) for x in w) == 2
    v, label = ds[(1, 5)]
    assert v.shape == (3, 6, 16, 16) and label == 1 and 0 <= v.min() and v.max() <= 1
    assert torch.equal(ds[(1, 5)][0], v)  # same key -> same crop/flip
    # CSV form, relative paths
    lines = ["path,label", "ucf/Archery/v0.mp4,0", "ucf/Biking/v1.mp4,1", "ucf/Biking/broken.mp4,1"]
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dc = VideoFolder(csv_path=tmp_path / "list.csv", frames=6, height=16, width=16, train=False)
    assert len(dc) == 2 and dc.skipped == 1 and dc[0][0].shape == (3, 6, 16, 16)


def test_step_sampler_is_a_function_of_the_step():
    s = StepBatchSampler(10, global_batch=4, steps=5, seed=1)
    full = list(s)
    resumed = list(StepBatchSampler(10, global_batch=4, steps=5, start_step=3, seed=1))
    assert full[3:] == resumed
    r0 = StepBatchSampler(10, global_batch=4, steps=5, rank=0, world_size=2, seed=1).batch(2)
    r1 = StepBatchSampler(10, global_batch=4, steps=5, rank=1, world_size=2, seed=1).batch(2)
    assert [i for i, _ in r0 + r1] == [i for i, _ in full[2]]
    # every index once per epoch
    assert sorted(i for b in list(StepBatchSampler(8, global_batch=4, steps=2, seed=0)) for i, _ in b) == list(range(8))


# --------------------------------------------------------------------------------------------
# tokenizer trainer
# --------------------------------------------------------------------------------------------
def test_tokenizer_loss_decreases_and_checkpoint_loads(tmp_path):
    from larp_rt.training.train_tokenizer import train_tokenizer

    r = train_tokenizer(tok_cfg(steps=30, warmup_steps=5, quantizer_warmup=10), tmp_path / "tok", progress=False)
    l1 = [h["l1"] for h in r["history"]]  # (the total jumps when the prior loss joins after the warm-up)
    assert np.mean(l1[-5:]) < 0.7 * np.mean(l1[:5])
    assert all(math.isfinite(h["loss"]) for h in r["history"]) and "prior" in r["history"][-1]
    tok = load_pretrained(tmp_path / "tok")
    assert tok.prior_model is not None and tok.config.num_tokens == 16
    meta = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert meta["training"]["steps"] == 30 and "psnr" in meta["val"]
    assert (tmp_path / "tok" / "train_log.jsonl").is_file()
    # the prior's learning rate is lr * lr_mult in its own group
    assert r["history"][-1]["lr"] > 0


def test_tokenizer_resume_matches_uninterrupted_run(tmp_path):
    from larp_rt.training.train_tokenizer import train_tokenizer

    cfg = tok_cfg(steps=6, quantizer_warmup=2)
    full = train_tokenizer(cfg, tmp_path / "a", progress=False)["history"]
    part = train_tokenizer(cfg, tmp_path / "b", stop_after=3, progress=False)
    assert part["steps_done"] == 3 and not (tmp_path / "b" / "model.safetensors").exists()
    rest = train_tokenizer(cfg, tmp_path / "b", progress=False)["history"]
    assert rest[0]["step"] == 3
    for a, b in zip(full[3:], rest, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    # a different config cannot silently continue this run
    with pytest.raises(ValueError, match="config differs"):
        train_tokenizer(cfg.replace(lr=1e-4, steps=8), tmp_path / "b", progress=False)


def test_tokenizer_gan_path_runs(tmp_path):
    from larp_rt.training.train_tokenizer import train_tokenizer

    r = train_tokenizer(tok_cfg(steps=3, gan_weight=0.3, disc_every=2, disc_dim=32, disc_depth=1, disc_heads=2,
                                prior=None, prior_overrides={}, ckpt_every=2), tmp_path / "g", progress=False)
    assert "g_adv" in r["history"][0] and "d_loss" in r["history"][0]
    assert load_pretrained(tmp_path / "g").prior_model is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_world_size_one(tmp_path, monkeypatch):
    from larp_rt.training.train_tokenizer import train_tokenizer

    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(k, v)
    r = train_tokenizer(tok_cfg(steps=3, quantizer_warmup=1), tmp_path / "ddp", progress=False, device="cpu")
    assert r["steps_done"] == 3 and len(r["history"]) == 3
    assert not torch.distributed.is_initialized()
    cfg = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert cfg["world_size"] == 1
    load_pretrained(tmp_path / "ddp")


# --------------------------------------------------------------------------------------------
# generator trainer, sampling loop, evaluation
# --------------------------------------------------------------------------------------------
def test_generator_training_and_sampling(tmp_path):
    from larp_rt.training.evaluate import frechet_distance, psnr, sample_tokens, ssim
    from larp_rt.training.train_generator import train_generator
    from larp_rt.training.train_tokenizer import train_tokenizer

    from larp_rt.sampling import SamplingParams

    train_tokenizer(tok_cfg(steps=4, quantizer_warmup=1), tmp_path / "tok", progress=False)
    gcfg = GeneratorTrainConfig.from_dict({
        "tokenizer": str(tmp_path / "tok"), "token_clips": 64, "val_size": 16, "steps": 30, "batch_size": 16,
        "lr": 3e-3, "warmup_steps": 2, "num_classes": 4, "ckpt_every": 0, "log_every": 5,
        "model_overrides": {"dim": 32, "n_layer": 1, "n_head": 2}})
    r = train_generator(gcfg, tmp_path / "gen", progress=False)
    losses = [h["loss"] for h in r["history"]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) and math.isfinite(r["val_loss"])
    gen = load_pretrained(tmp_path / "gen")
    assert gen.config.vocab_size == 64 and gen.config.max_seq_len == 16 and gen.has_null_class
    z = np.load(tmp_path / "gen" / "tokens.npz")
    assert z["train_tokens"].shape == (64, 16) and z["val_tokens"].shape == (16, 16)
    # the cache is reused: a resume of a finished run does nothing new
    again = train_generator(gcfg, tmp_path / "gen", progress=False)
    assert again["history"] == [] and again["token_wall_s"] < r["token_wall_s"] + 5

    toks = sample_tokens(gen, [0, 3], SamplingParams(cfg_scale=1.5, temperature=1.0, seed=7))
    assert toks.shape == (2, 16) and toks.dtype == torch.int64 and int(toks.max()) < 64
    assert torch.equal(toks, sample_tokens(gen, [0, 3], SamplingParams(cfg_scale=1.5, temperature=1.0, seed=7)))
    greedy = sample_tokens(gen, [1], SamplingParams(temperature=0.0, seed=0))
    full = gen(torch.tensor([1]), greedy[:, :-1]).argmax(-1)  # the cached loop equals the full forward
    assert torch.equal(full, greedy)

    v = torch.rand(2, 3, 4, 16, 16)
    assert float(psnr(v, v)[0]) > 90 and float(ssim(v, v)[0]) == pytest.approx(1.0, abs=1e-4)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 1.0) == pytest.approx(4.0, rel=0.05)


def test_classifier_and_generation_metrics(tmp_path):
    from larp_rt.training.evaluate import (
        ClassifierSpec,
        generation_metrics,
        load_classifier,
        save_classifier,
        train_classifier,
    )

    from larp_rt.models import LARPGenerator, LARPTokenizer
    from larp_rt.sampling import SamplingParams

    small = {"frames": 4, "height": 16, "width": 16, "num_classes": 4}
    train_ds = SyntheticVideos(64, seed=0, **small)
    val_ds = SyntheticVideos(32, seed=1, **small)
    clf, info = train_classifier(train_ds, val_ds, ClassifierSpec(4, 4, 16, 16, width_mult=8), steps=30,
                                 batch_size=16, progress=False)
    assert info["val_accuracy"] > 0.5
    save_classifier(clf, tmp_path / "clf")
    clf2 = load_classifier(tmp_path / "clf")
    x = val_ds[0][0][None]
    assert torch.allclose(clf2(x), clf(x))
    from larp_rt.config import GeneratorConfig, TokenizerConfig

    tok = LARPTokenizer(TokenizerConfig.from_name("tiny", **SMALL)).eval()
    gen = LARPGenerator(GeneratorConfig.from_name("tiny", dim=32, n_layer=1, n_head=2, vocab_size=64, max_seq_len=16,
                                                  num_classes=4)).eval()
    m = generation_metrics(tok, gen, clf, val_ds, per_class=2, params=SamplingParams(cfg_scale=1.5, seed=0))
    assert 0 <= m["class_accuracy"] <= 1 and math.isfinite(m["frechet_distance"]) and m["samples"] == 8


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def test_cli_train_tokenizer_and_errors(tmp_path, capsys):
    from larp_rt.cli import main

    out = tmp_path / "cli"
    args = ["train", "tokenizer", "--out", str(out), "--steps", "2", "--batch-size", "2", "--val-size", "4",
            "--model-overrides", json.dumps(SMALL), "--prior-overrides", json.dumps(SMALL_PRIOR), "--no-progress",
            "--quantizer-warmup", "1", "--num-classes", "4"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["steps_done"] == 2 and (out / "model.safetensors").is_file()
    assert main(["train", "tokenizer", "--out", str(tmp_path / "x"), "--data", "folder", "--data-root",
                 str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    cfg_file = tmp_path / "bad.json"
    cfg_file.write_text(json.dumps({"learning_rate": 1}))
    assert main(["train", "tokenizer", "--out", str(tmp_path / "y"), "--config", str(cfg_file)]) == 2
    assert "unknown key" in capsys.readouterr().err
    assert main(["train", "generator", "--out", str(tmp_path / "z"), "--tokenizer", str(tmp_path / "none")]) == 2


def test_cli_module_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; import larp_rt.training.cli as c; import argparse; p = argparse.ArgumentParser(); "
            "c.register(p.add_subparsers()); print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
