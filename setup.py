"""Builds the sampling kernels of cpp_ext/ into larp_rt/_lib/ (plain shared libraries, loaded with ctypes).

The metadata lives in pyproject.toml; this file only adds the custom build_ext. No torch needed.

    liblarp_sampling.so        CPU kernel (C ABI, larp_rt/kernels/)
    liblarp_sampling_cuda.so   CPU + CUDA kernels (only when a CUDA toolkit is found; static cudart)
    liblarp_rt_ort.so          ONNX Runtime custom-op library (CPU; + CUDA EP kernel when CUDA is built)

Environment: LARP_RT_CUDA=0 skips CUDA, =1 requires it (default: build it when nvcc is found in $CUDA_HOME,
$CUDA_PATH, /usr/local/cuda or $PATH); LARP_RT_CUDA_ARCHS="80;90" (default) chooses the GPU architectures
(the last one also embeds PTX); CXX / NVCC override the compilers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CPP = Path("cpp_ext")
INCLUDE = CPP / "include"
ORT_INCLUDE = CPP / "third_party" / "onnxruntime" / "include"
HEADERS = sorted(str(p) for p in (CPP / "include" / "larp_rt").glob("*.h*"))
ORT_HEADERS = sorted(str(p) for p in ORT_INCLUDE.glob("*.h"))
CXXFLAGS = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-Wall", "-Wno-psabi",
            "-pthread"]


def _log(msg: str) -> None:
    print(f"[larp_rt build] {msg}", file=sys.stderr, flush=True)


def find_nvcc() -> str | None:
    want = os.environ.get("LARP_RT_CUDA", "").strip().lower()
    if want in ("0", "false", "no", "off"):
        return None
    cands = [os.environ.get("NVCC")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(str(Path(os.environ[var]) / "bin" / "nvcc"))
    cands += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in cands:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    if want in ("1", "true", "yes", "on"):
        raise RuntimeError("LARP_RT_CUDA=1 but no nvcc was found: set CUDA_HOME (or NVCC) to a CUDA toolkit")
    return None


NVCC = find_nvcc()


class KernelLibrary(Extension):
    """A plain shared library built by BuildKernels (not a Python extension module)."""

    def __init__(self, name: str, sources: list[str], kind: str):
        super().__init__(name, sources=sources, depends=HEADERS + (ORT_HEADERS if kind == "ort" else []))
        self.kind = kind


class BuildKernels(build_ext):
    def get_ext_filename(self, fullname: str) -> str:
        *pkg, name = fullname.split(".")
        return os.path.join(*pkg, name + ".so")

    def copy_extensions_to_source(self) -> None:  # editable installs: larp_rt/_lib/ is not a package
        lib_dir = ROOT / "larp_rt" / "_lib"
        lib_dir.mkdir(exist_ok=True)
        current = {Path(self.get_ext_filename(e.name)).name for e in self.extensions}
        for stale in lib_dir.glob("liblarp_*.so"):  # e.g. a CUDA library from an earlier build with nvcc
            if stale.name not in current:
                _log(f"removing {stale} (not part of this build)")
                stale.unlink()
        super().copy_extensions_to_source()

    def _run(self, cmd: list[str]) -> subprocess.Popen:
        _log(" ".join(cmd))
        return subprocess.Popen(cmd, cwd=ROOT)

    def _wait(self, procs: list[tuple[subprocess.Popen, str]]) -> None:
        for p, what in procs:
            if p.wait() != 0:
                raise RuntimeError(f"building {what} failed (exit {p.returncode}); see the compiler output above")

    def build_extensions(self) -> None:
        t0 = time.time()
        cxx = os.environ.get("CXX", "g++")
        tmp = Path(self.build_temp).resolve() / "larp_kernels"
        tmp.mkdir(parents=True, exist_ok=True)
        cuda = any(e.kind == "cuda" for e in self.extensions)
        inc = [f"-I{INCLUDE}"]
        objs = {"cpu": tmp / "sampling_cpu.o", "ort": tmp / "ort_sample_op.o", "cuda": tmp / "sampling_cuda.o",
                "attn": tmp / "attention_cpu.o", "mm": tmp / "matmul_cpu.o"}
        procs = []
        if cuda:  # the slowest step first, in parallel with the C++ ones
            archs = [a.strip() for a in os.environ.get("LARP_RT_CUDA_ARCHS", "80;90").split(";") if a.strip()]
            gencode = []
            for a in archs:
                code = f"[sm_{a},compute_{a}]" if a == archs[-1] else f"sm_{a}"
                gencode += ["-gencode", f"arch=compute_{a},code={code}"]
            procs.append((self._run([NVCC, "-O3", "-std=c++17", "--fmad=false", *gencode, "-Xcompiler",
                                     "-fPIC,-fvisibility=hidden,-ffp-contract=off", *inc, "-c",
                                     str(CPP / "csrc" / "sampling_cuda.cu"), "-o", str(objs["cuda"])]),
                          "the CUDA kernel"))
        procs.append((self._run([cxx, *CXXFLAGS, *inc, "-c", str(CPP / "csrc" / "sampling_cpu.cc"), "-o",
                                 str(objs["cpu"])]), "the CPU kernel"))
        attn_src = str(CPP / "csrc" / "attention_cpu.cc")  # FMA contraction: not a bit-exact kernel
        procs.append((self._run([cxx, *CXXFLAGS, "-ffp-contract=fast", *inc, "-c", attn_src, "-o",
                                 str(objs["attn"])]), "the CPU attention kernel"))
        procs.append((self._run([cxx, *CXXFLAGS, *inc, "-c", str(CPP / "csrc" / "matmul_cpu.cc"), "-o",
                                 str(objs["mm"])]), "the CPU packed matmul"))  # explicit FMA intrinsics only
        procs.append((self._run([cxx, *CXXFLAGS, *inc, f"-I{ORT_INCLUDE}", *(["-DLARP_RT_WITH_CUDA"] if cuda else []),
                                 "-c", str(CPP / "csrc" / "ort_sample_op.cc"), "-o", str(objs["ort"])]),
                      "the ONNX Runtime custom op"))
        self._wait(procs)
        links = []
        for ext in self.extensions:
            out = Path(self.get_ext_fullpath(ext.name)).resolve()
            out.parent.mkdir(parents=True, exist_ok=True)
            members = {"cpu": ["cpu", "attn", "mm"], "cuda": ["cpu", "attn", "mm", "cuda"],
                       "ort": ["ort", "cpu", "attn", "mm"] + (["cuda"] if cuda else [])}
            files = [str(objs[m]) for m in members[ext.kind]]
            if "cuda" in members[ext.kind]:
                cmd = [NVCC, "-shared", "-cudart=static", *files, "-o", str(out), "-Xlinker", "-Bsymbolic",
                       "-Xcompiler", "-pthread"]
            else:
                cmd = [cxx, "-shared", "-pthread", *files, "-o", str(out), "-Wl,-Bsymbolic"]
            links.append((self._run(cmd), str(out)))
        self._wait(links)
        _log(f"built {len(self.extensions)} libraries in {time.time() - t0:.1f} s" + ("" if cuda else " (CPU only)"))


def libraries() -> list[KernelLibrary]:
    csrc = CPP / "csrc"
    libs = [
        KernelLibrary("larp_rt._lib.liblarp_sampling", [str(csrc / "sampling_cpu.cc"), str(csrc / "attention_cpu.cc"),
                                                        str(csrc / "matmul_cpu.cc")], "cpu"),
        KernelLibrary("larp_rt._lib.liblarp_rt_ort", [str(csrc / "ort_sample_op.cc"), str(csrc / "sampling_cpu.cc"),
                                                      str(csrc / "attention_cpu.cc"), str(csrc / "matmul_cpu.cc")],
                      "ort"),
    ]
    if NVCC:
        libs.append(KernelLibrary("larp_rt._lib.liblarp_sampling_cuda",
                                  [str(csrc / "sampling_cuda.cu"), str(csrc / "sampling_cpu.cc"),
                                   str(csrc / "attention_cpu.cc"), str(csrc / "matmul_cpu.cc")], "cuda"))
    elif os.environ.get("LARP_RT_CUDA", "").strip().lower() in ("0", "false", "no", "off"):
        _log("LARP_RT_CUDA=0: building the CPU kernels only")
    else:
        _log("no CUDA toolkit found: building the CPU kernels only (set CUDA_HOME to build the CUDA kernels)")
    return libs


setup(ext_modules=libraries(), cmdclass={"build_ext": BuildKernels})
