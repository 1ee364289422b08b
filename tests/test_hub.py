"""Hugging Face hub repo ids, resolved offline against a cache this test lays out in huggingface_hub's documented
format: ``models--owner--name/refs/<branch>`` (a commit hash), ``snapshots/<commit>/<file>`` (symlinks) ->
``blobs/<hash>``. Never touches the network: offline mode, or an endpoint on a closed local port."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from _authors import generator_config_json

pytest.importorskip("huggingface_hub")

from larp_rt import load_pretrained  # noqa: E402
from larp_rt.checkpoint import read_config, save_pretrained  # noqa: E402
from larp_rt.cli import main  # noqa: E402
from larp_rt.config import GeneratorConfig  # noqa: E402
from larp_rt.hub import HubError, looks_like_repo_id, resolve_checkpoint  # noqa: E402
from larp_rt.models import LARPGenerator  # noqa: E402

REPO = "hywang66/LARP-L-long-AR-FP"


def lay_out(cache, repo: str, folder, commit: str, ref: str | None = "main") -> None:
    """Put ``folder``'s files into ``cache`` as huggingface_hub stores a downloaded snapshot."""
    base = cache / ("models--" + repo.replace("/", "--"))
    (base / "blobs").mkdir(parents=True, exist_ok=True)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(os.listdir(folder)):
        data = (folder / f).read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (base / "blobs" / blob).write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), snap / f)
    if ref is not None:
        (base / "refs").mkdir(exist_ok=True)
        (base / "refs" / ref).write_text(commit)


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """A cache holding an authors'-format FP generator at main (and another weights file at tag v1)."""
    from safetensors.torch import save_file

    cache = tmp_path / "hub"
    for i, ref in enumerate(("main", "v1")):
        torch.manual_seed(i)
        cfg = GeneratorConfig(dim=32, n_layer=1, n_head=2, vocab_size=32, max_seq_len=8, frame_prediction=True,
                              cls_token_num=9, class_dropout_prob=0.0)
        gen = LARPGenerator(cfg)
        src = tmp_path / f"src{i}"
        src.mkdir()
        (src / "config.json").write_text(json.dumps(generator_config_json(
            dim=32, n_layer=1, n_head=2, vocab_size=32, max_seq_len=8, frame_prediction=True, cls_token_num=9)))
        save_file({k: v.contiguous() for k, v in gen.state_dict().items()}, src / "model.safetensors")
        lay_out(cache, REPO, src, f"{i + 1:040x}", ref)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port: any network attempt fails at once
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HOME", raising=False)
    return cache


def test_repo_ids_and_local_paths(tmp_path):
    assert looks_like_repo_id(REPO) and looks_like_repo_id("a/b")
    assert not looks_like_repo_id(str(tmp_path)) and not looks_like_repo_id("a/b/c") and not looks_like_repo_id("x")
    assert resolve_checkpoint(tmp_path) == tmp_path  # a local folder is returned as it is
    with pytest.raises(HubError, match="revision"):
        resolve_checkpoint(tmp_path, revision="main")


def test_load_pretrained_from_the_cache_offline(hub_cache):
    main_gen = load_pretrained(REPO)
    assert main_gen.config.frame_prediction and main_gen.config.cls_token_num == 9
    kind, cfg, dialect = read_config(REPO)
    assert (kind, dialect) == ("generator", "authors") and cfg == main_gen.config
    v1 = load_pretrained(REPO, revision="v1")
    by_hash = load_pretrained(REPO, revision=f"{2:040x}")
    assert not torch.equal(main_gen.abs_pe, v1.abs_pe) and torch.equal(v1.abs_pe, by_hash.abs_pe)
    folder = resolve_checkpoint(REPO)
    assert folder.name == f"{1:040x}" and folder.parent.name == "snapshots"


def test_cached_repo_loads_when_the_hub_is_unreachable(hub_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")  # online mode, but the endpoint refuses connections: the cache serves
    assert load_pretrained(REPO).config.frame_prediction


def test_clear_errors_for_repos_not_in_the_cache(hub_cache, monkeypatch):
    with pytest.raises(HubError, match="not in the local Hugging Face cache.*HF_HUB_OFFLINE is set"):
        load_pretrained("someone/not-cached")
    with pytest.raises(HubError, match="not in the local Hugging Face cache"):
        load_pretrained(REPO, revision="no-such-branch")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(HubError, match="the hub could not be reached"):
        load_pretrained("someone/not-cached")


def test_cli_info_and_export_take_repo_ids(hub_cache, tmp_path, capsys):
    assert main(["info", REPO]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "generator" and info["dialect"] == "authors" and info["config"]["frame_prediction"]
    assert main(["info", REPO, "--revision", "v1"]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "b"), "--generator", REPO, "--no-verify"]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert "prefix_prefill" in manifest["graphs"]
    assert main(["info", "someone/not-cached"]) == 2
    assert "not in the local Hugging Face cache" in capsys.readouterr().err


def test_our_own_checkpoints_resolve_too(hub_cache, tmp_path):
    torch.manual_seed(0)
    save_pretrained(LARPGenerator(GeneratorConfig.from_name("tiny")), tmp_path / "ours")
    lay_out(hub_cache, "me/tiny-gen", tmp_path / "ours", "f" * 40)
    assert load_pretrained("me/tiny-gen").config == GeneratorConfig.from_name("tiny")
