"""The reference sampler: pure functions of logits, per-row parameters and a counter-based RNG.

Semantics (identical in every backend and kernel; this module is the oracle):

1. CFG: ``l = u + (c - u) * cfg_scale`` in float32 when the row has null-class logits ``u`` and
   ``cfg_scale != 1``; otherwise ``l = c`` (so a request without guidance gives the same tokens whether or not
   its batch carries CFG rows). Non-finite logits (inputs, or a mix that overflows float32) are refused.
2. ``temperature == 0``: greedy, ``argmax l`` (the lowest index wins ties). Otherwise ``z = float64(l) / T``.
3. top-k (0 = off, any k up to V): keep the k largest ``z``; ties at the boundary go to the lower index.
4. top-p (1.0 = off): order the kept tokens by (z descending, index ascending), weights ``w = exp(z - max z)``;
   keep the smallest prefix whose mass reaches ``top_p * total`` (at least one token).
5. Draw: one uniform ``u`` in [0, 1) from Philox4x32-10 with key = seed (64 bit) and counter =
   (step, stream) (64 bit each; ``step`` shared by the batch or one per row, as rows of a continuously batched
   loop sit at different steps); scan the kept tokens in **index order** accumulating ``w`` and take the first
   token whose running sum exceeds ``u * total`` (float64).

The log-probability of the chosen token under the filtered, renormalised distribution is
``z_t - max z - log(sum of kept w)`` (0 for greedy).

A batch given one ``SamplingParams`` with seed s gives row i the stream (s, i); a list gives each request its
own (seed, 0): a request's tokens never depend on the batch it shares. The numpy functions here serve the
torch-free runtime; ``larp_rt.sampling_torch`` has the same functions on tensors (device-side, no host sync).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import NonFiniteLogitsError, SamplingParamsError

__all__ = [
    "SamplingParams", "RowParams", "resolve_params", "philox4x32", "uniform", "uniform_table", "sample",
    "cfg_mix", "filtered_distribution", "check_step", "check_row_params", "MAX_CFG_SCALE", "MAX_TEMPERATURE",
    "MIN_TEMPERATURE", "MIN_TOP_P", "PARAM_RULES", "svq_sample",
]

_M32 = 0xFFFFFFFF
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
MAX_SEED = 2**64 - 1

# The parameter bounds every sampler enforces (``SamplingParams.validate`` on the request's float64 values, the
# kernels on the float32 copies they receive; mirrored in cpp_ext/include/larp_rt/sample_args.h as LARP_MAX_CFG_SCALE,
# ..., and a test checks that the two agree). Inside them the float32 / float64 arithmetic of every sampler stays
# finite and normal:
# - cfg_scale <= 1e4: the float32 mix u + (c - u) * s cannot overflow for logits differences below ~3.4e34
#   (float32 max / 1e4); 3.5e38 or 1e308 would round to inf in float32 before any logit is read.
# - temperature 0 (greedy) or in [1e-4, 1e4]: z = l / T is taken in float64 (|z| <= 3.4e38 * 1e4, far from the
#   float64 max) and T is a normal float32 (no denormal that a flush-to-zero unit would read as 0: division by 0);
#   1e308 would be inf in float32.
# - top_p >= the smallest normal float32 (1.1754944e-38): 1e-300 or 5e-324 round to 0 in float32 (refused as
#   top_p = 0), and a denormal top_p would read as 0 where denormals are flushed (the CUDA kernel: top-p off).
MAX_CFG_SCALE = 1e4
MAX_TEMPERATURE = 1e4
MIN_TEMPERATURE = 1e-4
MIN_TOP_P = float(np.finfo(np.float32).tiny)

# the rule of each bounded parameter, as every check words it ("SamplingParams.<name> must be <rule>, got <value>";
# the kernels: "<name>[<row>] = <value>: must be <rule>"); servers word their own checks with it
PARAM_RULES = {
    "cfg_scale": f"a finite number in [0, {MAX_CFG_SCALE:g}] (1.0 = no guidance)",
    "temperature": f"a finite number: 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]",
    "top_p": f"in (0, 1], at least {float(np.float32(MIN_TOP_P)):.8g} (the smallest normal float32; 1.0 = off)",
}
_F64_BOUNDS = (MAX_CFG_SCALE, MIN_TEMPERATURE, MAX_TEMPERATURE, MIN_TOP_P)  # SamplingParams.validate's
_F32_BOUNDS = tuple(float(np.float32(v)) for v in _F64_BOUNDS)  # the kernels' (on the float32 copies)


def _within(name: str, v, bounds: tuple[float, float, float, float]):
    """The one rule of each bounded float parameter, for a value or an array (NaN fails it): True where ``v`` is
    inside ``bounds`` (max cfg_scale, min and max temperature, min top_p). ``SamplingParams.validate`` applies it
    to the request's values with the exact bounds, ``check_row_params`` to the float32 rows with float32 ones."""
    max_cfg, min_t, max_t, min_p = bounds
    with np.errstate(invalid="ignore"):
        if name == "cfg_scale":
            return np.logical_and(v >= 0, v <= max_cfg)
        if name == "temperature":
            return np.logical_or(v == 0, np.logical_and(v >= min_t, v <= max_t))
        return np.logical_and(v >= min_p, v <= 1)  # top_p


