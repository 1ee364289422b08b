"""Video I/O: read (PyAV), fit to a model's T/H/W, write mp4 (PyAV, H.264) / GIF (Pillow) / npy, grids.

Frames are uint8 (T, H, W, 3) unless said otherwise; model videos are float (C, T, H, W) in [0, 1].
Writes are atomic (a temporary file beside the target, renamed when complete): a failure leaves nothing.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["VideoError", "read_video", "fit_clip", "write_video", "to_frames", "grid", "VIDEO_EXTS"]

VIDEO_EXTS = (".mp4", ".gif", ".npy")


class VideoError(ValueError):
    """A video file cannot be read or written; the message names the file and the reason."""


def read_video(path: str | os.PathLike, max_frames: int | None = None,
               max_pixels: int | None = None) -> tuple[np.ndarray, float]:
    """Decode a video file (anything FFmpeg reads) -> (frames uint8 (T, H, W, 3), fps). ``max_frames``: stop
    after that many; ``max_pixels``: refuse frames larger than that (width x height), from the stream's header
    before anything is decoded, and for every frame decoded (a header may lie)."""
    import av

    p = Path(path)
    if not p.is_file():
        raise VideoError(f"video file {str(p)!r} does not exist")
    frames: list[np.ndarray] = []
    out = None  # with max_frames: one array filled in place (no second copy of a large upload's frames)
    n = 0
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise VideoError(f"{str(p)!r} has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else 25.0
            _check_pixels(stream.codec_context.width, stream.codec_context.height, max_pixels)
            for frame in container.decode(stream):
                _check_pixels(frame.width, frame.height, max_pixels)
                x = frame.to_ndarray(format="rgb24")
                if max_frames is None:
                    frames.append(x)
                else:
                    if out is None:
                        out = np.empty((max_frames, *x.shape), np.uint8)
                    elif x.shape != out.shape[1:]:
                        raise VideoError(f"{str(p)!r} changes frame size mid-stream ({out.shape[1:3]} -> "
                                         f"{x.shape[:2]})")
                    out[n] = x
                n += 1
                if max_frames is not None and n >= max_frames:
                    break
    except VideoError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"cannot read video {str(p)!r}: {e}") from e
    if n == 0:
        raise VideoError(f"video {str(p)!r} has no decodable frames")
    return (np.stack(frames) if out is None else out[:n]), fps


def _check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise VideoError(f"frames of {width}x{height} ({width * height} pixels) are larger than the limit of "
                         f"{max_pixels} pixels per frame: downscale the video first")


def _resize(frame: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((w, h), Image.Resampling.BILINEAR, reducing_gap=None))


def fit_clip(frames: np.ndarray, T: int, H: int, W: int) -> tuple[np.ndarray, list[str]]:
    """First T frames (the last repeated if there are fewer), short-side resize, centre crop to H x W.

    Returns the clip (T, H, W, 3) uint8 and the list of adjustments made (empty if none), for reporting.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise VideoError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    notes = []
    t0, h0, w0 = frames.shape[:3]
    if t0 > T:
        frames = frames[:T]
        notes.append(f"kept the first {T} of {t0} frames")
    elif t0 < T:
        frames = np.concatenate([frames, np.repeat(frames[-1:], T - t0, axis=0)])
        notes.append(f"padded {t0} frames to {T} by repeating the last")
    if (h0, w0) != (H, W):
        s = max(H / h0, W / w0)
        rh, rw = max(H, round(h0 * s)), max(W, round(w0 * s))
        top, left = (rh - H) // 2, (rw - W) // 2
        frames = np.stack([_resize(f, rh, rw)[top : top + H, left : left + W] for f in frames])
        notes.append(f"resized {w0}x{h0} to {rw}x{rh} (short side) and centre-cropped to {W}x{H}")
    return np.ascontiguousarray(frames), notes


def to_frames(video: np.ndarray) -> np.ndarray:
    """Model video (C, T, H, W) float in [0, 1] -> frames (T, H, W, 3) uint8."""
    v = np.asarray(video)
    if v.ndim != 4 or v.shape[0] != 3:
        raise VideoError(f"video must be (3, T, H, W), got {v.shape}")
    return (np.clip(v, 0.0, 1.0).transpose(1, 2, 3, 0) * 255.0 + 0.5).astype(np.uint8)


def grid(videos: np.ndarray, cols: int | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """(B, 3, T, H, W) float in [0, 1] -> one (T, H', W', 3) uint8 clip tiling the samples (row-major)."""
    v = np.asarray(videos)
    if v.ndim != 5:
        raise VideoError(f"videos must be (B, 3, T, H, W), got {v.shape}")
    B = v.shape[0]
    cols = cols or math.ceil(math.sqrt(B))
    rows = math.ceil(B / cols)
    frames = [to_frames(x) for x in v]
    if scale > 1:
        frames = [f.repeat(scale, axis=1).repeat(scale, axis=2) for f in frames]
    T, H, W, _ = frames[0].shape
    out = np.full((T, rows * H + (rows + 1) * pad, cols * W + (cols + 1) * pad, 3), 255, np.uint8)
    for i, f in enumerate(frames):
        r, c = divmod(i, cols)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        out[:, y : y + H, x : x + W] = f
    return out


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0) -> Path:
    """Write frames (T, H, W, 3) uint8 to .mp4 (H.264), .gif or .npy, atomically."""
    p = Path(path)
    ext = p.suffix.lower()
    if ext not in VIDEO_EXTS:
        raise VideoError(f"unsupported output {str(p)!r}: use one of {', '.join(VIDEO_EXTS)}")
    f = np.asarray(frames)
    if f.ndim != 4 or f.shape[-1] != 3 or f.dtype != np.uint8 or f.shape[0] == 0:
        raise VideoError(f"frames must be uint8 (T, H, W, 3) with T >= 1, got {f.dtype} {f.shape}")
    if not fps > 0:
        raise VideoError(f"fps must be > 0, got {fps}")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=ext, dir=p.parent)
    os.close(fd)
    try:
        if ext == ".npy":
            np.save(tmp, f)
        elif ext == ".gif":
            from PIL import Image

            imgs = [Image.fromarray(x) for x in f]
            imgs[0].save(tmp, save_all=True, append_images=imgs[1:], duration=max(1, round(1000 / fps)), loop=0)
        else:
            _write_mp4(tmp, f, fps)
        os.chmod(tmp, 0o644)  # mkstemp files are private; outputs are ordinary files
        os.replace(tmp, p)
    except BaseException:
        os.unlink(tmp)
        raise
    return p


def _write_mp4(path: str, frames: np.ndarray, fps: float) -> None:
    from fractions import Fraction

    import av

    T, H, W, _ = frames.shape
    # yuv420p needs even sizes: pad the right/bottom edge by one pixel where needed
    ph, pw = H + H % 2, W + W % 2
    if (ph, pw) != (H, W):
        frames = np.pad(frames, ((0, 0), (0, ph - H), (0, pw - W), (0, 0)), mode="edge")
    with av.open(path, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = pw, ph, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for x in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(x, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
