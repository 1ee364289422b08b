"""The parameter bounds (larp_rt.sampling MAX_CFG_SCALE, MIN/MAX_TEMPERATURE, MIN_TOP_P) on every sampler path.

``SamplingParams.validate`` refuses what the float32 kernels cannot compute; a value at a bound passes it and
every sampler samples it (the reference's tokens); a float32 value just past a bound is refused by every sampler
with the same message (the CPU kernel's host check, the ORT op, the torch reference), or marked by the CUDA
kernel (token -2, its device-side check, run here on the CPU through the emulation of
test_kernels_cuda_emulation.py).
"""

import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from larp_rt import kernels as K
from larp_rt import sampling as S
from larp_rt.sampling import (
    MAX_CFG_SCALE,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    MIN_TOP_P,
    RowParams,
    SamplingParams,
    resolve_params,
)

torch = pytest.importorskip("torch")
from larp_rt import sampling_torch as ST  # noqa: E402

HEADER = Path(__file__).resolve().parents[1] / "cpp_ext" / "include" / "larp_rt" / "sample_args.h"
HAVE_CPU = K.cpu_library() is not None
HAVE_ORT = K.ort_custom_op_library() is not None
F32 = np.float32


def test_the_constants_are_documented_exported_and_float32_safe():
    for name in ("MAX_CFG_SCALE", "MAX_TEMPERATURE", "MIN_TEMPERATURE", "MIN_TOP_P"):
        assert name in S.__all__
    assert (MAX_CFG_SCALE, MAX_TEMPERATURE, MIN_TEMPERATURE) == (1e4, 1e4, 1e-4)
    assert MIN_TOP_P == float(np.finfo(np.float32).tiny)
    # each bound is a normal float32, and the extremes of the arithmetic stay finite (see sampling.py)
    for v in (MAX_CFG_SCALE, MAX_TEMPERATURE, MIN_TEMPERATURE, MIN_TOP_P):
        assert np.isfinite(F32(v)) and abs(F32(v)) >= np.finfo(np.float32).tiny
    assert np.isfinite(F32(3e34) * F32(MAX_CFG_SCALE))  # the CFG mix of logits differences up to ~3e34
    assert np.isfinite(float(np.finfo(np.float32).max) / float(F32(MIN_TEMPERATURE)))  # z = l / T in float64


def test_python_and_cpp_bounds_agree():
    # the header as written (no build needed) ...
    text = HEADER.read_text()
    header = {m[1]: F32(m[2]) for m in re.finditer(r"#define LARP_(\w+) ([0-9.e+-]+)f", text)}
    want = {"MAX_CFG_SCALE": MAX_CFG_SCALE, "MIN_TEMPERATURE": MIN_TEMPERATURE, "MAX_TEMPERATURE": MAX_TEMPERATURE,
            "MIN_TOP_P": MIN_TOP_P}
    assert {k: header[k] for k in want} == {k: F32(v) for k, v in want.items()}
    # ... and what the built kernels enforce
    if HAVE_CPU:
        got = K.sample_bounds()
        assert got == {k.lower(): float(F32(v)) for k, v in want.items()}


HOSTILE = [
    ("cfg_scale", 3.5e38, r"SamplingParams\.cfg_scale must be a finite number in \[0, 10000\] \(1\.0 = no "
                          r"guidance\), got 3\.5e\+38"),
    ("cfg_scale", 1e308, r"cfg_scale must be a finite number in \[0, 10000\].*got 1e\+308"),
    ("cfg_scale", 10000.000001, r"cfg_scale must be a finite number in \[0, 10000\]"),
    ("cfg_scale", 10**400, r"cfg_scale must be"),
    ("temperature", 1e308, r"SamplingParams\.temperature must be a finite number: 0 \(greedy\) or in "
                           r"\[0\.0001, 10000\], got 1e\+308"),
    ("temperature", 5e-324, r"temperature must be .*\[0\.0001, 10000\], got 5e-324"),
    ("temperature", 9.99e-5, r"temperature must be"),
    ("temperature", float("inf"), r"temperature must be"),
    ("top_p", 1e-300, r"SamplingParams\.top_p must be in \(0, 1\], at least 1\.1754944e-38 \(the smallest normal "
                      r"float32; 1\.0 = off\), got 1e-300"),
    ("top_p", 5e-324, r"top_p must be in \(0, 1\], at least 1\.1754944e-38.*got 5e-324"),
    ("top_p", float(np.nextafter(MIN_TOP_P, 0.0)), r"top_p must be in \(0, 1\], at least 1\.1754944e-38"),
    ("top_p", float("nan"), r"top_p must be"),
]


@pytest.mark.parametrize("field, value, message", HOSTILE, ids=[f"{f}={str(v)[:12]}" for f, v, _ in HOSTILE])
def test_validate_refuses_what_float32_cannot_hold(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value}).validate()
    with pytest.raises(ValueError, match=r"params\[1\]: SamplingParams\." + field + " must be"):
        resolve_params([SamplingParams(), SamplingParams(**{field: value})], 2)


