"""CLIPSonic's mel front end: log-mel spectrograms of 16 kHz audio, as pure jit-able functions.

The settings (:class:`MelSettings`) are the usual vocoder front end for 16 kHz audio, a choice
of this project (the paper does not give its own): n_fft 1024, hop 256 (62.5 frames per second),
Hann window, centred frames with reflect padding, 80 mel bands from 0 to 8 kHz on the Slaney mel
scale with Slaney-normalised triangles (librosa's defaults), magnitude (not power) spectra, and
the log of the mel magnitudes clamped at 1e-5. For the diffusion model the log-mel is mapped
linearly from [log(1e-5), ``log_max``] to [-1, 1] (:func:`normalize`); values above ``log_max``
are not clipped, so :func:`denormalize` inverts it exactly.

``log_mel(waveform)`` equals ``log(max(librosa.feature.melspectrogram(y=waveform, sr=16000,
n_fft=1024, hop_length=256, power=1.0, n_mels=80, fmin=0, fmax=8000, pad_mode="reflect"),
1e-5))`` (librosa 0.10 pads with zeros by default; the project's STFT reflects, as librosa 0.9
and the separators' front end do).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from clipsep_jax import audio

__all__ = ["MelSettings", "hz_to_mel", "mel_to_hz", "mel_filterbank", "mel_spectrogram",
           "log_mel", "normalize", "denormalize"]


@dataclasses.dataclass(frozen=True)
class MelSettings:
    sample_rate: int = 16000  # Hz
    n_fft: int = 1024
    hop_length: int = 256
    win_length: int = 1024
    n_mels: int = 80
    fmin: float = 0.0  # Hz
    fmax: float = 8000.0  # Hz
    clamp: float = 1e-5  # smallest mel magnitude before the log
    log_max: float = 2.5  # log-mel mapped to +1 (a full-scale tone reaches about 2)

    @property
    def log_min(self) -> float:
        return float(np.log(self.clamp))


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """Slaney's mel scale: linear (3 mels per 200 Hz) below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, log_step = min_log_hz / f_sp, np.log(6.4) / 27.0
    linear = hz / f_sp
    return np.where(hz >= min_log_hz,
                    min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / log_step,
                    linear)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    mel = np.asarray(mel, np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, log_step = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(log_step * (mel - min_log_mel)),
                    f_sp * mel)


@functools.lru_cache(maxsize=8)
def mel_filterbank(settings: MelSettings = MelSettings()) -> np.ndarray:  # noqa: B008
    """[n_mels, n_fft // 2 + 1] float32: triangles between consecutive mel points, each scaled
    by 2 / (its width in Hz) (Slaney's area normalisation)."""
    bins = np.linspace(0, settings.sample_rate / 2, settings.n_fft // 2 + 1)
    points = mel_to_hz(np.linspace(hz_to_mel(settings.fmin), hz_to_mel(settings.fmax),
                                   settings.n_mels + 2))
    widths = np.diff(points)
    slopes = points[:, None] - bins[None, :]
    rising = -slopes[:-2] / widths[:-1, None]
    falling = slopes[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (points[2:] - points[:-2]))[:, None]
    return weights.astype(np.float32)


def mel_spectrogram(waveform: jax.Array, settings: MelSettings = MelSettings()  # noqa: B008
                    ) -> jax.Array:
    """Waveform [..., samples] -> mel magnitudes [..., n_mels, frames] (1 + samples // hop
    frames), float32."""
    spectrum = audio.stft(waveform, n_fft=settings.n_fft, hop_length=settings.hop_length,
                          win_length=settings.win_length)
    magnitude = jnp.abs(spectrum)
    return jnp.einsum("mf,...ft->...mt", jnp.asarray(mel_filterbank(settings)), magnitude,
                      precision=jax.lax.Precision.HIGHEST)


def log_mel(waveform: jax.Array, settings: MelSettings = MelSettings()  # noqa: B008
            ) -> jax.Array:
    """Waveform [..., samples] -> log of the clamped mel magnitudes [..., n_mels, frames]."""
    return jnp.log(jnp.maximum(mel_spectrogram(waveform, settings), settings.clamp))


def normalize(log_mel_values: jax.Array, settings: MelSettings = MelSettings()  # noqa: B008
              ) -> jax.Array:
    """Log-mel -> the diffusion model's range: log(clamp) -> -1, ``log_max`` -> +1."""
    span = settings.log_max - settings.log_min
    return (log_mel_values - settings.log_min) / span * 2.0 - 1.0


def denormalize(values: jax.Array, settings: MelSettings = MelSettings()  # noqa: B008
                ) -> jax.Array:
    """Inverse of :func:`normalize`."""
    span = settings.log_max - settings.log_min
    return (values + 1.0) / 2.0 * span + settings.log_min
