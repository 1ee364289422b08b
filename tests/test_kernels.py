"""The CPU sampling kernel (cpp_ext/) against the reference sampler: exact equality, edge cases, errors, torch op."""

import numpy as np
import pytest

from larp_rt import kernels as K
from larp_rt import sampling as S
from larp_rt.sampling import RowParams, SamplingParams, resolve_params

pytestmark = pytest.mark.skipif(
    K.cpu_library() is None, reason=f"CPU kernels not built: {K.available()['errors'].get(K.CPU_LIB)}"
)


def random_params(rng, B, V) -> RowParams:
    return RowParams(
        cfg_scale=rng.choice([1.0, 1.5, 3.0, 0.0], B).astype(np.float32),
        temperature=rng.choice([0.0, 0.05, 0.5, 1.0, 2.0, 7.0], B).astype(np.float32),
        top_k=(rng.integers(0, V + 1, B) * (rng.random(B) < 0.7)).astype(np.int64),
        top_p=rng.choice([1.0, 0.99, 0.9, 0.5, 0.1, 1e-6], B).astype(np.float32),
        seed=rng.integers(0, 2**64 - 1, B, dtype=np.uint64, endpoint=True),
        stream=rng.integers(0, 2**64 - 1, B, dtype=np.uint64, endpoint=True),
    )


def random_logits(rng, B, V):
    scale = float(rng.choice([0.01, 1.0, 5.0, 40.0]))
    x = rng.standard_normal((B, V)) * scale
    kind = rng.integers(0, 4)
    if kind == 1:  # many exact ties
        x = np.round(x)
    elif kind == 2:  # a few distinct values only
        x = rng.integers(-2, 3, (B, V)).astype(np.float64)
    elif kind == 3:  # signed zeros among the values
        x[:, ::3] = -0.0
    return x.astype(np.float32)


EXACT_EXP = K.available()["exact_exp"]


def assert_logp_equal(got, want):
    """Bit for bit when the kernel's exp is numpy's (libm's, or numpy's SVML on AVX-512 machines: the usual
    case); otherwise (a numpy build with yet another exp) the last bits may differ."""
    if EXACT_EXP:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)


def test_kernel_is_loaded_and_its_exp_matches_numpy():
    info = K.available()
    assert info["cpu"] and not info["disabled"]
    assert info["exp_impl"] in ("libm", "numpy-svml")
    if not info["exact_exp"]:
        pytest.skip("numpy's exp on this machine is neither libm's nor SVML's: logprobs agree to ~1 ulp only")


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_cpu_kernel_equals_the_reference_exactly(dtype):
    rng = np.random.default_rng({np.float32: 1, np.float16: 2, np.float64: 3}[dtype])
    for _ in range(120):
        B = int(rng.integers(1, 6))
        V = int(rng.choice([1, 2, 3, 17, 256, 1000, 4099]))
        cond = random_logits(rng, B, V).astype(dtype)
        uncond = random_logits(rng, B, V).astype(dtype) if rng.random() < 0.5 else None
        params = random_params(rng, B, V)
        step = int(rng.integers(0, 2**63 - 1))
        want_t, want_l = S.sample(cond, uncond, params, step, return_logprobs=True)
        got_t, got_l = K.sample_numpy(cond, uncond, params, step, return_logprobs=True)
        assert got_t.dtype == np.int64 and got_l.dtype == np.float64
        np.testing.assert_array_equal(got_t, want_t)
        assert_logp_equal(got_l, want_l)  # bit for bit (float64 order and exp as the reference)


