"""From mask logits to separated waveforms, as the reference's evaluation does, and a plain SDR.

Mask probabilities are unwarped from the log-frequency axis to the linear one, then thresholded
at 0.5 (in that order, as the reference's evaluation and inference do), multiplied with the
mixture magnitude, combined with the mixture phase and inverted with the inverse STFT; the
waveform is clipped to [-1, 1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from clipsep_jax import audio
from clipsep_jax.errors import UserError

__all__ = ["SeparationError", "binary_masks", "linear_masks", "with_residual", "masked_waveforms",
           "signal_to_distortion"]


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
