"""``larp-rt build``: a bundle's ONNX graphs -> TensorRT plans, written into the bundle with manifest entries.

    build_plans("bundles/larp-tiny")                                     # TensorRT-RTX, ahead of time, any machine
    build_plans("bundles/larp-tiny", trt="tensorrt", batch=(1, 4, 16))   # datacenter TensorRT, on its own GPU

Two builders, one code path (they share the Python API):

* ``rtx``: TensorRT-RTX (``pip install tensorrt-rtx``, import ``tensorrt_rtx``). It builds ahead of time on a CPU
  with no GPU for the compute capabilities given (default: the builder's own portable set, 8.0 / 8.6 / 8.9 / 12.0;
  7.5 Turing only when asked); the kernels are JIT-compiled on the target GPU at load, and the backend persists
  them in a runtime cache. RTX-class GPUs only (Hopper is not in its support matrix).
* ``tensorrt``: datacenter TensorRT (``pip install tensorrt``, import ``tensorrt``). It builds on the GPU it will run
  on (the target compute capability is that GPU's), with a timing cache persisted in the bundle
  (``plans/timing.cache``) so a rebuild re-times nothing it already timed.

Networks are strongly typed: every tensor's type is the ONNX graph's (an fp16 bundle gives fp16 plans; see
``--precision``). One optimisation profile per batch bucket; the graphs' other dynamic axes get their range from
``PROFILES`` below: **a new graph gets plans by adding one entry there** (symbol -> rule), nothing else. The KV
length ``S`` ranges over [1, max_seq] in every profile, so a step binds the cache window it needs (about ``pos``
slots, like the ONNX Runtime backend), not ``max_seq``.

Atomicity: plans are built into a staging directory inside the bundle; only when every plan built (and its I/O
matched the ONNX graph's) are they moved in under new content-addressed names, then ``manifest.json`` is replaced
atomically (write + fsync + rename) and the old plans are deleted. A failure at any point before the rename
leaves every file of the bundle exactly as it was.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..backends import tensorrt as trt_backend
from ..bundle import MANIFEST, Bundle, BundleError, sha256_file
from ..manifest import TensorSpec

__all__ = ["build_plans", "PlanBuildError", "PROFILES", "PLAN_EXCLUDED", "FLAVOURS", "DEFAULT_BATCH",
           "RTX_DEFAULT_CC", "import_trt", "trt_version"]

FLAVOURS = {"rtx": ("tensorrt_rtx", "tensorrt-rtx"), "tensorrt": ("tensorrt", "tensorrt")}
DEFAULT_BATCH = (1, 2, 4, 8, 16)
# TensorRT-RTX's default targets when no compute capability is set (its CPU-only AOT documentation)
RTX_DEFAULT_CC = ["8.0", "8.6", "8.9", "12.0"]
PRECISIONS = ("fp32", "fp16", "bf16")
TIMING_CACHE = "plans/timing.cache"  # datacenter TensorRT's timing cache, kept between builds

# ---------------------------------------------------------------------------------------------------------------
# The per-graph profile table: graph -> {ONNX dim symbol -> rule}. Rules:
#   "batch"        the profile's batch bucket b: range [previous bucket + 1, b], optimum b
#   "kv"           the KV-cache length: [1, max_seq], optimum max_seq // 2 (max_seq: --max-seq, else the bundle's)
#   "prior_kv"     the same for the tokenizer prior's cache (its own max_seq)
#   "prefix"       a prefix length (multi-token prefill): [1, max_seq], optimum max_seq // 2
#   (lo, opt, hi)  fixed ints
# A graph of the bundle that is neither here nor in PLAN_EXCLUDED fails the build with a message pointing here.
# Example: the multi-token prefill of frame-prediction bundles (prefix tokens (B, P) -> logits + P cache entries)
# is the "prefix_prefill" entry.
# ---------------------------------------------------------------------------------------------------------------
PROFILES: dict[str, dict[str, Any]] = {
    "encoder": {"B": "batch"},
    "decoder": {"B": "batch"},
    "decode": {"B": "batch", "S": "kv"},
    "prior": {"B": "batch", "S": "prior_kv"},
    "prior_score": {"B": "batch"},
    "prefix_prefill": {"B": "batch", "P": "prefix"},
}
# graphs that stay ONNX-only: the sampler graph computes in float64 (plans hold none; the plan path samples with
# the CUDA kernel of cpp_ext instead), the fused decode+sample graph uses larp_rt custom ops TensorRT cannot parse
PLAN_EXCLUDED = {"sample": "float64 sampler graph (the plan path samples with the CUDA kernel)",
                 "decode_sample": "custom ops larp_rt::DecodeAttention / larp_rt::Sample (ONNX Runtime only)",
                 "prior_fused": "custom op larp_rt::DecodeAttention (ONNX Runtime only; the plan is prior.onnx's)"}

_NP_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
              "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "FP8": "float8", "INT4": "int4", "FP4": "fp4",
              "DOUBLE": "float64"}


class PlanBuildError(RuntimeError):
    """A plan could not be built; the bundle was left exactly as it was."""


def import_trt(flavour: str):
    """The TensorRT module of ``flavour`` ("rtx" -> tensorrt_rtx, "tensorrt" -> tensorrt), with a clear error."""
    if flavour not in FLAVOURS:
        raise ValueError(f"trt must be one of auto, {', '.join(FLAVOURS)}; got {flavour!r}")
    mod, pkg = FLAVOURS[flavour]
    try:
        return importlib.import_module(mod)
    except ImportError as e:
        extra = ("pip install 'larp_rt[tensorrt]' (TensorRT-RTX: builds on any machine, runs on RTX GPUs)"
                 if flavour == "rtx" else "pip install tensorrt (datacenter TensorRT: builds and runs on its GPU)")
        raise ImportError(f"{pkg} is not installed ({e}): {extra}") from e


def trt_version(trt) -> str:
    return str(getattr(trt, "__version__", "unknown"))


def _resolve_flavour(trt: str) -> str:
    if trt != "auto":
        import_trt(trt)
        return trt
    if importlib.util.find_spec("tensorrt_rtx") is not None:
        return "rtx"
    if importlib.util.find_spec("tensorrt") is not None:
        return "tensorrt"
    raise ImportError("no TensorRT builder is installed: pip install 'larp_rt[tensorrt]' (TensorRT-RTX, builds on "
                      "any machine) or pip install tensorrt (datacenter TensorRT, builds on its GPU)")


def _parse_cc(values: Sequence[str] | str | None) -> list[str] | None:
    if values is None:
        return None
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    out = []
    for v in values:
        v = str(v).strip().lower()
        if v == "current":
            out.append(v)
            continue
        parts = v.split(".")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"compute capability must look like 8.6 (major.minor) or 'current', got {v!r}")
        out.append(f"{int(parts[0])}.{int(parts[1])}")
    if not out:
        raise ValueError("--compute-capability needs at least one value, e.g. 8.6,8.9")
    return out


def _check_batch(batch: Sequence[int] | str) -> list[int]:
    if isinstance(batch, str):
        try:
            batch = [int(b) for b in batch.split(",") if b.strip()]
        except ValueError:
            raise ValueError(f"--batch takes comma-separated positive ints like 1,2,4,8,16, got {batch!r}") from None
    b = [int(x) for x in batch]
    if not b or any(x < 1 for x in b) or sorted(set(b)) != b:
        raise ValueError(f"batch buckets must be distinct positive ints in increasing order, got {list(batch)}")
    return b


def _onnx_symbols(path: Path) -> tuple[dict[str, list], dict[str, list], dict[str, str]]:
    """The ONNX graph's inputs/outputs as name -> [dim symbol or int], and name -> ONNX element type name."""
    import onnx  # the export extra: imported here so that this module (its constants, checks) imports without it

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}

    def dims(vi):
        return [d.dim_param if d.dim_param else int(d.dim_value) for d in vi.type.tensor_type.shape.dim]

    types = {}
    ins = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        ins[vi.name] = dims(vi)
        types[vi.name] = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name
    outs = {}
    for vi in model.graph.output:
        outs[vi.name] = dims(vi)
        types[vi.name] = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name
    return ins, outs, types


