"""The CUDA sampling kernel through the torch op and the raw-pointer launcher (needs a CUDA GPU)."""

import numpy as np
import pytest

from larp_rt import kernels as K
from larp_rt import sampling as S
from larp_rt.sampling import RowParams, SamplingParams, resolve_params

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module", autouse=True)
def need_cuda_kernels():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if K.cuda_library() is None:
        pytest.fail(f"a GPU is visible but the CUDA kernels are not built: {K.available()['errors']}")


def device_params(p: RowParams):
    from larp_rt.sampling_torch import DeviceRowParams

    return DeviceRowParams(p, "cuda")


def random_case(rng, B, V):
    c = (rng.standard_normal((B, V)) * rng.choice([0.1, 1.0, 5.0])).astype(np.float32)
    if rng.random() < 0.3:
        c = np.round(c)
    u = (rng.standard_normal((B, V))).astype(np.float32) if rng.random() < 0.5 else None
    p = RowParams(
        cfg_scale=rng.choice([1.0, 1.5, 3.0], B).astype(np.float32),
        temperature=rng.choice([0.0, 0.5, 1.0, 2.0], B).astype(np.float32),
        top_k=(rng.integers(0, V + 1, B) * (rng.random(B) < 0.7)).astype(np.int64),
        top_p=rng.choice([1.0, 0.9, 0.5, 0.1], B).astype(np.float32),
        seed=rng.integers(0, 2**63, B).astype(np.uint64), stream=np.arange(B, dtype=np.uint64),
    )
    return c, u, p


