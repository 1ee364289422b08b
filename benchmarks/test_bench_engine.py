"""Engine benchmarks on this CPU: ONNX Runtime vs torch eager vs the authors' loop, side by side in one run.

    .venv/bin/python -m pytest benchmarks/test_bench_engine.py --benchmark-only \
        --benchmark-json=benchmarks/results/engine_cpu_raw.json
    .venv/bin/python benchmarks/report.py benchmarks/results/engine_cpu_raw.json   # table + engine_cpu.json

Cases: encode and decode (batch 1, 8) and one decode step mid-video (position N/2, CFG on: 2B rows) including
sampling, at batch 1 and 8, for the ``tiny`` and ``small`` presets (random weights); ONNX Runtime's step on
``small`` at batch 1 also at positions 1 and N-1. Each step case records the bytes of weights it reads and its
floor ratio = step time / (those bytes / the read bandwidth), with the bandwidth probed around every block of 10
rounds (``conftest.BlockedFloor``: this host's bandwidth swings within a run); beside it ``weights_kv_bytes_ratio``
(the weights plus the KV slots the step must read) and ``param_bytes_ratio`` (every parameter, embedding tables
included: how the issue sized the floor).
"""

import numpy as np
import pytest
import torch
from authors_loop import authors_decode_one_token
from conftest import BlockedFloor

from larp_rt import Engine, SamplingParams
from larp_rt.backends.base import ContinuousBatch, Sequence, StepSample
from larp_rt.sampling import RowParams, resolve_params, uniform_table

pytestmark = pytest.mark.filterwarnings("ignore")
torch.set_grad_enabled(False)
PRESETS = ["tiny", "small"]


def _info(benchmark, machine, **kw):
    benchmark.extra_info.update({"machine": machine, **kw})


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("op", ["encode", "decode"])
def test_tokenizer(benchmark, bundles, machine, preset, batch, backend, op):
    eng = Engine(bundles[preset], backend=backend, device="cpu")
    cfg = eng.tokenizer_config
    rng = np.random.default_rng(0)
    if op == "encode":
        x = rng.random((batch, *cfg.video_shape), dtype=np.float32)
        fn = lambda: eng.encode(x)  # noqa: E731
    else:
        x = rng.integers(0, cfg.codebook_size, (batch, cfg.num_tokens))
        fn = lambda: eng.decode(x)  # noqa: E731
    _info(benchmark, machine, group=f"{op} {preset} b{batch}", preset=preset, batch=batch, path=backend, op=op)
    rounds = 3 if preset == "small" else 20
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


def _step_ort(eng: Engine, batch: int, pos: int):
    """One mid-video ONNX Runtime step at ``pos`` for ``batch`` guided requests (2 * batch rows: the requests, then
    their null-class rows, as ``Engine.generate`` lays them out), sampling included, on the engine's sampler: the
    fused decode_sample graph (one run gives the tokens) or the decode graph + the backend's sampler."""
    be, cfg = eng.backend, eng.generator_config
    params = resolve_params(SamplingParams(seed=0, cfg_scale=1.25), batch)
    ids = np.arange(batch) % cfg.num_classes
    runner = be.runner(2 * batch)
    cb = ContinuousBatch(be, runner)
    fields = RowParams.__dataclass_fields__
    for i, c in enumerate(ids):
        one = RowParams(**{f: getattr(params, f)[i:i + 1] for f in fields})
        cb.admit(Sequence(int(c), one, cfg.max_seq_len), (i, batch + i))
    cb.step()  # prefill: binds the runner's rows and caches
    # written slots, as in a real generation: the buffers come from np.zeros, whose untouched pages all map the
    # kernel's one zero page, which a step would "read" from cache instead of memory
    rng = np.random.default_rng(0)
    for flat in runner.flat:
        flat[:] = rng.standard_normal(flat.size, dtype=np.float32).astype(flat.dtype) * 0.5
    R = 2 * batch
    tokens, positions = np.zeros(R, np.int64), np.full(R, pos, np.int64)
    k = pos - cfg.cls_token_num + 1  # the sampling step whose token the step at position ``pos`` draws
    steps = np.full(batch, k, np.int64)
    if runner.samples:
        # rows the sampler reads: the requests', then their null rows; version -1 is never a batch's (they count
        # up from 1), so the runner binds these inputs once, on the first call
        sample = StepSample(np.arange(R, dtype=np.int64), params, steps, version=-1)
        return lambda: runner.run(tokens, positions, sample)
    # as in ContinuousBatch: a sampler that takes uniforms gets the rows' draws from a table made once
    extra = {"u": uniform_table(params, k + 1)[:, k]} if be.sampler_takes_uniform else {}

    def step():
        logits = runner.run(tokens, positions)
        return be.sampler(logits[:batch], logits[batch:R], params, steps, **extra)

    return step