@dataclass(frozen=True)
class SamplingParams:
    """How to draw tokens for one request (or, given once, for every row of a batch).

    cfg_scale: classifier-free guidance scale in [0, MAX_CFG_SCALE] (1.0 = no guidance, no null-class rows).
    temperature: 0 = greedy, else in [MIN_TEMPERATURE, MAX_TEMPERATURE]. top_k: 0 = off, else 1..vocab.
    top_p: in [MIN_TOP_P, 1]; 1.0 = off. seed: 0..2**64-1, or None to draw a fresh one (the engine reports it).
    The bounds keep every sampler's float32 arithmetic finite (see MAX_CFG_SCALE above): a value that passes
    ``validate`` is sampled by every kernel, and every kernel refuses what ``validate`` refuses.
    """

    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        def bad(name: str, want: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} must be {want}, got {getattr(self, name)!r}")

        def is_num(v) -> bool:
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

        # comparisons, not float(): a huge int compares exactly, NaN fails every one
        for name in ("cfg_scale", "temperature"):
            if not is_num(getattr(self, name)) or not bool(_within(name, getattr(self, name), _F64_BOUNDS)):
                raise bad(name, PARAM_RULES[name])
        if not isinstance(self.top_k, (int, np.integer)) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise bad("top_k", "an int >= 0 (0 = off)")
        if vocab_size is not None and self.top_k > vocab_size:
            raise bad("top_k", f"at most the vocabulary size {vocab_size} (0 = off)")
        if not is_num(self.top_p) or not bool(_within("top_p", self.top_p, _F64_BOUNDS)):
            raise bad("top_p", PARAM_RULES["top_p"])
        int_seed = isinstance(self.seed, (int, np.integer)) and not isinstance(self.seed, bool)
        if self.seed is not None and (not int_seed or not 0 <= self.seed <= MAX_SEED):
            raise bad("seed", f"None or an int in [0, {MAX_SEED}]")
        return self


@dataclass(frozen=True)
class RowParams:
    """Per-row parameter arrays of a batch (B rows), as every sampler implementation takes them."""

    cfg_scale: np.ndarray  # (B,) float32
    temperature: np.ndarray  # (B,) float32
    top_k: np.ndarray  # (B,) int64
    top_p: np.ndarray  # (B,) float32
    seed: np.ndarray  # (B,) uint64
    stream: np.ndarray  # (B,) uint64

    def __len__(self) -> int:
        return len(self.seed)

    def select(self, rows) -> RowParams:
        """These parameters for ``rows`` only (an index array, a slice or a mask), every field alike."""
        return RowParams(**{f: getattr(self, f)[rows] for f in RowParams.__dataclass_fields__})

    @property
    def uses_cfg(self) -> bool:
        return bool(np.any(self.cfg_scale != 1.0))


def fresh_seed() -> int:
    return secrets.randbits(63)


