"""The CUDA kernel's logic on the CPU: sampling_cuda.cuh compiled with g++ against cpp_ext/tests/cuda_emulation.h.

Every thread of a block is a fiber, __syncthreads() a real barrier, warp shuffles exact; so the radix passes,
tie handling, deterministic reductions and the segmented draw are checked against the reference here, on
machines without a GPU. (Memory model, occupancy and speed need the real GPU tests: test_kernels_gpu.py.)
"""

import ctypes
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from larp_rt import kernels as K
from larp_rt import sampling as S
from larp_rt.sampling import RowParams, SamplingParams, resolve_params

ROOT = Path(__file__).resolve().parents[1]
CPP = ROOT / "cpp_ext"

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None or platform.system() != "Linux" or not (CPP / "tests").is_dir(),
    reason="needs g++ on Linux and the cpp_ext sources",
)


def build(tmp_path_factory, threads: int):
    out = tmp_path_factory.mktemp("emu") / f"libemu{threads}.so"
    cmd = ["g++", "-std=c++17", "-O2", "-ffp-contract=off", "-fPIC", "-shared", f"-DLARP_CUDA_THREADS={threads}",
           f"-I{CPP / 'include'}", f"-I{CPP / 'tests'}", str(CPP / "tests" / "cuda_emulation.cc"), "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    lib = ctypes.CDLL(str(out))
    lib.larp_sample_cuda_emulated.argtypes = [ctypes.POINTER(K.SampleArgs)]
    return lib


@pytest.fixture(scope="module")
def emu64(tmp_path_factory):
    return build(tmp_path_factory, 64)


def run(lib, cond, uncond, p: RowParams, step, dtype=0, step_on_ptr=False, ld=None):
    """``step`` an int (the ``step`` field, or ``step_ptr`` with step_on_ptr) or (B,) per-row ``steps``."""
    B = len(p)
    V = cond.shape[1]
    tokens = np.full(B, -7, np.int64)
    logp = np.empty(B, np.float64)
    arrs = [np.ascontiguousarray(getattr(p, f), dt) for f, dt in
            [("cfg_scale", np.float32), ("temperature", np.float32), ("top_k", np.int64), ("top_p", np.float32),
             ("seed", np.uint64), ("stream", np.uint64)]]
    per_row = np.ndim(step) > 0
    step_arr = np.ascontiguousarray(step, np.int64) if per_row else np.array([step], np.int64)
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p) if a is not None else None
    args = K.SampleArgs(
        cond=ptr(cond), uncond=ptr(uncond), ld_cond=V if ld is None else ld, ld_uncond=V, dtype=dtype, batch=B,
        vocab=V, cfg_scale=ptr(arrs[0]), temperature=ptr(arrs[1]), top_k=ptr(arrs[2]), top_p=ptr(arrs[3]),
        seed=ptr(arrs[4]), stream=ptr(arrs[5]), step_ptr=ptr(step_arr) if step_on_ptr and not per_row else None,
        step=0 if step_on_ptr or per_row else step, tokens=ptr(tokens), logprobs=ptr(logp),
        steps=ptr(step_arr) if per_row else None,
    )
    assert lib.larp_sample_cuda_emulated(ctypes.byref(args)) == 0
    return tokens, logp


def random_case(rng, V):
    B = int(rng.integers(1, 4))
    scale = float(rng.choice([0.1, 1.0, 5.0, 30.0]))
    cond = (rng.standard_normal((B, V)) * scale).astype(np.float32)
    if rng.random() < 0.4:
        cond = np.round(cond)  # ties
    uncond = (rng.standard_normal((B, V)) * scale).astype(np.float32) if rng.random() < 0.5 else None
    p = RowParams(
        cfg_scale=rng.choice([1.0, 1.5, 3.0], B).astype(np.float32),
        temperature=rng.choice([0.0, 0.05, 0.5, 1.0, 2.0], B).astype(np.float32),
        top_k=(rng.integers(0, V + 1, B) * (rng.random(B) < 0.7)).astype(np.int64),
        top_p=rng.choice([1.0, 0.99, 0.9, 0.5, 0.1], B).astype(np.float32),
        seed=rng.integers(0, 2**63, B).astype(np.uint64), stream=np.arange(B, dtype=np.uint64),
    )
    return cond, uncond, p


