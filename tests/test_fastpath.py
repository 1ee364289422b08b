"""The generation fast path (larp_rt/backends/torch/fast.py) on the CPU, where its step runs eagerly.

Oracles for the same seeds: the loop every backend shares (``base.ContinuousBatch``: B + G rows, each at its own
position, logits to the host) over the model's per-row step, sampled by the CPU kernel and by the numpy reference
(``larp_rt.sampling.sample``). Tokens must be identical: greedy and sampled, with and without CFG, a mixed batch
(guided and unguided, greedy, top-k, top-p), with the fused kernel op and with the torch reference sampler.
"""

import numpy as np
import pytest
import torch

from larp_rt import GeneratorConfig, SamplingParams, kernels, sampling, save_pretrained
from larp_rt.backends.base import Backend, StepRunner
from larp_rt.backends.torch import TorchBackend
from larp_rt.backends.torch.fast import FastGenerator, bucket_size, pad_params
from larp_rt.models import LARPGenerator
from larp_rt.sampling import RowParams, resolve_params

SP = SamplingParams
CASES = {
    "greedy": ([0, 5, 7], SP(temperature=0.0, seed=0)),
    "greedy_cfg": ([0, 5, 7], SP(temperature=0.0, cfg_scale=1.25, seed=0)),
    "sampled": ([2, 3, 3], SP(seed=11)),
    "sampled_cfg": ([2, 3, 3], SP(seed=11, cfg_scale=1.25)),
    "mixed": ([1, 2, 3, 4, 6], [SP(seed=1), SP(seed=2, top_k=10, cfg_scale=2.0), SP(seed=3, top_p=0.8, temperature=0.7),
                                SP(seed=4, temperature=0.0), SP(seed=5, cfg_scale=1.5, top_k=3, top_p=0.9)]),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()  # tiny models: threads only add contention on a busy 2-core machine
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_generator(seed: int = 0) -> LARPGenerator:
    torch.manual_seed(seed)
    gen = LARPGenerator(GeneratorConfig.from_name("tiny"))
    torch.nn.init.normal_(gen.output.weight, std=0.3)  # peaked enough that greedy has no near-ties
    return gen.eval()


@pytest.fixture(scope="module")
def gen():
    return tiny_generator()


def rows(case: str):
    ids, params = CASES[case]
    return np.array(ids, np.int64), resolve_params(params, len(ids), 1024)


def sampler_mode(sampler: str):
    if sampler == "kernel" and not kernels.available()["cpu"]:
        pytest.skip(f"the CPU sampling kernel is not built: {kernels.available()['errors']}")
    return kernels.force_fallback(sampler == "reference")  # False forces the kernel op on


class ModelRunner(StepRunner):
    """The model's per-row step (``LARPGenerator.step``) on its own caches."""

    def __init__(self, gen: LARPGenerator, capacity: int):
        self.gen, self.capacity = gen, capacity
        gen.setup_caches(capacity)

    def run(self, tokens, pos, sample=None):
        with torch.inference_mode():
            return self.gen.step(torch.as_tensor(tokens), torch.as_tensor(pos)).float().numpy()


class SharedLoop(Backend):
    """The base backend's loop over the torch model, sampled on the host by the CPU kernel or the numpy reference."""

    def __init__(self, gen: LARPGenerator, sampler: str = "reference"):
        super().__init__(None, gen.config)
        self.gen = gen
        if sampler == "kernel":
            self.sampler, self.sampler_takes_uniform = kernels.sample_numpy, False
        else:
            self.sampler = sampling.sample

    def new_runner(self, capacity):
        return ModelRunner(self.gen, capacity)


def stack(events) -> np.ndarray:
    return np.stack([e.tokens for e in events], axis=1)


@pytest.mark.parametrize("sampler", ["kernel", "reference"])
@pytest.mark.parametrize("case", list(CASES))
def test_fast_path_draws_the_eager_and_the_reference_tokens(gen, case, sampler):
    ids, rp = rows(case)
    with sampler_mode(sampler):
        fast = FastGenerator(gen).generate(ids, rp)
        eager = stack(SharedLoop(gen, sampler).generate_iter(ids, rp))
    ref = stack(SharedLoop(gen).generate_iter(ids, rp))
    assert fast.shape == (len(ids), 64) and fast.dtype == np.int64
    np.testing.assert_array_equal(fast, eager)
    np.testing.assert_array_equal(fast, ref)


def test_a_request_does_not_depend_on_its_bucket(gen):
    ids, rp = rows("mixed")  # 5 requests: bucket 8, guided rows
    fg = FastGenerator(gen)
    full = fg.generate(ids, rp)
    for i in (1, 3):  # guided (bucket 1 with CFG) and greedy unguided (bucket 1, no CFG rows)
        one = RowParams(**{f: getattr(rp, f)[i:i + 1] for f in RowParams.__dataclass_fields__})
        alone = fg.generate(ids[i:i + 1], one)
        np.testing.assert_array_equal(alone[0], full[i])


def test_buckets_and_caches_are_allocated_once_and_reused(gen):
    fg = FastGenerator(gen)
    p = SP(seed=3, cfg_scale=1.25)
    ids = np.array([1, 2, 3, 4, 5])
    a3 = fg.generate(ids[:3], resolve_params(p, 3))
    (key,) = fg.buckets
    assert key[:2] == (4, True) and gen.cache_shape[0] == 8  # 3 requests -> 4 rows + 4 null rows
    cache, bucket = gen.layers[0].attention.kv_cache, fg._buckets[key]
    buffers = [t.data_ptr() for t in (bucket.out, bucket.row_tokens, bucket.step, bucket.params.seed)]
    a4 = fg.generate(ids[:4], resolve_params(p, 4))
    assert fg.buckets == [key] and gen.layers[0].attention.kv_cache is cache and fg._buckets[key] is bucket
    assert [t.data_ptr() for t in (bucket.out, bucket.row_tokens, bucket.step, bucket.params.seed)] == buffers
    np.testing.assert_array_equal(fg.generate(ids[:3], resolve_params(p, 3)), a3)
    np.testing.assert_array_equal(a4[:3], a3)  # row i draws from (seed, i) whatever the batch
    a5 = fg.generate(ids, resolve_params(p, 5))  # bucket 8: the caches grow once, the old buckets go
    assert gen.cache_shape[0] == 16 and [k[:2] for k in fg.buckets] == [(8, True)]
    np.testing.assert_array_equal(a5[:4], a4)
    np.testing.assert_array_equal(fg.generate(ids[:3], resolve_params(p, 3)), a3)
    assert gen.cache_shape[0] == 16 and len(fg.buckets) == 2
    gen.setup_caches(2)  # someone else replaced the caches: the fast path notices and rebuilds
    np.testing.assert_array_equal(fg.generate(ids[:3], resolve_params(p, 3)), a3)
    assert gen.cache_shape[0] == 8


@pytest.mark.parametrize("sync_every", [1, 5, 64, 100])
def test_iterator_yields_every_step_in_order(gen, sync_every):
    ids, rp = rows("sampled_cfg")
    fg = FastGenerator(gen)
    events = list(fg.generate_iter(ids, rp, sync_every=sync_every))
    assert [e.step for e in events] == list(range(64)) and {e.total for e in events} == {64}
    assert all(e.tokens.shape == (3,) and e.tokens.dtype == np.int64 for e in events)
    np.testing.assert_array_equal(stack(events), fg.generate(ids, rp))


def test_one_generation_at_a_time(gen):
    ids, rp = rows("sampled")
    fg = FastGenerator(gen)
    it = fg.generate_iter(ids, rp)
    next(it)
    fg.generate(ids, rp)
    with pytest.raises(RuntimeError, match="one at a time"):
        list(it)
    b = fg.begin(ids, rp)
    while b.done < b.steps:
        fg.advance(b)
    with pytest.raises(RuntimeError, match="all 64 steps are sampled"):
        fg.advance(b)


@pytest.mark.parametrize("sampler", ["kernel", "reference"])
def test_non_finite_logits_raise(sampler):
    gen = tiny_generator()
    with torch.no_grad():
        gen.output.weight[3, :] = float("nan")
    ids, rp = rows("sampled_cfg")
    with sampler_mode(sampler):
        with pytest.raises(ValueError, match="NaN/Inf"):
            FastGenerator(gen).generate(ids, rp)
        with pytest.raises(ValueError, match="NaN/Inf"):
            list(FastGenerator(gen, sync_every=8).generate_iter(ids, rp))


def test_bucket_and_padding_helpers():
    assert [bucket_size(b) for b in (1, 2, 3, 4, 5, 8, 9, 32, 33)] == [1, 2, 4, 4, 8, 8, 16, 32, 64]
    rp = resolve_params([SP(seed=1, top_k=3), SP(seed=2, cfg_scale=2.0)], 2)
    p = pad_params(rp, 4)
    assert len(p) == 4 and p.seed.tolist() == [1, 2, 1, 1] and p.top_k.tolist() == [3, 0, 3, 3]
    assert p.cfg_scale.dtype == np.float32 and p.seed.dtype == np.uint64
    with pytest.raises(ValueError, match="cannot pad"):
        pad_params(rp, 1)
    with pytest.raises(ValueError, match="sync_every"):
        FastGenerator(tiny_generator(), sync_every=0)


class _GeneratorBundle:
    """What TorchBackend reads of a Bundle, for a generator checkpoint alone (no ONNX export needed)."""

    def __init__(self, path, cfg):
        self.path, self.tokenizer_config, self.generator_config = path, None, cfg

    def checkpoint_dir(self, kind):
        return self.path if kind == "generator" else None


def test_torch_backend_fast_and_eager_paths_agree(gen, tmp_path, monkeypatch):
    save_pretrained(gen, tmp_path / "gen")
    bundle = _GeneratorBundle(tmp_path / "gen", gen.config)
    ids, rp = rows("mixed")
    fast = TorchBackend(bundle, device="cpu")
    assert fast.fast_path and fast.cuda_graphs
    eager = TorchBackend(bundle, device="cpu", fast_path=False)
    a, b = stack(fast.generate_iter(ids, rp)), stack(eager.generate_iter(ids, rp))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, stack(fast.generate_iter(ids, rp)))
    assert len(fast.fast.buckets) == 1
    fast.close()
    assert fast.gen.cache_shape is None and fast.fast.buckets == []
    monkeypatch.setenv("LARP_RT_CUDA_GRAPHS", "0")
    assert not TorchBackend(bundle, device="cpu").cuda_graphs