AT_BOUNDS = [  # every bound, alone and together; a greedy and an unfiltered row for company
    SamplingParams(seed=1, cfg_scale=MAX_CFG_SCALE),
    SamplingParams(seed=2, cfg_scale=0.0, temperature=0.7),
    SamplingParams(seed=3, temperature=MIN_TEMPERATURE),
    SamplingParams(seed=4, temperature=MAX_TEMPERATURE),
    SamplingParams(seed=5, top_p=MIN_TOP_P),
    SamplingParams(seed=6, temperature=MAX_TEMPERATURE, top_p=MIN_TOP_P, top_k=7),
    SamplingParams(seed=7, cfg_scale=MAX_CFG_SCALE, temperature=MIN_TEMPERATURE, top_p=MIN_TOP_P, top_k=300),
    SamplingParams(seed=8, cfg_scale=MAX_CFG_SCALE, temperature=MAX_TEMPERATURE, top_p=0.9),
    SamplingParams(seed=9, temperature=0.0, cfg_scale=MAX_CFG_SCALE),
    SamplingParams(seed=10),
]


def bounds_case(V=300):
    rng = np.random.default_rng(7)
    p = resolve_params([q.validate(V) for q in AT_BOUNDS], len(AT_BOUNDS), vocab_size=V)
    B = len(p)
    cond = (rng.standard_normal((B, V)) * 3).astype(np.float32)
    uncond = (rng.standard_normal((B, V)) * 3).astype(np.float32)
    steps = rng.integers(0, 1 << 40, B).astype(np.int64)
    return cond, uncond, p, steps


def ort_session():
    from test_kernels_ort import session

    return session(step_dims=["B"])


def ort_feed(cond, uncond, p, steps):
    from test_kernels_ort import feed

    return feed(np.concatenate([cond, uncond]), p, steps)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("the CUDA emulation needs g++")
    from test_kernels_cuda_emulation import build

    return build(tmp_path_factory, 64)


def test_values_at_the_bounds_are_sampled_by_every_path(emu):
    cond, uncond, p, steps = bounds_case()
    want_t, want_l = S.sample(cond, uncond, p, steps, return_logprobs=True)
    assert np.isfinite(want_l).all()
    got = {}
    dp = ST.DeviceRowParams(p, "cpu")
    c_t, u_t, s_t = torch.from_numpy(cond), torch.from_numpy(uncond), torch.from_numpy(steps)
    got["torch reference"] = [x.numpy() for x in ST.sample(c_t, u_t, dp, s_t, return_logprobs=True)]
    if HAVE_CPU:
        got["cpu kernel"] = K.sample_numpy(cond, uncond, p, steps, return_logprobs=True)
        got["torch op"] = [x.numpy() for x in K.sample_torch(c_t, u_t, dp, s_t, return_logprobs=True)]
    if HAVE_ORT:
        got["ort op"] = ort_session().run(None, ort_feed(cond, uncond, p, steps))
    from test_kernels_cuda_emulation import run as run_emulated

    got["cuda kernel (emulated)"] = run_emulated(emu, cond, uncond, p, steps)
    for name, (t, lp) in got.items():
        np.testing.assert_array_equal(t, want_t, err_msg=name)
        np.testing.assert_allclose(lp, want_l, rtol=1e-12, atol=1e-12, err_msg=name)
    # the standard-ops sample graph (the ``graph`` sampler): the uniforms of the rows' steps
    ort = pytest.importorskip("onnxruntime")
    from larp_rt.export.sampler_graph import build_sampler_model

    sess = ort.InferenceSession(build_sampler_model().SerializeToString(), providers=["CPUExecutionProvider"])
    t, _ = sess.run(None, {"logits": np.concatenate([cond, uncond]), "cfg_scale": p.cfg_scale,
                           "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p,
                           "uniform": S.uniform(p.seed, p.stream, steps)})
    np.testing.assert_array_equal(t, want_t)


JUST_PAST = [  # float32 values one ulp outside a bound (what validate's float64 check can never let through)
    ("cfg_scale", np.nextafter(F32(MAX_CFG_SCALE), F32(np.inf)), r"cfg_scale\[1\] = 10000\.001: must be a finite "
                                                                 r"number in \[0, 10000\] \(1\.0 = no guidance\)"),
    ("cfg_scale", np.nextafter(F32(0), F32(-1)), r"cfg_scale\[1\] = -1\.4013e-45: must be"),
    ("cfg_scale", F32(np.inf), r"cfg_scale\[1\] = inf: must be"),
    ("temperature", np.nextafter(F32(MIN_TEMPERATURE), F32(0)), r"temperature\[1\] = 9\.999999e-05: must be a "
                                                                r"finite number: 0 \(greedy\) or in \[0\.0001, "
                                                                r"10000\]"),
    ("temperature", np.nextafter(F32(MAX_TEMPERATURE), F32(np.inf)), r"temperature\[1\] = 10000\.001: must be"),
    ("temperature", F32(np.nan), r"temperature\[1\] = nan: must be"),
    ("top_p", np.nextafter(F32(MIN_TOP_P), F32(0)), r"top_p\[1\] = 1\.1754942e-38: must be in \(0, 1\], at least "
                                                    r"1\.1754944e-38 \(the smallest normal float32; 1\.0 = off\)"),
    ("top_p", F32(0), r"top_p\[1\] = 0: must be"),
    ("top_p", np.nextafter(F32(1), F32(2)), r"top_p\[1\] = 1\.0000001: must be"),
    ("top_k", np.int64(301), r"top_k\[1\] = 301: must be in \[0, vocab = 300\] \(0 = off\)"),
]


