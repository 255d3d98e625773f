"""TFDS's dataset writer without TensorFlow, for splits larger than its in-memory shuffle buffer.

TFDS shuffles a split's examples in memory up to ``tfds.core.shuffle.MAX_MEM_BUFFER_SIZE`` (1 GB)
and beyond that spills them into 1000 bucket files, which it opens through ``tf.io.gfile``: with
TensorFlow absent (it is not a dependency of this project) every split over 1 GB, such as a real
MUSIC or VGGSound build, fails with ``No module named 'tensorflow'``. :func:`install` gives the
shuffler a file layer made of ``etils.epath`` (local and cloud paths) when TensorFlow cannot be
imported, and raises the process's open-file limit so that the buckets fit. The on-disk order of
the examples is TFDS's own either way (a stable hash of the keys).
"""

from __future__ import annotations

import importlib.util
import resource
import types

from etils import epath
from tensorflow_datasets.core import shuffle

__all__ = ["install"]

_OPEN_FILES_WANTED = 4096  # the shuffler's 1000 buckets, the writer's shards and headroom


class _ResourceExhaustedError(Exception):
    """Stands in for ``tf.errors.ResourceExhaustedError`` (which the shuffler catches)."""

    message = ""


def _gfile(path, mode: str = "r"):
    return epath.Path(path).open(mode)


def _exists(path) -> bool:
    return epath.Path(path).exists()


def _remove(path) -> None:
    epath.Path(path).unlink()


_FILE_LAYER = types.SimpleNamespace(
    io=types.SimpleNamespace(gfile=types.SimpleNamespace(GFile=_gfile, exists=_exists,
                                                         remove=_remove)),
    errors=types.SimpleNamespace(ResourceExhaustedError=_ResourceExhaustedError),
)


def install() -> None:
    """Lets the TFDS shuffler spill to disk without TensorFlow; nothing when TensorFlow is
    installed (it is then TFDS's own path). Safe to call more than once."""
    if importlib.util.find_spec("tensorflow") is not None:
        return
    shuffle.tf = _FILE_LAYER
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else min(
        hard, _OPEN_FILES_WANTED)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
