"""HiFi-GAN's discriminators and losses (Kong et al., 2020) in Flax, for training the vocoder.

- :class:`PeriodDiscriminator` / :class:`MultiPeriodDiscriminator` (MPD, periods 2, 3, 5, 7, 11):
  the waveform [B, T] (reflect-padded to a multiple of p) folded into [B, T / p, p] and read by
  2D convolutions with (5, 1) kernels and (3, 1) strides (widths 32, 128, 512, 1024, then 1024
  with stride 1), a (3, 1) output convolution; LeakyReLU 0.1.
- :class:`ScaleDiscriminator` / :class:`MultiScaleDiscriminator` (MSD, 3 scales): 1D grouped
  convolutions (kernels 15, 41 x 5, 5; strides 1, 2, 2, 4, 4, 1, 1; groups 1, 4, 16, 16, 16, 16,
  1), a 3-tap output convolution; scales 2 and 3 read the waveform average-pooled (4, stride 2,
  zero padding 2, counted in the mean) once and twice.

``width_divisor`` shrinks every width (and caps the groups) for small demos; 1 is the paper's.
Each discriminator returns (logits [B, N], feature maps [list of arrays]). The losses (pure
functions, float32 means) are the least-squares GAN losses, the feature-matching loss (2 x the
mean absolute difference per feature map, summed) and the mel reconstruction loss (L1 of the
log-mels, weighted 45 in the paper). The reference trains the convolutions under weight norm
(spectral norm for the first MSD scale); here the weights are plain (the forward pass is the
same for the same effective weights).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["PeriodDiscriminator", "MultiPeriodDiscriminator", "ScaleDiscriminator",
           "MultiScaleDiscriminator", "discriminator_loss", "generator_adversarial_loss",
           "feature_matching_loss", "mel_reconstruction_loss"]

Outputs = tuple[list[jax.Array], list[list[jax.Array]]]


class PeriodDiscriminator(nn.Module):
    """One MPD sub-discriminator: waveform [B, T] -> (logits [B, N], feature maps)."""

    period: int
    width_divisor: int = 1  # every width divided by it (1: the paper's)

    @nn.compact
    def __call__(self, wave: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        batch, length = wave.shape
        if length % self.period:
            pad = self.period - length % self.period
            wave = jnp.pad(wave, ((0, 0), (0, pad)), mode="reflect")
        x = wave.reshape(batch, -1, self.period)[..., None]  # [B, T / p, p, 1]
        features = []
        for i, (width, stride) in enumerate(((32, 3), (128, 3), (512, 3), (1024, 3),
                                             (1024, 1))):
            x = nn.Conv(width // self.width_divisor, (5, 1), strides=(stride, 1),
                        padding=[(2, 2), (0, 0)], name=f"convs_{i}")(x)
            x = nn.leaky_relu(x, 0.1)
            features.append(x)
        x = nn.Conv(1, (3, 1), padding=[(1, 1), (0, 0)], name="conv_post")(x)
        features.append(x)
        # Flattened in PyTorch's [B, C, H, W] order (C = 1): time-major, then the period.
        return x.reshape(batch, -1), features


class MultiPeriodDiscriminator(nn.Module):
    """MPD: one :class:`PeriodDiscriminator` per period."""

    periods: tuple[int, ...] = (2, 3, 5, 7, 11)
    width_divisor: int = 1

    @nn.compact
    def __call__(self, wave: jax.Array) -> Outputs:
        outputs = [PeriodDiscriminator(p, self.width_divisor, name=f"discriminators_{i}")(wave)
                   for i, p in enumerate(self.periods)]
        return [o[0] for o in outputs], [o[1] for o in outputs]


_SCALE_LAYERS = ((128, 15, 1, 1), (128, 41, 2, 4), (256, 41, 2, 16), (512, 41, 4, 16),
                 (1024, 41, 4, 16), (1024, 41, 1, 16), (1024, 5, 1, 1))


class ScaleDiscriminator(nn.Module):
    """One MSD sub-discriminator: waveform [B, T] -> (logits [B, N], feature maps)."""

    width_divisor: int = 1  # every width divided by it; groups capped by the width

    @nn.compact
    def __call__(self, wave: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        x = wave[..., None]  # [B, T, 1]
        features = []
        for i, (width, kernel, stride, groups) in enumerate(_SCALE_LAYERS):
            width = width // self.width_divisor
            x = nn.Conv(width, (kernel,), strides=(stride,), padding=[((kernel - 1) // 2,) * 2],
                        feature_group_count=min(groups, x.shape[-1], width),
                        name=f"convs_{i}")(x)
            x = nn.leaky_relu(x, 0.1)
            features.append(x)
        x = nn.Conv(1, (3,), padding=[(1, 1)], name="conv_post")(x)
        features.append(x)
        return x.reshape(x.shape[0], -1), features


def average_pool(wave: jax.Array) -> jax.Array:
    """PyTorch's AvgPool1d(4, 2, padding=2) on [B, T]: zero padding counted in the mean."""
    padded = jnp.pad(wave, ((0, 0), (2, 2)))
    return jax.lax.reduce_window(padded, 0.0, jax.lax.add, (1, 4), (1, 2), "VALID") / 4.0


class MultiScaleDiscriminator(nn.Module):
    """MSD: :class:`ScaleDiscriminator` on the waveform and on it pooled once and twice."""

    scales: int = 3
    width_divisor: int = 1

    @nn.compact
    def __call__(self, wave: jax.Array) -> Outputs:
        logits, features = [], []
        for i in range(self.scales):
            if i:
                wave = average_pool(wave)
            out, maps = ScaleDiscriminator(self.width_divisor, name=f"discriminators_{i}")(wave)
            logits.append(out)
            features.append(maps)
        return logits, features


def discriminator_loss(real: list[jax.Array], generated: list[jax.Array]) -> jax.Array:
    """Least squares: sum over discriminators of mean((1 - D(real))^2) + mean(D(fake)^2)."""
    return sum(jnp.mean(jnp.square(1.0 - r)) + jnp.mean(jnp.square(g))
               for r, g in zip(real, generated, strict=True))


def generator_adversarial_loss(generated: list[jax.Array]) -> jax.Array:
    """Least squares: sum over discriminators of mean((1 - D(fake))^2)."""
    return sum(jnp.mean(jnp.square(1.0 - g)) for g in generated)


def feature_matching_loss(real: list[list[jax.Array]], generated: list[list[jax.Array]]
                          ) -> jax.Array:
    """2 x the sum over discriminators and layers of mean |features(real) - features(fake)|."""
    return 2.0 * sum(jnp.mean(jnp.abs(r - g)) for rs, gs in zip(real, generated, strict=True)
                     for r, g in zip(rs, gs, strict=True))


def mel_reconstruction_loss(log_mel_real: jax.Array, log_mel_generated: jax.Array,
                            weight: float = 45.0) -> jax.Array:
    """``weight`` x mean |log-mel(real) - log-mel(generated)| (the paper's lambda_mel = 45)."""
    return weight * jnp.mean(jnp.abs(log_mel_real - log_mel_generated))