@pytest.mark.parametrize("field, value, message", JUST_PAST, ids=[f"{f}={v}" for f, v, _ in JUST_PAST])
def test_just_past_a_bound_every_sampler_refuses(emu, field, value, message):
    cond, uncond, p, steps = bounds_case()
    cond, uncond = cond[:3], uncond[:3]
    p, steps = p.select(slice(0, 3)), steps[:3]
    arr = getattr(p, field).copy()
    arr[1] = value
    bad = dataclasses.replace(p, **{field: arr})
    with pytest.raises(ValueError, match=message):
        S.sample(cond, uncond, bad, steps)
    with pytest.raises(ValueError, match=message):  # the torch reference (its host-side check)
        ST.sample(torch.from_numpy(cond), torch.from_numpy(uncond), ST.DeviceRowParams(bad, "cpu"), 0)
    if HAVE_CPU:
        with pytest.raises(ValueError, match=message):  # the C++ kernel's host check
            K.sample_numpy(cond, uncond, bad, steps)
        op = K.register_torch_op()
        with pytest.raises(ValueError, match=message):  # the torch op (the same kernel)
            op(torch.from_numpy(cond), torch.from_numpy(uncond), *(torch.from_numpy(getattr(bad, f).view(
                np.int64) if getattr(bad, f).dtype == np.uint64 else getattr(bad, f)) for f in
                ("cfg_scale", "temperature", "top_k", "top_p", "seed", "stream")), torch.from_numpy(steps))
    if HAVE_ORT:
        with pytest.raises(Exception, match=r"larp_rt\.Sample: " + message):
            ort_session().run(None, ort_feed(cond, uncond, bad, steps))
    from test_kernels_cuda_emulation import run as run_emulated

    t, lp = run_emulated(emu, cond, uncond, bad, steps)  # the CUDA kernel marks the row (device-side check)
    assert t[1] == K.TOKEN_BAD_PARAMS and np.isnan(lp[1])
    want = S.sample(cond[[0, 2]], uncond[[0, 2]], p.select([0, 2]), steps[[0, 2]])
    np.testing.assert_array_equal(t[[0, 2]], want)  # the other rows are sampled as ever


def test_a_cfg_mix_that_overflows_float32_is_refused_on_every_path(emu):
    """Finite logits whose float32 mix overflows (|cond - uncond| * cfg_scale > 3.4e38) are refused like NaN/Inf
    logits, at the bound too: by the reference, the kernels and the graph (token -1), not sampled from inf/NaN."""
    cond = np.zeros((2, 50), np.float32)
    uncond = np.zeros((2, 50), np.float32)
    cond[1, 4], uncond[1, 4] = 1e35, -1e35
    p = resolve_params([SamplingParams(seed=0, cfg_scale=2.0), SamplingParams(seed=0, cfg_scale=MAX_CFG_SCALE)], 2)
    msg = r"guided logits contain NaN/Inf \(first at row 1, token 4\).*overflows float32"
    with pytest.raises(ValueError, match=msg):
        S.sample(cond, uncond, p, 0)
    with pytest.raises(ValueError, match="NaN/Inf"):
        ST.sample(torch.from_numpy(cond), torch.from_numpy(uncond), ST.DeviceRowParams(p, "cpu"), 0)
    if HAVE_CPU:
        with pytest.raises(ValueError, match=msg):
            K.sample_numpy(cond, uncond, p, 0)
    from test_kernels_cuda_emulation import run as run_emulated

    t, lp = run_emulated(emu, cond, uncond, p, 0)
    assert t[1] == K.TOKEN_NON_FINITE and np.isnan(lp[1]) and t[0] >= 0
    # without guidance the same logits are fine (no mix)
    plain = resolve_params(SamplingParams(seed=0, temperature=0.0), 2)
    np.testing.assert_array_equal(S.sample(cond, None, plain, 0), [0, 4])


def test_row_params_check_is_the_kernels():
    """check_row_params (the Python mirror) names the same first bad row and field as the kernel."""
    p = resolve_params(SamplingParams(seed=0), 4)
    bad = RowParams(**{**p.__dict__, "top_p": np.array([1, 1, 0, 1], np.float32),
                       "temperature": np.array([1, 1, 1, -1], np.float32)})
    with pytest.raises(ValueError, match=r"^top_p\[2\] = 0"):
        S.check_row_params(bad, 10)
    if HAVE_CPU:
        with pytest.raises(ValueError, match=r"^top_p\[2\] = 0"):
            K.sample_numpy(np.zeros((4, 10), np.float32), None, bad, 0)
    S.check_row_params(p, 10)  # what resolve_params built passes
