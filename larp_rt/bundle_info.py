"""What a bundle holds, and whether its files are intact: ``larp-rt info BUNDLE [--json] [--verify]``.

    info = bundle_info("bundles/larp-tiny", verify=True)   # a dict with stable keys (see ``bundle_info``)
    print(format_info(info))                               # the text ``larp-rt info`` prints
    info["verify"]["ok"]                                   # False: info["verify"]["problems"] names each bad file

Reading needs only the manifest (and the files' sizes): a bundle too damaged for ``Bundle`` to load is still
described. Verifying re-hashes every file against the manifest's sha256, checks every TensorRT plan with
``backends.tensorrt.plan_issues`` (its file, the ONNX graph it was built from, its header bytes, the builder installed
here) and, when every file is intact, loads the bundle with ``Bundle`` for the checks of the graphs' contents
(precision, KV cache, prior). No GPU is probed and no TensorRT runtime is created: the GPU-dependent checks
(compute capability, the engine validity API) happen when ``Engine(backend="tensorrt")`` loads the plans. Each bad
file comes with the command that fixes it: ``larp-rt build ...`` for a plan, ``larp-rt export ...`` for anything
else. Torch-free.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

from .backends.tensorrt import machine, plan_issues
from .bundle import (
    MANIFEST,
    Bundle,
    BundleError,
    build_command,
    export_command,
    plan_files,
    read_manifest,
    sha256_file,
)
from .manifest import GeneratorSpec, PriorSpec, TokenizerSpec

__all__ = ["is_bundle", "bundle_info", "verify_bundle", "format_info", "graph_precision", "FLAVOUR_NAMES"]

FLAVOUR_NAMES = {"tensorrt-rtx": "TensorRT-RTX", "tensorrt": "datacenter TensorRT"}
_TOKENIZER_GRAPHS = ("encoder", "decoder")
_PRIOR_GRAPHS = ("prior", "prior_score", "prior_fused")
_KV_GRAPHS = ("decode", "decode_sample", "prefix_prefill")  # read (or write) the generator's KV cache


def is_bundle(path: str | os.PathLike) -> bool:
    """A directory with a bundle manifest (``manifest.json``)."""
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).is_file()


def _float(m: dict) -> str:
    return "fp16" if m.get("precision") == "fp16" else "fp32"


def _part(spec: type, d: Any, where: str):
    """Entry ``d`` typed (``spec.from_dict``), or None where it is absent or malformed: info describes what it can
    read, and ``verify_bundle`` (loading ``Bundle``) names the malformed entry."""
    if not d:
        return None
    try:
        return spec.from_dict(d, where)
    except BundleError:
        return None


def _generator_kv(m: dict) -> dict[str, Any] | None:
    gen = _part(GeneratorSpec, m.get("generator"), "generator")
    if gen is None:
        return None
    kv = gen.kv_cache.to_dict()
    kv.setdefault("dtype", _float(m))  # older manifests: the weights' float type
    return kv


def _prior(m: dict) -> PriorSpec | None:
    return _part(PriorSpec, (m.get("tokenizer") or {}).get("prior"), "tokenizer.prior")


def _prior_kv(m: dict) -> dict[str, Any] | None:
    prior = _prior(m)
    return None if prior is None else prior.kv_cache.to_dict()


def graph_precision(manifest: dict, name: str) -> str:
    """The precision graph ``name`` computes in: the tokenizer's for encoder/decoder, the float type for the prior's
    graphs (fp16 bundles: fp16, else fp32), float64 for the sampler graph, the bundle's for the generator's."""
    if name in _TOKENIZER_GRAPHS:
        tok = _part(TokenizerSpec, manifest.get("tokenizer"), "tokenizer")
        return (tok.precision if tok else None) or _float(manifest)
    if name in _PRIOR_GRAPHS:
        prior = _prior(manifest)
        return (prior.kv_cache.dtype if prior else None) or _float(manifest)
    if name == "sample":
        return "fp64"
    return manifest.get("precision", "fp32")


def _kv_dtype(manifest: dict, name: str) -> str | None:
    if name in _KV_GRAPHS:
        return (_generator_kv(manifest) or {}).get("dtype")
    if name in ("prior", "prior_fused"):
        return (_prior_kv(manifest) or {}).get("dtype")
    return None


def _size(p: Path) -> int | None:
    try:
        return p.stat().st_size
    except OSError:
        return None


def bundle_info(path: str | os.PathLike, *, verify: bool = False) -> dict[str, Any]:
    """The bundle at ``path`` as a dict with stable keys: ``kind`` ("bundle"), ``path``, ``format``,
    ``format_version``, ``precision``, ``created_by``, ``tokenizer`` / ``generator`` (configs; None when absent),
    ``kv_cache`` (the generator's), ``prior``, ``sampler``, ``default_sampling``, ``quantization``, ``graphs``
    (name -> file, data, bytes, precision, kv_dtype, inputs, outputs), ``plans`` (name -> the manifest's entry plus
    ``flavour_name``: file, size, sha256, flavour, version, compute_capabilities, buckets, profiles, ...),
    ``tensorrt`` (the build's common options), ``checkpoints``, ``files`` (relative path -> sha256, bytes) and, with
    ``verify``, ``verify`` (see ``verify_bundle``). Raises BundleError when ``path`` holds no bundle manifest."""
    root = Path(path)
    m = read_manifest(root)
    tok, gen = m.get("tokenizer"), m.get("generator")
    graphs = {}
    for name, g in (m.get("graphs") or {}).items():
        g = g if isinstance(g, dict) else {}
        files = [g.get("file"), *(g.get("data") or [])]
        sizes = [_size(root / f) if isinstance(f, str) else None for f in files]
        graphs[name] = {"file": g.get("file"), "data": list(g.get("data") or []),
                        "bytes": None if None in sizes else sum(sizes),
                        "precision": graph_precision(m, name), "kv_dtype": _kv_dtype(m, name),
                        "inputs": list(g.get("inputs") or []), "outputs": list(g.get("outputs") or [])}
    plans = {}
    for name, e in (m.get("plans") or {}).items():
        e = dict(e) if isinstance(e, dict) else {}
        e["flavour_name"] = FLAVOUR_NAMES.get(e.get("flavour"), e.get("flavour"))
        plans[name] = e
    info: dict[str, Any] = {
        "kind": "bundle",
        "path": str(root),
        "format": m.get("format"),
        "format_version": m.get("format_version"),
        "precision": m.get("precision", "fp32"),
        "created_by": m.get("created_by"),
        "tokenizer": None if not isinstance(tok, dict) else {
            "config": tok.get("config"), "precision": tok.get("precision") or _float(m),
            "codebook": tok.get("codebook"), "quantization": tok.get("quantization")},
        "generator": None if not isinstance(gen, dict) else {
            "config": gen.get("config"), "frame_prediction": bool((gen.get("config") or {}).get("frame_prediction")),
            "prefill": gen.get("prefill")},
        "kv_cache": _generator_kv(m),
        "prior": (tok or {}).get("prior") if isinstance(tok, dict) else None,
        "sampler": m.get("sampler"),
        "default_sampling": m.get("default_sampling"),
        "quantization": m.get("quantization"),
        "graphs": graphs,
        "plans": plans,
        "tensorrt": m.get("tensorrt"),
        "checkpoints": dict(m.get("checkpoints") or {}),
        "files": {rel: {"sha256": d, "bytes": _size(root / rel)} for rel, d in (m.get("files") or {}).items()},
    }
    if verify:
        info["verify"] = verify_bundle(root, m)
    return info


_WHAT = {"graph": "graph file", "checkpoint": "checkpoint file", "file": "bundle file", "plan": "plan"}


def _file_kind(m: dict, rel: str) -> str:
    if rel in plan_files(m):
        return "plan"
    for g in (m.get("graphs") or {}).values():
        if isinstance(g, dict) and (rel == g.get("file") or rel in (g.get("data") or [])):
            return "graph"
    if any(rel.startswith(str(d).rstrip("/") + "/") for d in (m.get("checkpoints") or {}).values()):
        return "checkpoint"
    return "file"


def _verify_notes(root: Path, m: dict, mach, n_plans: int, problems: dict[str, dict[str, Any]]) -> list[str]:
    """What ``verify_bundle`` did not check (plans without a GPU) and what its fixes' placeholders mean."""
    notes = []
    if not n_plans:
        notes.append(f"no TensorRT plans (build them with `larp-rt build {root}`)")
    else:
        have = ", ".join(f"{k} {v}" for k, v in mach.versions.items() if v) or "no TensorRT"
        notes.append(f"plans checked without a GPU against {have} installed here; the GPU's compute capability is "
                     "checked when Engine(backend='tensorrt') loads them")
    if any("TOKENIZER_DIR" in c or "GENERATOR_DIR" in c for p in problems.values() for c in p["fix"]):
        held = ", ".join(f"{root / d}" for d in (m.get("checkpoints") or {}).values())
        notes.append("TOKENIZER_DIR / GENERATOR_DIR: the checkpoint folders the bundle was exported from "
                     "(manifest.json does not record them)" + (f"; the bundle holds copies: {held}" if held else ""))
    return notes


def verify_bundle(path: str | os.PathLike, manifest: dict | None = None) -> dict[str, Any]:
    """Every file of the bundle against the manifest, without a GPU: ``{"ok", "files", "plans", "problems",
    "notes", "summary"}``. ``files`` / ``plans``: how many were checked; ``problems``: one per bad file,
    ``{"file", "kind" (graph | plan | checkpoint | file | manifest), "reasons": [...], "fix": [commands]}`` (run the
    commands in order); ``notes``: what was not checked, and why."""
    root = Path(path)
    m = read_manifest(root) if manifest is None else manifest
    hashes: dict[Path, str] = {}

    def sha(p: Path) -> str:
        if p not in hashes:
            hashes[p] = sha256_file(p)
        return hashes[p]

    plans = plan_files(m)
    files = dict(m.get("files") or {})
    problems: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    export_fix = [export_command(root, m)] + ([build_command(root, m)] if plans else [])

    def bad(rel: str, kind: str, reason: str, fix: list[str]) -> None:
        problems.setdefault(rel, {"file": rel, "kind": kind, "reasons": [], "fix": fix})["reasons"].append(reason)

    inside = root.resolve()
    for rel, digest in files.items():
        if rel in plans:
            continue  # plan_issues below
        p = root / rel
        kind = _file_kind(m, rel)
        if inside not in p.resolve().parents:
            bad(rel, "manifest", f"manifest.json lists {rel!r}, which points outside the bundle", export_fix)
        elif not p.is_file():
            bad(rel, kind, f"{_WHAT[kind]} {str(p)!r} is missing", export_fix)
        elif sha(p) != digest:
            bad(rel, kind, f"{_WHAT[kind]} {str(p)!r} was altered (sha256 mismatch with manifest.json)", export_fix)
    for name, g in (m.get("graphs") or {}).items():
        for rel in [g.get("file"), *(g.get("data") or [])] if isinstance(g, dict) else [None]:
            if rel not in files:
                bad(str(rel), "graph", f"graph {name!r}'s file {rel!r} is not in manifest.json's files (no sha256 "
                                       "to check it against)", export_fix)
    damaged = bool(problems)
    mach = machine(probe=False)  # the installed builders' versions; no GPU probe
    bad_graphs = {g.get("file") for g in (m.get("graphs") or {}).values() if isinstance(g, dict)} & set(problems)
    for issue in plan_issues(root, m, mach, sha=sha):
        graph = ((m.get("graphs") or {}).get(issue.plan) or {}).get("file")
        if issue.kind == "stale" and graph in bad_graphs:
            continue  # the graph is named above; its fix rebuilds the plans too
        if issue.not_installed:
            fl = (m["plans"][issue.plan] or {}).get("flavour")
            notes.append(f"{issue.file}: not checked against an installed {fl}: none is installed here "
                         f"(pip install {fl}=={m['plans'][issue.plan].get('version')} to check it)")
            continue
        bad(issue.file, "plan", issue.reason, [issue.fix])
    for name, e in (m.get("plans") or {}).items():
        if isinstance(e, dict) and e.get("file") and e["file"] not in files:
            bad(e["file"], "plan", f"plan {e['file']!r} ({name}) is not in manifest.json's files",
                [build_command(root, m, e)])
    if not damaged:  # the graphs' contents against the manifest (precision, KV cache, prior): intact files only
        try:
            Bundle(root, verify=False)
        except BundleError as e:
            bad(MANIFEST, "manifest", str(e), export_fix)
        except Exception as e:  # noqa: BLE001 (a graph the onnx package cannot read: say so, never crash)
            bad(MANIFEST, "manifest", f"the bundle does not load: {type(e).__name__}: {e}", export_fix)
    else:
        notes.append("the graphs' contents (precision, KV cache, prior) were not checked: some files are damaged")
    n_plans = len(m.get("plans") or {})
    notes += _verify_notes(root, m, mach, n_plans, problems)
    n_files = len([f for f in files if f not in plans])
    out = list(problems.values())
    summary = f"verified {n_files} files, {n_plans} plans"
    summary += ": all match manifest.json" if not out else f": {len(out)} bad"
    return {"ok": not out, "files": n_files, "plans": n_plans, "problems": out, "notes": notes, "summary": summary}


# ---------------------------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------------------------
def _shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _kv(d: dict | None) -> str:
    return " ".join(f"{k}={v}" for k, v in (d or {}).items())


def _wrap(head: str, d: dict | None, indent: str = "    ") -> list[str]:
    """``head`` then the dict's key=value pairs, wrapped at 118 columns."""
    return textwrap.wrap(_kv(d), width=118, initial_indent=head, subsequent_indent=indent,
                         break_long_words=False, break_on_hyphens=False) or [head.rstrip()]


def _fill(text: str, indent: str = "    ") -> list[str]:
    return textwrap.wrap(text, width=118, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)


def _bytes(n: int | None) -> str:
    if n is None:
        return "missing"
    return f"{n} bytes ({n / 1e6:.2f} MB)" if n >= 10**5 else f"{n} bytes"


def _profile(p: dict) -> str:
    return ", ".join(f"{sym} {r[0]}..{r[2]} (opt {r[1]})" if isinstance(r, list | tuple) and len(r) == 3
                     else f"{sym} {r}" for sym, r in p.items())


def _format_models(info: dict[str, Any]) -> list[str]:
    """The tokenizer, its prior and the generator (with its KV cache and default sampling)."""
    L: list[str] = []
    tok, gen = info.get("tokenizer"), info.get("generator")
    if tok:
        cfg = {k: v for k, v in (tok["config"] or {}).items() if k != "prior"}  # the prior: its own line
        L += _wrap(f"tokenizer ({tok['precision']}): ", cfg)
    else:
        L.append("tokenizer: none")
    prior = info.get("prior")
    if prior:
        pkv = prior.get("kv_cache") or {}
        fused = f", fused step graph {prior['fused_graph']} ({prior.get('fused_attention')})" \
            if prior.get("fused_graph") else ""
        L += _fill(f"prior: step graph {prior.get('graph')}, score graph {prior.get('score_graph')}{fused}; "
                   f"KV cache {pkv.get('dtype')}, {pkv.get('max_seq')} slots x {pkv.get('layers')} layers x "
                   f"{pkv.get('heads')} heads x {pkv.get('head_dim')}")
        L += _wrap("  prior config: ", prior.get("config"))
    elif tok:
        L.append("prior: none")
    if gen:
        kind = "frame prediction" if gen["frame_prediction"] else "class-conditional"
        L += _wrap(f"generator ({info['precision']}, {kind}): ", gen["config"])
        kv = info.get("kv_cache") or {}
        L.append(f"  KV cache {kv.get('dtype')} ({kv.get('attention', 'standard')} attention), {kv.get('max_seq')} "
                 f"slots x {kv.get('layers')} layers x {kv.get('heads')} heads x {kv.get('head_dim')}")
        if info.get("default_sampling"):
            L.append(f"  default sampling: {_kv(info['default_sampling'])}")
    else:
        L.append("generator: none")
    return L


def _format_graphs(info: dict[str, Any]) -> list[str]:
    """The sampler graphs, the quantization summary and every graph with its inputs and outputs."""
    L: list[str] = []
    s = info.get("sampler")
    if s:
        fused = "none"
        if s.get("fused"):
            ops = ", ".join(x for x in (s.get("fused_attention"), "larp_rt::Sample",
                                        f"{s.get('packed_matmuls')} x {s['fused_matmul']}" if s.get("fused_matmul")
                                        else None) if x)
            fused = f"{s['fused']} ({ops}; custom ops from {s.get('custom_op_library')})"
        L += _fill(f"sampler graphs: {s.get('graph')} (standard ops, float64); fused decode+sample: {fused}")
    if info.get("quantization"):
        q = {k: v for k, v in info["quantization"].items() if not isinstance(v, dict | list)}
        L.append(f"quantization: {_kv(q)}")
    L.append(f"graphs ({len(info['graphs'])}):")
    for name, g in info["graphs"].items():
        kv = f", KV cache {g['kv_dtype']}" if g["kv_dtype"] else ""
        data = f" + {', '.join(g['data'])}" if g["data"] else ""
        L.append(f"  {name}: {g['file']}{data}, {g['precision']}{kv}, {_bytes(g['bytes'])}")
        w = max([len(d["name"]) for d in g["inputs"] + g["outputs"]] or [0])
        for arrow, lst in (("in ", g["inputs"]), ("out", g["outputs"])):
            for d in lst:
                L.append(f"    {arrow} {d['name']:<{w}}  {d['dtype']:<8} {_shape(d['shape'])}")
    return L


def _format_plans(info: dict[str, Any]) -> list[str]:
    plans = info.get("plans") or {}
    if not plans:
        return ["TensorRT plans: none (`larp-rt build BUNDLE` builds them)"]
    t = info.get("tensorrt") or {}
    L = [f"TensorRT plans ({len(plans)}): {FLAVOUR_NAMES.get(t.get('flavour'), t.get('flavour'))} "
         f"{t.get('version')}, batch buckets {','.join(map(str, t.get('buckets') or []))}, KV length "
         f"1..{t.get('max_seq')}, built by larp_rt {t.get('built_by')}"]
    for name, e in plans.items():
        L.append(f"  {name}: {e.get('file')}, {e.get('size')} bytes")
        L.append(f"    {e.get('flavour_name')} {e.get('version')} ({e.get('flavour')}), compute capability "
                 f"{', '.join(e.get('compute_capabilities') or [])}, {e.get('precision')}, weights "
                 f"{e.get('weights')}")
        for k, p in enumerate(e.get("profiles") or []):
            L.append(f"    profile {k}: {_profile(p)}")
    return L


def _format_verify(v: dict[str, Any]) -> list[str]:
    L = [""]
    for p in v["problems"]:
        L.append(f"BAD {p['file']} ({p['kind']}):")
        for r in p["reasons"]:
            L.append(f"    {r}")
        L.append(f"  fix: {' && '.join(p['fix'])}")
    for note in v["notes"]:
        L += _fill(f"note: {note}")
    L.append(("OK " if v["ok"] else "FAILED ") + v["summary"])
    return L


def format_info(info: dict[str, Any]) -> str:
    """The human-readable form of ``bundle_info``'s dict (what ``larp-rt info BUNDLE`` prints)."""
    L = [f"bundle {info['path']}: {info['format']} format version {info['format_version']}, "
         f"precision {info['precision']}"]
    cb = info.get("created_by") or {}
    if cb:
        L.append("  exported by " + ", ".join(f"{k} {v}" for k, v in cb.items()))
    L += _format_models(info) + _format_graphs(info) + _format_plans(info)
    ck = info.get("checkpoints") or {}
    L.append("PyTorch checkpoints: " + (", ".join(f"{k} {v}" for k, v in ck.items()) if ck else "none (onnx only)"))
    n = len(info["files"])
    total = sum(f["bytes"] or 0 for f in info["files"].values())
    L.append(f"files: {n} listed in manifest.json, {_bytes(total)}")
    if info.get("verify") is not None:
        L += _format_verify(info["verify"])
    return "\n".join(L)
