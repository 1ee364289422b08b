"""Datasets: procedural class-labelled synthetic clips and UCF101-style video folders (PyAV).

Both return ``(video, label)`` with ``video`` a float32 tensor ``(3, T, H, W)`` in [0, 1] and ``label`` an int.

* :class:`SyntheticVideos` renders clip ``i`` as a pure function of ``(seed, i)``: a soft-edged shape
  moving across a smooth textured background. The class (``i % num_classes``) sets the direction of motion,
  the speed, the hue and the shape; position offsets, background colours and texture are per-clip nuisances.
  Everything is low-frequency so a tiny tokenizer can reconstruct it.
* :class:`VideoFolder` reads ``root/<class>/<video>.{avi,mp4,...}`` or a CSV of ``path,label`` lines: ``T``
  consecutive frames from a random start, short-side resize, centre crop, random horizontal flip. Videos that
  cannot be opened or are shorter than ``T`` frames are skipped with a warning and counted (``skipped``).

Augmentation randomness is explicit: item ``key`` (an int the sampler passes, see ``StepBatchSampler``) seeds a
``numpy`` generator together with the dataset seed, so a run is reproducible and resumable.
"""

from __future__ import annotations

import csv
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = [
    "SyntheticVideos", "VideoFolder", "VideoSkipWarning", "StepBatchSampler", "DataError", "VIDEO_EXTENSIONS",
    "read_clip",
]

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg")


class DataError(ValueError):
    """A dataset argument or folder is invalid; the message says what to fix."""


class VideoSkipWarning(UserWarning):
    """A video was skipped (unreadable or too short)."""


def _item(index) -> tuple[int, int]:
    """Dataset indices may be ``i`` or ``(i, key)``; key seeds the augmentation (defaults to i)."""
    if isinstance(index, (tuple, list)):
        return int(index[0]), int(index[1])
    return int(index), int(index)


# --------------------------------------------------------------------------------------------
# Synthetic clips
# --------------------------------------------------------------------------------------------
def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], dtype=np.float32)


