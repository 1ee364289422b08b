"""TensorRT backend, layer 2 of 4: the bundle's plans checked against its manifest and this machine, without a GPU.

What ``larp-rt info --verify`` and ``TensorRTBackend`` check before any TensorRT or CUDA runtime object exists:
``plan_issues`` (each plan's file, the ONNX graph it was built from, the builder installed here, its header bytes
read by ``read_plan_header``) and ``check_plans`` (those, then the GPU's compute capability against the plan's
targets). Each problem names its fix, a ``larp-rt build`` command (``rebuild_command``). The errors raised:
``PlanError`` (a BundleError), ``PlanMismatchError`` and ``TensorRTUnavailable``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ...bundle import TRT_FLAGS, Bundle, BundleError, PlanError, build_command, sha256_file
from ...manifest import GraphSpec, PlanEntry
from .device import Machine

FLAG = TRT_FLAGS


class TensorRTUnavailable(RuntimeError):
    """No usable GPU / TensorRT here (raised before any TensorRT or CUDA runtime object exists)."""


class PlanMismatchError(RuntimeError):
    """A plan does not suit this machine (builder version, compute capability, validity); rebuild it."""


def rebuild_command(bundle: Bundle, flavour: str, cc: str | None = None, entry: PlanEntry | None = None) -> str:
    """``larp-rt build`` with the options the manifest recorded (see ``bundle.build_command``)."""
    return build_command(bundle.path, bundle.manifest, entry, flavour=flavour, cc=cc)


def _same_version(a: str, b: str) -> bool:
    """Plans record the module's __version__ (1.7.1.116); metadata may say the same or a prefix of it."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


PLAN_MAGIC = {b"vtrt": "tensorrt-rtx", b"ftrt": "tensorrt", b"ptrt": "tensorrt"}  # a plan's first four bytes


def read_plan_header(path: str | os.PathLike) -> dict:
    """What a plan's first bytes say, read as bytes (no TensorRT object): ``magic`` and ``flavour`` (None: not a
    TensorRT plan magic), and where the header has TensorRT-RTX's layout also ``size`` and ``version``. That layout
    (seen in TensorRT-RTX 1.7 plans): b"vtrt", 12 bytes, the plan's size in bytes (uint64 little-endian), the
    builder's version (major, minor, patch, build: one byte each), b"vtrt" again; the second magic is required
    before the size and version are read. Datacenter TensorRT's header is undocumented: only its magic is read."""
    with open(path, "rb") as f:
        head = f.read(32)
    magic = head[:4]
    out = {"magic": magic.decode("latin-1"), "flavour": PLAN_MAGIC.get(magic), "size": None, "version": None}
    if magic == b"vtrt" and len(head) == 32 and head[28:32] == b"vtrt":
        out["size"] = int.from_bytes(head[16:24], "little")
        out["version"] = ".".join(str(b) for b in head[24:28])
    return out


@dataclass(frozen=True)
class PlanIssue:
    """One thing wrong with one plan: ``phase`` 0 its file (``kind`` malformed, missing, altered, stale: built from
    another ONNX file than the bundle's), 1 the builder installed here (version; not_installed: none of the plan's
    flavour), 2 its header against its manifest entry (header); ``error`` the exception class ``check_plans`` raises
    for it; ``reason`` what is wrong, ``fix`` the ``larp-rt build`` command."""

    plan: str
    file: str
    phase: int
    kind: str
    error: type
    reason: str
    fix: str
    after: str = ""  # what the fix needs first (pip install ...)

    @property
    def not_installed(self) -> bool:
        return self.kind == "not_installed"

    @property
    def message(self) -> str:
        return f"{self.reason}; rebuild with `{self.fix}`" + (f" {self.after}" if self.after else "")


def _entries(manifest: dict) -> tuple[dict[str, PlanEntry | str], dict[str, str]]:
    """The manifest's plan entries (name -> PlanEntry, or why the entry is malformed) and its graphs' files (name ->
    file), read entry by entry: one malformed entry is reported as such, and the others are still checked."""
    plans: dict[str, PlanEntry | str] = {}
    for name, e in (manifest.get("plans") or {}).items():
        miss = PlanEntry.missing(e)
        if miss:
            plans[name] = f"manifest.json's plan entry {name!r} is malformed (no {', '.join(miss)})"
            continue
        try:
            plans[name] = PlanEntry.from_dict(e, f"plans.{name}")
        except BundleError as err:
            plans[name] = f"manifest.json's plan entry {name!r} is malformed ({str(err).split(';')[0]})"
    graphs = {}
    for name, g in (manifest.get("graphs") or {}).items():
        try:
            graphs[name] = GraphSpec.from_dict(g, f"graphs.{name}", name=name).file
        except BundleError:
            continue  # Bundle names a malformed graph entry
    return plans, graphs


