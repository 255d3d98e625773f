"""Writing files so that a reader never sees half of one.

A temporary file or folder is created private (mode 0600 / 0700); before it is renamed into
place it gets the mode a plain ``open(path, "w")`` or ``mkdir`` would give (less the umask), so
datasets, configs, models and results stay readable by whoever could read their folder.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import soundfile

__all__ = ["write_text_atomic", "write_wav_atomic", "staging_folder", "FILE_MODE", "DIR_MODE"]


def _umask() -> int:
    umask = os.umask(0o022)  # read once, at import (os.umask can only be read by setting it)
    os.umask(umask)
    return umask


_UMASK = _umask()
FILE_MODE = 0o666 & ~_UMASK  # what open(path, "w") gives
DIR_MODE = 0o777 & ~_UMASK  # what mkdir gives


def staging_folder(final: str | Path, prefix: str | None = None) -> Path:
    """A new empty folder beside ``final`` (default name ``.<name>.tmp-XXXX``) to fill and then
    rename into place, with the mode a plain mkdir would give (mkdtemp's is 0700)."""
    final = Path(final)
    folder = Path(tempfile.mkdtemp(prefix=prefix or f".{final.name}.tmp-", dir=final.parent))
    os.chmod(folder, DIR_MODE)
    return folder


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Writes ``text`` to a temporary file beside ``path``, then renames it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
        os.chmod(temporary, FILE_MODE)
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
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