class SyntheticVideos(Dataset):
    """Procedural labelled clips; ``dataset[i]`` is a pure function of ``(seed, i)``.

    Class ``c`` (= ``i % num_classes``): motion direction ``2*pi*c/num_classes``, speed 0.45 or 0.6 of the frame
    per clip (alternating with ``c``), hue ``c/num_classes``, a disk for even ``c`` and a rounded square for odd.
    """

    def __init__(self, size: int, *, frames: int = 8, height: int = 32, width: int = 32, num_classes: int = 8,
                 seed: int = 0):
        for name, v in (("size", size), ("frames", frames), ("height", height), ("width", width),
                        ("num_classes", num_classes)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise DataError(f"SyntheticVideos: {name} must be a positive int, got {v!r}")
        if num_classes < 2:
            raise DataError(f"SyntheticVideos: num_classes must be >= 2, got {num_classes}")
        self.size, self.frames, self.height, self.width = size, frames, height, width
        self.num_classes, self.seed = num_classes, int(seed)
        self.skipped = 0  # same interface as VideoFolder
        ys = (np.arange(height, dtype=np.float32) + 0.5) / height
        xs = (np.arange(width, dtype=np.float32) + 0.5) / width
        self._y, self._x = np.meshgrid(ys, xs, indexing="ij")  # (H, W) in (0, 1)
        self._aspect = width / height

    def __len__(self) -> int:
        return self.size

    def label(self, index: int) -> int:
        return int(index) % self.num_classes

    def __getitem__(self, index) -> tuple[torch.Tensor, int]:
        i, _ = _item(index)
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for SyntheticVideos of size {self.size}")
        return torch.from_numpy(self.render(i)), self.label(i)

    def render(self, i: int) -> np.ndarray:
        """Clip i as a float32 array (3, T, H, W) in [0, 1]."""
        c = self.label(i)
        rng = np.random.default_rng([self.seed, i])
        T, y, x = self.frames, self._y, self._x * self._aspect

        # background: vertical blend of two muted colours + a gentle low-frequency wave texture
        c0 = rng.uniform(0.15, 0.55, 3).astype(np.float32)
        c1 = rng.uniform(0.15, 0.55, 3).astype(np.float32)
        theta = rng.uniform(0, 2 * math.pi)
        freq = rng.uniform(1.0, 2.0)
        phase = rng.uniform(0, 2 * math.pi)
        wave = 0.025 * np.sin(2 * math.pi * freq * (x * math.cos(theta) + y * math.sin(theta)) + phase)
        bg = c0[:, None, None] * (1 - y) + c1[:, None, None] * y + wave  # (3, H, W)

        # the moving shape: class-specific direction, speed, hue and form
        angle = 2 * math.pi * c / self.num_classes + rng.uniform(-0.12, 0.12)
        travel = (0.45 if c % 2 == 0 else 0.6) * rng.uniform(0.9, 1.1)  # frame heights over the clip
        vel = np.array([math.cos(angle), -math.sin(angle)]) * travel / max(T - 1, 1)  # (dx, dy) per frame
        radius = rng.uniform(0.16, 0.21)
        centre = np.array([0.5 * self._aspect, 0.5]) + rng.uniform(-0.08, 0.08, 2)
        start = centre - vel * (T - 1) / 2
        hue = (c / self.num_classes + rng.uniform(-0.02, 0.02)) % 1.0
        colour = _hsv_to_rgb(hue, rng.uniform(0.75, 0.95), rng.uniform(0.85, 1.0))
        edge = 1.0 / self.height  # soft edge ~ one pixel

        out = np.empty((3, T, self.height, self.width), dtype=np.float32)
        for t in range(T):
            cx, cy = start + vel * t
            if c % 2 == 0:
                d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) - radius  # disk
            else:
                r = 0.85 * radius  # rounded square: L-infinity-ish distance with rounded corners
                qx, qy = np.maximum(np.abs(x - cx) - 0.6 * r, 0), np.maximum(np.abs(y - cy) - 0.6 * r, 0)
                d = np.sqrt(qx**2 + qy**2) - 0.4 * r
            alpha = 1.0 / (1.0 + np.exp(np.clip(d / edge, -30, 30)))  # (H, W)
            shade = 1.0 - 0.25 * np.clip((y - cy) / radius, -1, 1) * alpha  # soft top light
            out[:, t] = bg * (1 - alpha) + colour[:, None, None] * (alpha * shade)
        return np.clip(out, 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Video folders (UCF101 layout or CSV list)
# --------------------------------------------------------------------------------------------
def _frame_count(path: Path) -> int:
    """Number of decodable frames (from the container header when present, else by decoding)."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        if stream.frames and stream.frames > 0:
            return int(stream.frames)
        return sum(1 for _ in container.decode(stream))


def read_clip(path: str | Path, start: int, frames: int) -> np.ndarray:
    """Frames [start, start + frames) of a video as uint8 (T, H, W, 3); raises ValueError if too short."""
    import av

    out = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for k, frame in enumerate(container.decode(stream)):
            if k >= start:
                out.append(frame.to_ndarray(format="rgb24"))
                if len(out) == frames:
                    break
    if len(out) < frames:
        raise ValueError(f"{len(out)} frames from frame {start}, need {frames}")
    return np.stack(out)


def _resize_crop(clip: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 (T, h, w, 3) -> float (3, T, height, width): short-side resize (bilinear, antialiased), centre crop."""
    import torch.nn.functional as F

    x = torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 255.0  # (T, 3, h, w)
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - height) // 2, (nw - width) // 2
    x = x[:, :, top:top + height, left:left + width]
    return x.permute(1, 0, 2, 3).clamp(0, 1).contiguous()  # (3, T, H, W)


@dataclass(frozen=True)
class _Entry:
    path: Path
    label: int
    frames: int