def _ranges(graph: str, symbols: set[str], bucket: int, prev: int, max_seq: dict[str, int]) -> dict[str, list[int]]:
    table = PROFILES[graph]
    out = {}
    for sym in sorted(symbols):
        if sym not in table:
            raise PlanBuildError(f"graph {graph!r} has a dynamic axis {sym!r} that export/trt_build.py PROFILES does "
                                 f"not describe; add {sym!r}: <rule> to PROFILES[{graph!r}]")
        rule = table[sym]
        if rule == "batch":
            out[sym] = [prev + 1, bucket, bucket]
        elif rule in ("kv", "prior_kv", "prefix"):
            hi = max_seq["prior" if rule == "prior_kv" else "gen"]
            out[sym] = [1, max(1, hi // 2), hi]
        elif isinstance(rule, tuple | list) and len(rule) == 3:
            out[sym] = [int(r) for r in rule]
        else:
            raise PlanBuildError(f"PROFILES[{graph!r}][{sym!r}] = {rule!r} is not a known rule")
    return out


def _network_io(trt, net, symbols: dict[str, list]) -> tuple[list[dict], list[dict]]:
    """The built network's I/O (name, dtype, shape), dynamic dims named by the ONNX graph's symbols."""
    def entry(t):
        onnx_dims = symbols.get(t.name, [])
        shape = []
        for j, d in enumerate(t.shape):
            if d == -1:
                shape.append(onnx_dims[j] if j < len(onnx_dims) and isinstance(onnx_dims[j], str) else -1)
            else:
                shape.append(int(d))
        return {"name": t.name, "dtype": _NP_DTYPES.get(t.dtype.name, t.dtype.name.lower()), "shape": shape}

    ins = [entry(net.get_input(i)) for i in range(net.num_inputs)]
    outs = [entry(net.get_output(i)) for i in range(net.num_outputs)]
    return ins, outs


def _no_float64(trt, net, graph: str) -> None:
    double = getattr(trt.DataType, "DOUBLE", None)
    if double is None:
        return  # this TensorRT has no float64 type at all
    for i in range(net.num_layers):
        layer = net.get_layer(i)
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype == double:
                raise PlanBuildError(f"graph {graph!r}: layer {layer.name!r} computes in float64; plans hold no "
                                     "float64 (re-export the graph without double-precision ops)")


class _Logger:
    """Collects the builder's errors for the exception message (TensorRT's own logger prints everything)."""

    def __init__(self, trt):
        self.trt = trt
        self.errors: list[str] = []

        class L(trt.ILogger):
            def __init__(inner):
                trt.ILogger.__init__(inner)

            def log(inner, severity, msg):
                if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                    self.errors.append(str(msg))

        self.logger = L()


def _build_one(trt, flavour: str, graph: str, onnx_path: Path, buckets: list[int], max_seq: dict[str, int],
               cc: list[str] | None, strip: bool, timing_cache: Path | None, info) -> tuple[bytes, dict]:
    lg = _Logger(trt)
    builder = trt.Builder(lg.logger)
    net = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(net, lg.logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors)) or "; ".join(lg.errors)
        raise PlanBuildError(f"TensorRT's ONNX parser rejected {onnx_path.name} ({graph}): {errs}")
    _no_float64(trt, net, graph)
    sym_in, sym_out, _ = _onnx_symbols(onnx_path)
    inputs, outputs = _network_io(trt, net, {**sym_in, **sym_out})
    _same_io(graph, info, inputs, outputs)
    config = builder.create_builder_config()
    profiles = []
    symbols = {d for i in inputs for d in i["shape"] if isinstance(d, str)}
    prev = 0
    for b in buckets:
        ranges = _ranges(graph, symbols, b, prev, max_seq)
        prof = builder.create_optimization_profile()
        for i in inputs:
            shp = [[ranges[d][k] if isinstance(d, str) else d for d in i["shape"]] for k in range(3)]
            prof.set_shape(i["name"], *shp)
        config.add_optimization_profile(prof)
        profiles.append(ranges)
        prev = b
    targets: list[str]
    if flavour == "rtx":
        if cc:
            config.num_compute_capabilities = len(cc)
            for k, c in enumerate(cc):
                name = "CURRENT" if c == "current" else "SM" + c.replace(".", "")
                if not hasattr(trt.ComputeCapability, name):
                    have = [m[2:-1] + "." + m[-1] for m in trt.ComputeCapability.__members__ if m.startswith("SM")]
                    raise ValueError(f"TensorRT-RTX {trt_version(trt)} cannot target compute capability {c} "
                                     f"(it targets {', '.join(have)})")
                config.set_compute_capability(getattr(trt.ComputeCapability, name), k)
            targets = cc
        else:
            targets = list(RTX_DEFAULT_CC)
    else:
        here = gpu_compute_capability()
        if cc and here not in cc:
            raise ValueError(f"datacenter TensorRT builds for the GPU it runs on (compute capability {here}); "
                             f"--compute-capability {','.join(cc)} cannot be built here")
        targets = [here]
        if timing_cache is not None:
            blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
            config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False)
    if strip:  # refitted at load with the same weights: TensorRT-RTX documents STRIP_PLAN + REFIT; datacenter
        # TensorRT recommends REFIT_IDENTICAL for identical weights (its REFIT may drop a GEMM bias, 11.3 notes)
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        config.set_flag(trt.BuilderFlag.REFIT if flavour == "rtx" else trt.BuilderFlag.REFIT_IDENTICAL)
    plan = builder.build_serialized_network(net, config)
    if plan is None:
        why = "; ".join(lg.errors) or "no message"
        hint = ""
        if strip and flavour == "rtx" and "CUDA" in why:
            hint = (" (TensorRT-RTX's CPU-only builder needs a GPU for refittable/weight-stripped engines: build "
                    "with --strip-weights on a machine with an NVIDIA GPU, or without --strip-weights here)")
        raise PlanBuildError(f"TensorRT could not build {graph}: {why}{hint}")
    if flavour == "tensorrt" and timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    entry = {"inputs": inputs, "outputs": outputs, "profiles": profiles, "compute_capabilities": targets}
    return bytes(plan), entry


