"""PyTorch modules (import only where torch is installed: the ONNX/TensorRT runtime never imports this)."""

from .generator import LARPGenerator
from .prior import LARPPrior
from .tokenizer import LARPTokenizer

__all__ = ["LARPTokenizer", "LARPPrior", "LARPGenerator", "build_model"]


def build_model(config):
    """The module for a TokenizerConfig or GeneratorConfig."""
    from ..config import GeneratorConfig, TokenizerConfig

    if isinstance(config, TokenizerConfig):
        return LARPTokenizer(config)
    if isinstance(config, GeneratorConfig):
        return LARPGenerator(config)
    raise TypeError(f"build_model expects a TokenizerConfig or GeneratorConfig, got {type(config).__name__}")