class VideoFolder(Dataset):
    """``root/<class>/<video>`` (classes sorted by name) or ``csv`` lines ``path,label`` (relative to the CSV).

    ``train=True``: random start and random horizontal flip (keyed by ``(seed, key)``); ``train=False``: the
    middle clip, no flip. Unreadable / too-short videos are skipped with a :class:`VideoSkipWarning`;
    ``skipped`` counts them (at scan time and any that fail later, which are replaced by the next video).
    """

    def __init__(self, root: str | Path | None = None, *, csv_path: str | Path | None = None, frames: int = 16,
                 height: int = 128, width: int = 128, train: bool = True, seed: int = 0,
                 split: str = "all", val_fraction: float = 0.0):
        if (root is None) == (csv_path is None):
            raise DataError("VideoFolder: give exactly one of root (a folder of class folders) or csv_path")
        if split not in ("all", "train", "val"):
            raise DataError(f"VideoFolder: split must be 'all', 'train' or 'val', got {split!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"VideoFolder: val_fraction must be in [0, 1), got {val_fraction!r}")
        self.frames, self.height, self.width, self.train, self.seed = frames, height, width, train, int(seed)
        self.skipped = 0
        items = self._list_csv(Path(csv_path)) if csv_path is not None else self._list_root(Path(root))
        if split != "all" and val_fraction > 0:
            order = np.random.default_rng([self.seed, 7]).permutation(len(items))
            n_val = max(1, round(val_fraction * len(items)))
            chosen = order[:n_val] if split == "val" else order[n_val:]
            items = [items[k] for k in sorted(chosen)]
        self.entries: list[_Entry] = []
        for path, label in items:
            try:
                n = _frame_count(path)
            except Exception as e:  # noqa: BLE001 - any decoder failure means: skip this file
                self._skip(path, f"cannot be read ({type(e).__name__}: {e})")
                continue
            if n < frames:
                self._skip(path, f"has {n} frames, fewer than the {frames} needed")
                continue
            self.entries.append(_Entry(path, label, n))
        if not self.entries:
            where = csv_path if csv_path is not None else root
            raise DataError(f"VideoFolder: no usable video in {str(where)!r} ({self.skipped} skipped); "
                            f"need videos with >= {frames} frames")

    def _list_root(self, root: Path) -> list[tuple[Path, int]]:
        if not root.is_dir():
            raise DataError(f"data root {str(root)!r} does not exist or is not a folder; pass a folder laid out as "
                            "root/<class name>/<video>.avi|mp4 (UCF101) or use --data-csv")
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        items = []
        for label, name in enumerate(self.classes):
            for f in sorted((root / name).iterdir()):
                if f.suffix.lower() in VIDEO_EXTENSIONS:
                    items.append((f, label))
        if not items:
            raise DataError(f"data root {str(root)!r} holds no videos ({', '.join(VIDEO_EXTENSIONS)}) in class "
                            "sub-folders; expected root/<class name>/<video>")
        return items

    def _list_csv(self, path: Path) -> list[tuple[Path, int]]:
        if not path.is_file():
            raise DataError(f"data CSV {str(path)!r} does not exist; give a file of 'path,label' lines")
        items = []
        with path.open(newline="") as f:
            for n, row in enumerate(csv.reader(f), start=1):
                if not row or row[0].startswith("#") or (n == 1 and row[0].strip().lower() == "path"):
                    continue
                if len(row) != 2:
                    raise DataError(f"{path}:{n}: expected 'path,label', got {row!r}")
                try:
                    label = int(row[1])
                except ValueError:
                    raise DataError(f"{path}:{n}: label must be an int, got {row[1]!r}") from None
                p = Path(row[0].strip())
                items.append((p if p.is_absolute() else path.parent / p, label))
        if not items:
            raise DataError(f"data CSV {str(path)!r} lists no videos")
        labels = sorted({lab for _, lab in items})
        self.classes = [str(lab) for lab in labels]
        return items

    def _skip(self, path: Path, why: str) -> None:
        self.skipped += 1
        warnings.warn(f"skipping video {str(path)!r}: {why}", VideoSkipWarning, stacklevel=3)

    @property
    def num_classes(self) -> int:
        return max(e.label for e in self.entries) + 1

    def __len__(self) -> int:
        return len(self.entries)

    def label(self, index: int) -> int:
        return self.entries[int(index)].label

    def __getitem__(self, index) -> tuple[torch.Tensor, int]:
        i, key = _item(index)
        for attempt in range(len(self.entries)):
            e = self.entries[(i + attempt) % len(self.entries)]
            rng = np.random.default_rng([self.seed, key, attempt])
            start = int(rng.integers(0, e.frames - self.frames + 1)) if self.train else (e.frames - self.frames) // 2
            try:
                clip = read_clip(e.path, start, self.frames)
            except Exception as err:  # noqa: BLE001 - a corrupt file must never stop a run
                self._skip(e.path, f"failed while decoding ({type(err).__name__}: {err}); using the next video")
                continue
            video = _resize_crop(clip, self.height, self.width)  # (3, T, H, W)
            if self.train and rng.random() < 0.5:
                video = video.flip(-1)
            return video, e.label
        raise DataError("VideoFolder: every video failed to decode")


# --------------------------------------------------------------------------------------------
# Step-indexed batches (resumable, DDP-aware)
# --------------------------------------------------------------------------------------------
class StepBatchSampler(Sampler):
    """Yields the batches of steps ``start_step .. steps-1`` for one rank as lists of ``(index, key)``.

    Sample ``p = step * global_batch + rank * local_batch + j`` (a global counter) is item
    ``perm_e[p % n]`` of epoch ``e = p // n`` (a seeded permutation per epoch, or the identity with
    ``shuffle=False``); ``key = p`` seeds its augmentation. The data order is a pure function of the step,
    so resuming needs no sampler state, and ranks never overlap.
    """

    def __init__(self, n: int, *, global_batch: int, steps: int, start_step: int = 0, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True):
        if global_batch % world_size:
            raise DataError(f"batch size {global_batch} must be divisible by the number of processes {world_size}")
        self.n, self.global_batch, self.steps, self.start_step = n, global_batch, steps, start_step
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.local_batch = global_batch // world_size
        self._perm_epoch, self._perm = -1, np.arange(n)

    def _index(self, p: int) -> int:
        epoch = p // self.n
        if not self.shuffle:
            return p % self.n
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return int(self._perm[p % self.n])

    def batch(self, step: int) -> list[tuple[int, int]]:
        base = step * self.global_batch + self.rank * self.local_batch
        return [(self._index(p), p) for p in range(base, base + self.local_batch)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.steps):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)


