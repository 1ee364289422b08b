"""Bundles: one self-describing directory per deployable (``manifest.json`` + ONNX graphs [+ checkpoints]).

Reading a bundle validates everything up front — the format version, the configs, every file's presence and
sha256, the graphs' I/O names — and fails with a message saying what to do (re-export, upgrade larp_rt).
Writing goes to a temporary sibling directory that is renamed into place only when complete, so a failed
export never leaves a partial bundle. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .config import GeneratorConfig, TokenizerConfig
from .manifest import (
    BUILD_FIX,
    BundleError,
    GeneratorSpec,
    GraphInfo,
    GraphSpec,
    KVCacheSpec,
    ManifestSpec,
    PlanEntry,
    PlanError,
    PriorSpec,
    SamplerSpec,
    TensorRTSpec,
    TensorSpec,
    TokenizerSpec,
)

__all__ = ["BundleError", "PlanError", "Bundle", "BundleWriter", "sha256_file", "FORMAT", "FORMAT_VERSION",
           "build_command", "export_command", "plan_files", "read_manifest", "MANIFEST", "GraphInfo", "GraphSpec"]

FORMAT = "larp_rt.bundle"
# 2: the decode step takes a position per row (``pos`` (B,)) and the fused graph ``sample_rows`` + per-request steps
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
GRAPHS = ("encoder", "decoder", "prefill", "decode", "sample", "decode_sample", "prior", "prior_score",
          "prefix_prefill", "prior_fused")  # prefix_prefill: frame prediction's multi-token prefill (optional);
# prior_fused: the prior's step with larp_rt::DecodeAttention (optional; prior.onnx is its fallback)


TRT_FLAGS = {"tensorrt-rtx": "rtx", "tensorrt": "tensorrt"}  # a plan's recorded flavour -> `larp-rt build --trt`


def build_command(path: str | os.PathLike, manifest: dict[str, Any], entry: PlanEntry | dict[str, Any] | None = None,
                  *, flavour: str | None = None, cc: str | None = None) -> str:
    """The ``larp-rt build`` command that rebuilds the bundle's plans with the options the manifest recorded
    (builder, batch buckets, TensorRT-RTX targets, KV length, weight stripping). ``entry``: the plan entry to
    reproduce (default: the first one); ``flavour``: another builder (its recorded targets are then left out);
    ``cc``: target this compute capability instead of the recorded ones. One build makes every plan of the
    bundle, so the command rebuilds them all. Reads the raw manifest on purpose (as ``export_command`` and
    ``plan_files`` do): it names the fix for manifests too damaged for ``ManifestSpec`` to read."""
    if isinstance(entry, PlanEntry):
        entry = entry.to_dict()
    trt = manifest.get("tensorrt") or {}
    e = entry if entry is not None else next(iter((manifest.get("plans") or {}).values()), {})
    recorded = e.get("flavour") or trt.get("flavour")
    fl = flavour or recorded
    cmd = f"larp-rt build {path} --trt {TRT_FLAGS.get(fl, 'auto')}"
    buckets = e.get("buckets") or trt.get("buckets")
    if buckets:
        cmd += " --batch " + ",".join(map(str, buckets))
    targets = [cc] if cc else (e.get("compute_capabilities") if fl == recorded == "tensorrt-rtx" else None)
    if targets:  # datacenter TensorRT targets the GPU it builds on: nothing to repeat
        cmd += " --compute-capability " + ",".join(map(str, targets))
    kv_max = ((manifest.get("generator") or {}).get("kv_cache") or {}).get("max_seq")
    if trt.get("max_seq") and kv_max and trt["max_seq"] != kv_max:
        cmd += f" --max-seq {trt['max_seq']}"
    if e.get("weights") == "stripped":
        cmd += " --strip-weights"
    return cmd


def export_command(path: str | os.PathLike, manifest: dict[str, Any]) -> str:
    """The ``larp-rt export`` command that rewrites the bundle with the options its manifest recorded (precision,
    tokenizer precision, KV-cache type, opset, fused sampler, checkpoints or not). The manifest does not record
    the checkpoint folders it was exported from: TOKENIZER_DIR / GENERATOR_DIR stand for them."""
    cmd = f"larp-rt export {path} --force"
    tok, gen = manifest.get("tokenizer"), manifest.get("generator")
    if tok:
        cmd += " --tokenizer TOKENIZER_DIR"
    if gen:
        cmd += " --generator GENERATOR_DIR"
    cmd += f" --precision {manifest.get('precision', 'fp32')}"
    if isinstance(tok, dict) and tok.get("precision"):
        cmd += f" --tokenizer-precision {tok['precision']}"
    kv = (gen.get("kv_cache") or {}) if isinstance(gen, dict) else {}
    if kv.get("dtype"):
        cmd += f" --kv-dtype {kv['dtype']}"
    opset = (manifest.get("created_by") or {}).get("opset")
    if opset:
        cmd += f" --opset {opset}"
    if gen:
        cmd += " --fused-sampler" if (manifest.get("sampler") or {}).get("fused") else " --no-fused-sampler"
    if not manifest.get("checkpoints"):
        cmd += " --onnx-only"
    return cmd


def plan_files(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest's plan files (relative path -> plan entry)."""
    return {e["file"]: e for e in (manifest.get("plans") or {}).values() if isinstance(e, dict) and "file" in e}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """A bundle directory's ``manifest.json`` as a dict, checked only for being a larp_rt bundle manifest (``Bundle``
    validates the rest)."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"bundle {str(path)!r} does not exist or is not a directory; "
                          "create one with `larp-rt export`")
    mpath = path / MANIFEST
    try:
        m = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise BundleError(
            f"{str(mpath)!r} is missing: not a larp_rt bundle (create one with `larp-rt export`)"
        ) from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{str(mpath)!r} is not valid JSON ({e}); re-export the bundle") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BundleError(f"{str(mpath)!r} is not a larp_rt bundle manifest (format != {FORMAT!r}); re-export")
    return m


class Bundle:
    """A validated bundle directory (read-only)."""

    def __init__(self, path: str | os.PathLike, *, verify: bool = True, verify_plans: bool = True):
        """``verify``: check every file's sha256 (``verify_plans=False``: all but the TensorRT plans', for
        ``larp-rt build``, which replaces them)."""
        self.path = Path(path)
        self.manifest: dict[str, Any] = read_manifest(self.path)
        m = self.manifest
        mpath = self.path / MANIFEST
        version = m.get("format_version")
        if version != FORMAT_VERSION:
            if isinstance(version, int) and not isinstance(version, bool) and version < FORMAT_VERSION:
                raise BundleError(
                    f"{str(mpath)!r} has bundle format_version {version}, older than this larp_rt's {FORMAT_VERSION} "
                    "(its decode graphs take one position for the whole batch; this runtime needs one per row): "
                    "re-export it with `larp-rt export` from the same checkpoints"
                )
            raise BundleError(
                f"{str(mpath)!r} has bundle format_version {version!r}; this larp_rt reads version "
                f"{FORMAT_VERSION}: upgrade larp_rt or re-export the bundle with this version"
            )
        self.spec: ManifestSpec = self._parse(m)
        self.tokenizer_config: TokenizerConfig | None = self.spec.tokenizer.model if self.spec.tokenizer else None
        self.generator_config: GeneratorConfig | None = self.spec.generator.model if self.spec.generator else None
        if self.tokenizer_config is None and self.generator_config is None:
            raise BundleError(f"{str(mpath)!r} holds neither a tokenizer nor a generator")
        self.graphs: dict[str, GraphSpec] = dict(self.spec.graphs)
        for name in self.graphs:
            if name not in GRAPHS:
                raise BundleError(f"{str(mpath)!r}: unknown graph {name!r} (known: {', '.join(GRAPHS)})")
        self.files: dict[str, str] = dict(self.spec.files or {})
        for rel in self.files:
            p = (self.path / rel).resolve()
            if self.path.resolve() not in p.parents:
                raise BundleError(f"{str(mpath)!r}: file {rel!r} points outside the bundle")
        if verify:
            self.verify(plans=verify_plans)
        why = check_graph_precision(self)
        if why is not None:
            raise BundleError(f"{str(mpath)!r}: {why}; re-export the bundle "
                              "(larp-rt export --precision ... --kv-dtype ...)")
        why = check_prior(self)
        if why is not None:
            raise BundleError(f"{str(mpath)!r}: {why}; re-export the bundle (larp-rt export --tokenizer DIR)")

    def _parse(self, m: dict[str, Any]) -> ManifestSpec:
        """The manifest's typed parts; a malformed entry raises here, at load, naming its key and the fix (a plan's:
        PlanError with the ``larp-rt build`` command)."""
        try:
            return ManifestSpec.from_dict(m, "")
        except PlanError as e:
            why = str(e).replace(BUILD_FIX, f"rebuild the plans with `{build_command(self.path, m)}`")
            raise PlanError(f"{str(self.path / MANIFEST)!r}: {why}") from None
        except BundleError as e:
            raise BundleError(f"{str(self.path / MANIFEST)!r}: {e}") from None

    def verify(self, *, plans: bool = True) -> None:
        """Check every listed file (``plans=False``: but the TensorRT plans) exists and has its recorded sha256. A
        plan's failure (PlanError) names the ``larp-rt build`` command that rebuilds it, any other file's the
        ``larp-rt export`` one."""
        plan_entries = {e.file: e for e in self.plans.values()}
        for rel, digest in self.files.items():
            p = self.path / rel
            if rel in plan_entries:
                if not plans:
                    continue
                rebuild = build_command(self.path, self.manifest, plan_entries[rel])
                if not p.is_file():
                    raise PlanError(f"plan {str(p)!r} is missing; rebuild the plans with `{rebuild}`")
                if sha256_file(p) != digest:
                    raise PlanError(f"plan {str(p)!r} was altered (sha256 mismatch with manifest.json); rebuild the "
                                    f"plans with `{rebuild}`")
                continue
            if not p.is_file():
                raise BundleError(f"bundle file {str(p)!r} is missing; re-export the bundle "
                                  f"(`{export_command(self.path, self.manifest)}`)")
            if sha256_file(p) != digest:
                raise BundleError(
                    f"bundle file {str(p)!r} was altered (sha256 mismatch with manifest.json); re-export the bundle "
                    f"(`{export_command(self.path, self.manifest)}`)"
                )

    # ------------------------------------------------------------------------------------------
    @property
    def precision(self) -> str:
        return self.spec.precision or "fp32"

    @property
    def tokenizer_spec(self) -> TokenizerSpec | None:
        """The manifest's ``tokenizer`` entry (config, codebook, prior, precision), None without a tokenizer."""
        return self.spec.tokenizer

    def load_codebook(self) -> np.ndarray:
        """The tokenizer's normalised codebook (K, d) float32 from ``codebook.npy``: what the stochastic SVQ draw
        of ``Backend.encode_latents`` needs. ValueError for a bundle exported before larp_rt wrote it."""
        rel = self.spec.tokenizer.codebook if self.spec.tokenizer is not None else None
        if rel is None:
            raise ValueError(f"bundle {str(self.path)!r} has no codebook.npy (exported before larp_rt wrote "
                             "one): re-export the tokenizer for stochastic_cond, or use the deterministic encoder")
        return np.load(self.path / rel)

    @property
    def generator_spec(self) -> GeneratorSpec | None:
        """The manifest's ``generator`` entry (config, KV cache, prefill), None without a generator."""
        return self.spec.generator

    @property
    def kv_cache_spec(self) -> KVCacheSpec | None:
        """The generator's KV cache, None without a generator."""
        return self.spec.generator.kv_cache if self.spec.generator else None

    @property
    def prior_spec(self) -> PriorSpec | None:
        """The tokenizer's AR prior (graphs, KV-cache geometry), None when the bundle has none."""
        return self.spec.tokenizer.prior if self.spec.tokenizer else None

    @property
    def sampler(self) -> SamplerSpec | None:
        """The sampler graphs (standard, fused decode+sample), None without a generator."""
        return self.spec.sampler

    @property
    def plans(self) -> dict[str, PlanEntry]:
        """The TensorRT plans (graph name -> entry); empty before ``larp-rt build``."""
        return dict(self.spec.plans or {})

    @property
    def tensorrt(self) -> TensorRTSpec | None:
        """The options of the ``larp-rt build`` that made the plans, None before one."""
        return self.spec.tensorrt

    @property
    def tokenizer_precision(self) -> str | None:
        """The tokenizer graphs' precision ("fp32" | "fp16" | "int8"), None without a tokenizer."""
        tok = self.spec.tokenizer
        if tok is None:
            return None
        return tok.precision or ("fp16" if self.precision == "fp16" else "fp32")

    @property
    def default_sampling(self) -> dict[str, Any]:
        return dict(self.spec.default_sampling or {})

    def graph(self, name: str) -> GraphSpec:
        if name not in self.graphs:
            raise BundleError(
                f"bundle {str(self.path)!r} has no {name!r} graph (it has: {', '.join(self.graphs) or 'none'}); "
                "export it with the matching --tokenizer/--generator"
            )
        return self.graphs[name]

    def graph_path(self, name: str) -> Path:
        return self.path / self.graph(name).file

    def checkpoint_dir(self, kind: str) -> Path | None:
        rel = (self.spec.checkpoints or {}).get(kind)
        return None if rel is None else self.path / rel