def _same_io(graph: str, info, inputs: list[dict], outputs: list[dict]) -> None:
    """The network TensorRT parsed must expose the bundle graph's I/O exactly (names, dtypes, shapes)."""
    def norm(lst):  # TensorRT's parsed I/O (dicts) and the manifest's (TensorSpecs) as comparable tuples
        dicts = [d.to_dict() if isinstance(d, TensorSpec) else d for d in lst]
        return [(d["name"], d["dtype"], [str(x) if isinstance(x, str) else int(x) for x in d["shape"]]) for d in dicts]

    if norm(inputs) != norm(info.inputs) or norm(outputs) != norm(info.outputs):
        raise PlanBuildError(f"graph {graph!r}: TensorRT's network I/O {norm(inputs)} -> {norm(outputs)} differs from "
                             f"the manifest's {norm(info.inputs)} -> {norm(info.outputs)}; re-export the bundle")


def gpu_compute_capability(device: int = 0) -> str:
    """This machine's GPU compute capability ("8.6"), probed in a subprocess (see backends/tensorrt/device.py)."""
    gpus, why = trt_backend.probe_gpus()
    if not gpus:
        raise RuntimeError(f"datacenter TensorRT builds on the GPU it targets, and this machine has none usable "
                           f"({why}); use --trt rtx (TensorRT-RTX builds ahead of time without a GPU)")
    return gpus[min(device, len(gpus) - 1)]["cc"]


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build_plans(
    bundle_dir: str | os.PathLike,
    *,
    trt: str = "auto",
    precision: str | None = None,
    batch: Sequence[int] | str = DEFAULT_BATCH,
    max_seq: int | None = None,
    compute_capability: Sequence[str] | str | None = None,
    strip_weights: bool = False,
    graphs: Sequence[str] | None = None,
    printer: Callable[[str], None] = print,
) -> dict[str, dict]:
    """Build a TensorRT plan for every graph of the bundle that ``PROFILES`` lists (or ``graphs``), write them into
    ``BUNDLE/plans/`` and record them in the manifest's ``plans`` section (replacing earlier plans). Returns the
    new ``plans`` entries. Any failure raises and leaves the bundle unchanged."""
    bundle = Bundle(bundle_dir, verify=True, verify_plans=False)  # damaged or missing plans are what it replaces
    flavour = _resolve_flavour(trt)
    buckets = _check_batch(batch)
    cc = _parse_cc(compute_capability)
    _check_precision(precision, bundle)
    seq = _kv_lengths(bundle, max_seq)
    names = _plan_graphs(bundle, graphs, printer)
    trtmod = import_trt(flavour)
    version = trt_version(trtmod)
    root = bundle.path
    plans_dir = root / "plans"
    stage = Path(tempfile.mkdtemp(prefix=".plans.tmp-", dir=root))
    moved: list[Path] = []
    made_dir = not plans_dir.exists()
    old_plans = {n: e.to_dict() for n, e in bundle.plans.items()}  # as recorded: the manifest is rewritten below
    timing_stage = stage / "timing.cache" if flavour == "tensorrt" else None
    if timing_stage is not None and (root / TIMING_CACHE).is_file():
        shutil.copyfile(root / TIMING_CACHE, timing_stage)
    printer(f"building {len(names)} plan(s) with {FLAVOURS[flavour][1]} {version} ({bundle.precision}, batch "
            f"buckets {','.join(map(str, buckets))}, KV length 1..{seq['gen']}"
            + (", weight-stripped" if strip_weights else "") + ")")
    try:
        t_all = time.perf_counter()
        entries = {name: _build_plan(bundle, trtmod, flavour, version, name, buckets, seq, cc, strip_weights,
                                     timing_stage, stage, printer) for name in names}
        _install(root, entries, old_plans, stage, timing_stage, moved, flavour, version, buckets, seq)
    except BaseException:
        for p in moved:
            p.unlink(missing_ok=True)
        if made_dir and plans_dir.is_dir() and not any(plans_dir.iterdir()):
            plans_dir.rmdir()
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(stage, ignore_errors=True)
    _retire(root, entries, old_plans, timing_stage)
    total = sum(e["size"] for e in entries.values())
    printer(f"{len(entries)} plan(s), {total / 1e6:.2f} MB, in {time.perf_counter() - t_all:.1f} s -> {plans_dir}")
    return entries


