"""Weight-only int8 / int4 generator graphs, built on ONNX Runtime's own quantizer.

    export_bundle(tok_dir, gen_dir, "bundles/larp-int8", precision="int8")   # or larp-rt export --precision int8

The generator's decode graphs (``decode.onnx`` and, with ``--fused-sampler``, ``decode_sample.onnx``) are first
exported and verified in float32 as usual; then every weight MatMul is rewritten by
``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`` into a ``com.microsoft::MatMulNBits``
node: symmetric, one float scale per block of ``BLOCK_SIZE`` input rows of each output column, and
``accuracy_level=4`` (int8 activations with VNNI dot products; the quantizer's default level dequantizes
to float32 in every step and made int8 6x slower than float32 here). The embedding tables (Gathers read one
row per step) and the norms stay float32; so does the tokenizer. The KV cache is the bundle's ``kv_dtype``
(float32 unless ``--kv-dtype fp16|int8``; export/graphs.py).

The manifest records ``precision`` ("int8" | "int4") and a ``quantization`` entry (method, bits, block size,
accuracy level, the graphs rewritten, the measured logit error against float32). ``Bundle`` refuses a bundle
whose graphs do not hold what its manifest claims (``check_graph_precision`` in larp_rt/bundle.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .verify import ExportError, cache_feeds, ort_session

# onnx and onnxruntime.quantization (the export extra) are imported where they are used, so that
# ``quantizer_available`` can say what is missing instead of this module failing to import.

BITS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4
GRAPHS = ("decode", "decode_sample")


def quantizer_available() -> str | None:
    """None when ONNX Runtime's MatMulNBitsQuantizer imports, else why not (and how to fix it)."""
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer  # noqa: F401
    except ImportError as e:
        return (f"ONNX Runtime's MatMulNBitsQuantizer does not import here ({e}); install the export extra: "
                "pip install 'larp_rt[export]' (it brings onnx and onnx-ir)")
    return None


def quantize_model(model, precision: str, nodes_to_exclude=()):
    """An ``onnx.ModelProto`` with its weight MatMuls (constant B) as MatMulNBits of ``precision``'s bits, but for
    the nodes named in ``nodes_to_exclude``."""
    from onnxruntime.quantization import QuantFormat  # optional: see the note at the top
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    if precision not in BITS:
        raise ValueError(f"precision must be one of {sorted(BITS)}, got {precision!r}")
    bits = BITS[precision]
    cfg = DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL,
                                       quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",),
                                       bits=bits)
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK_SIZE, is_symmetric=True,
                             accuracy_level=ACCURACY_LEVEL, op_types_to_quantize=("MatMul",), algo_config=cfg,
                             nodes_to_exclude=list(nodes_to_exclude))
    qlog = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = qlog.level
    qlog.setLevel(logging.WARNING)  # it logs every node it visits at INFO
    try:
        q.process()
    finally:
        qlog.setLevel(level)
    return q.model.model


def quantize_bundle_graphs(w, precision: str, *, verify: bool = True, batch: int = 2, seed: int = 0,
                           printer=print, kv_dtype: str = "fp32") -> dict[str, Any]:
    """Rewrite the generator graphs of an open ``BundleWriter`` (already exported in float32) to ``precision``;
    returns the manifest's ``quantization`` entry. Raises ValueError when nothing could be quantized."""
    import onnx  # the export extra (see the note at the top)

    why = quantizer_available()
    if why is not None:
        raise ValueError(why)
    graphs = w.manifest["graphs"]
    done: list[str] = []
    ref_path = None
    n_quantized = 0
    # every graph in memory first: decode_sample may read decode.onnx's external weight file, removed below
    models = {name: onnx.load(str(w.path(graphs[name]["file"])), load_external_data=True)
              for name in GRAPHS if name in graphs}
    for name, model in models.items():
        info = graphs[name]
        path: Path = w.path(info["file"])
        if name == "decode" and verify:
            ref_path = path.with_name(".decode_fp32.onnx")
            onnx.save_model(model, str(ref_path))
        qmodel = quantize_model(model, precision)
        n = sum(node.op_type == "MatMulNBits" for node in qmodel.graph.node)
        left = sum(node.op_type == "MatMul" and node.input[1] in {i.name for i in qmodel.graph.initializer}
                   for node in qmodel.graph.node)
        if n == 0:
            raise ExportError(f"the quantizer rewrote no MatMul of {info['file']} to MatMulNBits")
        n_quantized = max(n_quantized, n)
        for rel in info.get("data", []):  # the quantized graph holds its (smaller) weights itself
            p = w.path(rel)
            if p.exists():
                p.unlink()
            w.manifest["files"].pop(rel, None)
        info.pop("data", None)
        onnx.save_model(qmodel, str(path))
        w.add_file(info["file"])
        done.append(name)
        printer(f"  {name:<13} {n} MatMuls -> MatMulNBits ({precision}, block {BLOCK_SIZE}, accuracy_level "
                f"{ACCURACY_LEVEL}); {left} weight MatMuls left float32")
    if not done:
        raise ValueError(f"precision {precision!r} quantizes the generator; the bundle has no generator graphs")
    entry: dict[str, Any] = {"method": "onnxruntime.MatMulNBitsQuantizer", "weights": precision,
                             "bits": BITS[precision], "block_size": BLOCK_SIZE, "symmetric": True,
                             "accuracy_level": ACCURACY_LEVEL, "graphs": done, "matmuls": n_quantized,
                             "kv_cache": kv_dtype, "tokenizer": "fp32"}
    if verify and ref_path is not None:
        try:
            entry["verification"] = _compare_logits(ref_path, w.path(graphs["decode"]["file"]), graphs["decode"],
                                                    batch, seed)
        finally:
            ref_path.unlink(missing_ok=True)
        v = entry["verification"]
        printer(f"  {precision} decode vs float32: logits max abs {v['logits_max_abs']:.3e} (scale "
                f"{v['logits_scale']:.3e}), top-1 agreement {v['top1_agreement']:.3f}")
        if not np.isfinite(v["logits_max_abs"]):
            raise ExportError(f"the {precision} decode graph gives non-finite logits; nothing was written")
    return entry


def _compare_logits(ref_path: Path, q_path: Path, info: dict, batch: int, seed: int) -> dict[str, float]:
    """The quantized decode step against the float32 one on the same random mid-sequence feeds."""
    custom = any(io["dtype"] != "float32" for io in info["inputs"][2:])  # a narrow cache: the fused attention op
    ref, q = ort_session(ref_path, custom_ops=custom), ort_session(q_path, custom_ops=custom)
    rng = np.random.default_rng(seed)
    V = info["outputs"][0]["shape"][1]
    S = 8
    feeds = {"token": rng.integers(0, V, (batch, 1)).astype(np.int64),
             "pos": rng.integers(1, S, batch).astype(np.int64), **cache_feeds(info["inputs"], batch, S, rng)[0]}
    a = ref.run(["logits"], feeds)[0].astype(np.float64)
    b = q.run(["logits"], feeds)[0].astype(np.float64)
    return {"logits_max_abs": float(np.abs(a - b).max()), "logits_scale": float(np.abs(a).max()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean())}