PRECISIONS = ("fp32", "fp16", "int8", "int4")  # int8/int4: weight-only MatMulNBits generator (export/quantize.py)
_NBITS = {"int8": 8, "int4": 4}


def check_graph_precision(bundle: Bundle) -> str | None:
    """None when the generator graphs hold the weights the manifest's ``precision`` claims, else what is wrong:
    int8/int4 bundles must have com.microsoft MatMulNBits nodes of that many bits, other bundles none. Reads the
    graphs with ``onnx`` when installed (op types, the ``bits`` attribute), else scans the files for the op name."""
    precision = bundle.precision
    if precision not in PRECISIONS:
        return f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})"
    want = _NBITS.get(precision)
    for name in ("decode", "decode_sample"):
        info = bundle.graphs.get(name)
        if info is None:
            continue
        path = bundle.path / info.file
        if not path.is_file():
            continue  # verify() names missing files
        try:
            import onnx
        except ImportError:
            has = b"MatMulNBits" in path.read_bytes()
            if (want is not None) != has:
                return (f"the manifest claims precision {precision!r} but {info.file} "
                        + ("has no MatMulNBits node" if want else "holds MatMulNBits (quantized) weights"))
            continue
        graph = onnx.load(str(path), load_external_data=False).graph
        if (why := _check_kv_graph(bundle, info.file, graph)) is not None:
            return why
        bits = [next((a.i for a in n.attribute if a.name == "bits"), None) for n in graph.node
                if n.op_type == "MatMulNBits"]
        if want is None and bits:
            return (f"the manifest claims precision {precision!r} but {info.file} holds {len(bits)} MatMulNBits "
                    f"({sorted(set(bits))}-bit quantized) weight nodes")
        if want is not None:
            if not bits:
                return f"the manifest claims precision {precision!r} but {info.file} has no MatMulNBits node"
            if set(bits) != {want}:
                return (f"the manifest claims precision {precision!r} ({want}-bit) but {info.file}'s MatMulNBits "
                        f"nodes are {sorted(set(bits))}-bit")
    return check_tokenizer_precision(bundle)


