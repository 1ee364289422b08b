"""Backends: onnxruntime.py (the embedded default), torch.py (reference / CUDA path); same small interface."""

from .base import Backend, StepEvent

__all__ = ["Backend", "StepEvent"]
