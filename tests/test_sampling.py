import numpy as np
import pytest
import torch
from _stats import chi2_pvalue
from scipy.stats import chi2

from larp_rt import sampling as S
from larp_rt import sampling_torch as ST
from larp_rt.sampling import SamplingParams, resolve_params

KAT = [  # Random123 known-answer vectors for philox4x32_10
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr, key, want", KAT)
def test_philox_known_answers_numpy_and_torch(ctr, key, want):
    got = S.philox4x32([np.uint64(c) for c in ctr], [np.uint64(k) for k in key])
    assert tuple(int(x) for x in got) == want
    got_t = ST.philox4x32(tuple(torch.tensor([c]) for c in ctr), tuple(torch.tensor([k]) for k in key))
    assert tuple(int(x) for x in got_t) == want


def test_uniforms_agree_and_are_uniform():
    seeds = np.array([0, 1, 2**63 + 5, 2**64 - 1] * 5000, np.uint64)
    streams = np.arange(len(seeds), dtype=np.uint64)
    u = S.uniform(seeds, streams, 7)
    ut = ST.uniform(torch.as_tensor(seeds.view(np.int64)), torch.as_tensor(streams.view(np.int64)), 7).numpy()
    assert np.array_equal(u, ut)
    assert 0 <= u.min() and u.max() < 1
    counts = np.histogram(u, bins=20, range=(0, 1))[0]
    assert chi2.sf(((counts - len(u) / 20) ** 2 / (len(u) / 20)).sum(), df=19) > 1e-4


def test_uniform_tables_equal_per_step_draws():
    p = resolve_params([SamplingParams(seed=3), SamplingParams(seed=2**64 - 1)], 2)
    table = S.uniform_table(p, 40)
    assert all(np.array_equal(table[:, k], S.uniform(p.seed, p.stream, k)) for k in range(40))
    assert np.array_equal(ST.DeviceRowParams(p, "cpu").uniform_table(40).numpy(), table)
    logits = np.random.default_rng(0).normal(size=(2, 30)).astype(np.float32)
    assert np.array_equal(S.sample(logits, None, p, 7), S.sample(logits, None, p, 7, u=table[:, 7]))


def test_per_row_steps_numpy_and_torch():
    """step (B,): row r draws uniform(seed[r], stream[r], step[r]) (continuous batching: every row at its own
    step). == each row alone with its step as an int; numpy == torch; a device-style (1,) tensor still shares."""
    rng = np.random.default_rng(5)
    B, V = 6, 200
    ks, ps = [0, 5, 0, 50, 1, 0], [1.0, 1.0, 0.5, 0.9, 1.0, 0.2]
    rp = resolve_params([SamplingParams(seed=int(s), temperature=1.0, top_k=k, top_p=p)
                         for s, k, p in zip(rng.integers(0, 2**62, B), ks, ps, strict=True)], B, V)
    dp = ST.DeviceRowParams(rp, "cpu")
    steps = np.array([0, 3, 3, 1000, 2**40, 2**63 - 1], np.int64)
    c = rng.normal(size=(B, V)).astype(np.float32) * 3
    t, lp = S.sample(c, None, rp, steps, return_logprobs=True)
    for r in range(B):
        sub = S.RowParams(**{f: getattr(rp, f)[r:r + 1] for f in S.RowParams.__dataclass_fields__})
        one_t, one_lp = S.sample(c[r:r + 1], None, sub, int(steps[r]), return_logprobs=True)
        assert one_t[0] == t[r] and one_lp[0] == lp[r]
    assert np.array_equal(S.uniform(rp.seed, rp.stream, steps),
                          [S.uniform(rp.seed[r], rp.stream[r], int(steps[r])) for r in range(B)])
    assert np.array_equal(S.sample(c, None, rp, list(steps)), t)  # any integer sequence
    assert np.array_equal(S.sample(c, None, rp, steps.astype(np.uint64)), t)
    ct = torch.from_numpy(c)
    for step in (torch.from_numpy(steps), steps):
        t_t, lp_t = ST.sample(ct, None, dp, step, return_logprobs=True)
        assert np.array_equal(t_t.numpy(), t)
        np.testing.assert_allclose(lp_t.numpy(), lp, rtol=0, atol=1e-9)
    # one step for every row, as an int, a () or a (1,) tensor (the fast path's device step), or a (B,) array of it
    want = S.sample(c, None, rp, 7)
    assert np.array_equal(S.sample(c, None, rp, np.full(B, 7)), want)
    for step in (7, torch.tensor(7), torch.tensor([7]), torch.full((B,), 7)):
        assert np.array_equal(ST.sample(ct, None, dp, step).numpy(), want)
    # tables from per-row first steps
    table = S.uniform_table(rp, 5, start=steps[:5].tolist() + [9])
    assert all(np.array_equal(table[:, j], S.uniform(rp.seed, rp.stream, np.array(steps[:5].tolist() + [9]) + j))
               for j in range(5))
    assert np.array_equal(dp.uniform_table(5, start=torch.tensor(steps[:5].tolist() + [9])).numpy(), table)
    assert np.array_equal(S.uniform_table(rp, 4, start=2), S.uniform_table(rp, 6)[:, 2:])


def test_per_row_step_errors_are_named():
    p = rows(3)
    dp = ST.DeviceRowParams(p, "cpu")
    x = np.zeros((3, 10), np.float32)
    with pytest.raises(ValueError, match=r"step\[2\] = -1: must be >= 0"):
        S.sample(x, None, p, np.array([0, 1, -1]))
    with pytest.raises(ValueError, match=r"step must be an int or have shape \(3,\) \(one step per row\)"):
        S.sample(x, None, p, np.array([[0, 1, 2]]))
    with pytest.raises(ValueError, match=r"step must be an int or a \(3,\) integer array"):
        S.sample(x, None, p, 1.5)
    with pytest.raises(ValueError, match=r"step must be >= 0"):
        S.sample(x, None, p, -1)
    with pytest.raises(ValueError, match=r"start must be"):
        S.uniform_table(p, 4, start=[1, 2])
    xt = torch.from_numpy(x)
    with pytest.raises(ValueError, match=r"step\[1\] = -4: must be >= 0"):
        ST.sample(xt, None, dp, torch.tensor([0, -4, 1]))
    with pytest.raises(ValueError, match=r"step must have shape \(\) or \(1,\) \(one step for every row\) or \(3,\)"):
        ST.sample(xt, None, dp, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"step must be an integer tensor"):
        ST.sample(xt, None, dp, torch.zeros(3))
    with pytest.raises(ValueError, match=r"step must be >= 0"):
        ST.sample(xt, None, dp, -2)


def rows(n, **kw) -> S.RowParams:
    return resolve_params(SamplingParams(**{"seed": 0, **kw}), n)


def exact_distribution(logits, temperature, top_k, top_p):
    """Written independently: softmax(l/T), top-k by rank, top-p smallest prefix, renormalised."""
    l = np.asarray(logits, np.float64)
    p = np.exp(l / temperature - (l / temperature).max())
    p /= p.sum()
    order = sorted(range(len(l)), key=lambda i: (-l[i], i))
    if top_k:
        order = order[:top_k]
    if top_p < 1.0:
        q = p[order] / p[order].sum()
        n = next(j for j in range(len(q)) if q[: j + 1].sum() >= top_p - 1e-12) + 1
        order = order[:n]
    out = np.zeros_like(p)
    out[order] = p[order]
    return out / out.sum()


LOGITS = np.array([2.0, 1.7, 1.5, 1.5, 1.2, 0.9, 0.5, 0.2, 0.0, -0.3, -0.8, -1.5], np.float32)


def draw_torch(logits, n, step0=0, **kw):
    p = ST.DeviceRowParams(rows(n, **kw), "cpu")
    x = torch.as_tensor(np.tile(logits, (n, 1)))
    return np.concatenate([ST.sample(x, None, p, s).numpy() for s in range(step0, step0 + 10)])


@pytest.mark.parametrize(
    "T, k, p",
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 4, 1.0), (1.0, 3, 1.0), (1.3, 0, 0.8), (1.0, 6, 0.7), (1.0, 12, 0.5)],
)
def test_frequencies_match_the_exact_filtered_distribution(T, k, p):
    counts = np.bincount(draw_torch(LOGITS, 100_000, temperature=T, top_k=k, top_p=p), minlength=len(LOGITS))
    assert counts.sum() == 1_000_000
    assert chi2_pvalue(counts, exact_distribution(LOGITS, T, k, p)) > 1e-5
    # the test has power: an off-by-one k, a 10% wrong temperature or a wrong p are rejected
    if k and p == 1.0:  # (where top-p binds first, k +- 1 changes nothing)
        assert chi2_pvalue(counts, exact_distribution(LOGITS, T, k + 1, p)) < 1e-12
        assert chi2_pvalue(counts, exact_distribution(LOGITS, T, k - 1, p)) < 1e-12
    assert chi2_pvalue(counts, exact_distribution(LOGITS, T * 1.1, k, p)) < 1e-12
    if p < 1:
        assert chi2_pvalue(counts, exact_distribution(LOGITS, T, k, min(1.0, p + 0.15))) < 1e-12


