"""The bundle manifest's parts as typed, frozen specs: ``GraphSpec``, ``KVCacheSpec``, ``PriorSpec``, ``PlanEntry``...

Each spec reads one entry of ``manifest.json`` with ``Spec.from_dict(d, where)`` (``where``: the entry's dotted key,
e.g. ``"generator.kv_cache"``), which checks every field's presence and JSON type and raises ``BundleError`` naming
the key and the command that rewrites it. ``to_dict()`` writes the entry back exactly as it was read (same keys,
same order, same values, unknown keys kept in ``extra``), so bundles stay byte-compatible in both directions; a spec
built in code writes its keys in the order ``larp-rt export`` / ``larp-rt build`` always wrote them.

What a value *means* (a precision the graphs must hold, a prior's fused graph that must exist) is checked by
``bundle.py`` against the graphs; the specs check only the manifest's shape. Bottom layer: config + stdlib only.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .config import ConfigError, GeneratorConfig, PriorConfig, TokenizerConfig

__all__ = ["BundleError", "PlanError", "TensorSpec", "GraphSpec", "GraphInfo", "KVCacheSpec", "PriorSpec",
           "PrefillSpec", "TokenizerSpec", "GeneratorSpec", "SamplerSpec", "PlanEntry", "TensorRTSpec",
           "ManifestSpec", "EXPORT_FIX", "BUILD_FIX"]

EXPORT_FIX = "re-export the bundle with `larp-rt export`"
BUILD_FIX = "rebuild its plans with `larp-rt build BUNDLE`"


class BundleError(ValueError):
    """A bundle is missing, altered, of an unknown version or inconsistent; the message says what to do."""


class PlanError(BundleError):
    """A TensorRT plan of the bundle is missing, altered or stale; the message names the ``larp-rt build`` command."""


# ---------------------------------------------------------------------------------------------------------------
# field checks: each returns the value (sequences as tuples) or raises BundleError naming ``where.key``
# ---------------------------------------------------------------------------------------------------------------
def _at(where: str, key: str) -> str:
    """The dotted manifest key of ``key`` inside entry ``where`` ("" at the top)."""
    return f"{where}.{key}" if where and key else where or key


def _bad(where: str, key: str, what: str, fix: str) -> BundleError:
    error = PlanError if fix == BUILD_FIX else BundleError  # a plan's entry: rebuilt, not re-exported
    return error(f"manifest key {_at(where, key) or '(top level)'} {what}; {fix}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_KINDS: dict[str, tuple[str, Any]] = {
    "str": ("a string", lambda v: isinstance(v, str)),
    "int": ("an integer", _is_int),
    "num": ("a number", lambda v: (_is_int(v) or isinstance(v, float))),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "obj": ("an object", lambda v: isinstance(v, Mapping)),
    "strs": ("a list of strings", lambda v: isinstance(v, list | tuple) and all(isinstance(x, str) for x in v)),
    "ints": ("a list of integers", lambda v: isinstance(v, list | tuple) and all(_is_int(x) for x in v)),
    "list": ("a list", lambda v: isinstance(v, list | tuple)),
    "dims": ("a list of integers and axis names",
             lambda v: isinstance(v, list | tuple) and all(_is_int(x) or isinstance(x, str) for x in v)),
}


def _field(d: Mapping[str, Any], where: str, key: str, kind: str, fix: str, *, required: bool = True,
           nullable: bool = False) -> Any:
    """``d[key]`` checked to be of ``kind`` (see ``_KINDS``); absent (or null where ``nullable``): None, unless
    ``required``."""
    if key not in d:
        if required:
            raise _bad(where, key, "is missing", fix)
        return None
    v = d[key]
    if v is None and (nullable or not required):
        return None
    what, ok = _KINDS[kind]
    if not ok(v):
        raise _bad(where, key, f"must be {what}, got {v!r}", fix)
    return tuple(v) if isinstance(v, list) and kind != "list" else v


def _obj(d: Any, where: str, fix: str) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise _bad(where, "", f"must be an object, got {type(d).__name__}", fix)
    return d


def _json(v: Any) -> Any:
    """A spec's field value as JSON (specs -> dicts, tuples -> lists), copied."""
    if isinstance(v, _Spec):
        return v.to_dict()
    if isinstance(v, list | tuple):
        return [_json(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _json(x) for k, x in v.items()}
    return copy.deepcopy(v)


@dataclass(frozen=True)
class _Spec:
    """One manifest entry. Subclasses name their JSON keys (== attribute names) in ``KEYS``, in the order the
    exporter writes them, and ``NULLS``: the keys written as null rather than left out when their value is None.
    ``extra``: keys this larp_rt does not know (kept, written back); ``keys``: the key order as read."""

    KEYS: ClassVar[tuple[str, ...]] = ()
    NULLS: ClassVar[frozenset[str]] = frozenset()
    FIX: ClassVar[str] = EXPORT_FIX

    extra: Mapping[str, Any] = field(default_factory=dict, kw_only=True, repr=False)
    keys: tuple[str, ...] = field(default=(), kw_only=True, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: Any, where: str, **kw: Any):
        """The spec of entry ``d`` (at manifest key ``where``); raises BundleError naming the bad key."""
        d = _obj(d, where, cls.FIX)
        values = cls._parse(d, where, **kw)
        extra = {k: copy.deepcopy(v) for k, v in d.items() if k not in cls.KEYS}
        return cls(**values, extra=extra, keys=tuple(d))

    @classmethod
    def _parse(cls, d: Mapping[str, Any], where: str) -> dict[str, Any]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """The manifest entry, exactly as read (or in the exporter's key order for a spec built in code)."""
        values = {k: _json(getattr(self, k)) for k in self.KEYS}
        out: dict[str, Any] = {}
        for k in (*self.keys, *self.KEYS, *self.extra):
            if k in out:
                continue
            if k in values:
                if values[k] is None and k not in self.keys and k not in self.NULLS:
                    continue  # absent when read (or never set): stays absent
                out[k] = values[k]
            elif k in self.extra:
                out[k] = copy.deepcopy(self.extra[k])
        return out


# ---------------------------------------------------------------------------------------------------------------
# graphs
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec(_Spec):
    """One input or output of a graph or plan: ``{"name", "dtype", "shape"}`` (axis names for dynamic axes)."""

    KEYS: ClassVar = ("name", "dtype", "shape")
    name: str = ""
    dtype: str = ""
    shape: tuple[int | str, ...] = ()

    @classmethod
    def _parse(cls, d, where):
        return {"name": _field(d, where, "name", "str", cls.FIX), "dtype": _field(d, where, "dtype", "str", cls.FIX),
                "shape": _field(d, where, "shape", "dims", cls.FIX)}


def _tensors(d: Mapping[str, Any], where: str, key: str, fix: str) -> tuple[TensorSpec, ...]:
    lst = _field(d, where, key, "list", fix)
    return tuple(TensorSpec.from_dict(x, f"{_at(where, key)}[{i}]") for i, x in enumerate(lst))


@dataclass(frozen=True)
class GraphSpec(_Spec):
    """``graphs.NAME``: an ONNX graph of the bundle: its file, external data files and I/O."""

    KEYS: ClassVar = ("file", "inputs", "outputs", "data")
    name: str = ""
    file: str = ""
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    data: tuple[str, ...] | None = None  # external data the graph reads (None: none, key absent)

    @classmethod
    def _parse(cls, d, where, name: str = ""):
        return {"name": name or where.rsplit(".", 1)[-1], "file": _field(d, where, "file", "str", cls.FIX),
                "inputs": _tensors(d, where, "inputs", cls.FIX), "outputs": _tensors(d, where, "outputs", cls.FIX),
                "data": _field(d, where, "data", "strs", cls.FIX, required=False)}

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    @property
    def files(self) -> list[str]:
        """The graph file and its external data files."""
        return [self.file, *(self.data or ())]


GraphInfo = GraphSpec  # its name before the manifest became typed


# ---------------------------------------------------------------------------------------------------------------
# the models
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVCacheSpec(_Spec):
    """``generator.kv_cache`` / ``tokenizer.prior.kv_cache``: the cache geometry the decode graphs read.
    ``dtype``: fp32 | fp16 | int8 (None in manifests older than cache types: the weights' float type);
    ``attention``: "standard" or the custom op reading a narrow cache (the prior's entry has none); ``scales``:
    the int8 cache's per-slot scale inputs (int8 only)."""

    KEYS: ClassVar = ("layers", "heads", "head_dim", "max_seq", "dtype", "attention", "scales")
    layers: int = 0
    heads: int = 0
    head_dim: int = 0
    max_seq: int = 0
    dtype: str | None = None
    attention: str | None = None
    scales: Mapping[str, Any] | None = None

    @classmethod
    def _parse(cls, d, where):
        out = {k: _field(d, where, k, "int", cls.FIX) for k in ("layers", "heads", "head_dim", "max_seq")}
        for k, kind in (("dtype", "str"), ("attention", "str"), ("scales", "obj")):
            out[k] = _field(d, where, k, kind, cls.FIX, required=False)
        return out

    def dtype_or(self, precision: str) -> str:
        """The cache type; manifests without one: the weights' float type (fp16 bundles fp16, else fp32)."""
        return self.dtype or ("fp16" if precision == "fp16" else "fp32")


def _model_config(cfg_cls: type, d: Mapping[str, Any], where: str, fix: str):
    raw = _field(d, where, "config", "obj", fix)
    try:
        return cfg_cls.from_dict(raw)
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise _bad(where, "config", f"is an invalid model config ({e})", fix) from e


@dataclass(frozen=True)
class PriorSpec(_Spec):
    """``tokenizer.prior``: the tokenizer's AR prior: its step / score graphs, config, cache and, optionally, the
    step graph that reads its cache with larp_rt::DecodeAttention (``fused_graph``)."""

    KEYS: ClassVar = ("graph", "score_graph", "config", "num_tokens", "codebook_size", "latent_ce_temperature",
                      "kv_cache", "fused_graph", "fused_attention", "custom_op_domain", "custom_op_library")
    graph: str = ""
    score_graph: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)
    num_tokens: int = 0
    codebook_size: int = 0
    latent_ce_temperature: float = 1.0
    kv_cache: KVCacheSpec = field(default_factory=KVCacheSpec)
    fused_graph: str | None = None
    fused_attention: str | None = None
    custom_op_domain: str | None = None
    custom_op_library: str | None = None

    @classmethod
    def _parse(cls, d, where):
        _model_config(PriorConfig, d, where, cls.FIX)
        out = {"graph": _field(d, where, "graph", "str", cls.FIX),
               "score_graph": _field(d, where, "score_graph", "str", cls.FIX),
               "config": copy.deepcopy(dict(d["config"])),
               "num_tokens": _field(d, where, "num_tokens", "int", cls.FIX),
               "codebook_size": _field(d, where, "codebook_size", "int", cls.FIX),
               "latent_ce_temperature": _field(d, where, "latent_ce_temperature", "num", cls.FIX),
               "kv_cache": KVCacheSpec.from_dict(_field(d, where, "kv_cache", "obj", cls.FIX), _at(where, "kv_cache"))}
        for k in ("fused_graph", "fused_attention", "custom_op_domain", "custom_op_library"):
            out[k] = d.get(k) if k == "fused_graph" else _field(d, where, k, "str", cls.FIX, required=False)
        return out  # fused_graph: any value, checked against the graphs by bundle.check_prior


