"""PyTorch backend: the bundle's checkpoints (``torch/``) run eagerly, on the CPU or a CUDA device.

Token ids and the sampler's state stay on the device for the whole generation (the reference sampler's torch
version draws from the same Philox streams as the numpy one, so both backends give the same tokens); the only
host transfers are the per-step event (for progress) and the final sequence.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..bundle import Bundle, BundleError
from ..checkpoint import load_pretrained, require_torch
from ..sampling import RowParams
from .base import Backend, CfgRows, StepEvent

__all__ = ["TorchBackend"]


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, bundle: Bundle, *, device: str = "auto", threads: int | None = None):
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
        self._rows = 0

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

    def _sampler(self):
        """The fused kernel op where it is built for this device, else the torch reference (same draws)."""
        from .. import kernels

        info = kernels.available()
        built = info["cuda"] if self.device.type == "cuda" else info["cpu"]
        if built and not info["disabled"] and kernels.register_torch_op() is not None:
            return lambda cond, uncond, p, k, u: kernels.sample_torch(cond, uncond, p, k)
        from .. import sampling_torch as ST

        check = self.device.type == "cpu"  # a finiteness check is a host sync: CPU only
        return lambda cond, uncond, p, k, u: ST.sample(cond, uncond, p, k, check_finite=check, u=u)

    def generate_iter(self, class_ids: np.ndarray, params: RowParams) -> Iterator[StepEvent]:
        from .. import sampling_torch as ST

        torch, cfg, gen = self.torch, self.generator_config, self.gen
        B, N = len(class_ids), cfg.max_seq_len
        layout = CfgRows.build(class_ids, params, cfg.null_class)
        R = layout.rows
        if gen.cache_shape is None or gen.cache_shape[0] < R:
            gen.setup_caches(1 << max(R - 1, 0).bit_length())  # batch buckets: allocated once, reused
        dparams = ST.DeviceRowParams(params, self.device)
        guided = torch.as_tensor(layout.guided, device=self.device)
        sample = self._sampler()
        table = dparams.uniform_table(N)  # every step's uniforms in one pass (the reference's)
        with torch.inference_mode():
            logits = gen.prefill(torch.as_tensor(layout.class_ids, device=self.device))
            pos = torch.zeros(1, dtype=torch.int64, device=self.device)
            row_tokens = torch.empty(0, dtype=torch.int64, device=self.device)
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
                    raise ValueError("logits contain NaN/Inf: the model produced non-finite values; "
                                     "check the weights and the precision")
                yield StepEvent(k, N, host)

    def close(self) -> None:
        if self.gen is not None:
            self.gen.clear_caches()
