"""clu metric writers for training: log lines plus TensorBoard event files.

clu's own TensorBoard writer needs TensorFlow, which this project does not install. Where
TensorFlow is missing, ``clu.metric_writers.SummaryWriter`` is provided by
:class:`TensorBoardXWriter` (tensorboardX writes the same event files: scalars, images, audio,
text, histograms, hyperparameters), so that clu's writers, ``create_default_writer`` included,
work unchanged.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Mapping
from typing import Any

import numpy as np

_SHIM = "clu.metric_writers.summary_writer"


def _tensorboardx_writer_class():
    # clu.metric_writers' __init__ imports its TensorFlow writer: importable only after the
    # shim below is installed, so clu is imported here, not at the top.
    from clu.metric_writers import interface

    class TensorBoardXWriter(interface.MetricWriter):
        """A clu MetricWriter that writes TensorBoard event files with tensorboardX."""

        def __init__(self, logdir: str):
            import tensorboardX  # only where TensorFlow is missing

            self._writer = tensorboardX.SummaryWriter(logdir, flush_secs=30)

        def write_summaries(self, step: int, values: Mapping[str, Any], metadata=None):
            for key, value in values.items():
                self._writer.add_scalar(key, float(np.asarray(value)), step)

        def write_scalars(self, step: int, scalars: Mapping[str, Any]):
            for key, value in scalars.items():
                self._writer.add_scalar(key, float(np.asarray(value)), step)

        def write_images(self, step: int, images: Mapping[str, Any]):
            for key, value in images.items():
                value = np.asarray(value)
                value = value[None] if value.ndim == 3 else value
                self._writer.add_images(key, value, step, dataformats="NHWC")

        def write_videos(self, step: int, videos: Mapping[str, Any]):
            for key, value in videos.items():
                self._writer.add_video(key, np.asarray(value), step)

        def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
            for key, value in audios.items():
                value = np.asarray(value)
                value = value[None] if value.ndim == 2 else value  # [N, samples, channels]
                for i, clip in enumerate(value):
                    self._writer.add_audio(f"{key}/{i}", clip[:, 0], step,
                                           sample_rate=sample_rate)

        def write_texts(self, step: int, texts: Mapping[str, str]):
            for key, value in texts.items():
                self._writer.add_text(key, value, step)

        def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets=None):
            for key, value in arrays.items():
                self._writer.add_histogram(key, np.asarray(value), step)

        def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None):
            pass  # not written by this project

        def write_hparams(self, hparams: Mapping[str, Any]):
            flat = {k: v if isinstance(v, int | float | str | bool) else str(v)
                    for k, v in hparams.items()}
            self._writer.add_text("hparams", "\n".join(f"{k}: {v}" for k, v in flat.items()))

        def flush(self):
            self._writer.flush()

        def close(self):
            self._writer.close()

    return TensorBoardXWriter


def _install_shim() -> None:
    if importlib.util.find_spec("tensorflow") is not None or _SHIM in sys.modules:
        return
    shim = types.ModuleType(_SHIM)
    cache = {}

    def getattr_(name):
        if name == "SummaryWriter":
            if "cls" not in cache:
                cache["cls"] = _tensorboardx_writer_class()
            return cache["cls"]
        raise AttributeError(name)

    shim.__getattr__ = getattr_
    sys.modules[_SHIM] = shim


_install_shim()

from clu import metric_writers  # noqa: E402  (after the shim)

__all__ = ["metric_writers", "create_writer"]


def create_writer(logdir: str, *, is_main_process: bool = True) -> metric_writers.MetricWriter:
    """Log lines and TensorBoard events in ``logdir`` on the main process, written
    asynchronously; other processes write nothing."""
    return metric_writers.create_default_writer(logdir, just_logging=not is_main_process,
                                                asynchronous=True)
