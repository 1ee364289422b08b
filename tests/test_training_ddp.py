"""DDP at world size 2 (two CPU processes on gloo, as ``torchrun --nproc_per_node 2`` starts them).

Each trainer runs through its real entry point (``train_tokenizer`` / ``train_generator``) in two spawned
processes with the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), and once in this
process at world size 1 with the same config. The global batch is split between the ranks by ``StepBatchSampler``,
so the one-process run sees exactly rank 0's batch followed by rank 1's. After a few steps:

* both ranks hold bitwise-equal weights (the gradient all-reduce and identical optimizer steps);
* they equal the one-process weights within float tolerance (gradients averaged, not summed; disjoint shards);
* the logged loss (averaged over ranks) equals the one-process loss on the whole batch.

The comparison needs the same forward on both sides, so every random draw is made harmless: no dropout, no class
dropout, no scheduled sampling, and an SVQ temperature so low that sampling picks the nearest code (the ranks'
generators are seeded per rank, a single process has one). The SVQ, the prior, the codebook re-initialisation at
the end of the quantizer warm-up, the GAN and a rank-0 checkpoint mid-run are all on the path.

Also: a run stopped half-way and resumed at world size 2 retraces the uninterrupted one (each rank's RNG streams
are saved and restored), and (slow) the README's ``torchrun --nproc_per_node 2 -m larp_rt.cli train tokenizer``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from larp_rt.training.config import GeneratorTrainConfig, TokenizerTrainConfig

WORLD = 2
JOIN_TIMEOUT_S = 120.0

# tiny models: a step takes milliseconds (4x16x16 clips, 16 tokens)
SMALL = {"num_tokens": 16, "frames": 4, "height": 16, "width": 16, "codebook_size": 64, "enc_dim": 32,
         "enc_depth": 1, "enc_heads": 2, "dec_dim": 32, "dec_depth": 1, "dec_heads": 2}
TOK = {"model_overrides": {**SMALL, "svq_temperature": 1e-4},  # sampling == nearest code
       "prior_overrides": {"dim": 32, "depth": 1, "heads": 2, "dropout": 0.0, "ss_max_ratio": 0.0},
       "steps": 3, "quantizer_warmup": 1, "batch_size": 4, "lr": 2e-3, "warmup_steps": 1, "val_size": 4,
       "log_every": 1, "ckpt_every": 2, "num_classes": 4,
       # the GAN from the last step: the generator loss reads the initial discriminator (the same in both runs), then
       # the discriminator steps with per-rank label noise (compared between the ranks only)
       "gan_weight": 0.1, "gan_start": 2, "disc_every": 1, "disc_dim": 32, "disc_depth": 1, "disc_heads": 2}
GEN_MODEL = {"dim": 32, "n_layer": 1, "n_head": 2, "class_dropout_prob": 0.0, "token_dropout_p": 0.0,
             "attn_dropout_p": 0.0, "resid_dropout_p": 0.0, "ffn_dropout_p": 0.0}
GEN = {"token_clips": 32, "val_size": 8, "steps": 3, "batch_size": 8, "lr": 3e-3, "warmup_steps": 1,
       "num_classes": 4, "ckpt_every": 2, "log_every": 1, "model_overrides": GEN_MODEL}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trainer(kind: str):
    if kind == "tokenizer":
        from larp_rt.training import train_tokenizer as mod

        return mod, mod.train_tokenizer, TokenizerTrainConfig
    from larp_rt.training import train_generator as mod

    return mod, mod.train_generator, GeneratorTrainConfig


def _final_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained model's tensors under its own names (the tokenizer trainer wraps it in ``_TrainForward``)."""
    model = getattr(module, "model", module)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _worker(rank: int, port: int, kind: str, cfg: dict, out: str, result_dir: str) -> None:
    """One DDP rank: the torchrun environment, the real trainer, then this rank's final weights and history."""
    from safetensors.torch import save_file

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    mod, train, cfg_cls = _trainer(kind)
    wrapped: list[torch.nn.Module] = []

    class Recording(mod.DDP):  # the trainer's own DDP, remembering what it wraps (rank 0 alone saves a model)
        def __init__(self, module, *args, **kwargs):
            super().__init__(module, *args, **kwargs)
            wrapped.append(module)

    mod.DDP = Recording
    r = train(cfg_cls.from_dict(cfg), out, progress=False, device="cpu")
    assert wrapped, "the trainer did not wrap its model in DistributedDataParallel"
    for i, module in enumerate(wrapped):  # the model, then the discriminator (GAN)
        save_file(_final_weights(module), str(Path(result_dir) / f"rank{rank}{'' if i == 0 else f'.{i}'}.safetensors"))
    (Path(result_dir) / f"rank{rank}.json").write_text(json.dumps(
        {"history": r["history"], "steps_done": r["steps_done"],
         "process_group_left": torch.distributed.is_initialized()}))


