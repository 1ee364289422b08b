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