def check_against_reference(lib, rng, cases, vocabs):
    for _ in range(cases):
        cond, uncond, p = random_case(rng, int(rng.choice(vocabs)))
        half = rng.random() < 0.3
        if half:
            cond = cond.astype(np.float16)
            uncond = None if uncond is None else uncond.astype(np.float16)
        step = int(rng.integers(0, 1 << 40))
        want_t, want_l = S.sample(cond, uncond, p, step, return_logprobs=True)
        got_t, got_l = run(lib, cond, uncond, p, step, dtype=1 if half else 0, step_on_ptr=rng.random() < 0.5)
        np.testing.assert_array_equal(got_t, want_t)
        # float64 summation order and libm's exp (the reference uses numpy's) differ in the last bits only
        np.testing.assert_allclose(got_l, want_l, rtol=1e-12, atol=1e-12)


def test_emulated_cuda_kernel_matches_the_reference(emu64):
    check_against_reference(emu64, np.random.default_rng(0), 40, [1, 2, 7, 64, 65, 300, 1000])


def test_emulated_cuda_kernel_greedy_ties_peaks_and_bfloat16(emu64):
    l = np.array([[1, 5, 5, 0], [7, 7, 7, 7], [-1, -3, -1, -2], [0.0, -0.0, 0.0, -1]], np.float32)
    t, lp = run(emu64, l, None, resolve_params(SamplingParams(temperature=0.0, seed=0), 4), 0)
    assert t.tolist() == [1, 0, 0, 0] and lp.tolist() == [0.0] * 4
    t, _ = run(emu64, l, None, resolve_params(SamplingParams(temperature=2.0, top_k=1, seed=0), 4), 0)
    assert t.tolist() == [1, 0, 0, 0]
    V = 3000
    peaked = np.full((3, V), -1e4, np.float32)
    peaked[[0, 1, 2], [5, 2999, 1234]] = 0.0
    for kw in [{}, {"top_k": 40}, {"top_p": 0.2}]:
        t, _ = run(emu64, peaked, None, resolve_params(SamplingParams(seed=1, **kw), 3), 4)
        assert t.tolist() == [5, 2999, 1234]
    # bfloat16 bit patterns: the top 16 bits of float32 values that are exactly representable
    torch = pytest.importorskip("torch")
    x = torch.randn(2, 500).bfloat16()
    p = resolve_params(SamplingParams(top_k=50, top_p=0.9, seed=3), 2)
    t, _ = run(emu64, x.view(torch.int16).numpy(), None, p, 2, dtype=2)
    np.testing.assert_array_equal(t, S.sample(x.float().numpy(), None, p, 2))


def test_emulated_cuda_kernel_shared_row_and_non_finite_rows(emu64):
    rng = np.random.default_rng(1)
    row = rng.standard_normal((1, 200)).astype(np.float32)
    p = resolve_params(SamplingParams(top_p=0.8, seed=2), 5)
    t, _ = run(emu64, row, None, p, 3, ld=0)  # one row read by every block
    np.testing.assert_array_equal(t, S.sample(np.repeat(row, 5, 0), None, p, 3))
    bad = np.zeros((2, 10), np.float32)
    bad[1, 3] = np.inf
    t, lp = run(emu64, bad, None, resolve_params(SamplingParams(seed=0), 2), 0)
    assert t[0] >= 0 and t[1] == -1 and np.isnan(lp[1])


def test_emulated_cuda_kernel_with_per_row_steps(emu64):
    """steps [B]: block r draws at steps[r] (rows at different steps), == the reference given the same steps, and
    the shared step (step / step_ptr) is ignored."""
    rng = np.random.default_rng(3)
    for _ in range(15):
        cond, uncond, p = random_case(rng, int(rng.choice([7, 300, 1000])))
        B = len(p)
        steps = rng.choice([0, 1, 1 << 33, (1 << 63) - 1], B).astype(np.int64)
        want_t, want_l = S.sample(cond, uncond, p, steps, return_logprobs=True)
        got_t, got_l = run(emu64, cond, uncond, p, steps, step_on_ptr=rng.random() < 0.5)
        np.testing.assert_array_equal(got_t, want_t)
        np.testing.assert_allclose(got_l, want_l, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_emulated_cuda_kernel_with_512_threads(tmp_path_factory):
    lib = build(tmp_path_factory, 512)
    check_against_reference(lib, np.random.default_rng(2), 25, [1, 513, 1000, 5000])
