"""Export: checkpoint folders -> bundles (ONNX graphs verified against PyTorch; TensorRT plans).

Names are imported lazily, so ``build_plans`` (TensorRT plans) works where torch is not installed."""

__all__ = ["export_bundle", "ExportError", "DEFAULT_OPSET", "build_plans", "PlanBuildError"]


def __getattr__(name):
    if name in ("export_bundle", "ExportError", "DEFAULT_OPSET"):
        from . import onnx_export  # torch + onnx: only when asked for (no cycle: nothing here is imported back)

        return getattr(onnx_export, name)
    if name in ("build_plans", "PlanBuildError"):
        from . import trt_build  # the TensorRT builder's module, without torch

        return getattr(trt_build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
