"""The PyTorch backend: ``backend.py`` (``TorchBackend``: the bundle's checkpoints, the shared loop's runner, the
prior) and ``fast.py`` (the generation fast path: static buffers per batch bucket, one decode step captured as a
CUDA graph on CUDA). ``fast.py`` imports torch at its top, so it loads only when the fast path first runs."""

from .backend import TorchBackend

__all__ = ["TorchBackend"]
