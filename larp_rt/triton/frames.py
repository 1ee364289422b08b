"""Frames as the Triton models return them."""

import numpy as np


def to_frames(video: np.ndarray) -> np.ndarray:
    """(B, C, T, H, W) float in [0, 1] -> (B, T, H, W, C) uint8, rounded."""
    return np.clip(np.rint(video.transpose(0, 2, 3, 4, 1) * 255.0), 0, 255).astype(np.uint8)