def test_numpy_and_torch_samplers_agree_exactly():
    rng = np.random.default_rng(0)
    V, B = 300, 16
    params = [
        SamplingParams(cfg_scale=float(rng.choice([1.0, 1.25, 3.0, 0.0])),
                       temperature=float(rng.choice([0, 0.5, 1, 2])), top_k=int(rng.choice([0, 1, 7, V])),
                       top_p=float(rng.choice([1.0, 0.9, 0.3])), seed=int(s))
        for s in rng.integers(0, 2**62, B)
    ]
    rp = resolve_params(params, B, V)
    dp = ST.DeviceRowParams(rp, "cpu")
    for step in range(30):
        c = rng.normal(size=(B, V)).astype(np.float32) * 3
        u = rng.normal(size=(B, V)).astype(np.float32) * 3
        t_np, lp_np = S.sample(c, u, rp, step, return_logprobs=True)
        t_t, lp_t = ST.sample(torch.from_numpy(c), torch.from_numpy(u), dp, step, return_logprobs=True)
        assert np.array_equal(t_np, t_t.numpy())
        np.testing.assert_allclose(lp_np, lp_t.numpy(), rtol=0, atol=1e-9)


def test_greedy_is_argmax_with_lowest_index_ties_and_peaks_win():
    l = np.zeros((3, 50), np.float32)
    l[0, [7, 20]] = 5.0  # tie -> 7
    l[1, 33] = 1.0
    l[2, :] = -1.0  # all equal -> 0
    assert S.sample(l, None, rows(3, temperature=0.0), 0).tolist() == [7, 33, 0]
    greedy_t = ST.sample(torch.from_numpy(l), None, ST.DeviceRowParams(rows(3, temperature=0.0), "cpu"), 0)
    assert greedy_t.tolist() == [7, 33, 0]
    peaked = np.full((64, 50), -30.0, np.float32)
    peaked[:, 11] = 30.0  # one-hot in practice
    for kw in ({}, {"top_k": 1}, {"top_k": 50}, {"top_p": 0.01}, {"temperature": 2.0}):
        assert (S.sample(peaked, None, rows(64, **kw), 3) == 11).all()
    # top_k=1 is greedy (ties to the lower index) at any temperature
    assert S.sample(l, None, rows(3, top_k=1, temperature=5.0), 9).tolist() == [7, 33, 0]


