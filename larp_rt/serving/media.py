"""The video side of the server, run in worker threads off the event loop: uploads spooled to temporary files and
read (bounded in frames and pixels), tokens decoded and written as mp4 / gif / npy, an upload encoded.

Errors about an upload are 400s naming the upload, never the server's temporary path.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
from fastapi import UploadFile

from ..engine import Engine
from ..video import VideoError, fit_clip, grid, read_video, write_video
from . import schemas as S
from .errors import HTTPError

__all__ = ["MEDIA", "DECODE_CHUNK", "read_upload", "spooled", "render", "encode_upload"]

MEDIA = {"mp4": "video/mp4", "gif": "image/gif", "npy": "application/x-npy"}
DECODE_CHUNK = 16  # token rows per decoder run when a response decodes many


def read_upload(path: str, name: str, max_frames: int, max_pixels: int) -> tuple[np.ndarray, float | None]:
    """An uploaded file's first ``max_frames`` frames (the reader stops there), each at most ``max_pixels``; a 400
    naming the upload (never the server's temp path)."""
    try:
        return read_video(path, max_frames=max_frames, max_pixels=max_pixels)
    except (VideoError, ValueError, OSError) as e:
        raise HTTPError(400, f"unreadable upload {name!r}: {str(e).replace(repr(path), repr(name))}") from None


@contextlib.contextmanager
def spooled(uploads: list[UploadFile]):
    """The uploads as named temporary files (the video reader takes paths; the suffix tells it the container)."""
    with contextlib.ExitStack() as stack:
        out = []
        for up in uploads:
            name = up.filename or "upload"
            suffix = Path(name).suffix.lower()
            suffix = suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else ""
            tmp = stack.enter_context(tempfile.NamedTemporaryFile(prefix="larp_rt-upload-", suffix=suffix))
            shutil.copyfileobj(up.file, tmp)
            tmp.flush()
            out.append((tmp.name, name))
        yield out


def render(engine: Engine, tokens: np.ndarray, fmt: str, fps: float, scale: int) -> bytes:
    """(B, N) tokens -> the bytes of an mp4 / gif (several videos tile a grid) or of an npy of the videos."""
    # (B, 3, T, H, W) float32, decoded DECODE_CHUNK rows at a time: the decoder's activations (and the arena
    # ONNX Runtime keeps for them) grow with the batch, the videos themselves are small beside them
    videos = np.concatenate([engine.decode(tokens[i : i + DECODE_CHUNK])
                             for i in range(0, len(tokens), DECODE_CHUNK)])
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, videos, allow_pickle=False)
        return buf.getvalue()
    with tempfile.TemporaryDirectory(prefix="larp_rt-serve-") as d:
        # several videos tile a grid (as `larp-rt generate` writes them); one is written as it is
        frames = grid(videos, pad=2 if len(videos) > 1 else 0, scale=scale)
        return write_video(Path(d) / f"out.{fmt}", frames, fps=fps).read_bytes()


def encode_upload(engine: Engine, path: str, name: str, max_upload_pixels: int) -> dict:
    """An uploaded video -> its first T frames fitted to the model -> ``EncodeResult`` JSON."""
    C, T, H, W = engine.tokenizer_config.video_shape
    # T + 1 frames at most: enough to know there were more, without decoding a long upload whole
    frames, fps = read_upload(path, name, T + 1, max_upload_pixels)
    t0, h0, w0 = frames.shape[:3]
    notes = []
    if t0 > T:
        frames = frames[:T]
        notes.append(f"kept the first {T} frames of a longer video")
    clip, fit_notes = fit_clip(frames, T, H, W)
    notes += fit_notes
    tokens = engine.encode(clip[None])
    return S.EncodeResult(tokens=tokens.tolist(), notes=[f"{n} (the model takes {T}x{H}x{W})" for n in notes],
                          # frames: null when the upload is longer than T (only its first T frames are read)
                          input={"frames": t0 if t0 <= T else None, "height": h0, "width": w0, "fps": fps},
                          model_input={"frames": T, "height": H, "width": W}).model_dump()
