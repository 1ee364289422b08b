import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


RUFF = shutil.which("ruff") or (str(ROOT / ".venv/bin/ruff") if (ROOT / ".venv/bin/ruff").exists() else None)


@pytest.mark.skipif(RUFF is None, reason="ruff not installed (pip install 'larp_rt[dev]')")
def test_ruff_check_passes():
    r = subprocess.run([RUFF, "check", "--no-cache", str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_python_package_is_in_the_wheel():
    """pyproject's explicit package list must name every package folder (else `pip install .` drops it)."""
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = {"larp_rt": ROOT / "larp_rt", **{k: ROOT / v for k, v in cfg.get("package-dir", {}).items()}}
    found = set()
    for name, root in dirs.items():
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    assert found <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