def test_never_outside_the_allowed_set():
    rng = np.random.default_rng(1)
    l = rng.normal(size=(2000, 100)).astype(np.float32)
    toks = S.sample(l, None, rows(2000, top_k=5, temperature=3.0), 0)
    top5 = np.argsort(-l, axis=1, kind="stable")[:, :5]
    assert all(t in s for t, s in zip(toks, top5, strict=True))
    toks = S.sample(l, None, rows(2000, top_p=0.2, temperature=1.0), 0)
    for t, row in zip(toks, l, strict=True):
        p = np.exp(row - row.max())
        p /= p.sum()
        order = np.argsort(-row, kind="stable")
        n = np.searchsorted(np.cumsum(p[order]), 0.2 - 1e-9) + 1
        assert t in order[:n]


def test_cfg_mix_and_rows_without_guidance_ignore_null_rows():
    rng = np.random.default_rng(2)
    c, u = rng.normal(size=(2, 3, 40)).astype(np.float32)
    mixed = S.cfg_mix(c, u, np.array([1.25, 1.0, 0.0], np.float32))
    assert np.array_equal(mixed[0], u[0] + (c[0] - u[0]) * np.float32(1.25))
    assert np.array_equal(mixed[1], c[1]) and np.array_equal(mixed[2], u[2])
    # a request without guidance draws the same tokens with or without the batch's null rows
    p = rows(3, cfg_scale=1.0, temperature=1.0)
    assert np.array_equal(S.sample(c, u, p, 4), S.sample(c, None, p, 4))


