"""The documentation: the MkDocs site builds with --strict (no broken link, anchor or nav entry), and the README
stays short, runs CI's own test command and links only to files that exist."""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 260

# [text](target) and ![alt](target); the target ends at whitespace or ')' (no titles are used)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _code_blocks(text: str) -> list[str]:
    """The contents of the fenced code blocks of a Markdown text."""
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)


def _outside_code(text: str) -> str:
    """The text without fenced code blocks or inline code spans (links inside them are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _relative_links(text: str) -> list[str]:
    return [t for t in _LINK.findall(_outside_code(text)) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def _outside_code_keep_spans(text: str) -> str:
    """The text without fenced code blocks (headings keep their code spans)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def _anchors(md: Path) -> set[str]:
    """The heading ids MkDocs gives a page (the toc extension's default slugify)."""
    from markdown.extensions.toc import slugify

    headings = re.findall(r"^#{1,6} +(.+?) *#*$", _outside_code_keep_spans(md.read_text()), flags=re.M)
    return {slugify(h.replace("`", ""), "-") for h in headings}


def test_mkdocs_build_strict(tmp_path):
    """`mkdocs build --strict`: any warning (a broken link or anchor, a page missing from the nav, a mkdocstrings
    name that does not resolve) fails the build, and this test with its output."""
    for mod in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed (pip install -e '.[dev]' installs the docs tools)")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--clean", "-q", "-f", str(ROOT / "mkdocs.yml"),
         "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{out}"
    assert "WARNING" not in out, f"mkdocs build printed warnings:\n{out}"
    assert (tmp_path / "site" / "api" / "index.html").exists()
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("engine.Engine", "sampling.SamplingParams", "bundle.Bundle", "serving.Scheduler"):
        assert f'id="larp_rt.{name}"' in api, f"the API reference lacks larp_rt.{name}"


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move sections to docs/"


def test_readme_test_command_is_what_ci_runs():
    """The README's test command is, verbatim, the command `.ci/run` runs (its last command line)."""
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [ln for ln in lines if ln and not ln.startswith("#")]
    ci = commands[-1]
    assert "pytest" in ci, f".ci/run's last command is not the test command: {ci!r}"
    readme_cmds = [ln.strip() for block in _code_blocks(README.read_text()) for ln in block.splitlines()]
    assert ci in readme_cmds, f"README.md has no code line equal to .ci/run's command {ci!r}"


def test_readme_demo_command():
    readme_cmds = [ln.strip() for block in _code_blocks(README.read_text()) for ln in block.splitlines()]
    assert "bash scripts/setup.sh && .venv/bin/larp-rt demo" in readme_cmds


def test_readme_links_point_to_existing_files():
    """Every relative link of README.md (docs pages, images, other READMEs) names a file that exists, and an anchor
    into a Markdown file names one of its headings."""
    links = _relative_links(README.read_text())
    assert any(t.startswith("docs/") for t in links), "README.md links to no docs/ page"
    bad = []
    for target in links:
        path, _, anchor = target.partition("#")
        dest = (ROOT / path) if path else README
        if not dest.exists():
            bad.append(f"{target}: {path} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: {path} has no heading with the anchor #{anchor}")
    assert not bad, "broken links in README.md:\n" + "\n".join(bad)


def test_readme_cli_table_names_every_verb():
    """Every verb `larp-rt` registers appears in the README's CLI table as `larp-rt VERB`."""
    cli = pytest.importorskip("larp_rt.cli")
    parser = cli.build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    table = "\n".join(ln for ln in README.read_text().splitlines() if ln.startswith("| `larp-rt "))
    missing = [v for v in verbs if f"`larp-rt {v} " not in table and f"`larp-rt {v}`" not in table]
    assert not missing, f"CLI verbs missing from the README's table: {missing}"