def test_bfloat16_and_float16_tensors_are_upcast_like_the_reference():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    op = K.register_torch_op()
    for dt in (torch.bfloat16, torch.float16):
        for _ in range(20):
            B, V = 3, int(rng.choice([5, 300, 2048]))
            c = torch.from_numpy(random_logits(rng, B, V)).to(dt)
            u = torch.from_numpy(random_logits(rng, B, V)).to(dt)
            params = random_params(rng, B, V)
            want_t, want_l = S.sample(c.float().numpy(), u.float().numpy(), params, 5, return_logprobs=True)
            t, l = op(c, u, torch.from_numpy(params.cfg_scale), torch.from_numpy(params.temperature),
                      torch.from_numpy(params.top_k), torch.from_numpy(params.top_p),
                      torch.from_numpy(params.seed.view(np.int64)), torch.from_numpy(params.stream.view(np.int64)),
                      torch.tensor(5))
            np.testing.assert_array_equal(t.numpy(), want_t)
            assert_logp_equal(l.numpy(), want_l)


def test_greedy_is_argmax_with_lowest_index_ties():
    l = np.array([[1, 5, 5, 0], [7, 7, 7, 7], [-1, -3, -1, -2], [0.0, -0.0, 0.0, -1]], np.float32)
    p = resolve_params(SamplingParams(temperature=0.0, seed=0), 4)
    t, lp = K.sample_numpy(l, None, p, 0, return_logprobs=True)
    assert t.tolist() == [1, 0, 0, 0] and lp.tolist() == [0.0] * 4
    # top_k = 1 at any temperature is the greedy token too (ties to the lower index)
    p1 = resolve_params(SamplingParams(temperature=3.0, top_k=1, seed=9), 4)
    assert K.sample_numpy(l, None, p1, 3).tolist() == [1, 0, 0, 0]


@pytest.mark.parametrize("V", [1, 2, 1000, 65536])
def test_one_hot_and_peaked_rows_return_the_peak(V):
    rng = np.random.default_rng(V)
    B = 16
    peaks = rng.integers(0, V, B)
    l = np.full((B, V), -1e4, np.float32)
    l[np.arange(B), peaks] = 0.0
    for kw in [{}, {"top_k": min(V, 50)}, {"top_p": 0.5}, {"temperature": 0.3, "top_k": V}, {"temperature": 0.0}]:
        p = resolve_params(SamplingParams(seed=int(rng.integers(1 << 62)), **kw), B)
        np.testing.assert_array_equal(K.sample_numpy(l, None, p, 1), peaks)


def test_never_outside_the_allowed_set():
    rng = np.random.default_rng(5)
    V, B = 64, 4096
    l = np.tile(rng.standard_normal(V).astype(np.float32) * 2, (B, 1))
    order = sorted(range(V), key=lambda i: (-l[0, i], i))
    for k, p in [(5, 1.0), (0, 0.3), (10, 0.5), (V, 0.9)]:
        params = resolve_params(SamplingParams(top_k=k, top_p=p, seed=1), B)
        want = set(S.filtered_distribution(l[0], 1.0, k, p)[1].tolist())
        if k:
            assert want <= set(order[:k])
        got = K.sample_numpy(l, None, params, 0)
        assert set(got.tolist()) <= want


def test_reproducible_and_independent_of_batch_composition():
    rng = np.random.default_rng(6)
    V = 500
    l = random_logits(rng, 8, V)
    u = random_logits(rng, 8, V)
    params = random_params(rng, 8, V)
    full = K.sample_numpy(l, u, params, 11)
    np.testing.assert_array_equal(full, K.sample_numpy(l, u, params, 11))  # same run twice
    for rows in ([3], [7, 0], [5, 1, 2], list(range(8))[::-1]):
        sub = RowParams(**{f: getattr(params, f)[rows] for f in RowParams.__dataclass_fields__})
        np.testing.assert_array_equal(K.sample_numpy(l[rows], u[rows], sub, 11), full[rows])
    # threads over rows do not change anything
    np.testing.assert_array_equal(K.sample_numpy(l, u, params, 11, num_threads=3), full)


