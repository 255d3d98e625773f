"""A frame-rate vocoder: ConvNeXt blocks over the log-mel frames predict the STFT, an inverse STFT
makes the waveform (the design of Vocos, Siuzdak 2023), with one addition of ours: the
log-magnitude is predicted as a correction to the mel filterbank's least-squares inverse.

    x = LayerNorm(Conv(n_mels -> dim, 7)(log_mel))          # [B, T, dim], one row per frame
    x = LayerNorm(ConvNeXt^depth(x))                        # depthwise conv 7, LN, MLP x3, GELU
    log|X| = Dense(x)[:F] + log(max(pinv(mel filterbank) @ exp(log_mel), clamp))
    phase  = Dense(x)[F:]                                   # radians, F = n_fft // 2 + 1 each
    waveform = iSTFT(|X| e^{i phase})                       # centred, the mel front end's framing

Everything runs at the frame rate (62.5 frames/s at 16 kHz, hop 256), so it trains and runs far
faster than HiFi-GAN's sample-rate convolutions; the pseudo-inverse start makes the magnitudes
right early, leaving mostly the phase to learn. ``T`` frames give ``hop * (T - 1)`` samples: the
waveform the centred front end read ``T`` frames from, when its length is a multiple of the hop.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clipsep_jax import audio
from clipsep_jax.families.clipsonic import mel

__all__ = ["ConvNeXtBlock", "ISTFTGenerator"]


class ConvNeXtBlock(nn.Module):
    """[B, T, dim] -> the same: x + scale * MLP(LayerNorm(depthwise conv(x)))."""

    dim: int
    kernel: int = 7
    expansion: int = 3
    layer_scale: float = 0.125  # the residual branch's initial scale (1 / depth in Vocos)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Conv(self.dim, (self.kernel,), padding=[((self.kernel - 1) // 2,) * 2],
                    feature_group_count=self.dim, name="depthwise")(x)
        h = nn.LayerNorm(epsilon=1e-6, name="norm")(h)
        h = nn.Dense(self.expansion * self.dim, name="expand")(h)
        h = nn.Dense(self.dim, name="contract")(nn.gelu(h, approximate=False))
        scale = self.param("scale", nn.initializers.constant(self.layer_scale), (self.dim,))
        return x + scale * h


class ISTFTGenerator(nn.Module):
    """``__call__(log_mel [B, n_mels, T], length=None) -> waveform [B, length]`` (natural-log mel
    magnitudes, as :func:`clipsep_jax.families.clipsonic.mel.log_mel` gives; ``length``
    defaults to hop * (T - 1) and may be up to the samples a centred STFT read T frames from)."""

    settings: mel.MelSettings
    dim: int = 512
    depth: int = 8
    kernel: int = 7
    pseudo_inverse_start: bool = True
    max_log_magnitude: float = 10.0  # exp() is clipped here (an untrained head can overflow)

    @nn.compact
    def __call__(self, log_mel: jax.Array, length: int | None = None) -> jax.Array:
        s = self.settings
        bins = s.n_fft // 2 + 1
        x = jnp.swapaxes(log_mel.astype(jnp.float32), 1, 2)  # [B, T, n_mels]
        h = nn.Conv(self.dim, (7,), padding=[(3, 3)], name="embed")(x)
        h = nn.LayerNorm(epsilon=1e-6, name="embed_norm")(h)
        for i in range(self.depth):
            h = ConvNeXtBlock(self.dim, self.kernel, layer_scale=1.0 / self.depth,
                              name=f"blocks_{i}")(h)
        h = nn.LayerNorm(epsilon=1e-6, name="final_norm")(h)
        out = nn.Dense(2 * bins, name="head")(h)
        log_magnitude, phase = out[..., :bins], out[..., bins:]
        if self.pseudo_inverse_start:
            inverse = jnp.asarray(np.linalg.pinv(mel.mel_filterbank(s).astype(np.float64)),
                                  jnp.float32)  # [bins, n_mels]
            linear = jnp.einsum("fm,btm->btf", inverse, jnp.exp(x),
                                precision=jax.lax.Precision.HIGHEST)
            log_magnitude = log_magnitude + jnp.log(jnp.maximum(linear, s.clamp))
        magnitude = jnp.exp(jnp.minimum(log_magnitude, self.max_log_magnitude))
        spectrum = jnp.swapaxes(magnitude * jnp.exp(1j * phase), 1, 2)  # [B, bins, T]
        return audio.istft(spectrum, hop_length=s.hop_length, win_length=s.win_length,
                           length=length or s.hop_length * (log_mel.shape[-1] - 1))