def plan_issues(root: str | os.PathLike, manifest: dict, mach: Machine, *, sha=sha256_file) -> list[PlanIssue]:
    """Everything wrong with the manifest's plans that can be told without a GPU or a TensorRT runtime: each plan's
    file (present, its recorded size and sha256, built from the ONNX graph the bundle holds now), the builder
    installed here (``mach.versions``) and the plan's header bytes against its entry (magic = flavour, version,
    size). ``manifest``: the raw ``manifest.json`` (it may be too damaged for ``Bundle``; each entry is read alone).
    ``sha``: the hash function (a caching one lets a caller hash each file once)."""
    root = Path(root)
    plans, graphs = _entries(manifest)
    out: list[PlanIssue] = []
    for name, e in plans.items():
        if isinstance(e, str):
            raw = (manifest.get("plans") or {}).get(name)
            file = str(raw.get("file", f"plans/{name}")) if isinstance(raw, dict) else f"plans/{name}"
            out.append(PlanIssue(name, file, 0, "malformed", PlanError, e, build_command(root, manifest,
                                                                                          flavour="auto")))
            continue
        out += _entry_issues(root, manifest, name, e, graphs.get(name), mach, sha)
    return out


def _entry_issues(root: Path, manifest: dict, name: str, e: PlanEntry, graph: str | None, mach: Machine,
                  sha) -> list[PlanIssue]:
    """What is wrong with plan ``name`` (entry ``e``; ``graph``: the file of the ONNX graph of its name)."""
    out: list[PlanIssue] = []
    fix = build_command(root, manifest, e)
    p = root / e.file

    def issue(phase: int, kind: str, reason: str, error: type = PlanError, **kw) -> None:
        out.append(PlanIssue(name, e.file, phase, kind, error, reason, fix, **kw))

    if not p.is_file():
        issue(0, "missing", f"plan {str(p)!r} is missing")
        return out
    size = p.stat().st_size
    damaged = True
    if e.size is not None and size != e.size:
        issue(0, "altered", f"plan {str(p)!r} was altered: {size} bytes where manifest.json records {e.size} "
                 "(truncated or overwritten)")
    elif sha(p) != e.sha256:
        issue(0, "altered", f"plan {str(p)!r} was altered (sha256 mismatch with manifest.json)")
    else:
        damaged = False
    if graph is not None and (root / graph).is_file() and sha(root / graph) != e.onnx_sha256:
        issue(0, "stale", f"plan {e.file!r} was built from another {graph} than the bundle holds now")
    fl, ver = e.flavour, e.version
    have = mach.versions.get(fl)
    if have is None or not _same_version(have, ver):
        issue(1, "version" if have else "not_installed",
              f"plan {e.file!r} ({name}) was built with {fl} {ver} for compute capability "
              f"{', '.join(e.compute_capabilities)}; {mach.describe()}. Plans only load in the "
              "TensorRT they were built with", PlanMismatchError,
              after="" if have else f"after pip install {fl}=={ver}")
    if damaged:
        return out  # a damaged file's header says nothing
    head = read_plan_header(p)
    if head["flavour"] is None:
        why = (f"is not a TensorRT plan (it starts with {head['magic']!r}, not "
               f"{', '.join(repr(k.decode()) for k in PLAN_MAGIC)})")
    elif head["flavour"] != fl:
        why = f"is a {head['flavour']} plan by its header, and manifest.json says {fl}"
    elif head["version"] is not None and not _same_version(head["version"], ver):
        why = f"was built with {fl} {head['version']} by its header, and manifest.json says {ver}"
    elif head["size"] is not None and head["size"] != size:
        why = f"is {size} bytes, and its header says {head['size']}"
    else:
        return out
    issue(2, "header", f"plan {str(p)!r} {why}")
    return out


def check_plans(bundle: Bundle, mach: Machine, *, device: int = 0, need_gpu: bool = True) -> dict[str, PlanEntry]:
    """Every plan entry of the bundle against its files and ``mach``; returns the entries. Raises PlanError (a
    BundleError: a file missing, altered or stale, a header that contradicts the manifest) or PlanMismatchError
    (builder version / compute capability) with the rebuild command, or TensorRTUnavailable (no GPU, when
    ``need_gpu``). Everything before the GPU check needs no GPU and no TensorRT runtime (``plan_issues``)."""
    plans = bundle.plans
    if not plans:
        raise BundleError(f"bundle {str(bundle.path)!r} has no TensorRT plans: build them with "
                          f"`larp-rt build {bundle.path}`")
    issues = plan_issues(bundle.path, bundle.manifest, mach)
    for phase in (0, 1, 2):
        for issue in issues:
            if issue.phase == phase:
                raise issue.error(issue.message)
    if not need_gpu:
        return plans
    if not mach.gpus:
        raise TensorRTUnavailable(
            f"backend='tensorrt' needs a usable NVIDIA GPU, and there is none ({mach.why_no_gpu or 'not probed'}); "
            "use backend='onnxruntime' (CPU) or run on a machine with a GPU")
    gpu = mach.gpus[min(device, len(mach.gpus) - 1)]
    for name, e in plans.items():
        if gpu["cc"] not in e.compute_capabilities:
            raise PlanMismatchError(
                f"plan {e.file!r} ({name}) targets compute capability {', '.join(e.compute_capabilities)} "
                f"({e.flavour} {e.version}); {mach.describe()}. Rebuild with "
                f"`{rebuild_command(bundle, e.flavour, gpu['cc'], e)}`")
    return plans

