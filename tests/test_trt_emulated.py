"""The TensorRT backend's host logic on the CPU, with CUDA and the plans emulated: "device" memory is host memory
(real addresses, so the backend's pointer arithmetic is exercised as written), cudaMemcpy*/cudaMemset are
memmoves, stream capture records the enqueued work and cudaGraphLaunch replays it, an execution context runs the
plan's source ONNX graph with ONNX Runtime on the buffers bound to it, and the NVRTC kernels (KV write, row
gather) and the CUDA sampling kernel are numpy models of the same computations. What this checks: buffer
layouts, cache windows and their moves (cudaMemcpy2D pitches), slot writes at per-row positions, what a captured
graph reads at replay (pinned inputs), the sampled-row gather and parameter plumbing. What it cannot check: the
real TensorRT engine, the real kernels and CUDA itself (test_trt_gpu.py, on a GPU)."""

import ctypes
import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
from larp_rt.export import export_bundle, trt_build
from test_trt_build import tiny_pair

from larp_rt import Engine, SamplingParams, sampling
from larp_rt.backends import tensorrt as tb

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                                reason="needs the TensorRT-RTX builder: pip install 'larp_rt[tensorrt]'")


def view(ptr: int, nbytes: int) -> np.ndarray:
    return np.frombuffer((ctypes.c_char * nbytes).from_address(ptr), np.uint8)


