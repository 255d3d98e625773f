"""From mask logits to separated waveforms, as the reference's evaluation does, a plain SDR, and
what every separator does around its model: windows over a long recording, channels and rates.

Mask probabilities are unwarped from the log-frequency axis to the linear one, then thresholded
at 0.5 (in that order, as the reference's evaluation and inference do), multiplied with the
mixture magnitude, combined with the mixture phase and inverted with the inverse STFT; the
waveform is clipped to [-1, 1].

:func:`blend_windows` runs a model over overlapping windows of a recording's spectrogram and
cross-fades their masks; :func:`separate_channels` takes a recording at any rate with any
channels, separates each channel (or their mean) at the model's rate, and returns outputs like
the input with the residual (the input minus what the queries took together).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipsep_jax import audio
from clipsep_jax.errors import UserError

__all__ = ["SeparationError", "binary_masks", "linear_masks", "with_residual", "masked_waveforms",
           "signal_to_distortion", "window_starts", "blend_windows", "separate_channels"]


class SeparationError(UserError):
    """Bad input to separation: the message names the file or value."""


def binary_masks(values: jax.Array, threshold: float = 0.5, *, logits: bool = True) -> jax.Array:
    """Mask logits (or, with ``logits=False``, probabilities) [..., F, T] -> float32 0/1 masks:
    sigmoid(z) > threshold."""
    probabilities = jax.nn.sigmoid(values.astype(jnp.float32)) if logits else values
    return (probabilities > threshold).astype(jnp.float32)


def with_residual(masks: jax.Array) -> jax.Array:
    """Binary masks [..., N, F, T] -> [..., N + 1, F, T]: the last is what no mask took."""
    return jnp.concatenate([masks, 1.0 - masks.max(axis=-3, keepdims=True)], axis=-3)


def linear_masks(
    config: ml_collections.ConfigDict, probabilities: jax.Array, threshold: float | None = 0.5
) -> jax.Array:
    """Mask probabilities on the model's frequency axis [..., F', T] -> masks on the linear axis
    [..., 513, T]: unwarped, then 0/1 by ``probabilities > threshold`` (None: kept soft)."""
    a = config.audio
    masks = probabilities.astype(jnp.float32)
    if a.log_freq:
        masks = audio.unwarp_to_linear_frequency(masks, a.n_fft // 2 + 1)
    if threshold is not None:
        masks = (masks > threshold).astype(jnp.float32)
    return masks


def masked_waveforms(
    config: ml_collections.ConfigDict, masks: jax.Array, mix_stft: jax.Array, length: int
) -> jax.Array:
    """Linear-frequency masks [..., N, 513, T] (:func:`linear_masks`) and the mixture's complex
    STFT [..., 513, T] -> waveforms [..., N, length] in [-1, 1]."""
    a = config.audio
    spectrum = masks * mix_stft[..., None, :, :]
    waves = audio.istft(spectrum, hop_length=a.hop_length, win_length=a.win_length,
                        length=length)
    return jnp.clip(waves, -1.0, 1.0)


def signal_to_distortion(reference: jax.Array, estimate: jax.Array) -> jax.Array:
    """Plain SDR in dB over the last axis: 10 log10(|s|^2 / |s - s_hat|^2) (a quick validation
    figure; the evaluation reports bss_eval's SDR, SIR and SAR)."""
    signal = jnp.sum(reference**2, axis=-1)
    error = jnp.sum((reference - estimate) ** 2, axis=-1)
    return 10.0 * jnp.log10((signal + 1e-12) / (error + 1e-12))


def window_starts(frames: int, window: int, overlap: int) -> list[int]:
    """First frames of the windows of ``window`` frames over ``frames``, ``window - overlap``
    apart, the last flush with the end (one window at 0 when ``frames <= window``)."""
    hop = window - overlap
    if hop <= 0:
        raise SeparationError(f"overlap of {overlap} frames must be less than the window's "
                              f"{window}")
    starts = list(range(0, max(frames - window, 0) + 1, hop))
    if starts[-1] + window < frames:
        starts.append(frames - window)
    return starts


def blend_windows(magnitude: np.ndarray, window: int, overlap: int,
                  masks_of: Callable[[np.ndarray], np.ndarray], *, batch_size: int,
                  progress: Callable[[float], None] | None = None) -> np.ndarray:
    """A recording's masks from overlapping windows of its spectrogram.

    Args:
      magnitude: [F, T] the recording's magnitude on the model's frequency axis.
      window, overlap: frames per window and frames shared by neighbours
        (:func:`window_starts`); one window when T <= window.
      masks_of: windows [B, F, window] (B <= batch_size) -> masks [B, N, F', window].
      progress: called with the fraction of windows done.

    Returns:
      [N, F', T] float32: the windows' masks blended with linear cross-fades over the overlaps
      (weight 1 in between). Frames past the end repeat the recording backwards: zeros would be
      silence the model never heard next to sound, and would colour the last real frames.
    """
    frames = magnitude.shape[1]
    starts = window_starts(frames, window, overlap)
    extra = max(frames, starts[-1] + window) - frames
    padded = np.pad(magnitude, ((0, 0), (0, extra)), mode="symmetric")
    ramp = np.ones(window, np.float32)
    if len(starts) > 1:
        fade = np.linspace(0.0, 1.0, overlap + 2, dtype=np.float32)[1:-1]
        ramp[:overlap], ramp[window - overlap:] = fade, fade[::-1]
    total = weight = None
    for i in range(0, len(starts), batch_size):
        chunk = starts[i:i + batch_size]
        out = np.asarray(masks_of(np.stack([padded[:, s:s + window] for s in chunk])),
                         np.float32)
        if total is None:
            total = np.zeros((*out.shape[1:3], padded.shape[1]), np.float32)
            weight = np.zeros(padded.shape[1], np.float32)
        for s, masks in zip(chunk, out, strict=True):
            total[:, :, s:s + window] += masks * ramp
            weight[s:s + window] += ramp
        if progress is not None:
            progress(min(1.0, (i + len(chunk)) / len(starts)))
    return total[:, :, :frames] / weight[:frames]


LaneResult = tuple[np.ndarray, np.ndarray, Any]


def separate_channels(waveform: np.ndarray, sample_rate: int, model_rate: int,
                      separate_lane: Callable[[np.ndarray, Callable[[float], None] | None],
                                              LaneResult],
                      *, channels: str = "each",
                      progress: Callable[[float], None] | None = None
                      ) -> tuple[list[np.ndarray], Any]:
    """A recording [samples] or [samples, channels] at any rate -> (outputs, the first lane's
    extra): one estimate per query, then the residual, each like the input (rate, length,
    channels).

    ``separate_lane(mono [S] at model_rate, progress)`` -> (estimates [N, S], taken [S]: what
    the queries took together, extra: anything the caller wants back of the first lane, e.g. its
    masks). ``channels``: "each" (each channel separated) or "downmix" (their mean separated
    and written to every channel). The residual, at the input's rate, is the input minus what
    the queries took: content the model cannot see (above model_rate / 2) stays in it, and
    nothing of the input is lost. ``progress`` is called with the fraction done.
    """
    data = np.asarray(waveform, np.float32)
    mono = data.ndim == 1
    data = data[:, None] if mono else data
    if data.ndim != 2 or data.shape[0] == 0:
        raise SeparationError(f"expected audio [samples] or [samples, channels], got "
                              f"{np.shape(waveform)}")
    if not np.isfinite(data).all():
        raise SeparationError("the recording contains NaN or infinite samples")
    if channels not in ("each", "downmix"):
        raise SeparationError(f"channels must be 'each' or 'downmix', got {channels!r}")
    lanes = [data.mean(axis=1)] if channels == "downmix" else list(data.T)
    per_lane, first = [], None
    for index, lane in enumerate(lanes):
        at_rate = audio.resample(lane, sample_rate, model_rate)
        lane_progress = None if progress is None else functools.partial(
            _lane_progress, progress, index, len(lanes))
        estimates, taken, extra = separate_lane(at_rate, lane_progress)
        if index == 0:
            first = extra
        back = [_fit(audio.resample(x, model_rate, sample_rate), len(data)) for x in estimates]
        union = _fit(audio.resample(taken, model_rate, sample_rate), len(data))
        per_lane.append([*back, lane - union])
        if progress is not None:
            progress((index + 1) / len(lanes))
    outputs = []
    for index in range(len(per_lane[0])):
        stacked = np.stack([lane[index] for lane in per_lane], axis=1)
        if channels == "downmix" and not mono:
            stacked = np.repeat(stacked, data.shape[1], axis=1)
        outputs.append(stacked[:, 0] if mono else stacked)
    return outputs, first


def _lane_progress(progress: Callable[[float], None], index: int, count: int,
                   fraction: float) -> None:
    """Lane ``index`` of ``count`` at ``fraction`` -> the whole job's fraction."""
    progress((index + fraction) / count)


def _fit(x: np.ndarray, length: int) -> np.ndarray:
    return x[:length] if len(x) >= length else np.pad(x, (0, length - len(x)))