@dataclass(frozen=True)
class TokenizerSpec(_Spec):
    """``tokenizer``: its config, the codebook file (stochastic SVQ), the AR prior (None: none; the key may hold
    null), the graphs' precision (None in older manifests: the bundle's float type) and their int8 quantization."""

    KEYS: ClassVar = ("config", "codebook", "prior", "precision", "quantization")
    config: Mapping[str, Any] = field(default_factory=dict)
    codebook: str | None = None
    prior: PriorSpec | None = None
    precision: str | None = None
    quantization: Mapping[str, Any] | None = None
    model: TokenizerConfig | None = field(default=None, compare=False, repr=False)

    @classmethod
    def _parse(cls, d, where):
        prior = d.get("prior")
        return {"model": _model_config(TokenizerConfig, d, where, cls.FIX), "config": copy.deepcopy(dict(d["config"])),
                "codebook": _field(d, where, "codebook", "str", cls.FIX, required=False),
                "prior": None if prior is None else PriorSpec.from_dict(prior, _at(where, "prior")),
                "precision": _field(d, where, "precision", "str", cls.FIX, required=False),
                "quantization": _field(d, where, "quantization", "obj", cls.FIX, required=False)}


@dataclass(frozen=True)
class PrefillSpec(_Spec):
    """``generator.prefill``: frame prediction's multi-token prefill graph over the prefix (cond tokens + the
    separator token)."""

    KEYS: ClassVar = ("graph", "prefix_tokens", "separator")
    graph: str = ""
    prefix_tokens: int = 0
    separator: int = 0

    @classmethod
    def _parse(cls, d, where):
        return {"graph": _field(d, where, "graph", "str", cls.FIX),
                "prefix_tokens": _field(d, where, "prefix_tokens", "int", cls.FIX),
                "separator": _field(d, where, "separator", "int", cls.FIX)}