TOKENIZER_PRECISIONS = ("fp32", "fp16", "int8")  # int8: quantize_dynamic MatMulInteger (export/quantize_tokenizer.py)
_TOKENIZER_INT8_OPS = ("MatMulInteger", "DynamicQuantizeMatMul")


def check_tokenizer_precision(bundle: Bundle) -> str | None:
    """None when encoder.onnx / decoder.onnx hold what the tokenizer entry's ``precision`` claims (absent: the
    bundle's float precision), else what is wrong: int8 graphs must have int8 MatMuls (MatMulInteger), float ones
    none (and no MatMulNBits). Reads the graphs with ``onnx`` when installed, else scans the files for the op names."""
    claim = bundle.tokenizer_precision
    if claim is None:
        return None
    if claim not in TOKENIZER_PRECISIONS:
        return f"unknown tokenizer precision {claim!r} (known: {', '.join(TOKENIZER_PRECISIONS)})"
    want_int8 = claim == "int8"
    for name in ("encoder", "decoder"):
        info = bundle.graphs.get(name)
        if info is None or not (bundle.path / info.file).is_file():
            continue  # verify() names missing files
        path = bundle.path / info.file
        try:
            import onnx
        except ImportError:
            raw = path.read_bytes()
            n_int8 = sum(raw.count(op.encode()) for op in _TOKENIZER_INT8_OPS)
            n_nbits = raw.count(b"MatMulNBits")
        else:
            ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
            n_int8 = sum(op in _TOKENIZER_INT8_OPS for op in ops)
            n_nbits = ops.count("MatMulNBits")
        if want_int8 and not n_int8:
            return f"the manifest claims tokenizer precision 'int8' but {info.file} has no int8 (MatMulInteger) MatMul"
        if not want_int8 and (n_int8 or n_nbits):
            return (f"the manifest claims tokenizer precision {claim!r} but {info.file} holds {n_int8 + n_nbits} "
                    "quantized (int8) MatMul nodes")
    return None


