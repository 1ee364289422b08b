"""Pieces shared by the trainers: processes (single / DDP), LR schedule, precision, resumable state, progress.

Resumable state of a run lives in ``<out>/resume/step_XXXXXXXX/``:

    model/config.json + model/model.safetensors   (larp_rt.save_pretrained)
    state.safetensors                              optimizer tensors, each rank's RNG states, extra modules (no pickle)
    state.json                                     step, optimizer hyper-parameters, training config

``<out>/resume/latest`` names the newest complete one (written last, so a crash never points at a partial one).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import save_pretrained

__all__ = ["Dist", "setup_dist", "cosine_lr", "autocast_for", "save_state", "load_state", "latest_state",
           "Progress", "param_groups", "gather_rng"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialised_here: bool = False

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Average a tensor over processes (identity on one)."""
        if self.enabled and self.world_size > 1:
            x = x.detach().clone()
            dist.all_reduce(x)
            x /= self.world_size
        return x

    def close(self) -> None:
        if self.initialised_here and self.enabled:
            dist.destroy_process_group()


def setup_dist(device: str | None = None) -> Dist:
    """One process, or DDP when launched by torchrun (RANK / WORLD_SIZE set): nccl on CUDA, gloo on CPU."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return Dist(device=dev)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    here = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world)
        here = True
    return Dist(rank=rank, world_size=world, local_rank=local, device=dev, initialised_here=here)


# --------------------------------------------------------------------------------------------
# optimisation helpers
# --------------------------------------------------------------------------------------------
def cosine_lr(step: int, *, steps: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from 1/warmup to 1 over ``warmup`` steps, then cosine to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(module: nn.Module, lr: float, weight_decay: float, *, exclude: str | None = None,
                 name: str = "main") -> list[dict]:
    """AdamW groups: matrices decayed, vectors (norms, biases) and embeddings of positions not decayed."""
    decay, no_decay = [], []
    for n, p in module.named_parameters():
        if not p.requires_grad or (exclude and n.startswith(exclude)):
            continue
        (decay if p.ndim >= 2 and "pe" not in n.split(".")[-1] else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr, "base_lr": lr, "name": f"{name}.decay"},
              {"params": no_decay, "weight_decay": 0.0, "lr": lr, "base_lr": lr, "name": f"{name}.no_decay"}]
    return [g for g in groups if g["params"]]


def autocast_for(device: torch.device, precision: str):
    """(context factory, GradScaler or None): bf16 autocast on CUDA when supported, else fp16 + scaler."""
    if device.type != "cuda" or precision == "fp32":
        return nullcontext, None
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


# --------------------------------------------------------------------------------------------
# resumable state (safetensors + json, never pickle)
# --------------------------------------------------------------------------------------------
def backward_step(loss, opt, params, clip: float, scaler) -> None:
    """Backward, optional grad-norm clip (after unscaling), optimizer step; through ``scaler`` when given (fp16)."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    else:
        loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(list(params), clip)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


def _optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}.state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: dict, prefix: str) -> None:
    state: dict[int, dict[str, Any]] = {}
    head = f"{prefix}.state."
    for key, v in tensors.items():
        if key.startswith(head):
            pid, name = key[len(head):].split(".", 1)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _rng_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state(), "rng.train": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def _rank_suffix(rank: int) -> str:
    """Rank 0's RNG states keep the plain names (states written by one process read the same), rank r > 0's
    end in ``.rank{r}``."""
    return "" if rank == 0 else f".rank{rank}"


def gather_rng(generator: torch.Generator, d: Dist) -> dict[str, torch.Tensor]:
    """Every rank's RNG states (``rng.train``, ``rng.torch`` [, ``rng.cuda``] per rank) for ``save_state``.

    A collective under DDP: every rank calls it, rank 0 writes the result. Each rank draws its own SVQ samples,
    dropout masks and labels, so a resumed run needs each rank's streams back, not copies of rank 0's.
    """
    mine = _rng_tensors(generator)
    if not (d.enabled and d.world_size > 1):
        return mine
    every: list[Any] = [None] * d.world_size
    dist.all_gather_object(every, mine)
    return {k + _rank_suffix(r): v.cpu() for r, states in enumerate(every) for k, v in states.items()}