@dataclass(frozen=True)
class GeneratorSpec(_Spec):
    """``generator``: its config, KV cache and (frame prediction) prefill."""

    KEYS: ClassVar = ("config", "kv_cache", "prefill")
    config: Mapping[str, Any] = field(default_factory=dict)
    kv_cache: KVCacheSpec = field(default_factory=KVCacheSpec)
    prefill: PrefillSpec | None = None
    model: GeneratorConfig | None = field(default=None, compare=False, repr=False)

    @classmethod
    def _parse(cls, d, where):
        pre = d.get("prefill")
        return {"model": _model_config(GeneratorConfig, d, where, cls.FIX), "config": copy.deepcopy(dict(d["config"])),
                "kv_cache": KVCacheSpec.from_dict(_field(d, where, "kv_cache", "obj", cls.FIX), _at(where, "kv_cache")),
                "prefill": None if pre is None else PrefillSpec.from_dict(pre, _at(where, "prefill"))}


@dataclass(frozen=True)
class SamplerSpec(_Spec):
    """``sampler``: the standard-ops sampler graph and the fused decode+sample graph with its custom ops
    (``fused`` None: not written; ``fused_matmul`` None: no packed MatMuls)."""

    KEYS: ClassVar = ("graph", "fused", "fused_attention", "fused_matmul", "packed_matmuls", "custom_op_domain",
                      "custom_op_library")
    NULLS: ClassVar = frozenset({"fused", "fused_attention", "fused_matmul"})
    graph: str | None = None
    fused: str | None = None
    fused_attention: str | None = None
    fused_matmul: str | None = None
    packed_matmuls: int | None = None
    custom_op_domain: str | None = None
    custom_op_library: str | None = None

    @classmethod
    def _parse(cls, d, where):
        out = {k: _field(d, where, k, "str", cls.FIX, required=False) for k in cls.KEYS if k != "packed_matmuls"}
        out["packed_matmuls"] = _field(d, where, "packed_matmuls", "int", cls.FIX, required=False)
        return out