PRIOR_FUSED_ATTENTION = "larp_rt::DecodeAttention"  # the op a prior entry's ``fused_graph`` reads its cache with


def check_prior(bundle: Bundle) -> str | None:
    """None when the prior entry's optional ``fused_graph`` (the step with larp_rt::DecodeAttention) is consistent,
    else what is wrong: it and the step ``graph`` are graphs of the bundle with the same inputs and outputs,
    ``fused_attention`` is larp_rt::DecodeAttention and (with ``onnx`` installed) the graph has such a node.
    Entries without ``fused_graph`` (older bundles, fp16 priors, exports without the kernels) are valid."""
    prior = bundle.prior_spec
    if prior is None or prior.fused_graph is None:
        return None
    fused = prior.fused_graph
    if prior.graph not in bundle.graphs:
        return f"the prior entry names a fused_graph but its step graph {prior.graph!r} is not in the bundle"
    if not isinstance(fused, str) or fused not in bundle.graphs:
        return f"the prior entry's fused_graph {fused!r} is not a graph of the bundle"
    if prior.fused_attention != PRIOR_FUSED_ATTENTION:
        return (f"the prior entry's fused_attention is {prior.fused_attention!r}; this larp_rt runs "
                f"{PRIOR_FUSED_ATTENTION!r}")
    step, info = bundle.graphs[prior.graph], bundle.graphs[fused]
    if info.inputs != step.inputs or info.outputs != step.outputs:
        return f"the prior's fused step graph {info.file} has other inputs/outputs than {step.file}"
    path = bundle.path / info.file
    if not path.is_file():
        return None  # verify() names missing files
    try:
        import onnx
    except ImportError:
        has = b"DecodeAttention" in path.read_bytes()
    else:
        has = any(n.op_type == "DecodeAttention" and n.domain == "larp_rt"
                  for n in onnx.load(str(path), load_external_data=False).graph.node)
    if not has:
        return f"the prior entry says {info.file} reads its cache with {PRIOR_FUSED_ATTENTION}, but it has no such node"
    return None