def resolve_params(
    params: SamplingParams | Sequence[SamplingParams], batch: int, vocab_size: int | None = None
) -> RowParams:
    """Validate and expand to per-row arrays; seed=None draws a fresh seed (read it back from ``.seed``).

    One SamplingParams: row i gets the stream (seed, i). A list (one per request): row i gets (seed_i, 0).
    """
    if isinstance(params, SamplingParams):
        params.validate(vocab_size)
        seed = fresh_seed() if params.seed is None else int(params.seed)
        rows = [params] * batch
        seeds, streams = [seed] * batch, list(range(batch))
    else:
        if not isinstance(params, (list, tuple)):
            raise ValueError(f"params must be a SamplingParams or a list of them (one per class id), got "
                             f"{type(params).__name__}")
        rows = list(params)
        if len(rows) != batch:
            raise ValueError(f"params has {len(rows)} SamplingParams for {batch} class ids; give one, or one per id")
        for i, p in enumerate(rows):
            if not isinstance(p, SamplingParams):
                raise ValueError(f"params[{i}] must be a SamplingParams, got {type(p).__name__}")
            try:
                p.validate(vocab_size)
            except ValueError as e:
                raise ValueError(f"params[{i}]: {e}") from None
        seeds = [fresh_seed() if p.seed is None else int(p.seed) for p in rows]
        streams = [0] * batch
    return RowParams(
        cfg_scale=np.array([p.cfg_scale for p in rows], np.float32),
        temperature=np.array([p.temperature for p in rows], np.float32),
        top_k=np.array([p.top_k for p in rows], np.int64),
        top_p=np.array([p.top_p for p in rows], np.float32),
        seed=np.array(seeds, np.uint64),
        stream=np.array(streams, np.uint64),
    )


# --------------------------------------------------------------------------------------------
# Philox4x32-10 (Salmon et al. 2011), vectorised over arrays of counters
# --------------------------------------------------------------------------------------------
def philox4x32(counter: Sequence[np.ndarray], key: Sequence[np.ndarray], rounds: int = 10) -> list[np.ndarray]:
    """counter: 4 uint32-valued arrays, key: 2 -> 4 uint32 arrays (uint64 dtype holding 32-bit values)."""
    c0, c1, c2, c3 = (np.asarray(c, np.uint64) & _M32 for c in counter)
    k0, k1 = (np.asarray(k, np.uint64) & _M32 for k in key)
    m0, m1 = np.uint64(PHILOX_M[0]), np.uint64(PHILOX_M[1])
    for r in range(rounds):
        if r:
            k0 = (k0 + np.uint64(PHILOX_W[0])) & _M32
            k1 = (k1 + np.uint64(PHILOX_W[1])) & _M32
        p0, p1 = m0 * c0, m1 * c2  # < 2**64: exact in uint64
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0), (p1 & _M32), ((p0 >> 32) ^ c3 ^ k1), (p0 & _M32)
    return [c0, c1, c2, c3]


def uniform(seed: np.ndarray, stream: np.ndarray, step: int | np.ndarray) -> np.ndarray:
    """(B,) float64 uniforms in [0, 1) with 53 random bits: Philox(key=seed, counter=(step, stream))."""
    seed, stream, step = np.broadcast_arrays(
        np.asarray(seed, np.uint64), np.asarray(stream, np.uint64), np.asarray(step, np.uint64)
    )
    x0, x1, _, _ = philox4x32(
        (step & _M32, step >> np.uint64(32), stream & _M32, stream >> np.uint64(32)),
        (seed & _M32, seed >> np.uint64(32)),
    )
    return ((x0 >> np.uint64(5)).astype(np.float64) * 67108864.0 + (x1 >> np.uint64(6)).astype(np.float64)) / 2.0**53


def uniform_table(params: RowParams, steps: int, start: int | np.ndarray = 0) -> np.ndarray:
    """(B, steps) uniforms of steps start..start+steps-1 for every row, in one vectorised Philox pass; ``start``
    an int or (B,) per-row first steps (column j of row r is step start[r] + j)."""
    start = check_step(start, len(params), "start")
    first = np.asarray(start, np.uint64).reshape(-1, 1)  # (1, 1) or (B, 1)
    return uniform(params.seed[:, None], params.stream[:, None], first + np.arange(steps, dtype=np.uint64)[None, :])