def _check_precision(precision: str | None, bundle: Bundle) -> None:
    """Plans keep the bundle's types: ``precision`` must be None or the bundle's."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision is not None and precision != bundle.precision:
        raise ValueError(
            f"plans are strongly typed networks: every tensor keeps the ONNX graph's type, and this bundle's graphs "
            f"are {bundle.precision}. For {precision} plans export a {precision} bundle (`larp-rt export --precision "
            f"{precision} ...`; bf16 export is not available yet), or omit --precision")


def _kv_lengths(bundle: Bundle, max_seq: int | None) -> dict[str, int]:
    """The KV lengths the plans' profiles cover: {"gen": generator, "prior": prior}; ValueError for a bundle whose
    decode graphs TensorRT cannot parse or a ``max_seq`` outside what a generation needs and the cache holds."""
    kv = bundle.kv_cache_spec
    if kv is not None and kv.attention == "larp_rt::DecodeAttention":
        raise ValueError(f"this bundle's decode graphs read a {kv.dtype} KV cache through the custom op "
                         "larp_rt::DecodeAttention (ONNX Runtime CPU), which TensorRT cannot parse: build plans from "
                         "a bundle exported without --kv-dtype (fp16 plans keep an fp16 cache)")
    gen_max = kv.max_seq if kv is not None else 0
    prior = bundle.prior_spec
    prior_max = prior.kv_cache.max_seq if prior is not None else 0
    if max_seq is not None:
        if not isinstance(max_seq, int) or max_seq < 1:
            raise ValueError(f"max_seq must be a positive int, got {max_seq!r}")
        if gen_max and max_seq > gen_max:
            raise ValueError(f"max_seq {max_seq} exceeds the bundle's KV cache of {gen_max} slots (its graphs' "
                             f"positions end there)")
        need = bundle.generator_config.num_positions if bundle.generator_config else 0
        if need and max_seq < need:
            raise ValueError(f"max_seq {max_seq} is below the {need} positions a generation needs "
                             f"(cls tokens + {bundle.generator_config.max_seq_len} video tokens)")
    return {"gen": max_seq or gen_max or 1, "prior": prior_max or 1}


def _plan_graphs(bundle: Bundle, graphs: Sequence[str] | None, printer: Callable[[str], None]) -> list[str]:
    """The graphs to build plans for: ``graphs``, or every graph of the bundle with a plan (``PROFILES``)."""
    if graphs is None:
        names = []
        for name in bundle.graphs:
            if name in PLAN_EXCLUDED:
                continue
            if name not in PROFILES:
                raise PlanBuildError(f"graph {name!r} has no entry in export/trt_build.py PROFILES (its dynamic axes' "
                                     "ranges); add one to build its plan")
            names.append(name)
    else:
        names = list(graphs)
        for n in names:
            if n in PLAN_EXCLUDED:
                raise ValueError(f"graph {n!r} stays ONNX-only: {PLAN_EXCLUDED[n]}")
            bundle.graph(n)
            if n not in PROFILES:
                raise PlanBuildError(f"graph {n!r} has no entry in export/trt_build.py PROFILES")
    if bundle.tokenizer_precision == "int8" and {"encoder", "decoder"} & set(names):  # export/quantize_tokenizer.py
        why = ("the int8 tokenizer's graphs (MatMulInteger, com.microsoft::MultiHeadAttention) are ONNX Runtime CPU "
               "graphs TensorRT does not parse; export the tokenizer as fp32/fp16 for its plans")
        if graphs is not None:
            raise ValueError(why)
        printer(f"skipping encoder/decoder: {why}")
        names = [n for n in names if n not in ("encoder", "decoder")]
    if not names:
        raise PlanBuildError(f"bundle {str(bundle.path)!r} has no graph to build a plan for")
    return names


def _build_plan(bundle: Bundle, trtmod, flavour: str, version: str, name: str, buckets: list[int],
                seq: dict[str, int], cc: list[str] | None, strip_weights: bool, timing_stage: Path | None,
                stage: Path, printer: Callable[[str], None]) -> dict[str, Any]:
    """Build graph ``name``'s plan into ``stage`` under its final name; returns its ``plans`` entry."""
    root = bundle.path
    info = bundle.graph(name)
    onnx_path = bundle.graph_path(name)
    t0 = time.perf_counter()
    plan, entry = _build_one(trtmod, flavour, name, onnx_path, buckets, seq, cc, strip_weights, timing_stage, info)
    dt = time.perf_counter() - t0
    digest = hashlib.sha256(plan).hexdigest()
    rel = f"plans/{name}-{digest[:12]}.plan"
    (stage / Path(rel).name).write_bytes(plan)
    weight_files = info.files
    weight_bytes = sum((root / f).stat().st_size for f in weight_files)
    printer(f"  {name:<12} {dt:7.2f} s  {len(plan) / 1e6:9.2f} MB  ({len(buckets)} profiles) -> {rel}")
    return {
        "file": rel, "sha256": digest, "size": len(plan),
        "onnx": info.file, "onnx_sha256": sha256_file(onnx_path),
        "onnx_data": list(info.data or []),
        "flavour": FLAVOURS[flavour][1], "version": version,
        "compute_capabilities": entry["compute_capabilities"], "precision": bundle.precision,
        "strongly_typed": True, "weights": "stripped" if strip_weights else "embedded",
        "buckets": buckets, "profiles": entry["profiles"],
        "inputs": entry["inputs"], "outputs": entry["outputs"],
        "build_seconds": round(dt, 3), "onnx_bytes": weight_bytes,
    }