_KV_ONNX_TYPES = {"fp32": 1, "fp16": 10, "int8": 3}  # onnx.TensorProto FLOAT, FLOAT16, INT8


def _check_kv_graph(bundle: Bundle, file: str, graph) -> str | None:
    """None when a decode graph's cache inputs have the manifest's ``kv_cache.dtype`` (int8: with their
    ``past_*_scale_*`` inputs; a narrow cache under float32 activations: read by larp_rt::DecodeAttention)."""
    kv = bundle.kv_cache_spec or KVCacheSpec()
    claim = kv.dtype_or(bundle.precision)
    if claim not in _KV_ONNX_TYPES:
        return f"unknown kv_cache dtype {claim!r} (known: {', '.join(_KV_ONNX_TYPES)})"
    inputs = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    have = inputs.get("past_k_0")
    if have is None:
        return None  # not a cache-reading graph
    if have != _KV_ONNX_TYPES[claim]:
        names = {v: k for k, v in _KV_ONNX_TYPES.items()}
        return (f"the manifest claims a {claim} KV cache but {file} reads a "
                f"{names.get(have, f'onnx type {have}')} cache")
    if (claim == "int8") != ("past_k_scale_0" in inputs):
        return (f"the manifest claims a {claim} KV cache but {file} "
                + ("has no per-slot scale inputs (past_k_scale_0, ...)" if claim == "int8" else
                   "has int8 scale inputs"))
    if kv.attention == "larp_rt::DecodeAttention" and not any(
            n.op_type == "DecodeAttention" and n.domain == "larp_rt" for n in graph.node):
        return (f"the manifest says {file} reads its {claim} cache with larp_rt::DecodeAttention, but it has no "
                "such node")
    return None


def _io_list(lst: list | None) -> list:
    """A graph's inputs or outputs as manifest JSON (dicts are kept as given: the exporter extends these lists)."""
    if isinstance(lst, list) and not any(isinstance(x, TensorSpec) for x in lst):
        return lst
    return [x.to_dict() if isinstance(x, TensorSpec) else x for x in lst or ()]


