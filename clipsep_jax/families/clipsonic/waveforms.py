"""From generated log-mels to waveforms without a neural vocoder: Griffin-Lim.

Until the neural vocoder exists (issue 17), :func:`griffin_lim_from_log_mel` turns a log-mel
back into audio: the mel magnitudes are mapped to linear-frequency magnitudes by non-negative
least squares (the pseudo-inverse clipped at zero, refined by multiplicative updates, which keep
every value non-negative; the pseudo-inverse alone loses about half the mel energy to the
clipping), then Griffin-Lim (Griffin & Lim, 1984) finds a phase by alternating
the project's STFT and inverse STFT (``iterations`` rounds from a seeded random phase, the loop
compiled inside). The result is clearly a Griffin-Lim waveform (phasey), labelled as such by the
``generate`` command.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from clipsep_jax import audio
from clipsep_jax.families.clipsonic import mel

__all__ = ["mel_pseudo_inverse", "mel_to_linear", "griffin_lim", "griffin_lim_from_log_mel"]


@functools.lru_cache(maxsize=8)
def mel_pseudo_inverse(settings: mel.MelSettings = mel.MelSettings()) -> np.ndarray:  # noqa: B008
    """[n_fft // 2 + 1, n_mels]: the least-squares inverse of the mel filterbank."""
    return np.linalg.pinv(mel.mel_filterbank(settings).astype(np.float64)).astype(np.float32)


def mel_to_linear(mel_magnitudes: jax.Array, settings: mel.MelSettings,
                  iterations: int = 200) -> jax.Array:
    """Mel magnitudes [..., n_mels, T] -> non-negative linear magnitudes [..., bins, T] that the
    filterbank M maps back to them as closely as it can: S <- S * (M^T y) / (M^T M S)."""
    bank = jnp.asarray(mel.mel_filterbank(settings))
    start = jnp.einsum("fm,...mt->...ft", jnp.asarray(mel_pseudo_inverse(settings)),
                       mel_magnitudes, precision=jax.lax.Precision.HIGHEST)
    numerator = jnp.einsum("mf,...mt->...ft", bank, mel_magnitudes,
                           precision=jax.lax.Precision.HIGHEST)

    def update(_, linear):
        projected = jnp.einsum("mf,...ft->...mt", bank, linear,
                               precision=jax.lax.Precision.HIGHEST)
        back = jnp.einsum("mf,...mt->...ft", bank, projected,
                          precision=jax.lax.Precision.HIGHEST)
        return linear * numerator / (back + 1e-12)

    return jax.lax.fori_loop(0, iterations, update, jnp.maximum(start, 1e-6))


def griffin_lim(magnitude: jax.Array, settings: mel.MelSettings, iterations: int,
                key: jax.Array, length: int | None = None) -> jax.Array:
    """Linear magnitudes [..., n_fft // 2 + 1, T] -> waveform [..., length] (default
    hop * (T - 1); up to the samples a centred STFT read T frames from)."""
    iteration_length = settings.hop_length * (magnitude.shape[-1] - 1)
    phase = jax.random.uniform(key, magnitude.shape, minval=-np.pi, maxval=np.pi)
    spectrum = magnitude * jnp.exp(1j * phase)

    def invert(spectrum, length=iteration_length):
        return audio.istft(spectrum, hop_length=settings.hop_length,
                           win_length=settings.win_length, length=length)

    def body(_, spectrum):
        rebuilt = audio.stft(invert(spectrum), n_fft=settings.n_fft,
                             hop_length=settings.hop_length, win_length=settings.win_length)
        return magnitude * jnp.exp(1j * jnp.angle(rebuilt))

    return invert(jax.lax.fori_loop(0, iterations, body, spectrum), length or iteration_length)


def griffin_lim_from_log_mel(log_mel_values: jax.Array, settings: mel.MelSettings,
                             iterations: int = 64, key: jax.Array | None = None,
                             length: int | None = None) -> jax.Array:
    """Log-mel [..., n_mels, T] (not normalised) -> waveform [..., length] float32 (default
    hop * (T - 1))."""
    magnitudes = mel_to_linear(jnp.exp(log_mel_values), settings)
    key = jax.random.key(0) if key is None else key
    return griffin_lim(magnitudes, settings, iterations, key, length)
