"""Hugging Face hub ids for checkpoints: ``hywang66/LARP-L-long-AR-FP`` -> a local folder (config.json +
model.safetensors), through ``huggingface_hub`` and its cache, as the authors' own ``from_pretrained`` does.

    folder = resolve_checkpoint("hywang66/LARP-L-long-AR-FP", revision="main")

* A local folder always wins: a path that exists is returned as it is (hub ids are only tried for names of the
  form ``owner/name`` that are not an existing path).
* The files come from the hub's cache (``HF_HUB_CACHE``, or ``HF_HOME``/hub, default ``~/.cache/huggingface/hub``);
  they are downloaded there once when the hub can be reached. ``HF_HUB_OFFLINE=1`` never touches the network
  (the cached snapshot or a clear error). ``revision``: a branch, tag or commit hash (default "main").
* Environment variables are read at call time (``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``), so a process
  can change them between calls.

Needs ``huggingface_hub`` (``pip install 'larp_rt[hub]'``) only when a hub id is given.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["resolve_checkpoint", "looks_like_repo_id", "HubError", "CHECKPOINT_FILES"]

CHECKPOINT_FILES = ("config.json", "model.safetensors")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


class HubError(ValueError):
    """A hub id could not be resolved to a local checkpoint folder; the message says what to do."""


def looks_like_repo_id(path: str | os.PathLike) -> bool:
    """True for ``owner/name`` strings that are not an existing path (a hub repo id)."""
    s = os.fspath(path)
    return bool(_REPO_ID.match(s)) and not Path(s).exists() and ".." not in s


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_checkpoint(path: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A checkpoint folder for ``path``: the path itself when it exists (or is not a repo id), else the cached
    snapshot of the hub repo ``path`` at ``revision`` (downloading config.json + model.safetensors when needed)."""
    if not looks_like_repo_id(path):
        if revision is not None and Path(path).exists():
            raise HubError(f"revision={revision!r} is for hub repo ids; {os.fspath(path)!r} is a local folder")
        return Path(path)
    repo_id = os.fspath(path)
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as e:
        raise HubError(f"{repo_id!r} is not a local folder; to load it as a Hugging Face hub repo id install "
                       "huggingface_hub (pip install 'larp_rt[hub]'), or download the folder and give its path") from e
    offline = _offline()
    kw = {"revision": revision, "local_files_only": offline}
    if os.environ.get("HF_HUB_CACHE"):
        kw["cache_dir"] = os.environ["HF_HUB_CACHE"]
    elif os.environ.get("HF_HOME"):
        kw["cache_dir"] = os.path.join(os.environ["HF_HOME"], "hub")
    if os.environ.get("HF_ENDPOINT"):
        kw["endpoint"] = os.environ["HF_ENDPOINT"]
    where = f"hub repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    folders = []
    try:
        for name in CHECKPOINT_FILES:
            folders.append(Path(hf_hub_download(repo_id, name, **kw)).parent)
    except LocalEntryNotFoundError as e:
        how = ("HF_HUB_OFFLINE is set, so the hub was not asked" if offline else
               "the hub could not be reached")
        raise HubError(
            f"{where} is not in the local Hugging Face cache ({kw.get('cache_dir') or 'the default cache'}) and "
            f"{how}: connect once to download it (or unset HF_HUB_OFFLINE), point HF_HUB_CACHE at a cache that "
            f"holds it, or give the path of a downloaded folder with {' + '.join(CHECKPOINT_FILES)}"
        ) from e
    except RevisionNotFoundError as e:
        raise HubError(f"{where}: no such revision on the hub; give a branch, tag or commit hash "
                       "(--revision)") from e
    except RepositoryNotFoundError as e:
        raise HubError(f"{where}: no such repository on the hub (or it is private / gated: log in with "
                       "`hf auth login`)") from e
    except EntryNotFoundError as e:
        raise HubError(f"{where} has no {name}: not a LARP checkpoint folder ({' + '.join(CHECKPOINT_FILES)})") from e
    except (HfHubHTTPError, OSError) as e:
        raise HubError(f"{where} could not be downloaded ({type(e).__name__}: {e})") from e
    if len({str(f) for f in folders}) != 1:
        raise HubError(f"{where}: config.json and model.safetensors resolved to different snapshots {folders}; "
                       "clear the cache entry and retry")
    return folders[0]