class BundleWriter:
    """Collects files in a temporary directory beside ``dest``; ``commit`` writes the manifest and renames. The
    manifest's parts are recorded from specs (``add_graph``, ``set_generator``, ``set_kv_cache``, ``set_prior``,
    ``set_sampler``, ``add_plan``...), written with their ``to_dict()``; ``manifest`` is the dict being written."""

    def __init__(self, dest: str | os.PathLike, *, overwrite: bool = False):
        self.dest = Path(dest)
        if self.dest.exists() and not overwrite:
            raise BundleError(f"{str(self.dest)!r} already exists; choose another directory or pass --force")
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.tmp-", dir=self.dest.parent))
        self.manifest: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "graphs": {}, "files": {}}

    def path(self, rel: str) -> Path:
        p = self.tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def add_file(self, rel: str) -> None:
        self.manifest["files"][rel] = sha256_file(self.tmp / rel)

    def add_graph(self, name: str | GraphSpec, file: str | None = None, inputs: list | None = None,
                  outputs: list | None = None, extra_files=()) -> None:
        """Record graph ``name`` (its file and external data files already written under ``path``, hashed here):
        ``add_graph(GraphSpec(...))`` or ``add_graph(name, file, inputs, outputs, extra_files)`` with the I/O as
        TensorSpecs or ``{"name", "dtype", "shape"}`` dicts."""
        if isinstance(name, GraphSpec):
            spec = name
            name, file, extra_files = spec.name, spec.file, tuple(spec.data or ())
            entry = spec.to_dict()
        else:
            entry = {"file": file, "inputs": _io_list(inputs), "outputs": _io_list(outputs)}
            if extra_files:
                entry["data"] = list(extra_files)  # external data the graph reads
        self.manifest["graphs"][name] = entry
        for rel in (file, *extra_files):
            self.add_file(rel)

    def graph(self, name: str) -> GraphSpec:
        """Graph ``name`` as recorded so far (BundleError when it has not been added)."""
        entry = self.manifest["graphs"].get(name)
        if entry is None:
            raise BundleError(f"the bundle being written has no {name!r} graph yet: add_graph it first")
        return GraphSpec.from_dict(entry, f"graphs.{name}", name=name)

    @property
    def precision(self) -> str | None:
        """The generator weights' precision recorded so far (None before the exporter records it)."""
        return self.manifest.get("precision")

    def set_tokenizer(self, spec: TokenizerSpec | None) -> None:
        self.manifest["tokenizer"] = None if spec is None else spec.to_dict()

    def set_generator(self, spec: GeneratorSpec | None) -> None:
        self.manifest["generator"] = None if spec is None else spec.to_dict()

    def set_kv_cache(self, spec: KVCacheSpec) -> None:
        """The generator's KV cache (after ``set_generator`` or with a ``generator`` entry written)."""
        self._part("generator")["kv_cache"] = spec.to_dict()

    def set_prior(self, spec: PriorSpec | None) -> None:
        """The tokenizer's AR prior (None: the tokenizer has none; written as null, as the exporter does)."""
        self._part("tokenizer")["prior"] = None if spec is None else spec.to_dict()

    def set_sampler(self, spec: SamplerSpec) -> None:
        self.manifest["sampler"] = spec.to_dict()

    def add_plan(self, name: str, entry: PlanEntry) -> None:
        """Record plan ``name`` (its file already written under ``path``; its sha256 is the entry's)."""
        self.manifest.setdefault("plans", {})[name] = entry.to_dict()
        self.manifest["files"][entry.file] = entry.sha256

    def set_tensorrt(self, spec: TensorRTSpec) -> None:
        self.manifest["tensorrt"] = spec.to_dict()

    @property
    def spec(self) -> ManifestSpec:
        """What has been recorded so far, typed (raises BundleError where an entry is malformed)."""
        return ManifestSpec.from_dict(self.manifest, "")

    def _part(self, key: str) -> dict[str, Any]:
        part = self.manifest.get(key)
        if not isinstance(part, dict):
            raise BundleError(f"the manifest has no {key} entry yet: call set_{key} first")
        return part

    def commit(self) -> Path:
        (self.tmp / MANIFEST).write_text(json.dumps(self.manifest, indent=2) + "\n")
        os.chmod(self.tmp, 0o755)  # mkdtemp makes it private
        Bundle(self.tmp, verify=True)  # what we wrote must read back
        if self.dest.exists():
            old = self.dest.with_name(f".{self.dest.name}.old-{os.getpid()}")
            os.replace(self.dest, old)
            os.replace(self.tmp, self.dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.dest)
        return self.dest

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
