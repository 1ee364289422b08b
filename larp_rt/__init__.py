"""larp_rt: an inference runtime for LARP video tokenizers and their class-conditional AR generators.

``import larp_rt`` needs only numpy: torch is imported where a PyTorch path is used (``load_pretrained``,
``larp_rt.models``), so ONNX Runtime / TensorRT deployments run without it.
"""

from .bundle import Bundle, BundleError
from .checkpoint import CheckpointError, load_pretrained, save_pretrained
from .config import ConfigError, GeneratorConfig, PriorConfig, TokenizerConfig
from .engine import Engine, Generation
from .sampling import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "__version__", "Engine", "Generation", "SamplingParams", "Bundle", "BundleError",
    "TokenizerConfig", "PriorConfig", "GeneratorConfig", "ConfigError",
    "load_pretrained", "save_pretrained", "CheckpointError",
]