# ---------------------------------------------------------------------------------------------------------------
# TensorRT plans
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanEntry(_Spec):
    """``plans.NAME``: one TensorRT plan: its file (content-addressed, ``sha256``, ``size``), the ONNX graph it was
    built from (``onnx``, ``onnx_sha256``, ``onnx_data``), the builder (``flavour`` tensorrt-rtx | tensorrt,
    ``version``, ``compute_capabilities``), the build options (``precision``, ``weights`` embedded | stripped,
    ``buckets``, ``profiles``: symbol -> [min, opt, max] per bucket) and its I/O. ``REQUIRED`` are the keys a plan
    cannot be checked without."""

    KEYS: ClassVar = ("file", "sha256", "size", "onnx", "onnx_sha256", "onnx_data", "flavour", "version",
                      "compute_capabilities", "precision", "strongly_typed", "weights", "buckets", "profiles",
                      "inputs", "outputs", "build_seconds", "onnx_bytes")
    REQUIRED: ClassVar = ("file", "sha256", "flavour", "version", "compute_capabilities")
    FIX: ClassVar = BUILD_FIX
    file: str = ""
    sha256: str = ""
    flavour: str = ""
    version: str = ""
    compute_capabilities: tuple[str, ...] = ()
    size: int | None = None
    onnx: str | None = None
    onnx_sha256: str | None = None
    onnx_data: tuple[str, ...] | None = None
    precision: str | None = None
    strongly_typed: bool | None = None
    weights: str | None = None
    buckets: tuple[int, ...] | None = None
    profiles: tuple[Mapping[str, Any], ...] | None = None
    inputs: tuple[TensorSpec, ...] | None = None
    outputs: tuple[TensorSpec, ...] | None = None
    build_seconds: float | None = None
    onnx_bytes: int | None = None

    _KINDS: ClassVar = {"file": "str", "sha256": "str", "size": "int", "onnx": "str", "onnx_sha256": "str",
                        "onnx_data": "strs", "flavour": "str", "version": "str", "compute_capabilities": "strs",
                        "precision": "str", "strongly_typed": "bool", "weights": "str", "buckets": "ints",
                        "profiles": "list", "build_seconds": "num", "onnx_bytes": "int"}

    @classmethod
    def _parse(cls, d, where):
        out = {k: _field(d, where, k, kind, cls.FIX, required=k in cls.REQUIRED) for k, kind in cls._KINDS.items()}
        if out["profiles"] is not None:
            out["profiles"] = tuple(dict(_obj(p, f"{_at(where, 'profiles')}[{i}]", cls.FIX))
                                    for i, p in enumerate(out["profiles"]))
        for k in ("inputs", "outputs"):
            out[k] = _tensors(d, where, k, cls.FIX) if d.get(k) is not None else None
        return out

    def max_shape(self, name: str) -> list[int] | None:
        """I/O tensor ``name``'s largest shape over the plan's profiles (axis names resolved to each profile's max),
        None when the plan has no such tensor."""
        hi: dict[str, int] = {}
        for prof in self.profiles or ():
            for sym, (_, _, mx) in prof.items():
                hi[sym] = max(hi.get(sym, 0), mx)
        for t in (*(self.inputs or ()), *(self.outputs or ())):
            if t.name == name:
                return [hi.get(x, x) if isinstance(x, str) else x for x in t.shape]
        return None

    def max_of(self, symbol: str) -> int:
        """The largest value of dynamic axis ``symbol`` over the profiles (0 when no profile has it)."""
        return max((int(p[symbol][2]) for p in self.profiles or () if symbol in p), default=0)

    @classmethod
    def missing(cls, d: Any) -> list[str]:
        """The ``REQUIRED`` keys entry ``d`` lacks (all of them when it is no object)."""
        return [k for k in cls.REQUIRED if not isinstance(d, Mapping) or k not in d]


