"""Start the ``tritonserver`` of the nvidia-pytriton wheel on a model repository, as PyTriton's launcher does.

What the launcher does that a bare ``tritonserver --backend-directory pytriton/tritonserver/backends`` does not:
the wheel's backends/python/ has no ``triton_python_backend_stub``; the stubs live per Python version in
``python_backend_stubs/3.X/``, and the launcher copies the one of the running interpreter into a backend directory
of its own. It also puts the wheel's ``nvidia_pytriton.libs`` on ``LD_LIBRARY_PATH`` and the environment's
``bin/`` first on ``PATH`` (the stub runs the ``python3`` environment it finds there). Here, in addition, this
interpreter's ``LIBDIR`` goes first on ``LD_LIBRARY_PATH``: the stub links ``libpython3.X.so`` and would otherwise
load the system's, which differs from the venv's interpreter. (PyTriton's numpy<2 pin is why its own models
answered: the stub's numpy conversion misreads numpy 2 arrays; larp_rt's models pass tensors by DLPack.)

    python -m larp_rt.triton.server REPO_DIR [--http-port 8000] [--grpc-port 8001] [--metrics-port 8002]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path


def find_tritonserver() -> Path | None:
    """The wheel's tritonserver binary, or None when nvidia-pytriton is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "tritonserver" / "bin" / "tritonserver"
    return p if p.is_file() else None


def _pytriton_root() -> Path:
    binary = find_tritonserver()
    if binary is None:
        raise RuntimeError("tritonserver is not installed: pip install --no-deps nvidia-pytriton==0.7.0 "
                           "(scripts/setup.sh does it)")
    return binary.parent.parent


def prepare_backends(dest: str | os.PathLike) -> Path:
    """A backend directory with the python backend and the stub of this interpreter's version."""
    root = _pytriton_root()
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise RuntimeError(f"the nvidia-pytriton wheel has no python backend stub for Python {version}")
    py = Path(dest) / "python"
    py.mkdir(parents=True, exist_ok=True)
    for f in (root / "backends" / "python").iterdir():
        if f.is_file():
            shutil.copy2(f, py / f.name)
    shutil.copy2(stub, py / "triton_python_backend_stub")
    return Path(dest)


def server_env(base: dict | None = None) -> dict:
    """The environment for tritonserver: LIBDIR + the wheel's libs on LD_LIBRARY_PATH, this env's bin on PATH."""
    env = dict(os.environ if base is None else base)
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(_pytriton_root().parent.parent / "nvidia_pytriton.libs")]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("LARP_RT_ORT_SPIN", "0")  # the server's instances share the cores
    return env


def _die_with_parent() -> None:
    """In the child: SIGTERM when the process that started it dies (Linux), as PyTriton's launcher does."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """tritonserver on ``repo`` bound to 127.0.0.1 (free ports unless given); ``stop()`` always ends it."""

    def __init__(self, repo: str | os.PathLike, *, http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, address: str = "127.0.0.1", log_path: str | None = None,
                 extra_args: list[str] | None = None):
        self.repo = Path(repo).absolute()
        self.address = address
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.extra_args = list(extra_args or [])
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def http_url(self) -> str:
        return f"{self.address}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.address}:{self.metrics_port}/metrics"

    def command(self, backends: Path) -> list[str]:
        return [str(find_tritonserver()), "--model-repository", str(self.repo), "--backend-directory",
                str(backends), "--http-address", self.address, "--http-port", str(self.http_port),
                "--grpc-address", self.address, "--grpc-port", str(self.grpc_port),
                "--metrics-address", self.address, "--metrics-port", str(self.metrics_port),
                "--allow-metrics", "true", "--allow-gpu-metrics", "false", "--exit-timeout-secs", "10",
                *self.extra_args]

    def start(self, timeout: float = 60.0) -> LocalServer:
        self._tmp = tempfile.TemporaryDirectory(prefix="larp_triton_")
        backends = prepare_backends(Path(self._tmp.name) / "backends")
        self.log_path = self.log_path or str(Path(self._tmp.name) / "server.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(backends), env=server_env(), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode} during start-up:\n{self.logs()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"tritonserver was not ready within {timeout} s:\n{self.logs()}")
            time.sleep(0.25)

    def logs(self, tail: int = 6000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-tail:]
        except (OSError, TypeError):
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """SIGINT (graceful), then SIGKILL after ``timeout``; idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
            except ProcessLookupError:
                pass
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m larp_rt.triton.server", description=__doc__.split("\n")[0])
    p.add_argument("repo")
    p.add_argument("--address", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    a, extra = p.parse_known_args(argv)
    srv = LocalServer(a.repo, http_port=a.http_port, grpc_port=a.grpc_port, metrics_port=a.metrics_port,
                      address=a.address, extra_args=extra)
    with tempfile.TemporaryDirectory(prefix="larp_triton_") as tmp:
        backends = prepare_backends(Path(tmp) / "backends")
        return subprocess.call(srv.command(backends), env=server_env())


if __name__ == "__main__":
    sys.exit(main())