# --------------------------------------------------------------------------------------------
# the sampler
# --------------------------------------------------------------------------------------------
def check_step(step, batch: int, name: str = "step") -> int | np.ndarray:
    """A sampler's ``step``: an int in [0, 2**64) shared by every row, or (batch,) integers >= 0, one per row
    (row r draws ``uniform(seed[r], stream[r], step[r])``). Returns the int, or the (batch,) uint64 array."""
    if isinstance(step, (int, np.integer)) and not isinstance(step, (bool, np.bool_)):
        step = int(step)
        if not 0 <= step < 2**64:
            raise ValueError(f"{name} must be >= 0 and < 2**64, got {step}")
        return step
    a = np.asarray(step)
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be an int or a ({batch},) integer array (one step per row), got {step!r}")
    if a.ndim == 0:
        return check_step(a.item(), batch, name)
    if a.shape != (batch,):
        raise ValueError(f"{name} must be an int or have shape ({batch},) (one step per row), got shape {a.shape}")
    if a.dtype.kind == "i" and batch and a.min() < 0:
        r = int(np.argmax(a < 0))
        raise ValueError(f"{name}[{r}] = {a[r]}: must be >= 0")
    return a.astype(np.uint64)


def check_row_params(params: RowParams, vocab: int | None = None) -> None:
    """The kernels' check of per-row parameters (``larp_sample_cpu``'s, same bounds on the same float32 values,
    same message): raises SamplingParamsError (a ValueError) naming the first bad row, e.g. "cfg_scale[3] = inf:
    must be ...". The values ``SamplingParams.validate`` accepts always pass (the same rules, ``_within``).
    ``vocab``: also check top_k <= vocab."""
    s = np.asarray(params.cfg_scale, np.float32)
    t = np.asarray(params.temperature, np.float32)
    k = np.asarray(params.top_k)
    p = np.asarray(params.top_p, np.float32)
    checks = [
        ("cfg_scale", s, ~_within("cfg_scale", s, _F32_BOUNDS), PARAM_RULES["cfg_scale"]),
        ("temperature", t, ~_within("temperature", t, _F32_BOUNDS), PARAM_RULES["temperature"]),
        ("top_k", k, (k < 0) | (k > vocab) if vocab is not None else k < 0,
         f"in [0, vocab = {vocab}] (0 = off)" if vocab is not None else ">= 0 (0 = off)"),
        ("top_p", p, ~_within("top_p", p, _F32_BOUNDS), PARAM_RULES["top_p"]),
    ]
    first = [int(np.argmax(bad)) if bad.any() else len(s) for _, _, bad, _ in checks]
    r = min(first)
    if r == len(s):
        return
    name, v, _, rule = checks[first.index(r)]
    raise SamplingParamsError(f"{name}[{r}] = {_f32(v[r])}: must be {rule}", row=r)


def _f32(x) -> str:
    """The shortest "%g" text (6 to 9 significant digits) that reads back as float32 x (the C++ messages' too)."""
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = np.float32(x)
    for prec in range(6, 10):
        s = f"{float(x):.{prec}g}"
        if np.float32(s) == x:
            return s
    return s