@dataclass(frozen=True)
class TensorRTSpec(_Spec):
    """``tensorrt``: what the last ``larp-rt build`` used for every plan (builder, batch buckets, KV length)."""

    KEYS: ClassVar = ("flavour", "version", "buckets", "max_seq", "built_by", "compute_capabilities", "timing_cache")
    NULLS: ClassVar = frozenset({"timing_cache"})
    FIX: ClassVar = BUILD_FIX
    flavour: str | None = None
    version: str | None = None
    buckets: tuple[int, ...] | None = None
    max_seq: int | None = None
    built_by: str | None = None
    compute_capabilities: tuple[str, ...] | None = None
    timing_cache: str | None = None

    _KINDS: ClassVar = {"flavour": "str", "version": "str", "buckets": "ints", "max_seq": "int", "built_by": "str",
                        "compute_capabilities": "strs", "timing_cache": "str"}

    @classmethod
    def _parse(cls, d, where):
        return {k: _field(d, where, k, kind, cls.FIX, required=False) for k, kind in cls._KINDS.items()}


# ---------------------------------------------------------------------------------------------------------------
# the whole manifest
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ManifestSpec(_Spec):
    """``manifest.json``: every part typed, but the free-form records (``created_by``, ``quantization``,
    ``default_sampling``, ``verification``), which stay JSON. ``format`` / ``format_version`` are checked by
    ``bundle.read_manifest`` / ``Bundle``, which say what to do about another version."""

    KEYS: ClassVar = ("format", "format_version", "graphs", "files", "precision", "created_by", "tokenizer",
                      "generator", "checkpoints", "quantization", "sampler", "default_sampling", "verification",
                      "plans", "tensorrt")
    NULLS: ClassVar = frozenset({"tokenizer", "generator"})
    format: str = ""
    format_version: int = 0
    graphs: Mapping[str, GraphSpec] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)
    precision: str | None = None
    created_by: Mapping[str, Any] | None = None
    tokenizer: TokenizerSpec | None = None
    generator: GeneratorSpec | None = None
    checkpoints: Mapping[str, str] | None = None
    quantization: Mapping[str, Any] | None = None
    sampler: SamplerSpec | None = None
    default_sampling: Mapping[str, Any] | None = None
    verification: tuple[Any, ...] | None = None
    plans: Mapping[str, PlanEntry] | None = None
    tensorrt: TensorRTSpec | None = None

    @classmethod
    def _parse(cls, d, where):
        fix = cls.FIX
        out: dict[str, Any] = {"format": d.get("format"), "format_version": d.get("format_version")}
        graphs = _field(d, where, "graphs", "obj", fix, required=False) or {}
        out["graphs"] = {n: GraphSpec.from_dict(g, _at(where, f"graphs.{n}"), name=n) for n, g in graphs.items()}
        files = _field(d, where, "files", "obj", fix, required=False)
        if files is not None and not all(isinstance(v, str) for v in files.values()):
            raise _bad(where, "files", "must map each file to its sha256 string", fix)
        out["files"] = None if files is None else dict(files)
        for k, kind in (("precision", "str"), ("created_by", "obj"), ("checkpoints", "obj"), ("quantization", "obj"),
                        ("default_sampling", "obj"), ("verification", "list")):
            v = _field(d, where, k, kind, fix, required=False)
            out[k] = copy.deepcopy(dict(v) if isinstance(v, Mapping) else v)
        for k, spec in (("tokenizer", TokenizerSpec), ("generator", GeneratorSpec), ("sampler", SamplerSpec),
                        ("tensorrt", TensorRTSpec)):
            out[k] = None if not d.get(k) else spec.from_dict(d[k], _at(where, k))
        plans = _field(d, where, "plans", "obj", BUILD_FIX, required=False)
        out["plans"] = None if plans is None else {
            n: PlanEntry.from_dict(e, _at(where, f"plans.{n}")) for n, e in plans.items()}
        return out
