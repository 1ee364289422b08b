"""The layering of docs/architecture.md, kept by import-linter's contracts in ``.importlinter``.

``larp_rt.export`` and ``larp_rt.training`` install from the top-level folders ``export/`` and ``training/``
(pyproject's package-dir), which import-linter's graph builder cannot see from ``larp_rt/``; the test lays out a
tree of links (``larp_rt/*`` + ``larp_rt/export`` + ``larp_rt/training``) and runs ``lint-imports`` over it in a
fresh interpreter whose first path entry is that tree, so every module of the installed package is in the graph.
Function-level imports count: a lazy import that breaks a layer is a broken contract, not a hidden one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _staged_tree(tmp: Path) -> Path:
    pkg = tmp / "larp_rt"
    pkg.mkdir()
    for entry in (ROOT / "larp_rt").iterdir():
        if entry.name not in ("__pycache__", "_lib"):
            (pkg / entry.name).symlink_to(entry)
    (pkg / "export").symlink_to(ROOT / "export")
    (pkg / "training").symlink_to(ROOT / "training")
    return tmp


def _lint(tmp_path: Path, config: Path) -> subprocess.CompletedProcess:
    stage = _staged_tree(tmp_path / "stage")
    env = dict(os.environ, PYTHONPATH=str(stage))
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--config", str(config), "--no-cache"],
                          cwd=stage, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def stage_dir(tmp_path):
    (tmp_path / "stage").mkdir()
    return tmp_path


def test_contracts_are_kept(stage_dir):
    pytest.importorskip("importlinter", reason="import-linter is not installed (pip install -e '.[dev]')")
    r = _lint(stage_dir, ROOT / ".importlinter")
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"an import breaks the layering of docs/architecture.md:\n{out}"
    assert "Contracts: " in out and " broken" in out and "0 broken" in out, out


def test_a_broken_layer_is_caught(stage_dir):
    """The check is not vacuous: a contract that the tree breaks (export may not import the models, which it
    traces) fails through the same staged tree, so the graph holds the package-dir subpackages."""
    pytest.importorskip("importlinter", reason="import-linter is not installed (pip install -e '.[dev]')")
    config = stage_dir / "broken.ini"
    config.write_text("[importlinter]\nroot_packages =\n    larp_rt\n\n"
                      "[importlinter:contract:x]\nname = x\ntype = forbidden\nsource_modules =\n    larp_rt.export\n"
                      "forbidden_modules =\n    larp_rt.models\n")
    r = _lint(stage_dir, config)
    assert r.returncode != 0 and "larp_rt.export" in r.stdout and "larp_rt.models" in r.stdout, r.stdout + r.stderr

