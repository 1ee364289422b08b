import json
import subprocess
import sys

import pytest
import torch
from _authors import NO_TORCH

from larp_rt import GeneratorConfig, save_pretrained
from larp_rt.cli import main
from larp_rt.models import LARPGenerator


def test_demo_runs(tmp_path, capsys):
    tiny = tmp_path / "ck"
    torch.manual_seed(0)
    save_pretrained(LARPGenerator(GeneratorConfig.from_name("tiny")), tiny / "gen")
    from larp_rt.config import TokenizerConfig
    from larp_rt.models import LARPTokenizer

    save_pretrained(LARPTokenizer(TokenizerConfig.from_name("tiny")), tiny / "tok")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--tokenizer", str(tiny / "tok"),
                 "--generator", str(tiny / "gen")]) == 0
    out = capsys.readouterr().out
    assert "demo ok" in out and "per_token_ms" in out
    assert (tmp_path / "demo" / "samples.mp4").stat().st_size > 0 and (tmp_path / "demo" / "samples.gif").exists()


def test_presets_json(capsys):
    assert main(["presets", "--json"]) == 0
    rows = {(r["model"], r["preset"]): r["params_M"] for r in json.loads(capsys.readouterr().out)}
    assert abs(rows[("tokenizer", "larp-l")] - 172.2) < 0.5 and abs(rows[("generator", "ar-lp")] - 632.0) < 1


def test_info_loads_a_checkpoint(tmp_path, capsys):
    save_pretrained(LARPGenerator(GeneratorConfig.from_name("tiny")), tmp_path / "g")
    assert main(["info", str(tmp_path / "g")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "generator" and info["config"]["dim"] == 128


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "larp_rt.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "larp_rt" in r.stdout


def test_import_larp_rt_without_torch():
    """The runtime core must import where torch is not installed (ONNX Runtime / TensorRT deployments)."""
    code = NO_TORCH + (
        "import larp_rt\n"
        "from larp_rt import TokenizerConfig, GeneratorConfig\n"
        "assert TokenizerConfig.from_name('larp-l').num_tokens == 1024\n"
        "assert 'torch' not in sys.modules\n"
        "try:\n"
        "    larp_rt.load_pretrained('.')\n"
        "except ImportError as e:\n"
        "    print('needs torch:', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "load_pretrained needs PyTorch" in r.stdout and "larp_rt[torch]" in r.stdout
    assert torch  # the test itself runs where torch exists


def test_every_verb_prints_its_help(capsys):
    """`larp-rt VERB --help` formats for every verb (a bare '%' in a help text made argparse raise on `export`)."""
    from larp_rt.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.choices and "export" in a.choices)
    for verb in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0, verb
        assert "usage: larp-rt" in capsys.readouterr().out, verb
