"""Query heads and the separation models: CLIPSep, CLIPSep-NIT, PIT and LabelSep.

Each model maps the network input (log of the log-frequency mixture magnitude, [B, F, T]) and its
queries to pre-sigmoid mask logits in the log-frequency domain:

- ``query_logits`` [B, N, F, T]: one mask per query (PIT: one per output channel);
- ``noise_logits`` [B, H, F, T]: CLIPSep-NIT's noise heads.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipsep_jax.families.clipsep.layers import (
    conv_kernel_init,
    dense_kernel_init,
    torch_default_bias_init,
)
from clipsep_jax.families.clipsep.unet import UNet


class QueryProjection(nn.Module):
    """Linear(query_dim -> k) with the reference's init; returns pre-sigmoid [..., k] in float32."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, query: jax.Array) -> jax.Array:
        dense = nn.Dense(
            self.features,
            kernel_init=dense_kernel_init,
            bias_init=torch_default_bias_init(query.shape[-1]),
            dtype=self.dtype,
            name="dense",
        )
        return dense(query).astype(jnp.float32)


class MaskSynthesis(nn.Module):
    """Late fusion: z[n, f, t] = sum_c q[n, c] * scale_c * F[f, t, c] + bias.

    Takes query vectors q [B, N, k] (after the sigmoid) and U-Net features [B, F, T, k]; returns
    float32 logits [B, N, F, T].
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, query_vectors: jax.Array, features: jax.Array) -> jax.Array:
        channels = features.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (1,))
        weights = (query_vectors * scale).astype(self.dtype)
        logits = jnp.einsum(
            "bnc,bftc->bnft", weights, features.astype(self.dtype),
            preferred_element_type=jnp.float32,
        )
        return logits + bias


class _Separator(nn.Module):
    """Shared U-Net construction; subclasses add their query path."""

    num_downs: int = 7
    base_width: int = 64
    num_mask_channels: int = 32
    dtype: Any = jnp.float32
    batch_norm_momentum: float = 0.1
    batch_norm_epsilon: float = 1e-5
    up_conv_formulation: str = "taps_first"

    def audio_features(self, log_mag_mix: jax.Array, train: bool) -> jax.Array:
        """[B, F, T] -> U-Net features [B, F, T, k]."""
        unet = UNet(
            num_downs=self.num_downs,
            base_width=self.base_width,
            out_channels=self.num_mask_channels,
            dtype=self.dtype,
            batch_norm_momentum=self.batch_norm_momentum,
            batch_norm_epsilon=self.batch_norm_epsilon,
            up_conv_formulation=self.up_conv_formulation,
            name="unet",
        )
        return unet(log_mag_mix[..., None].astype(self.dtype), train)


class CLIPSep(_Separator):
    """Queries are embedding vectors [B, N, query_dim] (CLIP image or text embeddings)."""

    @nn.compact
    def __call__(self, log_mag_mix: jax.Array, queries: jax.Array, train: bool = False) -> dict:
        features = self.audio_features(log_mag_mix, train)
        projected = QueryProjection(self.num_mask_channels, self.dtype, name="query_projection")(
            queries
        )
        synthesis = MaskSynthesis(self.dtype, name="mask_synthesis")
        return {"query_logits": synthesis(nn.sigmoid(projected), features)}


class CLIPSepNIT(_Separator):
    """CLIPSep with noise heads (noise invariant training).

    The noise heads read the mean over the N queries of the pre-sigmoid query projections; each is
    Linear(k -> k) then sigmoid, and goes through the same mask synthesis as the queries.
    """

    num_noise_heads: int = 2

    @nn.compact
    def __call__(self, log_mag_mix: jax.Array, queries: jax.Array, train: bool = False) -> dict:
        features = self.audio_features(log_mag_mix, train)
        k = self.num_mask_channels
        projected = QueryProjection(k, self.dtype, name="query_projection")(queries)
        noise_input = jnp.mean(projected, axis=1)  # [B, k]
        kernel = self.param(
            "noise_heads_kernel", dense_kernel_init, (self.num_noise_heads, k, k)
        )  # [head, in, out]
        bias = self.param("noise_heads_bias", torch_default_bias_init(k), (self.num_noise_heads, k))
        noise_projected = jnp.einsum(
            "bi,hio->bho", noise_input, kernel, precision=jax.lax.Precision.HIGHEST
        ) + bias
        synthesis = MaskSynthesis(self.dtype, name="mask_synthesis")
        return {
            "query_logits": synthesis(nn.sigmoid(projected), features),
            "noise_logits": synthesis(nn.sigmoid(noise_projected), features),
        }


class PIT(_Separator):
    """Permutation invariant training baseline: a 1x1 conv maps the k channels to N mask logits."""

    num_outputs: int = 2

    @nn.compact
    def __call__(self, log_mag_mix: jax.Array, queries: None = None, train: bool = False) -> dict:
        features = self.audio_features(log_mag_mix, train)
        conv = nn.Conv(
            self.num_outputs,
            (1, 1),
            kernel_init=conv_kernel_init,
            bias_init=torch_default_bias_init(self.num_mask_channels),
            dtype=self.dtype,
            name="output_conv",
        )
        logits = conv(features).astype(jnp.float32)  # [B, F, T, N]
        return {"query_logits": jnp.transpose(logits, (0, 3, 1, 2))}


class LabelSep(_Separator):
    """Queries are integer label ids [B, N]; a learned table replaces the CLIP embedding."""

    num_labels: int = 11
    query_dim: int = 512

    @nn.compact
    def __call__(self, log_mag_mix: jax.Array, queries: jax.Array, train: bool = False) -> dict:
        features = self.audio_features(log_mag_mix, train)
        table = nn.Embed(
            self.num_labels,
            self.query_dim,
            embedding_init=nn.initializers.normal(stddev=1.0),  # PyTorch's Embedding default
            name="label_embedding",
        )
        projected = QueryProjection(self.num_mask_channels, self.dtype, name="query_projection")(
            table(queries)
        )
        synthesis = MaskSynthesis(self.dtype, name="mask_synthesis")
        return {"query_logits": synthesis(nn.sigmoid(projected), features)}