def _resume_worker(rank: int, port: int, cfg: dict, root: str, result_dir: str) -> None:
    """One rank of three tokenizer runs in one process group: uninterrupted, then stopped half-way and resumed."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=WORLD)
    try:
        from larp_rt.training.train_tokenizer import train_tokenizer

        c = TokenizerTrainConfig.from_dict(cfg)
        full = train_tokenizer(c, Path(root) / "full", progress=False, device="cpu")["history"]
        part = train_tokenizer(c, Path(root) / "split", stop_after=cfg["steps"] // 2, progress=False, device="cpu")
        rest = train_tokenizer(c, Path(root) / "split", progress=False, device="cpu")
        (Path(result_dir) / f"rank{rank}.json").write_text(json.dumps(
            {"full": full, "split": part["history"] + rest["history"]}))
    finally:
        torch.distributed.destroy_process_group()


def _spawn_ddp(kind: str, cfg: dict, out: Path, result_dir: Path, worker=_worker) -> None:
    """Run ``worker`` on WORLD ranks; a rank that fails, or hangs past JOIN_TIMEOUT_S, fails the test."""
    import torch.multiprocessing as mp

    result_dir.mkdir(parents=True, exist_ok=True)
    args = (_free_port(), kind, cfg, str(out), str(result_dir)) if worker is _worker else \
        (_free_port(), cfg, str(out), str(result_dir))
    ctx = mp.start_processes(worker, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP {kind} run did not finish in {JOIN_TIMEOUT_S:.0f} s (a rank hangs)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_close_to_one_process(weights: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert weights.keys() == ref.keys()
    for k in ref:
        if k.endswith("attn.key.bias"):
            # softmax is shift-invariant, so a key bias's gradient is 0 in exact arithmetic: AdamW (g / sqrt(v))
            # turns the rounding noise of either run into full steps, and the two runs' noise differs
            continue
        torch.testing.assert_close(weights[k], ref[k], rtol=1e-4, atol=2e-5,
                                   msg=lambda m, k=k: f"{k} vs one process: {m}")


def _check_against_one_process(kind: str, cfg: dict, tmp_path: Path) -> None:
    res = tmp_path / "ranks"
    _spawn_ddp(kind, cfg, tmp_path / "ddp", res)
    _, train, cfg_cls = _trainer(kind)
    one = train(cfg_cls.from_dict(cfg), tmp_path / "one", progress=False, device="cpu")

    w0, w1 = _load(res / "rank0.safetensors"), _load(res / "rank1.safetensors")
    ref = _load(tmp_path / "one" / "model.safetensors")
    saved = _load(tmp_path / "ddp" / "model.safetensors")  # what rank 0 wrote as the final checkpoint
    assert w0.keys() == w1.keys() == saved.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"{k}: the ranks' weights differ after {cfg['steps']} steps"
        assert torch.equal(w0[k], saved[k]), f"{k}: the saved checkpoint is not rank 0's final model"
    _assert_close_to_one_process(w0, ref)

    extra = sorted(p.name for p in res.glob("rank0.*.safetensors"))  # the discriminator
    for name in extra:
        a, b = _load(res / name), _load(res / name.replace("rank0", "rank1"))
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: the ranks' discriminators differ"
    assert len(extra) == int(cfg.get("gan_weight", 0) > 0)

    h0, h1 = (json.loads((res / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert h0["steps_done"] == h1["steps_done"] == cfg["steps"] == one["steps_done"]
    assert not h0["process_group_left"] and not h1["process_group_left"]  # setup_dist's group is destroyed
    assert h0["history"] == h1["history"]  # logs are averaged over the ranks: the same on both
    for a, b in zip(h0["history"], one["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6), (a, b)
    meta = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert meta["world_size"] == WORLD
    # rank 0 wrote a mid-run state at step 2 (ckpt_every) and the final one, which replaced it (keep 1)
    assert (tmp_path / "ddp" / "resume" / "latest").read_text().strip() == "step_00000003"


def test_ddp_tokenizer_two_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    _check_against_one_process("tokenizer", TOK, tmp_path)


def test_ddp_generator_two_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    from larp_rt import save_pretrained
    from larp_rt.config import TokenizerConfig
    from larp_rt.models import LARPTokenizer

    torch.manual_seed(0)
    save_pretrained(LARPTokenizer(TokenizerConfig.from_name("tiny", **SMALL)), tmp_path / "tok")
    _check_against_one_process("generator", {**GEN, "tokenizer": str(tmp_path / "tok")}, tmp_path)


def test_ddp_resume_continues_every_rank_s_random_stream(tmp_path):
    """Stopped half-way and resumed at world size 2, a run with the stochastic SVQ, dropout and scheduled sampling
    on retraces the uninterrupted one: each rank gets its own RNG streams back, not rank 0's."""
    cfg = {**TOK, "model_overrides": SMALL, "prior_overrides": {"dim": 32, "depth": 1, "heads": 2}, "steps": 4,
           "ckpt_every": 0, "gan_weight": 0.0}
    _spawn_ddp("tokenizer", cfg, tmp_path, tmp_path / "ranks", worker=_resume_worker)
    r0, r1 = (json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert r0 == r1
    assert [h["step"] for h in r0["split"]] == list(range(cfg["steps"]))
    for a, b in zip(r0["full"], r0["split"], strict=True):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (k, a, b)
    full, split = (_load(tmp_path / name / "model.safetensors") for name in ("full", "split"))
    for k in full:
        torch.testing.assert_close(split[k], full[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torchrun_cli_two_ranks_equal_one_process(tmp_path):
    """The README's launch: ``torchrun --nproc_per_node 2 -m larp_rt.cli train tokenizer ...`` (~15 s more than the
    spawned runs: torchrun's own start-up)."""
    from larp_rt.training.train_tokenizer import train_tokenizer

    (tmp_path / "cfg.json").write_text(json.dumps(TOK))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "-m", "larp_rt.cli", "train", "tokenizer", "--out",
           str(tmp_path / "ddp"), "--config", str(tmp_path / "cfg.json"), "--device", "cpu", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        stdout, stderr = proc.communicate(timeout=JOIN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        proc.communicate()
        pytest.fail(f"torchrun did not finish in {JOIN_TIMEOUT_S:.0f} s (a rank hangs)")
    assert proc.returncode == 0, stderr[-4000:]
    reports = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1 and reports[0]["steps_done"] == TOK["steps"], stdout  # rank 0 alone reports
    assert "psnr" in reports[0]["val"]
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["world_size"] == WORLD

    train_tokenizer(TokenizerTrainConfig.from_dict(TOK), tmp_path / "one", progress=False, device="cpu")
    _assert_close_to_one_process(_load(tmp_path / "ddp" / "model.safetensors"),
                                 _load(tmp_path / "one" / "model.safetensors"))
