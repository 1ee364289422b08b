"""Tracing a graph module to ONNX and saving it: the bottom layer of ``export/`` (no other export module here).

The graphs (``graphs.py``, ``prefill_graph.py``, ``prior_graph.py``) are traced with the TorchScript-based exporter,
which gives plain standard-op graphs that ONNX Runtime and TensorRT both take. Default opset 17
(LayerNormalization as one op; TensorRT 8.6+ reads it); any opset in ``OPSETS`` can be chosen. Weights above
``EXTERNAL_DATA_BYTES`` go to one external data file per graph (``<graph>.onnx.data``); a graph that holds the same
weights as another one points into that graph's file instead (``share_external_data``).

``EXTERNAL_DATA_BYTES`` is read at call time (``trace.EXTERNAL_DATA_BYTES``): tests lower it to force the
external-data layout on the tiny models.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from onnx.external_data_helper import ExternalDataInfo

__all__ = ["OPSETS", "DEFAULT_OPSET", "EXTERNAL_DATA_BYTES", "trace_module", "export_module", "save_graph",
           "share_external_data", "onnx_version"]

OPSETS = range(14, 21)
DEFAULT_OPSET = 17
EXTERNAL_DATA_BYTES = 256 << 20


def trace_module(module: torch.nn.Module, args: tuple, inputs: list[str], outputs: list[str],
                 dynamic: dict[str, dict[int, str]], opset: int, custom_opsets: dict[str, int] | None = None):
    """Trace ``module`` to an in-memory ``onnx.ModelProto`` (weights loaded)."""
    module.eval()  # wrappers start in train mode, and the exporter restores the mode it found (dropout!)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        raw = os.path.join(tmp, "g.onnx")
        torch.onnx.export(module, args, raw, input_names=inputs, output_names=outputs, dynamic_axes=dynamic,
                          opset_version=opset, do_constant_folding=True, dynamo=False,
                          custom_opsets=custom_opsets or {})
        return onnx.load(raw, load_external_data=True)


def export_module(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
                  dynamic: dict[str, dict[int, str]], opset: int, custom_opsets: dict[str, int] | None = None,
                  ) -> list[str]:
    """Trace ``module`` to ``path``; returns the files written (graph [+ external data])."""
    model = trace_module(module, args, inputs, outputs, dynamic, opset, custom_opsets)
    onnx.checker.check_model(model, full_check=False)
    return [path.name, *save_graph(model, path)]


def save_graph(model, path: Path) -> list[str]:
    """Save ``model`` to ``path``: its weights embedded, or above ``EXTERNAL_DATA_BYTES`` in one file beside it
    (``<graph>.onnx.data``). Returns the external data files written ([] or [the .data name])."""
    if sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES:
        data = path.name + ".data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
        return [data]
    onnx.save_model(model, str(path))
    return []


def share_external_data(model, reference_path) -> int:
    """Point ``model``'s initializers at the external data of the saved model ``reference_path`` wherever the
    reference holds a tensor of the same name, type, shape and bytes (so two graphs of one bundle share one
    weights file). Returns the number of initializers shared; the others stay embedded."""
    ref_path = Path(reference_path)
    ref = onnx.load(str(ref_path), load_external_data=False)
    by_name = {t.name: t for t in ref.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    shared = 0
    files: dict[str, object] = {}
    try:
        for t in model.graph.initializer:
            r = by_name.get(t.name)
            if r is None or r.data_type != t.data_type or list(r.dims) != list(t.dims) or not t.HasField("raw_data"):
                continue
            info = ExternalDataInfo(r)
            f = files.get(info.location)
            if f is None:
                f = files[info.location] = open(ref_path.parent / info.location, "rb")  # noqa: SIM115
            f.seek(info.offset or 0)
            if f.read(info.length if info.length is not None else len(t.raw_data)) != t.raw_data:
                continue
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            t.external_data.extend(r.external_data)
            shared += 1
    finally:
        for f in files.values():
            f.close()
    return shared


def onnx_version() -> str:
    return onnx.__version__