def test_rows_without_guidance_ignore_the_null_rows():
    rng = np.random.default_rng(7)
    c, u = random_logits(rng, 4, 100), random_logits(rng, 4, 100)
    p = resolve_params(SamplingParams(cfg_scale=1.0, seed=3), 4)
    np.testing.assert_array_equal(K.sample_numpy(c, u, p, 2), K.sample_numpy(c, None, p, 2))


def test_inputs_are_not_mutated_and_strided_inputs_work():
    rng = np.random.default_rng(8)
    both = random_logits(rng, 8, 300)
    keep = both.copy()
    p = random_params(rng, 4, 300)
    got = K.sample_numpy(both[:4], both[4:], p, 1)
    np.testing.assert_array_equal(both, keep)
    np.testing.assert_array_equal(got, S.sample(both[:4], both[4:], p, 1))
    wide = random_logits(rng, 4, 600)[:, ::2]  # non-unit stride along V: copied
    np.testing.assert_array_equal(K.sample_numpy(wide, None, p, 1), S.sample(wide, None, p, 1))
    one = np.broadcast_to(random_logits(rng, 1, 300), (4, 300))  # one row shared by all (stride 0)
    np.testing.assert_array_equal(K.sample_numpy(one, None, p, 1), S.sample(one, None, p, 1))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("top_k", 301, r"top_k\[1\] = 301: must be in \[0, vocab = 300\]"),
        ("top_k", -1, r"top_k\[1\] = -1"),
        ("top_p", 0.0, r"top_p\[1\] = 0: must be in \(0, 1\]"),
        ("top_p", 1.5, r"top_p\[1\]"),
        ("top_p", np.nan, r"top_p\[1\]"),
        ("temperature", -1.0, r"temperature\[1\] = -1: must be a finite number: 0 \(greedy\)"),
        ("temperature", np.inf, r"temperature\[1\]"),
        ("cfg_scale", np.nan, r"cfg_scale\[1\]"),
    ],
)
def test_bad_parameters_are_named(field, value, message):
    p = resolve_params(SamplingParams(seed=0), 2)
    arr = getattr(p, field).copy()
    arr[1] = value
    bad = RowParams(**{**{f: getattr(p, f) for f in RowParams.__dataclass_fields__}, field: arr})
    with pytest.raises(ValueError, match=message):
        K.sample_numpy(np.zeros((2, 300), np.float32), None, bad, 0)


def test_bad_logits_and_shapes_are_named():
    p = resolve_params(SamplingParams(seed=0), 2)
    x = np.zeros((2, 10), np.float32)
    with pytest.raises(ValueError, match=r"cond_logits must have shape \(2, V\)"):
        K.sample_numpy(x[:1], None, p, 0)
    with pytest.raises(ValueError, match="floating point"):
        K.sample_numpy(x.astype(np.int32), None, p, 0)
    with pytest.raises(ValueError, match="uncond_logits shape"):
        K.sample_numpy(x, np.zeros((2, 11), np.float32), p, 0)
    with pytest.raises(ValueError, match="step must be >= 0"):
        K.sample_numpy(x, None, p, -1)
    y = x.copy()
    y[1, 7] = np.nan
    with pytest.raises(ValueError, match=r"cond_logits contain NaN/Inf \(first at row 1, token 7\)"):
        K.sample_numpy(y, None, p, 0)
    with pytest.raises(ValueError, match=r"uncond_logits contain NaN/Inf \(first at row 1, token 7\)"):
        K.sample_numpy(x, y, p, 0)
    with pytest.raises(ValueError, match=r"params.top_k must have shape \(2,\)"):
        K.sample_numpy(x, None, RowParams(**{**p.__dict__, "top_k": p.top_k[:1]}), 0)


