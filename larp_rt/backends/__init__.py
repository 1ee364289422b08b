"""Backends: onnxruntime.py (the embedded default), tensorrt.py (plans on a GPU), torch.py (reference / CUDA
path); the same small interface."""

from .base import Backend, StepEvent

__all__ = ["Backend", "StepEvent"]