def test_cuda_kernel_matches_the_reference():
    rng = np.random.default_rng(0)
    for _ in range(60):
        B, V = int(rng.integers(1, 9)), int(rng.choice([1, 7, 1000, 8192, 65536]))
        c, u, p = random_case(rng, B, V)
        want_t, want_l = S.sample(c, u, p, 17, return_logprobs=True)
        got_t, got_l = K.sample_torch(torch.from_numpy(c).cuda(), None if u is None else torch.from_numpy(u).cuda(),
                                      device_params(p), 17, return_logprobs=True)
        np.testing.assert_array_equal(got_t.cpu().numpy(), want_t)
        np.testing.assert_allclose(got_l.cpu().numpy(), want_l, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_kernel_half_precision_inputs(dtype):
    rng = np.random.default_rng(1)
    dt = getattr(torch, dtype)
    c = torch.randn(4, 5000, generator=torch.Generator().manual_seed(0)).to(dt)
    _, _, p = random_case(rng, 4, 5000)
    want = S.sample(c.float().numpy(), None, p, 3)
    got = K.sample_torch(c.cuda(), None, device_params(p), 3)
    np.testing.assert_array_equal(got.cpu().numpy(), want)


def test_cuda_graph_capture_with_the_step_on_the_device():
    rng = np.random.default_rng(2)
    B, V = 8, 16384
    c, u, p = random_case(rng, B, V)
    dp = device_params(p)
    logits = torch.from_numpy(np.concatenate([c, u if u is not None else c])).cuda()
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    op = K.register_torch_op()
    args = (logits[:B], logits[B:], dp.cfg_scale, dp.temperature, dp.top_k, dp.top_p, dp.seed, dp.stream, step)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        op(*args)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens, logp = op(*args)
    for st in (0, 1, 5, 123456789):
        step.fill_(st)
        graph.replay()
        want = S.sample(c, u if u is not None else c, p, st)
        np.testing.assert_array_equal(tokens.cpu().numpy(), want)


def test_cuda_per_row_steps_on_the_device_and_in_a_graph():
    """steps (B,) on the device: row r draws at steps[r] (== the reference), also replayed in a CUDA graph."""
    rng = np.random.default_rng(5)
    B, V = 6, 8192
    c, _, p = random_case(rng, B, V)
    dp = device_params(p)
    cc = torch.from_numpy(c).cuda()
    steps = np.array([0, 1, 1, 77, 2**40, 2**63 - 1], np.int64)
    got = K.sample_torch(cc, None, dp, torch.from_numpy(steps).cuda())
    np.testing.assert_array_equal(got.cpu().numpy(), S.sample(c, None, p, steps))
    with pytest.raises(ValueError, match="per-row step is on cpu"):
        K.sample_torch(cc, None, dp, torch.from_numpy(steps))
    op = K.register_torch_op()
    dsteps = torch.zeros(B, dtype=torch.int64, device="cuda")
    args = (cc, None, dp.cfg_scale, dp.temperature, dp.top_k, dp.top_p, dp.seed, dp.stream, dsteps)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        op(*args)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens, _ = op(*args)
    for shift in (0, 3, 1000):
        dsteps.copy_(torch.from_numpy(steps // 2 + shift))
        graph.replay()
        np.testing.assert_array_equal(tokens.cpu().numpy(), S.sample(c, None, p, steps // 2 + shift))


def test_cuda_deterministic_and_independent_of_batch_composition():
    rng = np.random.default_rng(3)
    c, u, p = random_case(rng, 16, 30000)
    cc = torch.from_numpy(c).cuda()
    full = K.sample_torch(cc, None, device_params(p), 9)
    for _ in range(3):
        assert torch.equal(K.sample_torch(cc, None, device_params(p), 9), full)
    rows = [5, 0, 11]
    sub = RowParams(**{f: getattr(p, f)[rows] for f in RowParams.__dataclass_fields__})
    np.testing.assert_array_equal(K.sample_torch(cc[rows], None, device_params(sub), 9).cpu().numpy(),
                                  full.cpu().numpy()[rows])


def test_cuda_frequencies_match_the_exact_distribution():
    from scipy.stats import chi2

    N, V = 1_000_000, 12
    logits = torch.tensor([2.0, 0.5, 2.0, 1.0, -1.0, 1.5, 0.5, 0.0, 1.0, -0.5, 2.5, 0.25]).cuda()
    for T, k, pp in [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 6, 0.7)]:
        p = RowParams(cfg_scale=np.ones(N, np.float32), temperature=np.full(N, T, np.float32),
                      top_k=np.full(N, k, np.int64), top_p=np.full(N, pp, np.float32),
                      seed=np.full(N, 11, np.uint64), stream=np.arange(N, dtype=np.uint64))
        tokens = K.sample_torch(logits.expand(N, V), None, device_params(p), 0)
        counts = np.bincount(tokens.cpu().numpy(), minlength=V)
        z, kept, w, _ = S.filtered_distribution(logits.cpu().numpy(), T, k, pp)
        probs = np.zeros(V)
        probs[kept] = w[kept] / w[kept].sum()
        assert counts[probs == 0].sum() == 0
        m = probs > 0
        stat = ((counts[m] - N * probs[m]) ** 2 / (N * probs[m])).sum()
        assert chi2.sf(stat, df=max(int(m.sum()) - 1, 1)) > 1e-6


def test_raw_pointer_launcher_for_tensorrt():
    rng = np.random.default_rng(4)
    B, V = 4, 4096
    c, _, p = random_case(rng, B, V)
    dp = device_params(p)
    cc = torch.from_numpy(c).cuda()
    tokens = torch.empty(B, dtype=torch.int64, device="cuda")
    logp = torch.empty(B, dtype=torch.float64, device="cuda")
    top_p = dp.top_p.float()
    step = torch.tensor(6, dtype=torch.int64, device="cuda")
    K.launch_cuda(cond=cc.data_ptr(), uncond=None, dtype="float32", batch=B, vocab=V, cfg_scale=dp.cfg_scale.data_ptr(),
                  temperature=dp.temperature.data_ptr(), top_k=dp.top_k.data_ptr(), top_p=top_p.data_ptr(),
                  seed=dp.seed.data_ptr(), stream_ids=dp.stream.data_ptr(), tokens=tokens.data_ptr(),
                  logprobs=logp.data_ptr(), step_ptr=step.data_ptr(),
                  cuda_stream=torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    np.testing.assert_array_equal(tokens.cpu().numpy(), S.sample(c, None, p, 6))


def test_cuda_non_finite_rows_are_marked():
    x = torch.zeros(2, 100, device="cuda")
    x[1, 3] = float("nan")
    p = resolve_params(SamplingParams(seed=0), 2)
    t, lp = K.sample_torch(x, None, device_params(p), 0, return_logprobs=True)
    assert t[1].item() == -1 and torch.isnan(lp[1]).item() and t[0].item() >= 0