def test_fallback_flag_and_environment_variable(monkeypatch):
    rng = np.random.default_rng(9)
    l, p = random_logits(rng, 3, 50), random_params(rng, 3, 50)
    calls = []
    real = S.sample
    monkeypatch.setattr(S, "sample", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with K.force_fallback():
        assert K.disabled() and K.available()["disabled"]
        K.sample_numpy(l, None, p, 0)
    assert calls == [1] and not K.disabled()
    monkeypatch.setenv(K.ENV_DISABLE, "1")
    assert K.disabled()
    np.testing.assert_array_equal(K.sample_numpy(l, None, p, 0), real(l, None, p, 0))
    assert calls == [1, 1]
    K.set_disabled(False)
    try:
        assert not K.disabled()
    finally:
        K.set_disabled(None)
    assert K.disabled()  # back to the environment variable


def test_torch_op_on_cpu_matches_the_reference_and_compiles():
    torch = pytest.importorskip("torch")
    from larp_rt import sampling_torch as ST

    rng = np.random.default_rng(10)
    B, V = 4, 777
    c, u = random_logits(rng, B, V), random_logits(rng, B, V)
    params = random_params(rng, B, V)
    dp = ST.DeviceRowParams(params, "cpu")
    want = S.sample(c, u, params, 3, return_logprobs=True)
    got = K.sample_torch(torch.from_numpy(c), torch.from_numpy(u), dp, 3, return_logprobs=True)
    np.testing.assert_array_equal(got[0].numpy(), want[0])
    assert_logp_equal(got[1].numpy(), want[1])
    # one [2B, V] tensor: views, no copies
    both = torch.from_numpy(np.concatenate([c, u]))
    np.testing.assert_array_equal(K.sample_torch(both[:B], both[B:], dp, 3).numpy(), want[0])
    # the registered fake lets torch.compile trace it as one opaque op
    op = K.register_torch_op()
    assert op is torch.ops.larp_rt.sample

    def step_fn(logits, step):
        return op(logits[:B], logits[B:], dp.cfg_scale, dp.temperature, dp.top_k, dp.top_p, dp.seed, dp.stream, step)

    compiled = torch.compile(step_fn, backend="aot_eager", fullgraph=True)
    t, lp = compiled(both, torch.tensor(3))
    np.testing.assert_array_equal(t.numpy(), want[0])
    torch.library.opcheck(op, (both[:B], both[B:], dp.cfg_scale, dp.temperature, dp.top_k, dp.top_p.float(),
                               dp.seed, dp.stream, torch.tensor(3)), test_utils=("test_schema", "test_faketensor"))
    # the switch falls back to the torch reference
    with K.force_fallback():
        np.testing.assert_array_equal(K.sample_torch(torch.from_numpy(c), torch.from_numpy(u), dp, 3).numpy(), want[0])


def test_torch_op_errors_name_the_argument():
    torch = pytest.importorskip("torch")
    op = K.register_torch_op()
    x = torch.zeros(2, 10)
    ok = dict(cfg_scale=torch.ones(2), temperature=torch.ones(2), top_k=torch.zeros(2, dtype=torch.int64),
              top_p=torch.ones(2), seed=torch.zeros(2, dtype=torch.int64), stream=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"top_k must have shape \(2,\)"):
        op(x, None, **{**ok, "top_k": torch.zeros(3, dtype=torch.int64)}, step=torch.tensor(0))
    with pytest.raises(ValueError, match=r"top_k\[0\] = 11"):
        op(x, None, **{**ok, "top_k": torch.full((2,), 11)}, step=torch.tensor(0))
    with pytest.raises(ValueError, match=r"step must have one element \(every row\) or shape \(2,\) \(one per row\)"):
        op(x, None, **ok, step=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"steps\[1\] = -2: must be >= 0"):  # the kernel's own check (per row)
        op(x, None, **ok, step=torch.tensor([0, -2]))


def per_row_steps(rng, B):
    """Steps of rows at different points of their videos: 0, small, huge (< 2**63), repeats."""
    return rng.choice([0, 1, 2, 7, 1000, 2**40 + 3, 2**63 - 1], B).astype(np.int64)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_per_row_steps_equal_the_reference_and_rows_alone(dtype):
    """step (B,): row r draws at steps[r] (continuous batching): == the reference with the same array, and == each
    row sampled alone with its step as an int (tokens exactly, logprobs as above); threads change nothing."""
    rng = np.random.default_rng(11 + (dtype == np.float16))
    for _ in range(40):
        B = int(rng.integers(1, 7))
        V = int(rng.choice([1, 17, 1000, 4099]))
        cond = random_logits(rng, B, V).astype(dtype)
        uncond = random_logits(rng, B, V).astype(dtype) if rng.random() < 0.5 else None
        params = random_params(rng, B, V)
        steps = per_row_steps(rng, B)
        want_t, want_l = S.sample(cond, uncond, params, steps, return_logprobs=True)
        got_t, got_l = K.sample_numpy(cond, uncond, params, steps, return_logprobs=True)
        np.testing.assert_array_equal(got_t, want_t)
        assert_logp_equal(got_l, want_l)
        np.testing.assert_array_equal(K.sample_numpy(cond, uncond, params, list(steps), num_threads=3), got_t)
        for r in range(B):
            sub = RowParams(**{f: getattr(params, f)[r:r + 1] for f in RowParams.__dataclass_fields__})
            one_t, one_l = K.sample_numpy(cond[r:r + 1], None if uncond is None else uncond[r:r + 1], sub,
                                          int(steps[r]), return_logprobs=True)
            assert one_t[0] == got_t[r] and one_l[0] == got_l[r]
    # one step for every row: an int and a (B,) array of it are the same draw
    c, p = random_logits(rng, 5, 300), random_params(rng, 5, 300)
    np.testing.assert_array_equal(K.sample_numpy(c, None, p, np.full(5, 9, np.uint64)), K.sample_numpy(c, None, p, 9))


def test_per_row_step_errors_are_named():
    p = resolve_params(SamplingParams(seed=0), 3)
    x = np.zeros((3, 10), np.float32)
    with pytest.raises(ValueError, match=r"step\[1\] = -3: must be >= 0"):
        K.sample_numpy(x, None, p, np.array([0, -3, 1]))
    with pytest.raises(ValueError, match=r"step must be an int or have shape \(3,\) \(one step per row\), got shape"):
        K.sample_numpy(x, None, p, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"step must be an int or a \(3,\) integer array"):
        K.sample_numpy(x, None, p, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"step\[2\] = 9223372036854775808: must be < 2\*\*63"):
        K.sample_numpy(x, None, p, np.array([0, 1, 2**63], np.uint64))
    with pytest.raises(ValueError, match=r"step must be < 2\*\*63"):
        K.sample_numpy(x, None, p, 2**63)
    with K.force_fallback(), pytest.raises(ValueError, match=r"step\[1\] = -3: must be >= 0"):
        K.sample_numpy(x, None, p, np.array([0, -3, 1]))  # the reference says the same


def test_torch_op_with_per_row_steps_on_cpu():
    torch = pytest.importorskip("torch")
    from larp_rt import sampling_torch as ST

    rng = np.random.default_rng(12)
    B, V = 5, 640
    c, u = random_logits(rng, B, V), random_logits(rng, B, V)
    params = random_params(rng, B, V)
    dp = ST.DeviceRowParams(params, "cpu")
    steps = per_row_steps(rng, B)
    want = S.sample(c, u, params, steps, return_logprobs=True)
    ct, ut = torch.from_numpy(c), torch.from_numpy(u)
    for step in (torch.from_numpy(steps), steps):  # a tensor, or integers
        got = K.sample_torch(ct, ut, dp, step, return_logprobs=True)
        np.testing.assert_array_equal(got[0].numpy(), want[0])
        assert_logp_equal(got[1].numpy(), want[1])
    for r in range(B):  # == each row alone with its step as a 1-element tensor
        sub = ST.DeviceRowParams(RowParams(**{f: getattr(params, f)[r:r + 1] for f in RowParams.__dataclass_fields__}),
                                 "cpu")
        assert K.sample_torch(ct[r:r + 1], ut[r:r + 1], sub, torch.tensor([int(steps[r])])).item() == want[0][r]
    with K.force_fallback():  # the torch reference draws the same
        np.testing.assert_array_equal(K.sample_torch(ct, ut, dp, torch.from_numpy(steps)).numpy(), want[0])
    op = K.register_torch_op()
    args = (ct, ut, dp.cfg_scale, dp.temperature, dp.top_k, dp.top_p.float(), dp.seed, dp.stream,
            torch.from_numpy(steps))
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda *a: op(*a), backend="aot_eager", fullgraph=True)
    np.testing.assert_array_equal(compiled(*args)[0].numpy(), want[0])


