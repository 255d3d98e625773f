"""Audio front end: STFT, inverse STFT and the log-frequency warp, as pure jit-able JAX functions.

Conventions match librosa 0.9's defaults as the reference uses them: a periodic Hann window,
``center=True`` with reflect padding, complex spectra of shape ``[..., n_fft // 2 + 1, frames]``.
The log-frequency warp reproduces PyTorch's ``grid_sample(mode="bilinear", align_corners=True)``
on the reference's sampling grids; because the time coordinate of those grids is the identity,
the warp is a fixed linear map along the frequency axis and is applied as one matrix product.

Every function takes its sizes as arguments (usually from ``config.audio``); shapes are static
under ``jax.jit``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import soxr

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.lru_cache(maxsize=16)
def hann_window(win_length: int, n_fft: int) -> np.ndarray:
    """Periodic Hann window of ``win_length`` samples, centred in ``n_fft`` (zero-padded), f64."""
    if win_length > n_fft:
        raise ValueError(f"win_length={win_length} exceeds n_fft={n_fft}")
    n = np.arange(win_length)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / win_length)
    left = (n_fft - win_length) // 2
    return np.pad(window, (left, n_fft - win_length - left))


def num_frames(num_samples: int, hop_length: int) -> int:
    """Frames of a centred STFT of ``num_samples`` samples (65535 samples, hop 256 -> 256)."""
    return 1 + num_samples // hop_length


def stft(
    waveform: jax.Array,
    *,
    n_fft: int = 1024,
    hop_length: int = 256,
    win_length: int = 1024,
    center: bool = True,
) -> jax.Array:
    """Short-time Fourier transform, as ``librosa.stft(..., center=True, pad_mode="reflect")``.

    Args:
      waveform: real signal, shape ``[..., num_samples]``; needs ``num_samples > n_fft // 2``.
      center: reflect-pad ``n_fft // 2`` samples at both ends, so that frame ``t`` is centred on
        sample ``t * hop_length``. Without it the signal is framed as given (``num_samples >=
        n_fft``), which lets a caller pad on the host and bucket lengths for one compilation.
    Returns:
      complex64 spectrum, shape ``[..., n_fft // 2 + 1, frames]`` with ``1 + num_samples //
      hop_length`` frames when centred, ``1 + (num_samples - n_fft) // hop_length`` otherwise.
    """
    waveform = jnp.asarray(waveform, jnp.float32)
    num_samples = waveform.shape[-1]
    if center:
        pad = n_fft // 2
        if num_samples <= pad:
            raise ValueError(
                f"stft: {num_samples} samples is too short for reflect padding of {pad} samples"
            )
        padding = [(0, 0)] * (waveform.ndim - 1) + [(pad, pad)]
        padded = jnp.pad(waveform, padding, mode="reflect")
        frame_count = num_frames(num_samples, hop_length)
    else:
        if num_samples < n_fft:
            raise ValueError(f"stft: {num_samples} samples is shorter than n_fft = {n_fft}")
        padded = waveform
        frame_count = 1 + (num_samples - n_fft) // hop_length
    # [frames, n_fft] sample indices; a gather keeps this one vectorised op for any hop.
    index = np.arange(frame_count)[:, None] * hop_length + np.arange(n_fft)[None, :]
    frames = padded[..., index] * jnp.asarray(hann_window(win_length, n_fft), jnp.float32)
    spectrum = jnp.fft.rfft(frames, n=n_fft, axis=-1)  # [..., frames, bins]
    return jnp.swapaxes(spectrum, -1, -2).astype(jnp.complex64)


def resample(waveform: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Host-side resampling along the first axis (soxr HQ, as ``librosa.load`` does), float32."""
    if rate_in == rate_out:
        return np.asarray(waveform, np.float32)
    return soxr.resample(waveform, rate_in, rate_out, quality="HQ").astype(np.float32)


def stft_numpy(
    waveform: np.ndarray, *, n_fft: int = 1024, hop_length: int = 256, win_length: int = 1024
) -> np.ndarray:
    """:func:`stft` on the host in numpy (centred, reflect padding): complex64 [bins, frames].

    For input pipelines, whose worker processes must not start an accelerator backend.
    """
    waveform = np.asarray(waveform, np.float32)
    pad = n_fft // 2
    if waveform.shape[-1] <= pad:
        raise ValueError(f"stft: {waveform.shape[-1]} samples is too short for padding of {pad}")
    padded = np.pad(waveform, [(0, 0)] * (waveform.ndim - 1) + [(pad, pad)], mode="reflect")
    frame_count = num_frames(waveform.shape[-1], hop_length)
    index = np.arange(frame_count)[:, None] * hop_length + np.arange(n_fft)[None, :]
    frames = padded[..., index] * hann_window(win_length, n_fft).astype(np.float32)
    spectrum = np.fft.rfft(frames, n=n_fft, axis=-1)
    return np.swapaxes(spectrum, -1, -2).astype(np.complex64)


@functools.lru_cache(maxsize=16)
def _window_sum_square(
    frame_count: int, n_fft: int, hop_length: int, win_length: int
) -> np.ndarray:
    """Overlap-added squared window over ``frame_count`` frames, float64 [n_fft + hop * (T - 1)]."""
    squared = hann_window(win_length, n_fft) ** 2
    total = np.zeros(n_fft + hop_length * (frame_count - 1))
    for offset in range(0, hop_length * frame_count, hop_length):  # trace-time constant
        total[offset : offset + n_fft] += squared
    return total


def _overlap_add(frames: jax.Array, hop_length: int) -> jax.Array:
    """Sums frames [..., T, n_fft] placed ``hop_length`` apart into [..., n_fft + hop * (T - 1)]."""
    frame_count, n_fft = frames.shape[-2:]
    batch_shape = frames.shape[:-2]
    if n_fft % hop_length == 0:
        # Each frame is n_fft / hop blocks of one hop; block r of frame t lands on block t + r.
        blocks_per_frame = n_fft // hop_length
        blocks = frames.reshape(*batch_shape, frame_count, blocks_per_frame, hop_length)
        total_blocks = frame_count + blocks_per_frame - 1
        out = jnp.zeros((*batch_shape, total_blocks, hop_length), frames.dtype)
        for r in range(blocks_per_frame):  # a handful of shifted adds, not a loop over frames
            out = out.at[..., r : r + frame_count, :].add(blocks[..., r, :])
        return out.reshape(*batch_shape, total_blocks * hop_length)
    index = np.arange(frame_count)[:, None] * hop_length + np.arange(n_fft)[None, :]
    out = jnp.zeros((*batch_shape, n_fft + hop_length * (frame_count - 1)), frames.dtype)
    return out.at[..., index].add(frames)


def istft(
    spectrum: jax.Array,
    *,
    hop_length: int = 256,
    win_length: int = 1024,
    length: int | None = None,
) -> jax.Array:
    """Inverse STFT, as ``librosa.istft(..., center=True)`` with a Hann window.

    Args:
      spectrum: complex spectrum ``[..., n_fft // 2 + 1, frames]``.
      length: output samples; default ``hop_length * (frames - 1)``, as librosa.
    Returns:
      float32 waveform ``[..., length]``.
    """
    n_fft = 2 * (spectrum.shape[-2] - 1)
    frame_count = spectrum.shape[-1]
    window = jnp.asarray(hann_window(win_length, n_fft), jnp.float32)
    frames = jnp.fft.irfft(jnp.swapaxes(spectrum, -1, -2), n=n_fft, axis=-1) * window
    signal = _overlap_add(frames.astype(jnp.float32), hop_length)
    wss = _window_sum_square(frame_count, n_fft, hop_length, win_length)
    nonzero = wss > np.finfo(np.float32).tiny
    inverse_wss = np.where(nonzero, 1.0 / np.where(nonzero, wss, 1.0), 1.0)
    signal = signal * jnp.asarray(inverse_wss, jnp.float32)
    if length is None:
        length = hop_length * (frame_count - 1)
    start = n_fft // 2
    available = signal.shape[-1] - start
    signal = signal[..., start : start + min(length, available)]
    if length > available:
        padding = [(0, 0)] * (signal.ndim - 1) + [(0, length - available)]
        signal = jnp.pad(signal, padding)
    return signal


def magnitude_phase(spectrum: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Splits a complex spectrum into magnitude and phase angle (radians), both float32."""
    return jnp.abs(spectrum), jnp.angle(spectrum)


def from_magnitude_phase(magnitude: jax.Array, phase: jax.Array) -> jax.Array:
    """Complex spectrum ``magnitude * exp(i * phase)``."""
    return (magnitude * jnp.exp(1j * phase.astype(jnp.float32))).astype(jnp.complex64)


# ---------------------------------------------------------------------------------------------
# Log-frequency warp


def warp_grid_rows(out_bins: int, *, to_log: bool) -> np.ndarray:
    """Normalised source rows in [-1, 1] of the reference's sampling grid, float32 [out_bins].

    ``to_log=True`` is the warp (linear -> log frequency): y' = (21^((y+1)/2) - 11) / 10;
    ``to_log=False`` the unwarp: y' = log(10 y + 11) / log(21) * 2 - 1, for y = linspace(-1, 1).
    Computed in float64 and rounded to float32, as the reference builds its grids.
    """
    y = np.linspace(-1.0, 1.0, out_bins)
    if to_log:
        rows = (np.power(21.0, (y + 1.0) / 2.0) - 11.0) / 10.0
    else:
        rows = np.log(y * 10.0 + 11.0) / np.log(21.0) * 2.0 - 1.0
    return rows.astype(np.float32)


@functools.lru_cache(maxsize=16)
def bilinear_resample_matrix(in_bins: int, out_bins: int, *, to_log: bool) -> np.ndarray:
    """Matrix M [out_bins, in_bins] with ``out = M @ in`` equal to the reference's grid sampling.

    Reproduces ``grid_sample(bilinear, align_corners=True, padding_mode="zeros")`` along one axis:
    a row's source position is ``(y' + 1) / 2 * (in_bins - 1)`` (computed in float32 as PyTorch
    does), split between its two neighbouring bins; neighbours outside the input contribute zero.
    """
    rows = warp_grid_rows(out_bins, to_log=to_log)
    position = ((rows + np.float32(1.0)) / np.float32(2.0)) * np.float32(in_bins - 1)
    lower = np.floor(position)
    frac = (position - lower).astype(np.float64)
    lower = lower.astype(np.int64)
    matrix = np.zeros((out_bins, in_bins), np.float64)
    for neighbour, weight in ((lower, 1.0 - frac), (lower + 1, frac)):
        inside = (neighbour >= 0) & (neighbour < in_bins)
        matrix[np.arange(out_bins)[inside], neighbour[inside]] += weight[inside]
    return matrix.astype(np.float32)


@functools.lru_cache(maxsize=64)
def _time_taps(num_frames_: int) -> tuple[np.ndarray, np.ndarray]:
    """Two-tap interpolation (indices into a zero-padded axis, weights) along time, float32.

    The reference grid's time coordinate x = linspace(-1, 1, T) is the identity only up to float32
    rounding: its source positions miss the integers by up to ~1e-5 of a frame. Reproducing those
    taps keeps warped spectrograms equal to the reference's to float32 precision for any T.
    """
    columns = np.linspace(-1.0, 1.0, num_frames_).astype(np.float32)
    position = ((columns + np.float32(1.0)) / np.float32(2.0)) * np.float32(num_frames_ - 1)
    lower = np.floor(position)
    frac = (position - lower).astype(np.float32)
    lower = lower.astype(np.int64) + 1  # +1: the axis gets one zero frame of padding each side
    index = np.stack([lower, lower + 1])  # [2, T]
    weight = np.stack([np.float32(1.0) - frac, frac])  # [2, T]
    return index, weight


def _resample_time_like_reference(x: jax.Array) -> jax.Array:
    index, weight = _time_taps(x.shape[-1])
    if not weight[1].any():
        return x
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(1, 1)])
    return padded[..., index[0]] * weight[0] + padded[..., index[1]] * weight[1]


def _resample_frequency(x: jax.Array, out_bins: int, *, to_log: bool) -> jax.Array:
    matrix = bilinear_resample_matrix(x.shape[-2], out_bins, to_log=to_log)
    warped = jnp.einsum("of,...ft->...ot", matrix, x, precision=_HIGHEST)
    return _resample_time_like_reference(warped)


def warp_to_log_frequency(magnitude: jax.Array, num_log_bins: int = 256) -> jax.Array:
    """Linear-frequency magnitude ``[..., F, T]`` -> log-frequency ``[..., num_log_bins, T]``."""
    return _resample_frequency(magnitude, num_log_bins, to_log=True)


def unwarp_to_linear_frequency(magnitude: jax.Array, num_linear_bins: int = 513) -> jax.Array:
    """Log-frequency ``[..., L, T]`` (masks, magnitudes) -> linear ``[..., num_linear_bins, T]``."""
    return _resample_frequency(magnitude, num_linear_bins, to_log=False)