def _fill_torch_caches(gen) -> None:
    """Random cache contents (as _step_ort), so that both paths read the same kind of data."""
    g = torch.Generator().manual_seed(0)
    for layer in gen.layers:
        for buf in (layer.attention.kv_cache.k_cache, layer.attention.kv_cache.v_cache):
            buf.copy_(torch.randn(buf.shape, generator=g) * 0.5)


def _step_torch(eng: Engine, batch: int, pos: int):
    from larp_rt import sampling_torch as ST

    gen = eng.backend.gen
    params = ST.DeviceRowParams(resolve_params(SamplingParams(seed=0, cfg_scale=1.25), batch), "cpu")
    gen.setup_caches(2 * batch)
    gen.prefill(torch.arange(2 * batch) % gen.config.num_classes)
    _fill_torch_caches(gen)
    tokens, p = torch.zeros(2 * batch, 1, dtype=torch.int64), torch.tensor([pos])
    u = params.uniform_table(pos + 1)[:, pos]

    def step():
        logits = gen.decode_one_token(tokens, p)
        return ST.sample(logits[:batch], logits[batch:], params, pos, u=u)

    return step


def _step_authors(eng: Engine, batch: int, pos: int):
    gen = eng.backend.gen
    gen.setup_caches(2 * batch)
    gen.prefill(torch.arange(2 * batch) % gen.config.num_classes)
    _fill_torch_caches(gen)
    x, p = torch.zeros(batch, 1, dtype=torch.int64), torch.tensor([pos])
    return lambda: authors_decode_one_token(gen, x, p, 1.25, temperature=1.0, top_k=0, top_p=1.0)


def _min_read_bytes(eng: Engine, weights: int, rows: int, pos: int) -> int:
    """Weights + the ``pos`` cache slots of every layer, K and V, all rows: what any step at ``pos`` must read."""
    cfg = eng.generator_config
    return weights + cfg.n_layer * 2 * rows * cfg.n_head * pos * cfg.head_dim * 4


def _bench_step(benchmark, machine, eng: Engine, make, *, preset, batch, path, pos, weights, params, rounds):
    step = make(eng, batch, pos)
    floor = BlockedFloor(step, weights, weights_kv_bytes=_min_read_bytes(eng, weights, 2 * batch, pos),
                         param_bytes=params)
    benchmark.pedantic(step, setup=floor.setup, rounds=rounds, iterations=1)
    _info(benchmark, machine, group=f"step {preset} b{batch} pos {pos}", preset=preset, batch=batch, path=path,
          op="step", pos=pos, max_seq=eng.generator_config.max_seq_len, weight_read_bytes=weights,
          sampler=getattr(eng, "sampler_name", "torch"),
          **floor.finish(list(benchmark.stats.stats.data)))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("path", ["onnxruntime", "torch", "authors"])
def test_decode_step_cfg(benchmark, bundles, machine, weight_bytes, param_bytes, preset, batch, path):
    eng = Engine(bundles[preset], backend="onnxruntime" if path == "onnxruntime" else "torch", device="cpu")
    make = {"onnxruntime": _step_ort, "torch": _step_torch, "authors": _step_authors}[path]
    _bench_step(benchmark, machine, eng, make, preset=preset, batch=batch, path=path,
                pos=eng.generator_config.max_seq_len // 2, weights=weight_bytes[preset], params=param_bytes[preset],
                rounds=30 if preset == "small" else 200)


@pytest.mark.parametrize("where", ["first", "last"])
def test_decode_step_position(benchmark, bundles, machine, weight_bytes, param_bytes, where):
    """ONNX Runtime, ``small``, batch 1 with CFG, at the first and the last position (the KV read grows with it)."""
    eng = Engine(bundles["small"], backend="onnxruntime", device="cpu")
    pos = 1 if where == "first" else eng.generator_config.max_seq_len - 1
    _bench_step(benchmark, machine, eng, _step_ort, preset="small", batch=1, path="onnxruntime", pos=pos,
                weights=weight_bytes["small"], params=param_bytes["small"], rounds=30)