def _install(root: Path, entries: dict[str, dict], old_plans: dict[str, dict], stage: Path,
             timing_stage: Path | None, moved: list[Path], flavour: str, version: str, buckets: list[int],
             seq: dict[str, int]) -> None:
    """Every plan built: move them in under their new names (each into ``moved``, for the caller's rollback), then
    swap the manifest (one atomic write)."""
    (root / "plans").mkdir(exist_ok=True)
    for e in entries.values():
        dst = root / e["file"]
        os.replace(stage / Path(e["file"]).name, dst)
        moved.append(dst)
    m = json.loads((root / MANIFEST).read_text())
    files = dict(m.get("files") or {})
    for e in old_plans.values():
        files.pop(e.get("file"), None)
    for e in entries.values():
        files[e["file"]] = e["sha256"]
    if timing_stage is not None and timing_stage.is_file():
        dst = root / (TIMING_CACHE + f".{os.getpid()}")
        os.replace(timing_stage, dst)
        moved.append(dst)
    m["files"] = files
    m["plans"] = entries
    m["tensorrt"] = {"flavour": FLAVOURS[flavour][1], "version": version, "buckets": buckets,
                     "max_seq": seq["gen"], "built_by": __version__,
                     "compute_capabilities": next(iter(entries.values()))["compute_capabilities"],
                     "timing_cache": TIMING_CACHE if timing_stage is not None else None}
    _atomic_write(root / MANIFEST, json.dumps(m, indent=2) + "\n")


def _retire(root: Path, entries: dict[str, dict], old_plans: dict[str, dict], timing_stage: Path | None) -> None:
    """The new manifest is in place: retire what it no longer names, and check that the bundle reads back."""
    if timing_stage is not None:
        os.replace(root / (TIMING_CACHE + f".{os.getpid()}"), root / TIMING_CACHE)
    keep = {e["file"] for e in entries.values()}
    for e in old_plans.values():
        f = e.get("file")
        if f and f not in keep:
            (root / f).unlink(missing_ok=True)
    try:
        Bundle(root, verify=True)
    except BundleError as e:  # cannot happen unless something else writes the bundle meanwhile
        raise PlanBuildError(f"the bundle does not read back after writing its plans: {e}") from e