def test_reproducible_and_independent_of_batch_composition():
    rng = np.random.default_rng(3)
    l = np.tile(rng.normal(size=(1, 64)).astype(np.float32), (4, 1))
    one = SamplingParams(seed=123, temperature=1.0)
    a = S.sample(l, None, resolve_params(one, 4), 5)
    assert np.array_equal(a, S.sample(l, None, resolve_params(one, 4), 5))  # same seed, same draws
    # rows of one SamplingParams use streams (s, 0..B-1): distinct samples for identical inputs
    draws = np.stack([S.sample(l, None, resolve_params(one, 4), s) for s in range(20)])
    assert len({tuple(col) for col in draws.T}) == 4
    # a list: each request its own (seed, 0), whatever its neighbours
    mine = SamplingParams(seed=99, temperature=1.0, top_k=10)
    alone = S.sample(l[:1], None, resolve_params([mine], 1), 5)
    batch = [SamplingParams(seed=1), mine, SamplingParams(seed=2, top_p=0.5)]
    mixed = S.sample(l[:3], None, resolve_params(batch, 3), 5)
    assert mixed[1] == alone[0]


def test_fresh_seed_is_drawn_and_reported():
    a, b = resolve_params(SamplingParams(seed=None), 2), resolve_params(SamplingParams(seed=None), 2)
    assert a.seed[0] == a.seed[1] and a.seed[0] != b.seed[0]


def test_pure_functions_do_not_mutate_inputs():
    rng = np.random.default_rng(4)
    c, u = rng.normal(size=(2, 4, 30)).astype(np.float32)
    c0, u0 = c.copy(), u.copy()
    S.sample(c, u, rows(4, cfg_scale=2.0, top_k=3, top_p=0.5), 0)
    ct, ut = torch.from_numpy(c), torch.from_numpy(u)
    ST.sample(ct, ut, ST.DeviceRowParams(rows(4, cfg_scale=2.0, top_k=3, top_p=0.5), "cpu"), 0)
    assert np.array_equal(c, c0) and np.array_equal(u, u0)


def test_logprobs_are_those_of_the_filtered_distribution():
    l = np.tile(LOGITS, (50, 1))
    toks, lp = S.sample(l, None, rows(50, temperature=0.8, top_k=5, top_p=0.9), 0, return_logprobs=True)
    exact = exact_distribution(LOGITS, 0.8, 5, 0.9)
    np.testing.assert_allclose(lp, np.log(exact[toks]), atol=1e-9)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"top_k": -1}, r"top_k must be an int >= 0"),
        ({"top_k": 101}, r"top_k must be at most the vocabulary size 100"),
        ({"top_k": 2.5}, r"top_k must be an int"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"temperature": -0.1}, r"temperature must be a finite number: 0 \(greedy\) or in \[0.0001, 10000\]"),
        ({"temperature": float("nan")}, r"temperature"),
        ({"cfg_scale": -1.0}, r"cfg_scale must be a finite number in \[0, 10000\]"),
        ({"seed": -3}, r"seed must be None or an int"),
        ({"seed": 2**64}, r"seed"),
    ],
)
def test_bad_parameters_are_named(kw, message):
    with pytest.raises(ValueError, match=message):
        resolve_params(SamplingParams(**kw), 2, vocab_size=100)
    with pytest.raises(ValueError, match=r"params\[1\]: SamplingParams\." + message.split(" ")[0]):
        resolve_params([SamplingParams(), SamplingParams(**kw)], 2, vocab_size=100)


def test_bad_logits_are_named():
    p = rows(2)
    bad = np.zeros((2, 10), np.float32)
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match=r"cond_logits contain NaN/Inf \(first at row 1, token 3\)"):
        S.sample(bad, None, p, 0)
    with pytest.raises(ValueError, match=r"uncond_logits contain NaN/Inf"):
        S.sample(np.zeros((2, 10), np.float32), np.full((2, 10), np.inf, np.float32), p, 0)
    with pytest.raises(ValueError, match=r"cond_logits must have shape \(2, V\)"):
        S.sample(np.zeros((3, 10), np.float32), None, p, 0)
    with pytest.raises(ValueError, match="NaN/Inf"):
        ST.sample(torch.from_numpy(bad), None, ST.DeviceRowParams(p, "cpu"), 0)
    with pytest.raises(ValueError, match="one per id"):
        resolve_params([SamplingParams()], 3)


def test_params_of_the_wrong_kind_are_a_value_error():
    """Found by tests/test_fuzz_engine.py at 100 examples: a float as params was a TypeError from list()."""
    from larp_rt.sampling import resolve_params

    for bad in (1.5, None, 3, object()):
        with pytest.raises(ValueError, match="params must be a SamplingParams or a list of them"):
            resolve_params(bad, 2)
