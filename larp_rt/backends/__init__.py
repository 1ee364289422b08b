"""Backends: onnxruntime.py (the embedded default), tensorrt/ (plans on a GPU), torch/ (reference / CUDA path,
with its fast path); siblings that never import each other. The same interface, ``base.Backend`` (an abstract
base class: what the Engine and the serving loop call), and one layout of rows, positions and cache slots
(``layout.py``)."""

from .base import Backend, StepEvent, StepRunner
from .layout import RowLayout

__all__ = ["Backend", "StepEvent", "StepRunner", "RowLayout"]
