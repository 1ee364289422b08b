"""The reference sampler on torch tensors: same semantics and random stream as ``larp_rt.sampling`` (numpy).

Everything stays on the logits' device: no host synchronisation, so it can sit inside a captured decode step.
Which filtering code runs is decided from the host-side ``RowParams`` (known before the step), never from
device values. See ``larp_rt.sampling`` for the semantics.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .errors import NonFiniteLogitsError
from .sampling import PHILOX_M, PHILOX_W, RowParams, check_row_params, check_step

__all__ = ["DeviceRowParams", "philox4x32", "uniform", "sample", "as_step"]

_M32 = 0xFFFFFFFF


class DeviceRowParams:
    """RowParams as tensors on one device, built once per generation (H2D copies happen here, not per step)."""

    def __init__(self, params: RowParams, device: torch.device | str):
        check_row_params(params)  # the kernels' bounds (top_k <= V is checked per call, on these host arrays)
        self.host = params
        self.cfg_scale = torch.as_tensor(params.cfg_scale, device=device)
        self.temperature = torch.as_tensor(params.temperature, device=device)
        self.top_k = torch.as_tensor(params.top_k, device=device)
        self.top_p = torch.as_tensor(params.top_p, device=device).double()
        # 64-bit seeds/streams as int64 bit patterns
        self.seed = torch.as_tensor(params.seed.view("int64"), device=device)
        self.stream = torch.as_tensor(params.stream.view("int64"), device=device)
        self.any_greedy = bool((params.temperature == 0).any())
        self.all_greedy = bool((params.temperature == 0).all())

    def __len__(self) -> int:
        return len(self.host)

    def uniform_table(self, steps: int, start: int | Tensor = 0) -> Tensor:
        """(B, steps) float64 uniforms of steps start..start+steps-1 (``start`` an int or (B,) per-row first steps:
        column j of row r is step start[r] + j), drawn in one pass (same values as ``uniform``)."""
        B = len(self.host)
        first = as_step(start, B, self.seed.device, "start").view(-1, 1)  # (1, 1) or (B, 1)
        step = first + torch.arange(steps, device=self.seed.device).view(1, -1)
        return uniform(self.seed.view(-1, 1).expand(B, steps), self.stream.view(-1, 1).expand(B, steps), step)


def as_step(step, batch: int, device: torch.device | str, name: str = "step") -> Tensor:
    """A sampler's ``step`` as an int64 tensor on ``device``: an int (every row), a 1-element tensor (shared, e.g.
    the device step of a captured loop) or (batch,) per-row steps (a tensor, or integers ``check_step`` takes).
    Values are checked (>= 0) for ints, arrays and CPU tensors; a device tensor is not read (no host sync)."""
    if not isinstance(step, Tensor):
        s = check_step(step, batch, name)
        s = s.view(np.int64) if isinstance(s, np.ndarray) else (s - 2**64 if s >= 2**63 else s)  # bit patterns
        return torch.as_tensor(s, dtype=torch.int64, device=device)
    if step.dtype == torch.bool or step.dtype.is_floating_point or step.dtype.is_complex:
        raise ValueError(f"{name} must be an integer tensor, got {step.dtype}")
    if not (step.numel() == 1 and step.ndim <= 1) and tuple(step.shape) != (batch,):
        raise ValueError(f"{name} must have shape () or (1,) (one step for every row) or ({batch},) (one per row), "
                         f"got {tuple(step.shape)}")
    if step.device.type == "cpu" and bool((step < 0).any()):
        flat = step.reshape(-1)
        r = int(torch.nonzero(flat < 0)[0])
        raise ValueError(f"{name}[{r}] = {int(flat[r])}: must be >= 0")
    return step.to(device=device, dtype=torch.int64)


def _mulhilo(m: int, c: Tensor) -> tuple[Tensor, Tensor]:
    # m * c for 32-bit m, c without int64 overflow: split c into 16-bit halves
    a = m * (c & 0xFFFF)  # < 2**48
    b = m * (c >> 16)  # < 2**48
    hi = (b + (a >> 16)) >> 16
    lo = (a + ((b & 0xFFFF) << 16)) & _M32
    return hi, lo


def philox4x32(counter: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[Tensor, Tensor], rounds: int = 10):
    """Philox4x32-10 on int64 tensors holding 32-bit values (same outputs as the numpy version)."""
    c0, c1, c2, c3 = (c & _M32 for c in counter)
    k0, k1 = (k & _M32 for k in key)
    for r in range(rounds):
        if r:
            k0 = (k0 + PHILOX_W[0]) & _M32
            k1 = (k1 + PHILOX_W[1]) & _M32
        hi0, lo0 = _mulhilo(PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo(PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def uniform(seed: Tensor, stream: Tensor, step: int | Tensor) -> Tensor:
    """(B,) float64 in [0, 1): Philox(key=seed, counter=(step, stream)); int64 bit patterns for 64-bit values;
    ``step`` broadcasts (an int, a 1-element tensor, or one per row)."""
    step = torch.as_tensor(step, dtype=torch.int64, device=seed.device).expand_as(seed)  # broadcastable
    x0, x1, _, _ = philox4x32(
        (step & _M32, (step >> 32) & _M32, stream & _M32, (stream >> 32) & _M32), (seed & _M32, (seed >> 32) & _M32)
    )
    return ((x0 >> 5).double() * 67108864.0 + (x1 >> 6).double()) / 2.0**53


def cfg_mix(cond: Tensor, uncond: Tensor | None, cfg_scale: Tensor) -> Tensor:
    cond = cond.float()
    if uncond is None:
        return cond
    s = cfg_scale.float().view(-1, 1)
    uncond = uncond.float()
    return torch.where(s != 1.0, uncond + (cond - uncond) * s, cond)


def sample(
    cond_logits: Tensor,
    uncond_logits: Tensor | None,
    params: DeviceRowParams,
    step: int | Tensor,
    *,
    return_logprobs: bool = False,
    check_finite: bool = True,
    u: Tensor | None = None,
):
    """Draw one token per row: (B, V) logits -> (B,) int64 [and (B,) float64 log-probabilities].

    ``step``: an int or a 1-element int64 tensor (every row), or (B,) per-row steps (``as_step``).
    ``check_finite`` raises on NaN/Inf logits (a host sync: the engine's eager path uses it; a captured step
    passes False and checks the finished sequence instead). Never mutates its inputs.
    """
    if cond_logits.ndim != 2 or cond_logits.shape[0] != len(params):
        raise ValueError(f"cond_logits must have shape ({len(params)}, V), got {tuple(cond_logits.shape)}")
    if uncond_logits is not None and uncond_logits.shape != cond_logits.shape:
        raise ValueError(f"uncond_logits shape {tuple(uncond_logits.shape)} must equal {tuple(cond_logits.shape)}")
    step = as_step(step, len(params), params.seed.device)
    check_row_params(params.host, cond_logits.shape[1])  # host arrays: no device sync
    l = cfg_mix(cond_logits, uncond_logits, params.cfg_scale)  # (B, V) float32
    if check_finite and not bool(torch.isfinite(l).all()):
        raise NonFiniteLogitsError("logits contain NaN/Inf: the model produced non-finite values; check weights and "
                                   "precision")
    B, V = l.shape
    greedy = l.argmax(dim=-1)  # first max: lowest index wins ties
    if params.all_greedy:
        return (greedy, torch.zeros(B, dtype=torch.float64, device=l.device)) if return_logprobs else greedy

    host = params.host
    T = torch.where(params.temperature > 0, params.temperature, torch.ones_like(params.temperature)).double()
    z = l.double() / T.view(-1, 1)
    zmax = z.max(dim=-1, keepdim=True).values
    w = torch.exp(z - zmax)
    use_k = bool(((host.top_k > 0) & (host.top_k < V)).any())
    use_p = bool((host.top_p < 1.0).any())
    if use_k or use_p:
        _, order = torch.sort(z, dim=-1, descending=True, stable=True)  # ties: lower index first
        ranks = torch.arange(V, device=l.device).view(1, -1)
        k_eff = torch.where((params.top_k > 0) & (params.top_k < V), params.top_k, torch.full_like(params.top_k, V))
        keep_sorted = ranks < k_eff.view(-1, 1)
        if use_p:
            cum = torch.cumsum(torch.gather(w, 1, order) * keep_sorted, dim=-1)
            thresh = params.top_p.view(-1, 1) * cum[:, -1:]
            n = (cum < thresh).sum(dim=-1, keepdim=True) + 1
            keep_sorted = keep_sorted & (ranks < n)
        keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
        wk = torch.where(keep, w, torch.zeros_like(w))
    else:
        keep, wk = None, w
    cw = torch.cumsum(wk, dim=-1)  # index order
    total = cw[:, -1:]
    u = (uniform(params.seed, params.stream, step) if u is None else u).view(-1, 1)
    j = torch.searchsorted(cw, u * total, right=True).view(-1)
    if keep is not None:
        last_kept = (V - 1) - torch.argmax(keep.flip(-1).to(torch.uint8), dim=-1)
    else:
        last_kept = torch.full_like(j, V - 1)
    tokens = torch.where(j >= V, last_kept, j)
    if params.any_greedy:
        tokens = torch.where(params.temperature == 0, greedy, tokens)
    if not return_logprobs:
        return tokens
    logp = torch.gather(z, 1, tokens.view(-1, 1)).view(-1) - zmax.view(-1) - torch.log(total.view(-1))
    logp = torch.where(params.temperature == 0, torch.zeros_like(logp), logp)
    return tokens, logp