def save_state(out: Path, step: int, *, model: nn.Module, optimizers: Mapping[str, torch.optim.Optimizer],
               generator: torch.Generator, modules: Mapping[str, nn.Module] | None = None,
               meta: Mapping[str, Any] | None = None, keep_last: int = 1,
               rng: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write a resumable state for ``step`` (steps done) under ``out/resume`` and point ``latest`` at it.

    ``rng``: the RNG states to store (``gather_rng``: every rank's); default: this process's, from ``generator``.
    """
    from safetensors.torch import save_file

    root = out / "resume"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_pretrained(model, tmp / "model", extra={"training_step": step})
    tensors: dict[str, torch.Tensor] = dict(rng if rng is not None else _rng_tensors(generator))
    opt_meta = {}
    for name, opt in optimizers.items():
        t, m = _optimizer_tensors(opt, f"opt.{name}")
        tensors.update(t)
        opt_meta[name] = m
    for name, mod in (modules or {}).items():
        tensors.update({f"module.{name}.{k}": v.detach().cpu().contiguous() for k, v in mod.state_dict().items()})
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "optimizers": opt_meta, **(meta or {})}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    (root / "latest.tmp").write_text(final.name + "\n")
    os.replace(root / "latest.tmp", root / "latest")
    olds = sorted(p for p in root.glob("step_*") if p.is_dir() and p != final)
    for p in olds[: max(0, len(olds) - (keep_last - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_state(out: Path) -> Path | None:
    f = out / "resume" / "latest"
    if not f.is_file():
        return None
    p = out / "resume" / f.read_text().strip()
    return p if (p / "state.json").is_file() else None


def seed_and_resume(out: Path, cfg, d, *, resume: bool, model: nn.Module,
                    optimizers: Mapping[str, torch.optim.Optimizer],
                    modules: Mapping[str, nn.Module] | None = None) -> tuple[torch.Generator, int]:
    """Seed this rank's RNG streams, then restore the latest resumable state under ``out`` (if ``resume``).

    Returns the rank's explicit generator (sampling, dropout decisions) and the step to start from. The global
    torch stream (dropout) is seeded per rank too; both are then overwritten by a restored state.
    """
    gen = torch.Generator(device=d.device)
    gen.manual_seed(cfg.seed * 1_000_003 + 17 + d.rank)
    torch.manual_seed(cfg.seed * 1_000_003 + 29 + d.rank)
    start = 0
    state = latest_state(out) if resume else None
    if state is not None:
        meta = load_state(state, model=model, optimizers=optimizers, generator=gen, modules=modules, rank=d.rank)
        check_resume_config(meta.get("training", {}), cfg.to_dict(), state)
        start = int(meta["step"])
        if d.main:
            log.info("resumed from %s (step %d)", state, start)
    if start >= cfg.steps and d.main:
        log.info("nothing to do: %s already holds %d >= %d steps", out, start, cfg.steps)
    return gen, start


def load_state(path: Path, *, model: nn.Module, optimizers: Mapping[str, torch.optim.Optimizer],
               generator: torch.Generator, modules: Mapping[str, nn.Module] | None = None, rank: int = 0) -> dict:
    """Restore model, optimizers, RNG states and extra modules from ``save_state``; return state.json.

    ``rank``'s RNG states are restored; a rank the state has none for (it was written by fewer processes) keeps
    the streams it was seeded with.
    """
    from safetensors.torch import load_file

    from ..checkpoint import check_state_dict

    meta = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "model" / "model.safetensors"))
    check_state_dict(model.state_dict(), weights, str(path / "model"))
    model.load_state_dict(weights)
    tensors = load_file(str(path / "state.safetensors"))
    for name, opt in optimizers.items():
        _load_optimizer(opt, tensors, meta["optimizers"][name], f"opt.{name}")
    for name, mod in (modules or {}).items():
        head = f"module.{name}."
        mod.load_state_dict({k[len(head):]: v for k, v in tensors.items() if k.startswith(head)})
    sfx = _rank_suffix(rank)
    if f"rng.train{sfx}" in tensors:
        torch.set_rng_state(tensors[f"rng.torch{sfx}"])
        generator.set_state(tensors[f"rng.train{sfx}"])
        if f"rng.cuda{sfx}" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors[f"rng.cuda{sfx}"])
    return meta


def check_resume_config(saved: Mapping[str, Any], current: Mapping[str, Any], path: Path) -> None:
    """Refuse to resume a run whose model/optimisation settings differ (a mismatch would silently mix runs)."""
    allowed = {"ckpt_every", "log_every", "num_workers", "keep_resume", "val_every"}
    current = json.loads(json.dumps(dict(current)))  # tuples -> lists, as saved
    diff = sorted(k for k in set(saved) | set(current) if k not in allowed and saved.get(k) != current.get(k))
    if diff:
        details = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {current.get(k)!r}" for k in diff)
        raise ValueError(f"cannot resume from {str(path)!r}: the training config differs ({details}); "
                         "use the same settings, or a new --out folder to start afresh")


# --------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------
class Progress:
    """tqdm bar (when ``enabled``) with loss, lr and steps/s; appends JSON lines to ``log_path`` (None on ranks > 0)."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool, log_path: Path | None):
        self.enabled = enabled
        self.log_path = log_path
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=1.0)
        self.t0, self.s0 = time.perf_counter(), initial

    def update(self, step: int, logs: Mapping[str, float], write: bool) -> None:
        rate = (step - self.s0) / max(1e-9, time.perf_counter() - self.t0)
        if self.bar is not None:
            self.bar.update(1)
        if write:
            if self.bar is not None:
                shown = {k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "lr", "l1", "prior", "val_loss")}
                self.bar.set_postfix(**shown, it_s=f"{rate:.2f}")
            if self.log_path is not None:
                with self.log_path.open("a") as f:
                    f.write(json.dumps({"step": step, **{k: float(v) for k, v in logs.items()},
                                        "steps_per_s": rate}) + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
