"""Spectrograms and masks as pictures (TensorBoard images, PNG files next to audio examples)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["spectrogram_picture", "save_png"]


def spectrogram_picture(values: np.ndarray,
                        value_range: tuple[float, float] | None = None) -> np.ndarray:
    """[F, T] non-negative values -> uint8 RGB picture [F, T, 3], low frequencies at the
    bottom, scaled to ``value_range`` (default: its own range; masks: (0, 1)) on a
    blue-to-yellow map."""
    v = np.asarray(values, np.float32)[::-1]
    low, high = value_range if value_range else (float(v.min()), float(v.max()))
    v = np.clip((v - low) / max(high - low, 1e-12), 0.0, 1.0)
    rgb = np.stack([v, v**0.5 * 0.9, 0.6 * (1 - v)], axis=-1)
    return (rgb * 255).astype(np.uint8)


def save_png(path: str | Path, picture: np.ndarray, scale: int = 2) -> None:
    """Writes a uint8 RGB picture [H, W, 3], each pixel ``scale`` x ``scale``, through a
    temporary name."""
    image = Image.fromarray(np.repeat(np.repeat(picture, scale, 0), scale, 1))
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    image.save(temporary, format="PNG")
    os.replace(temporary, path)
