"""PyTorch backend: the bundle's checkpoints (``torch/``) on the CPU or a CUDA device (generator bf16, tokenizer fp16).

Generation runs the fast path of ``torch_fast.py`` by default: static buffers per batch bucket and one decode step
(model step + CFG mix + sampler) that is captured as a CUDA graph on CUDA and runs eagerly on the CPU. Token ids
and the sampler's state stay on the device; the host fetches tokens in chunks. ``fast_path=False`` keeps the
plain eager loop (``eager_generate_iter``). Both use the fused sampling op where it is built for the device, else
the torch reference sampler (same Philox streams as the numpy one), so every path and backend gives the same
tokens for the same seeds. ``cuda_graphs=None`` reads ``LARP_RT_CUDA_GRAPHS`` (default on; ``0`` runs the fast
step eagerly on CUDA).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from ..bundle import Bundle, BundleError
from ..checkpoint import load_pretrained, require_torch
from ..sampling import RowParams
from .base import NON_FINITE, Backend, CfgRows, StepEvent

__all__ = ["TorchBackend", "eager_generate_iter"]
ENV_CUDA_GRAPHS = "LARP_RT_CUDA_GRAPHS"


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, bundle: Bundle, *, device: str = "auto", threads: int | None = None, fast_path: bool = True,
                 cuda_graphs: bool | None = None, sampler: str = "auto"):
        """fast_path: static buffers + one decode step per batch bucket (default), or False for the eager loop.
        cuda_graphs: capture that step on CUDA (None: env LARP_RT_CUDA_GRAPHS, default on); ignored on the CPU.
        sampler: "auto" (the fused op where built for the device), "kernel" (require it), "reference" (torch)."""
        torch = require_torch("the torch backend")
        super().__init__(bundle.tokenizer_config, bundle.generator_config)
        self.torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' but torch sees no CUDA device; use device='cpu'")
        self.device = torch.device(device)
        if threads is not None:
            torch.set_num_threads(int(threads))
        half = self.device.type == "cuda"
        self.tok = self.gen = None
        if bundle.tokenizer_config is not None:
            self.tok = self._load(bundle, "tokenizer", torch.float16 if half else torch.float32)
        if bundle.generator_config is not None:
            self.gen = self._load(bundle, "generator", torch.bfloat16 if half else torch.float32)
        if cuda_graphs is None:
            cuda_graphs = os.environ.get(ENV_CUDA_GRAPHS, "1").strip().lower() not in ("0", "false", "no", "off")
        if sampler not in ("auto", "kernel", "reference"):
            raise ValueError(f"sampler must be 'auto', 'kernel' or 'reference' on the torch backend, got {sampler!r}")
        from .torch_fast import use_kernel_sampler

        have = use_kernel_sampler(self.device)
        if sampler == "kernel" and not have:
            raise ValueError(f"sampler='kernel': the fused sampling op is not built for {self.device.type} "
                             "(see larp_rt.kernels.available()); use sampler='auto'")
        self.kernel_sampler = have and sampler != "reference"
        self.sampler_name = "kernel" if self.kernel_sampler else "reference"
        self.fast_path = bool(fast_path)
        self.cuda_graphs = bool(cuda_graphs)
        self._fast = None

    def _load(self, bundle: Bundle, kind: str, dtype):
        path = bundle.checkpoint_dir(kind)
        if path is None:
            raise BundleError(
                f"bundle {str(bundle.path)!r} carries no PyTorch {kind} checkpoint (exported with --onnx-only); "
                "use backend='onnxruntime' or re-export without --onnx-only"
            )
        return load_pretrained(path, kind=kind, device=self.device, dtype=dtype)

    def encode(self, video: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            x = self.torch.from_numpy(video).to(self.device)
            return self.tok.encode(x).cpu().numpy()

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.tok.decode(self.torch.from_numpy(tokens).to(self.device)).float().cpu().numpy()

    @property
    def fast(self):
        """The generator's ``FastGenerator`` (created on first use)."""
        if self._fast is None:
            from .torch_fast import FastGenerator

            self._fast = FastGenerator(self.gen, cuda_graphs=self.cuda_graphs, kernel_sampler=self.kernel_sampler)
        return self._fast

    def generate_iter(self, class_ids: np.ndarray, params: RowParams) -> Iterator[StepEvent]:
        if self.fast_path:
            yield from self.fast.generate_iter(class_ids, params)
        else:
            if self._fast is not None:
                self._fast.release()  # the eager loop may re-allocate the caches under the graphs
            yield from eager_generate_iter(self.gen, class_ids, params, kernel_sampler=self.kernel_sampler)

    def close(self) -> None:
        if self._fast is not None:
            self._fast.release()
        if self.gen is not None:
            self.gen.clear_caches()


def _eager_sampler(device, kernel_sampler: bool | None = None):
    """The fused kernel op where it is built for this device (or as ``kernel_sampler`` says), else the torch
    reference (same draws)."""
    from .. import kernels
    from .. import sampling_torch as ST
    from .torch_fast import use_kernel_sampler

    if use_kernel_sampler(device) if kernel_sampler is None else kernel_sampler:
        return lambda cond, uncond, p, k, u: kernels.sample_torch(cond, uncond, p, k)
    check = device.type == "cpu"  # a finiteness check is a host sync: CPU only
    return lambda cond, uncond, p, k, u: ST.sample(cond, uncond, p, k, check_finite=check, u=u)


def eager_generate_iter(gen, class_ids: np.ndarray, params: RowParams, *,
                        kernel_sampler: bool | None = None) -> Iterator[StepEvent]:
    """The plain eager loop: B + G rows (G = requests with cfg_scale != 1), a host transfer per step."""
    import torch

    from .. import sampling_torch as ST

    cfg, device = gen.config, gen.tok_embeddings.weight.device
    B, N = len(class_ids), cfg.max_seq_len
    layout = CfgRows.build(class_ids, params, cfg.null_class)
    R = layout.rows
    if gen.cache_shape is None or gen.cache_shape[0] < R:
        gen.setup_caches(1 << max(R - 1, 0).bit_length())  # batch buckets: allocated once, reused
    dparams = ST.DeviceRowParams(params, device)
    guided = torch.as_tensor(layout.guided, device=device)
    sample = _eager_sampler(device, kernel_sampler)
    table = dparams.uniform_table(N)  # every step's uniforms in one pass (the reference's)
    with torch.inference_mode():
        logits = gen.prefill(torch.as_tensor(layout.class_ids, device=device))
        pos = torch.zeros(1, dtype=torch.int64, device=device)
        row_tokens = torch.empty(0, dtype=torch.int64, device=device)
        for k in range(N):
            if k:
                pos.fill_(cfg.cls_token_num + k - 1)
                logits = gen.decode_one_token(row_tokens.view(-1, 1), pos)
            cond = logits[:B].float()
            uncond = None
            if len(layout.guided):
                uncond = cond.clone()
                uncond[guided] = logits[B:].float()
            tokens = sample(cond, uncond, dparams, k, table[:, k])
            row_tokens = torch.cat([tokens, tokens[guided]]) if len(layout.guided) else tokens
            host = tokens.cpu().numpy()
            if (host < 0).any():  # the CUDA kernel marks rows whose logits were NaN/Inf with -1
                raise ValueError(NON_FINITE)
            yield StepEvent(k, N, host)
