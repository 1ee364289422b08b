import importlib.util
import os

import pytest

# ONNX Runtime's idle worker threads spin by default; on 2 cores that starves the torch references that the
# tests run in the same process (x50 slower). Deployments keep the default (see README).
os.environ.setdefault("LARP_RT_ORT_SPIN", "0")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    has_cuda = _has_cuda()
    has_trt = any(importlib.util.find_spec(m) is not None for m in ("tensorrt", "tensorrt_rtx"))
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch here"))
        if "tensorrt" in item.keywords and not (has_trt and has_cuda):
            item.add_marker(pytest.mark.skip(reason="needs TensorRT and a CUDA GPU; not installed/visible here"))