@pytest.mark.skipif(K.cuda_library() is None, reason="built without a CUDA toolkit")
def test_cuda_launcher_checks_its_arguments_on_the_host():
    lib = K.cuda_library()
    ok = dict(cond=0, uncond=None, dtype="float32", batch=2, vocab=10, cfg_scale=1, temperature=1, top_k=1, top_p=1,
              seed=1, stream_ids=1, tokens=1)
    with pytest.raises(ValueError, match="dtype must be one of"):
        K.launch_cuda(**{**ok, "dtype": "int8"})
    with pytest.raises(ValueError, match=r"cond \(logits\) is NULL"):
        K.launch_cuda(**ok)
    with pytest.raises(ValueError, match="vocab must be in"):
        K.launch_cuda(**{**ok, "vocab": 0})
    with pytest.raises(ValueError, match="tokens is NULL"):
        K.launch_cuda(**{**ok, "cond": 1, "tokens": 0})
    with pytest.raises(ValueError, match="step must be >= 0"):
        K.launch_cuda(**{**ok, "cond": 1, "step": -1})
    if lib.larp_cuda_device_count() == 0:  # no device: the launch itself fails, cleanly
        with pytest.raises(RuntimeError, match="CUDA launch failed"):
            K.launch_cuda(**{**ok, "cond": 1})
        with pytest.raises(RuntimeError, match="CUDA launch failed"):  # per-row steps: the shared one is unused
            K.launch_cuda(**{**ok, "cond": 1, "step": -1, "steps_ptr": 1})


