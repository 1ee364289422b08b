"""The generation fast path on a CUDA GPU: captured step == eager step, no memory growth, the ar-lp-shaped step
captures and replays, and the tokenizer's fp16 outputs against the CPU fp32 reference (tolerances below)."""

import copy

import numpy as np
import pytest

from larp_rt import GeneratorConfig, SamplingParams, TokenizerConfig, kernels
from larp_rt.sampling import resolve_params

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")

from larp_rt.backends.torch.fast import FastGenerator  # noqa: E402
from larp_rt.models import LARPGenerator, LARPTokenizer  # noqa: E402

SP = SamplingParams
PARAMS = {
    "greedy_cfg": ([0, 5, 7], SP(temperature=0.0, cfg_scale=1.25, seed=0)),
    "sampled_cfg": ([2, 3, 3, 1, 0], SP(seed=11, cfg_scale=1.25)),
    "mixed": ([1, 2, 3, 4, 6], [SP(seed=1), SP(seed=2, top_k=10, cfg_scale=2.0), SP(seed=3, top_p=0.8, temperature=0.7),
                                SP(seed=4, temperature=0.0), SP(seed=5, cfg_scale=1.5, top_k=3, top_p=0.9)]),
}


@pytest.fixture(scope="module", autouse=True)
def need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; none is visible to torch here")


def generator(preset: str = "tiny", dtype=None, seed: int = 0, **overrides) -> LARPGenerator:
    torch.manual_seed(seed)
    with torch.device("cuda"):
        gen = LARPGenerator(GeneratorConfig.from_name(preset, **overrides))
        torch.nn.init.normal_(gen.output.weight, std=0.3 if preset == "tiny" else 0.02)
    return gen.to(dtype or torch.bfloat16).eval()


def rows(case: str, vocab: int):
    ids, params = PARAMS[case]
    return np.array(ids, np.int64), resolve_params(params, len(ids), vocab)


@pytest.mark.parametrize("sampler", ["kernel", "reference"])
@pytest.mark.parametrize("case", list(PARAMS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_captured_step_equals_the_eager_step(case, sampler, dtype):
    if sampler == "kernel" and not kernels.available()["cuda"]:
        pytest.fail(f"a GPU is visible but the CUDA kernels are not built: {kernels.available()['errors']}")
    gen = generator(dtype=getattr(torch, dtype))
    ids, rp = rows(case, gen.config.vocab_size)
    with kernels.force_fallback(sampler == "reference"):
        graphed = FastGenerator(gen, cuda_graphs=True)
        a = graphed.generate(ids, rp)
        assert graphed.captures == 1
        b = graphed.generate(ids, rp)  # all replays (the first one also ran warm-up steps eagerly)
        eager = FastGenerator(gen, cuda_graphs=False)
        c = eager.generate(ids, rp)
        assert eager.captures == 0
        d = np.stack([e.tokens for e in graphed.generate_iter(ids, rp, sync_every=7)], axis=1)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, c)
    np.testing.assert_array_equal(d, c)


def test_kernel_and_reference_samplers_agree_on_the_gpu():
    if not kernels.available()["cuda"]:
        pytest.fail(f"a GPU is visible but the CUDA kernels are not built: {kernels.available()['errors']}")
    gen = generator(dtype=torch.float32)
    ids, rp = rows("mixed", gen.config.vocab_size)
    fg = FastGenerator(gen)
    a = fg.generate(ids, rp)
    with kernels.force_fallback():
        b = fg.generate(ids, rp)
    np.testing.assert_array_equal(a, b)
    assert fg.captures == 2  # one bucket per sampler


def test_no_memory_growth_over_generations():
    gen = generator()
    fg = FastGenerator(gen)
    ids, rp = rows("sampled_cfg", gen.config.vocab_size)
    first = fg.generate(ids, rp)  # warm-up: caches, bucket, capture
    list(fg.generate_iter(ids, rp))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(3):
        np.testing.assert_array_equal(fg.generate(ids, rp), first)
    assert len(list(fg.generate_iter(ids, rp))) == gen.config.max_seq_len
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    assert fg.captures == 1 and len(fg.buckets) == 1


def test_non_finite_logits_raise_once_at_the_end():
    gen = generator()
    with torch.no_grad():
        gen.output.weight[3, :] = float("nan")
    ids, rp = rows("sampled_cfg", gen.config.vocab_size)
    for fallback in (False, True):
        if not fallback and not kernels.available()["cuda"]:
            continue
        with kernels.force_fallback(fallback):
            with pytest.raises(ValueError, match="NaN/Inf"):
                FastGenerator(gen).generate(ids, rp)
            with pytest.raises(ValueError, match="NaN/Inf"):
                list(FastGenerator(gen).generate_iter(ids, rp))


def test_ar_lp_shaped_step_captures_and_replays():
    gen = generator("ar-lp")  # 632M parameters, bf16
    cfg = gen.config
    ids, rp = np.array([3, 17], np.int64), resolve_params(SP(seed=0, cfg_scale=1.25), 2, cfg.vocab_size)
    steps = 12
    graphed = FastGenerator(gen)
    b = graphed.begin(ids, rp)
    while b.done < steps:
        graphed.advance(b)
    a = graphed.tokens(b)
    assert graphed.captures == 1 and a.shape == (2, steps)
    assert ((a >= 0) & (a < cfg.vocab_size)).all()
    eager = FastGenerator(gen, cuda_graphs=False)
    e = eager.begin(ids, rp)
    while e.done < steps:
        eager.advance(e)
    np.testing.assert_array_equal(a, eager.tokens(e))
    gen.clear_caches()


def test_tokenizer_fp16_on_the_gpu_matches_the_cpu_fp32_reference():
    """Tolerances: decode max |diff| <= 2e-2 and mean |diff| <= 2e-3 on the [0, 1] video; encode: >= 95% of the
    indices equal (fp16 rounding flips near-ties of the cosine argmax over the codebook)."""
    torch.manual_seed(0)
    ref = LARPTokenizer(TokenizerConfig.from_name("tiny"))
    torch.nn.init.normal_(ref.final_layer.linear.weight, std=0.05)
    torch.nn.init.constant_(ref.final_layer.linear.bias, 0.5)
    ref = ref.eval()
    half = copy.deepcopy(ref).to("cuda", torch.float16)
    cfg = ref.config
    idx = torch.randint(0, cfg.codebook_size, (4, cfg.num_tokens), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = ref.decode(idx)
        got = half.decode(idx.cuda()).float().cpu()
    diff = (got - want).abs()
    assert diff.max().item() <= 2e-2 and diff.mean().item() <= 2e-3
    video = torch.rand(4, *cfg.video_shape, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        same = (half.encode(video.cuda()).cpu() == ref.encode(video)).float().mean().item()
    assert same >= 0.95