class FakeCudart:
    """The subset of cuda.bindings.runtime the backend calls, over host memory."""

    cudaStreamNonBlocking = 1
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3)
    cudaStreamCaptureMode = SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)

    def __init__(self):
        self.keep: dict[int, np.ndarray] = {}
        self.capturing: list | None = None
        self.graphs: dict[int, list] = {}
        self.launches = self.captures = 0

    def run(self, fn) -> None:  # enqueue on "the stream": recorded while capturing, else now
        if self.capturing is not None:
            self.capturing.append(fn)
        else:
            fn()

    def _alloc(self, n):
        a = np.zeros(n + 64, np.uint8)
        ptr = a.ctypes.data
        self.keep[ptr] = a
        return (0, ptr)

    cudaMalloc = cudaMallocHost = _alloc

    def cudaFree(self, p):
        self.keep.pop(p, None)
        return (0,)

    cudaFreeHost = cudaFree

    def cudaMemset(self, p, v, n):
        ctypes.memset(p, v, n)
        return (0,)

    def cudaMemcpy(self, dst, src, n, kind):
        ctypes.memmove(dst, src, n)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        self.run(lambda: ctypes.memmove(dst, src, n))
        return (0,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        def go():
            rows = [view(src + r * spitch, width).copy() for r in range(height)]  # read all, then write
            for r in range(height):
                view(dst + r * dpitch, width)[:] = rows[r]
        self.run(go)
        return (0,)

    def cudaSetDevice(self, i):
        return (0,)

    def cudaStreamCreateWithFlags(self, f):
        return (0, 7)

    def cudaStreamSynchronize(self, s):
        return (0,)

    def cudaStreamBeginCapture(self, s, mode):
        self.capturing = []
        return (0,)

    def cudaStreamEndCapture(self, s):
        ops, self.capturing = self.capturing, None
        self.captures += 1
        return (0, ops)

    def cudaGraphInstantiate(self, ops, flags):
        self.graphs[id(ops)] = ops
        return (0, id(ops))

    def cudaGraphLaunch(self, g, s):
        self.launches += 1
        for fn in self.graphs[g]:
            fn()
        return (0,)

    def cudaGraphExecDestroy(self, g):
        self.graphs.pop(g, None)
        return (0,)


NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


class FakeContext:
    """An execution context: the plan's ONNX graph in ONNX Runtime over the bound addresses and shapes."""

    def __init__(self, plan, cudart):
        self.plan, self.cudart = plan, cudart
        self.shapes, self.addr = {}, {}
        self.out_shapes = {}

    def set_optimization_profile_async(self, k, s):
        return True

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(int(x) for x in shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addr[name] = int(ptr)
        return True

    def is_stream_capturable(self, s):
        return True

    def get_tensor_shape(self, name):
        return self.out_shapes[name]

    def execute_async_v3(self, s):
        shapes, addr = dict(self.shapes), dict(self.addr)  # the bindings at enqueue time, as TensorRT records them

        def go():
            feeds = {}
            for n in self.plan.inputs:
                dt = self.plan.dtypes[n]
                size = int(np.prod(shapes[n])) * dt.itemsize
                feeds[n] = view(addr[n], size).view(dt).reshape(shapes[n]).copy()
            outs = self.plan.session.run(self.plan.outputs, feeds)
            for n, y in zip(self.plan.outputs, outs, strict=True):
                y = np.ascontiguousarray(y, self.plan.dtypes[n])
                self.out_shapes[n] = y.shape
                view(addr[n], y.nbytes)[:] = y.view(np.uint8).reshape(-1)
        self.cudart.run(go)
        return True


def make_fake_plan(cudart):
    import onnxruntime as ort

    class FakePlan(tb.LoadedPlan):
        def __init__(self, be, name, entry):
            self.be, self.name, self.entry = be, name, entry
            self.session = ort.InferenceSession(str(be.bundle.path / entry.onnx), providers=["CPUExecutionProvider"])
            self.buckets = list(entry.buckets)
            self.inputs = [i.name for i in entry.inputs]
            self.outputs = [o.name for o in entry.outputs]
            self.dtypes = {d.name: np.dtype(d.dtype) for d in (*entry.inputs, *entry.outputs)}
            self._contexts = {}
            self.runtime_cache = self.cache_path = None

        def context(self, bucket, shared=True):
            ctx = self._contexts.get(bucket) if shared else None
            if ctx is None:
                ctx = FakeContext(self, cudart)
                if shared:
                    self._contexts[bucket] = ctx
            return ctx

    return FakePlan


class FakeKernels:
    """numpy models of the NVRTC kernels (same arguments as their launches)."""

    def __init__(self, cudart):
        self.cudart = cudart

    def launch(self, name, grid, block, stream, args):
        vals = [v for v, _ in args]

        def go():
            if name.startswith("kv_write"):
                es = 2 if name == "kv_write2" else 4
                caches, presents, pos, rows, H, W, hd = vals
                n = grid[1]
                cp = view(caches, 8 * n).view(np.uint64)
                pp = view(presents, 8 * n).view(np.uint64)
                p = view(pos, 8 * rows).view(np.int64)
                dt = np.uint16 if es == 2 else np.uint32
                for j in range(n):
                    c = view(int(cp[j]), rows * H * W * hd * es).view(dt).reshape(rows, H, W, hd)
                    new = view(int(pp[j]), rows * H * hd * es).view(dt).reshape(rows, H, hd)
                    for r in range(rows):
                        if 0 <= p[r] < W:
                            c[r, :, p[r]] = new[r]
            elif name == "feed_tokens":
                token, sampled, row_req, cap = vals
                req = view(row_req, 8 * cap).view(np.int64)
                got = view(sampled, 8 * (int(req.max()) + 1)).view(np.int64)
                t = np.where(req >= 0, got[np.maximum(req, 0)], 0)
                view(token, 8 * cap).view(np.int64)[:] = np.maximum(t, 0)
            else:  # gather_rows
                dst, src, rows, R, V = vals
                idx = view(rows, 8 * R).view(np.int64)
                out = view(dst, 4 * R * V).view(np.float32).reshape(R, V)
                out[:] = view(src, 4 * (int(idx.max()) + 1) * V).view(np.float32).reshape(-1, V)[idx]
        self.cudart.run(go)


def fake_launch_cuda(cudart):
    """The CUDA sampling kernel's contract, on the emulated device: the reference sampler."""

    def launch(*, cond, uncond, dtype, batch, vocab, cfg_scale, temperature, top_k, top_p, seed, stream_ids, tokens,
               steps_ptr, cuda_stream, **_):
        def arr(p, dt):
            return view(p, batch * np.dtype(dt).itemsize).view(dt)

        def go():
            def logits(p):
                return view(p, 4 * batch * vocab).view(np.float32).reshape(batch, vocab).copy()

            c = logits(cond)
            u = None if uncond is None else logits(uncond)
            params = sampling.RowParams(cfg_scale=arr(cfg_scale, np.float32).copy(),
                                        temperature=arr(temperature, np.float32).copy(),
                                        top_k=arr(top_k, np.int64).copy(), top_p=arr(top_p, np.float32).copy(),
                                        seed=arr(seed, np.uint64).copy(), stream=arr(stream_ids, np.uint64).copy())
            arr(tokens, np.int64)[:] = sampling.sample(c, u, params, arr(steps_ptr, np.int64).copy())
        cudart.run(go)

    return launch


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    import torch

    from larp_rt import GeneratorConfig, save_pretrained
    from larp_rt.models import LARPGenerator

    root = tmp_path_factory.mktemp("emu")
    tok, _ = tiny_pair(root)
    torch.manual_seed(1)
    g = LARPGenerator(GeneratorConfig.from_name("tiny"))
    torch.nn.init.normal_(g.output.weight, std=0.3)  # peaked logits: the tokens follow the attention's output
    for layer in g.layers:
        torch.nn.init.normal_(layer.attention.wqkv.weight, std=0.3)  # and the attention reads the cache hard
    save_pretrained(g.eval(), root / "gen")
    gen = root / "gen"
    b = export_bundle(tok, gen, root / "b", onnx_only=True, verify=False, printer=lambda s: None)
    trt_build.build_plans(b, batch="1,2,4", printer=lambda s: None)
    return b


def emulated_engine(bundle, monkeypatch, *, device_sampler: bool, graphs: bool = True, chunk: int = 16):
    cudart = FakeCudart()
    from larp_rt import kernels

    monkeypatch.setattr(tb.backend, "load_cudart", lambda: cudart)  # patched where TensorRTBackend looks them up
    monkeypatch.setattr(tb.backend, "LoadedPlan", make_fake_plan(cudart))
    monkeypatch.setattr(tb.backend, "machine", lambda probe=True: tb.Machine(
        {"tensorrt-rtx": tb.installed_version("tensorrt-rtx"), "tensorrt": None},
        ({"index": 0, "name": "emulated", "cc": "8.6"},) if probe else ()))
    monkeypatch.setattr(tb.TensorRTBackend, "kernels", lambda self: FakeKernels(cudart))
    monkeypatch.setattr(kernels, "cuda_library", lambda: object() if device_sampler else None)
    monkeypatch.setattr(kernels, "launch_cuda", fake_launch_cuda(cudart))
    monkeypatch.setenv("LARP_RT_TRT_CUDA_GRAPHS", "1" if graphs else "0")
    monkeypatch.setenv("LARP_RT_TRT_CHUNK", str(chunk))
    return Engine(bundle, backend="tensorrt", sampler="auto" if device_sampler else "reference"), cudart


@pytest.mark.parametrize("device_sampler", [False, True], ids=["host-sampler", "device-sampler"])
def test_emulated_runner_draws_the_onnx_runtime_tokens(bundle, monkeypatch, device_sampler):
    ref = Engine(bundle, backend="onnxruntime", sampler="reference")
    eng, cudart = emulated_engine(bundle, monkeypatch, device_sampler=device_sampler)
    assert eng.backend_name == "tensorrt" and eng.backend.cuda_sampler == device_sampler
    for params in (SamplingParams(seed=0, temperature=0.0, cfg_scale=1.0),
                   SamplingParams(seed=1, temperature=1.0, top_k=50, top_p=0.9, cfg_scale=1.0)):
        want = ref.generate([1, 2, 3], params).tokens
        got = eng.generate([1, 2, 3], params).tokens  # 3 rows on the 4-row bucket (one idle row)
        np.testing.assert_array_equal(got, want)
    N = eng.generator_config.max_seq_len
    # replayed graphs did the steps (per step, or per chunk of 16 with the device sampler): windows grew and moved
    assert cudart.captures >= 2 and cudart.launches >= (4 if device_sampler else N)


def test_emulated_step_logits_equal_onnx_runtime_at_per_row_positions(bundle, monkeypatch):
    """Rows at their own positions across every cache window (moves up and down), a row joining mid-way at
    position 0 and an idle row above the bound ones: the logits of every step equal ONNX Runtime's runner."""
    eng, cudart = emulated_engine(bundle, monkeypatch, device_sampler=False)
    ref = Engine(bundle, backend="onnxruntime", sampler="reference").backend.new_runner(4)
    run = eng.backend.new_runner(4)
    rng = np.random.default_rng(0)
    V, S = eng.generator_config.vocab_size, run.S
    pos = np.array([0, 5, 0], np.int64)
    widths = set()
    for step in range(S - 6):
        tok = rng.integers(0, V, 3)
        tok[pos == 0] = V + 1
        if step == 30:
            pos[2] = 0  # a new request takes row 2: prefill at position 0
        a = run.run(tok, pos).copy()
        np.testing.assert_allclose(a, ref.run(tok, pos), atol=1e-5, rtol=1e-5)
        widths.add(run.width)
        pos = np.minimum(pos + 1, S - 1)
    assert len(widths) >= 3  # the window grew through several sizes and moved the cache each time


def test_emulated_graph_replay_equals_eager(bundle, monkeypatch):
    p = SamplingParams(seed=4, temperature=1.0, cfg_scale=1.0)
    eng, cudart = emulated_engine(bundle, monkeypatch, device_sampler=True, graphs=True, chunk=0)  # per step
    replayed = eng.generate([0, 5], p).tokens
    assert cudart.launches > 0
    eng2, cudart2 = emulated_engine(bundle, monkeypatch, device_sampler=True, graphs=False, chunk=0)
    eager = eng2.generate([0, 5], p).tokens
    assert cudart2.launches == 0
    np.testing.assert_array_equal(replayed, eager)


@pytest.mark.parametrize("chunk", [0, 5, 16])
def test_emulated_chunked_generation_equals_per_step_and_onnx_runtime(bundle, monkeypatch, chunk):
    """Generation in chunks of steps (tokens fed on the device, one host sync per chunk; chunk 0 = the per-step
    loop), with guidance on some rows: the tokens of ONNX Runtime's reference loop."""
    params = [SamplingParams(seed=2, temperature=1.0, top_k=40, cfg_scale=1.5),
              SamplingParams(seed=3, temperature=0.0, cfg_scale=1.0)]
    ref = Engine(bundle, backend="onnxruntime", sampler="reference").generate([1, 4], params).tokens
    eng, cudart = emulated_engine(bundle, monkeypatch, device_sampler=True, chunk=chunk)
    np.testing.assert_array_equal(eng.generate([1, 4], params).tokens, ref)
    N = eng.generator_config.max_seq_len
    if chunk:  # every chunk ran as a graph: captured after its eager first run, or replayed
        assert cudart.captures + cudart.launches == -(-N // chunk) and (cudart.launches > 0) == (chunk < 16)


def test_emulated_encode_decode_equal_onnx_runtime(bundle, monkeypatch):
    ref = Engine(bundle, backend="onnxruntime")
    eng, _ = emulated_engine(bundle, monkeypatch, device_sampler=False)
    rng = np.random.default_rng(0)
    cfg = eng.tokenizer_config
    tokens = rng.integers(0, cfg.codebook_size, (5, cfg.num_tokens))  # 5 rows: chunks of the 4-row bucket
    np.testing.assert_array_equal(eng.decode(tokens), ref.decode(tokens))
    video = ref.decode(tokens[:3])
    np.testing.assert_array_equal(eng.encode(video), ref.encode(video))



def test_emulated_encode_latents_equal_onnx_runtime(bundle, monkeypatch):
    """The stochastic encoder (predict(stochastic_cond=True)): the encoder plan's latents output and the bundle's
    codebook, as ONNX Runtime gives them; a plan without the output is a worded capability error."""
    from larp_rt.errors import BackendCapabilityError

    ref = Engine(bundle, backend="onnxruntime")
    eng, _ = emulated_engine(bundle, monkeypatch, device_sampler=False)
    cfg = eng.tokenizer_config
    tokens = np.random.default_rng(1).integers(0, cfg.codebook_size, (5, cfg.num_tokens))
    video = ref.decode(tokens)  # 5 rows: chunks of the 4-row bucket
    z, codes = eng.backend.encode_latents(video)
    z_ref, codes_ref = ref.backend.encode_latents(video)
    assert z.shape == (5, cfg.num_tokens, codes.shape[1])
    np.testing.assert_allclose(z, z_ref, atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(codes, codes_ref)
    monkeypatch.setattr(eng.backend.plan("encoder"), "outputs", ["indices"])
    with pytest.raises(BackendCapabilityError, match="no 'latents' output"):
        eng.backend.encode_latents(video)
