"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import soundfile

__all__ = ["write_text_atomic", "write_wav_atomic"]


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Writes ``text`` to a temporary file beside ``path``, then renames it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_wav_atomic(path: str | Path, wave: np.ndarray, sample_rate: int) -> Path:
    """Writes a float waveform [samples] (or [samples, channels]) as 32-bit float WAV through a
    temporary file beside ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".wav", dir=path.parent)
    os.close(handle)
    try:
        soundfile.write(temporary, np.asarray(wave), sample_rate, subtype="FLOAT")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
