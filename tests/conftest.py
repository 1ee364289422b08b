import importlib.util

import pytest


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    has_cuda = _has_cuda()
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch here"))
        if "tensorrt" in item.keywords and not (has_trt and has_cuda):
            item.add_marker(pytest.mark.skip(reason="needs TensorRT and a CUDA GPU; not installed/visible here"))