def collate(batch: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(video (3,T,H,W), label)] -> (B, 3, T, H, W) float32, (B,) int64."""
    videos = torch.stack([v for v, _ in batch])
    labels = torch.tensor([int(lab) for _, lab in batch], dtype=torch.int64)
    return videos, labels


def build_datasets(opts, *, frames: int, height: int, width: int) -> tuple[Dataset, Dataset]:
    """(train, held-out) datasets for a ``DataOptions``-like config at the model's clip size."""
    if opts.data == "synthetic":
        common = {"frames": frames, "height": height, "width": width, "num_classes": opts.num_classes}
        return (SyntheticVideos(opts.train_size, seed=opts.data_seed, **common),
                SyntheticVideos(opts.val_size, seed=opts.data_seed + 1, **common))
    if opts.data != "folder":
        raise DataError(f"data must be 'synthetic' or 'folder', got {opts.data!r}")
    src = {"root": opts.data_root} if opts.data_root is not None else {"csv_path": opts.data_csv}
    common = {"frames": frames, "height": height, "width": width, "seed": opts.data_seed,
              "val_fraction": opts.val_fraction}
    if opts.val_fraction > 0:
        return (VideoFolder(**src, train=True, split="train", **common),
                VideoFolder(**src, train=False, split="val", **common))
    return VideoFolder(**src, train=True, **common), VideoFolder(**src, train=False, **common)


def dataset_num_classes(ds: Dataset) -> int:
    return int(ds.num_classes)