def _check_logits(name: str, x: np.ndarray, rows: int | None = None) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or (rows is not None and x.shape[0] != rows):
        want = f"({rows}, V)" if rows is not None else "(B, V)"
        raise ValueError(f"{name} must have shape {want}, got {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    x = x.astype(np.float32, copy=False)
    bad = ~np.isfinite(x)
    if bad.any():
        r, i = np.argwhere(bad)[0]
        raise NonFiniteLogitsError(
            f"{name} contain NaN/Inf (first at row {r}, token {i}): the model produced non-finite values; "
            "check the weights and the precision (fp16 overflow?)", row=int(r)
        )
    return x


def cfg_mix(cond: np.ndarray, uncond: np.ndarray | None, cfg_scale: np.ndarray) -> np.ndarray:
    """(B, V) float32 guided logits; rows with cfg_scale == 1 (or no uncond) are ``cond`` unchanged."""
    cond = np.asarray(cond, np.float32)
    if uncond is None:
        return cond
    s = np.asarray(cfg_scale, np.float32).reshape(-1, 1)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is the caller's to refuse (``sample`` does)
        mixed = uncond + (cond - uncond) * s
    return np.where(s != 1.0, mixed, cond)


def _kept_order(z: np.ndarray) -> np.ndarray:
    """Indices by (z descending, index ascending)."""
    return np.argsort(-z, kind="stable")


def filtered_distribution(l_row: np.ndarray, temperature: float, top_k: int, top_p: float):
    """For one row of guided logits (T > 0): (z, kept index array ascending, weights w of all tokens, max z)."""
    z = l_row.astype(np.float64) / float(temperature)
    V = z.shape[0]
    zmax = z.max()
    w = np.exp(z - zmax)
    if (0 < top_k < V) or top_p < 1.0:
        order = _kept_order(z)
        if 0 < top_k < V:
            order = order[:top_k]
        if top_p < 1.0:
            cum = np.cumsum(w[order])
            n = int(np.searchsorted(cum, np.float64(np.float32(top_p)) * cum[-1], side="left")) + 1
            order = order[: min(max(n, 1), len(order))]
        kept = np.sort(order)
    else:
        kept = np.arange(V)
    return z, kept, w, zmax


def sample(
    cond_logits: np.ndarray,
    uncond_logits: np.ndarray | None,
    params: RowParams,
    step: int | np.ndarray,
    *,
    return_logprobs: bool = False,
    u: np.ndarray | None = None,
):
    """Draw one token per row. cond/uncond: (B, V) float logits (uncond = the paired null-class rows or None).

    ``step``: an int (every row) or (B,) integers, one per row (``check_step``). ``u``: the rows' uniforms for
    this step if already drawn (``uniform_table`` precomputes a whole video's); must equal
    ``uniform(params.seed, params.stream, step)``. Returns (B,) int64 token ids [and (B,) float64
    log-probabilities]. Never mutates its inputs.
    """
    B = len(params)
    cond = _check_logits("cond_logits", cond_logits, B)
    uncond = None if uncond_logits is None else _check_logits("uncond_logits", uncond_logits, B)
    if uncond is not None and uncond.shape != cond.shape:
        raise ValueError(f"uncond_logits shape {uncond.shape} must equal cond_logits shape {cond.shape}")
    step = check_step(step, B)
    check_row_params(params, cond.shape[1])
    l = cfg_mix(cond, uncond, params.cfg_scale)
    if uncond is not None:  # finite inputs, but the float32 mix may overflow (huge logits times cfg_scale)
        bad = ~np.isfinite(l)
        if bad.any():
            r, i = np.argwhere(bad)[0]
            raise NonFiniteLogitsError(
                f"guided logits contain NaN/Inf (first at row {r}, token {i}): cond and uncond are finite but "
                "uncond + (cond - uncond) * cfg_scale overflows float32; check the logits' scale or lower cfg_scale",
                row=int(r),
            )
    if u is None:
        u = uniform(params.seed, params.stream, step)
    tokens = np.empty(B, np.int64)
    logp = np.zeros(B, np.float64)
    for r in range(B):
        T = float(params.temperature[r])
        if T == 0.0:
            tokens[r] = int(np.argmax(l[r]))
            continue
        z, kept, w, zmax = filtered_distribution(l[r], T, int(params.top_k[r]), float(params.top_p[r]))
        cw = np.cumsum(w[kept])
        j = int(np.searchsorted(cw, u[r] * cw[-1], side="right"))
        t = int(kept[min(j, len(kept) - 1)])
        tokens[r] = t
        logp[r] = z[t] - zmax - math.log(cw[-1])
    return (tokens, logp) if return_logprobs else tokens


# --------------------------------------------------------------------------------------------
# the tokenizer's stochastic SVQ (frame prediction's conditioning, ``stochastic_cond=True``)
# --------------------------------------------------------------------------------------------
def svq_sample(latents: np.ndarray, codes: np.ndarray, temperature: float, seed: int | None,
               codebook_size: int | None = None) -> np.ndarray:
    """The authors' stochastic SVQ: each token drawn from ``softmax(cos(latent, code) / temperature)``.

    latents (B, N, d) and codes (K, d), both L2-normalised (``Backend.encode_latents``) -> (B, N) int64 indices
    in [0, codebook_size) (default K). One uniform per token from ``numpy.random.default_rng(seed)`` (reproducible
    for a seed; fresh when None), inverted through the cumulative weights in float64."""
    z = latents.astype(np.float64) @ codes.astype(np.float64).T / temperature  # (B, N, K)
    z -= z.max(axis=-1, keepdims=True)
    cdf = np.cumsum(np.exp(z), axis=-1)
    rng = np.random.default_rng(seed)
    u = rng.random(cdf.shape[:2]) * cdf[..., -1]
    idx = (cdf < u[..., None]).sum(axis=-1)
    return np.minimum(idx, (len(codes) if codebook_size is None else codebook_size) - 1).astype(np.int64)