@pytest.mark.parametrize("V", [64, 1000, 65536])
def test_both_top_k_paths_on_adversarial_orders(V):
    """Small k (filter + cut-back buffer) and large k (radix select) on sorted, reversed, constant, few-valued,
    signed-zero and random rows, at the boundaries between the paths."""
    rng = np.random.default_rng(V)
    rows = [np.arange(V), -np.arange(V), np.zeros(V), rng.integers(-3, 3, V), rng.standard_normal(V) * 5,
            np.round(rng.standard_normal(V) * 2), np.where(rng.random(V) < 0.5, -0.0, 0.0)]
    for row in rows:
        L = np.tile(np.asarray(row, np.float32), (3, 1))
        for k in sorted({1, 2, max(V // 64, 1), max(V // 16, 1), V // 16 + 1, V // 8, V - 1}):
            for p in (1.0, 0.7):
                params = RowParams(
                    cfg_scale=np.ones(3, np.float32), temperature=np.array([1.0, 0.5, 3.0], np.float32),
                    top_k=np.full(3, k, np.int64), top_p=np.full(3, p, np.float32),
                    seed=np.arange(3, dtype=np.uint64), stream=np.arange(3, dtype=np.uint64))
                want = S.sample(L, None, params, 1, return_logprobs=True)
                got = K.sample_numpy(L, None, params, 1, return_logprobs=True)
                np.testing.assert_array_equal(got[0], want[0])
                assert_logp_equal(got[1], want[1])
