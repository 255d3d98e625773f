"""CLIPSonic's denoiser: a U-Net over the log-mel spectrogram conditioned on a CLIP embedding.

Two variants of one module (:class:`Denoiser`, ``spatial_dims``):

- 1D (``spatial_dims=1``): time is the only axis and the mel bands are channels (a small,
  CPU-friendly model for the demo and small runs);
- 2D (``spatial_dims=2``): a single-channel image of mel bands x time, convolved in both.

Conditioning: the time step enters as a sinusoidal embedding of the log signal-to-noise ratio,
the condition as the L2-normalised CLIP embedding (image or text); both pass through MLPs and are
summed into one vector that modulates every residual block (FiLM: scale and shift after the
block's first convolution). Condition dropout for classifier-free guidance swaps the condition
for a learned null embedding (``drop`` [B] booleans). Optionally (``condition_token``), the
blocks at the lowest resolution also attend to the condition projected to one token
(cross-attention), as text-to-audio diffusion models do.

Shapes: ``z`` [B, n_mels, T] (T divisible by 2**(levels - 1)), ``logsnr`` [B], ``condition``
[B, D]; returns the v prediction [B, n_mels, T] in float32.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["Denoiser", "timestep_embedding"]


def timestep_embedding(logsnr: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal features of logsnr [B] -> [B, dim] (frequencies 1 .. 1/1000, as
    transformers' position encodings; logsnr is scaled to about [-1, 1] first)."""
    half = dim // 2
    frequencies = jnp.exp(-math.log(1000.0) * jnp.arange(half) / max(half - 1, 1))
    angles = (logsnr.astype(jnp.float32) / 15.0 * 1000.0)[:, None] * frequencies[None]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; FiLM from the embedding; GroupNorm, SiLU, conv; residual."""

    features: int
    kernel: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, embedding: jax.Array) -> jax.Array:
        groups = min(8, self.features)
        h = nn.silu(nn.GroupNorm(num_groups=min(8, x.shape[-1]), dtype=self.dtype)(x))
        h = nn.Conv(self.features, self.kernel, dtype=self.dtype)(h)
        film = nn.Dense(2 * self.features, dtype=self.dtype)(nn.silu(embedding))
        scale, shift = jnp.split(film, 2, axis=-1)
        expand = (slice(None),) + (None,) * (h.ndim - 2) + (slice(None),)
        h = nn.GroupNorm(num_groups=groups, dtype=self.dtype)(h)
        h = h * (1.0 + scale[expand]) + shift[expand]
        h = nn.Conv(self.features, self.kernel, dtype=self.dtype,
                    kernel_init=nn.initializers.zeros)(nn.silu(h))
        if x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1,) * len(self.kernel), dtype=self.dtype)(x)
        return x + h


class CrossAttention(nn.Module):
    """Positions attend to the condition token (pre-norm, residual)."""

    heads: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, token: jax.Array) -> jax.Array:
        shape = x.shape
        flat = x.reshape(shape[0], -1, shape[-1])
        attended = nn.MultiHeadDotProductAttention(num_heads=self.heads, dtype=self.dtype)(
            nn.LayerNorm(dtype=self.dtype)(flat), token[:, None, :])
        return x + attended.reshape(shape)


class Denoiser(nn.Module):
    """See the module docs. ``widths``: channels per level (the first is the outermost)."""

    spatial_dims: int = 1
    widths: tuple[int, ...] = (128, 256, 256)
    blocks_per_level: int = 2
    embedding_dim: int = 256
    condition_token: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, logsnr: jax.Array, condition: jax.Array,
                 drop: jax.Array | None = None) -> jax.Array:
        if self.spatial_dims not in (1, 2):
            raise ValueError(f"spatial_dims={self.spatial_dims}: expected 1 or 2")
        kernel = (3,) * self.spatial_dims
        batch, n_mels, frames = z.shape
        multiple = 2 ** (len(self.widths) - 1)
        if frames % multiple or (self.spatial_dims == 2 and n_mels % multiple):
            raise ValueError(f"z of {n_mels} bands x {frames} frames: the sizes the U-Net "
                             f"halves must be multiples of {multiple}")
        # Channels last: 1D [B, T, n_mels], 2D [B, n_mels, T, 1].
        x = jnp.swapaxes(z, 1, 2) if self.spatial_dims == 1 else z[..., None]
        x = x.astype(self.dtype)

        unit = condition.astype(jnp.float32)
        unit = unit / jnp.maximum(jnp.linalg.norm(unit, axis=-1, keepdims=True), 1e-6)
        null = self.param("null_condition", nn.initializers.normal(0.02), (unit.shape[-1],))
        if drop is not None:
            unit = jnp.where(drop[:, None], null[None], unit)
        c = nn.Dense(self.embedding_dim, dtype=self.dtype)(unit)
        c = nn.Dense(self.embedding_dim, dtype=self.dtype)(nn.silu(c))
        t = timestep_embedding(logsnr, self.embedding_dim)
        t = nn.Dense(self.embedding_dim, dtype=self.dtype)(t)
        t = nn.Dense(self.embedding_dim, dtype=self.dtype)(nn.silu(t))
        embedding = t + c

        x = nn.Conv(self.widths[0], kernel, dtype=self.dtype)(x)
        skips = []
        for level, width in enumerate(self.widths):
            for _ in range(self.blocks_per_level):
                x = ResBlock(width, kernel, self.dtype)(x, embedding)
                if self.condition_token and level == len(self.widths) - 1:
                    x = CrossAttention(dtype=self.dtype)(x, c)
            skips.append(x)
            if level < len(self.widths) - 1:
                x = nn.Conv(width, kernel, strides=(2,) * self.spatial_dims,
                            dtype=self.dtype)(x)
        for level in reversed(range(len(self.widths))):
            width = self.widths[level]
            x = jnp.concatenate([x, skips[level]], axis=-1)
            for _ in range(self.blocks_per_level):
                x = ResBlock(width, kernel, self.dtype)(x, embedding)
            if level > 0:
                for axis in range(1, 1 + self.spatial_dims):
                    x = jnp.repeat(x, 2, axis=axis)
                x = nn.Conv(self.widths[level - 1], kernel, dtype=self.dtype)(x)
        x = nn.silu(nn.GroupNorm(num_groups=min(8, x.shape[-1]), dtype=self.dtype)(x))
        out_channels = n_mels if self.spatial_dims == 1 else 1
        x = nn.Conv(out_channels, kernel, dtype=self.dtype,
                    kernel_init=nn.initializers.zeros)(x).astype(jnp.float32)
        return jnp.swapaxes(x, 1, 2) if self.spatial_dims == 1 else x[..., 0]
