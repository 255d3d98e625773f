"""The reference's conditional attention U-Net (``CondAttUNet`` with ``--cond_layer sca``) and its
CLIPSep-style query head, NHWC.

Level 0 is the outermost. With ``num_downs`` levels and base width ``w`` the down path's widths are
w, 2w, 4w, 8w, 8w, ... (8w from level 3 inwards; 64..512 at full size). Per level ``d``:

- down: Conv 4x4 stride 2 padding 1 without bias, BatchNorm, LeakyReLU(0.2), a residual block,
  then (at the attention levels) self-attention + cross-attention blocks on the H*W tokens;
- up: bilinear x2 upsampling (align_corners=True), a residual block, Conv 3x3 padding 1 (with bias
  only at level 0), then BatchNorm and ReLU (not at level 0); every level but the outermost
  returns concat(its input, its up-path output) on channels.

A residual block of ``k`` layers is (k - 1) x [Conv 3x3 with bias, BatchNorm, LeakyReLU(0.2)],
[Conv 3x3 with bias, BatchNorm], plus its input, then LeakyReLU(0.2).

The input is ``log1p(|X_mix|)`` [B, F, T, 1] (frequency on H, time on W: 512 x 512 at full size),
normalised by an input BatchNorm; F and T must be divisible by 2**num_downs. The output has
``out_channels`` (32) channels and no activation. Parameters follow PyTorch's default inits (the
reference never calls its ``init_weights``): U(+-1/sqrt(fan_in)) for conv and linear weights and
biases, 1 and 0 for BatchNorm and LayerNorm.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipsep_jax.families.clipsep.layers import (
    BatchNorm,
    down_conv4x4,
    torch_default_bias_init,
    upsample_bilinear_2x,
)
from clipsep_jax.families.clipsep.networks import MaskSynthesis, QueryProjection
from clipsep_jax.families.clipsep.unet import level_widths

Dtype = Any

# PyTorch's default weight init, kaiming_uniform(a=sqrt(5)), has the same bound 1/sqrt(fan_in)
# as its default bias init.
torch_default_init = torch_default_bias_init


class TorchBatchNorm(BatchNorm):
    """``layers.BatchNorm`` (PyTorch's numerics) with PyTorch's default init: scale 1, bias 0.

    ``layers.BatchNorm`` draws its scale from N(1, 0.02) (CLIPSep's ``init_weights``, which this
    reference never calls); only that initialiser is swapped.
    """

    @nn.nowrap
    def param(self, name: str, init_fn: Callable[..., Any], *init_args: Any,
              **kwargs: Any) -> Any:
        if name == "scale":
            init_fn = nn.initializers.ones
        return super().param(name, init_fn, *init_args, **kwargs)


def _dense(features: int, fan_in: int, dtype: Dtype, name: str) -> nn.Dense:
    init = torch_default_init(fan_in)
    return nn.Dense(features, kernel_init=init, bias_init=init, dtype=dtype, name=name)


class DownConv(nn.Module):
    """Conv 4x4 stride 2 padding 1 without bias (``layers.down_conv4x4``), PyTorch's init; its
    parameter is ``nn.Conv``'s ``kernel`` [4, 4, C_in, features]."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C_in] -> [B, H/2, W/2, features]."""
        kernel = self.param("kernel", torch_default_init(16 * x.shape[-1]),
                            (4, 4, x.shape[-1], self.features))
        return down_conv4x4(x, kernel, self.dtype)


class ResBlock(nn.Module):
    """Residual block: [B, H, W, C] -> [B, H, W, C] (see the module docstring)."""

    num_layers: int = 1
    dtype: Dtype = jnp.float32
    batch_norm_momentum: float = 0.1
    batch_norm_epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        channels = x.shape[-1]
        init = torch_default_init(9 * channels)
        y = x
        for i in range(self.num_layers):
            y = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), kernel_init=init,
                        bias_init=init, dtype=self.dtype, name=f"conv_{i}")(y)
            y = TorchBatchNorm(self.batch_norm_momentum, self.batch_norm_epsilon, self.dtype,
                               name=f"norm_{i}")(y, train)
            if i < self.num_layers - 1:
                y = nn.leaky_relu(y, 0.2)
        return nn.leaky_relu(y + x.astype(self.dtype), 0.2)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None,
            dtype: Dtype) -> jax.Array:
    """Scaled dot-product attention per head.

    q: [B, Lq, heads, d]; k, v: [B, Lk, heads, d]; key_mask: None or [B, Lk] (True = attend)
    -> [B, Lq, heads * d]. q is scaled by d**-0.5; the softmax over keys runs in float32.
    """
    q = q * q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return out.reshape(*out.shape[:2], -1)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection.

    ``qkv`` [C, 3C]: output feature s*C + h*(C/heads) + j is q, k or v (s = 0, 1, 2) of head h,
    dimension j, as the reference's layout; ``out`` [C, C] reads heads head-major.
    x: [B, L, C] -> [B, L, C].
    """

    num_heads: int = 8
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, channels = x.shape
        qkv = _dense(3 * channels, channels, self.dtype, "qkv")(x)
        qkv = qkv.reshape(batch, length, 3, self.num_heads, channels // self.num_heads)
        out = _attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], None, self.dtype)
        return _dense(channels, channels, self.dtype, "out")(out)


class CrossAttention(nn.Module):
    """Multi-head cross-attention from image tokens to text tokens.

    ``query`` [C, C] on x; ``key_value`` [cond_dim, 2C] on the raw text token states (features
    0..C-1 are the keys, C..2C-1 the values, each head-major); ``out`` [C, C].
    x: [B, L, C]; cond: [B, S, cond_dim]; key_mask: None (attend to every token, padding
    included) or [B, S] (True = a real token) -> [B, L, C].
    """

    num_heads: int = 8
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        batch, length, channels = x.shape
        head_dim = channels // self.num_heads
        q = _dense(channels, channels, self.dtype, "query")(x)
        q = q.reshape(batch, length, self.num_heads, head_dim)
        kv = _dense(2 * channels, cond.shape[-1], self.dtype, "key_value")(cond)
        kv = kv.reshape(batch, cond.shape[1], 2, self.num_heads, head_dim)
        out = _attend(q, kv[:, :, 0], kv[:, :, 1], key_mask, self.dtype)
        return _dense(channels, channels, self.dtype, "out")(out)


class Mlp(nn.Module):
    """Linear(C -> hidden), exact (erf) GELU, Linear(hidden -> C): [B, L, C] -> [B, L, C]."""

    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        h = _dense(self.hidden, channels, self.dtype, "fc1")(x)
        h = jax.nn.gelu(h, approximate=False)
        return _dense(channels, self.hidden, self.dtype, "fc2")(h)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + Attn(LN(x)[, cond]), then x + Mlp(LN(x)). No positional encoding.

    Self-attention when ``cross`` is False, cross-attention to ``cond`` otherwise.
    x: [B, L, C] -> [B, L, C].
    """

    cross: bool
    num_heads: int = 8
    mlp_ratio: float = 2.0
    layer_norm_epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array | None = None,
                 key_mask: jax.Array | None = None) -> jax.Array:
        channels = x.shape[-1]
        h = nn.LayerNorm(self.layer_norm_epsilon, dtype=self.dtype, name="attention_norm")(x)
        if self.cross:
            h = CrossAttention(self.num_heads, self.dtype, name="attention")(h, cond, key_mask)
        else:
            h = SelfAttention(self.num_heads, self.dtype, name="attention")(h)
        x = x + h
        h = nn.LayerNorm(self.layer_norm_epsilon, dtype=self.dtype, name="mlp_norm")(x)
        return x + Mlp(int(channels * self.mlp_ratio), self.dtype, name="mlp")(h)


class ConditioningBlock(nn.Module):
    """The reference's ``BlockSCA``: a self-attention block then a cross-attention block on the
    feature map's tokens (flattened frequency-major, H * W of them).

    x: [B, H, W, C]; cond: [B, S, cond_dim]; key_mask: None or [B, S] -> [B, H, W, C].
    """

    num_heads: int = 8
    mlp_ratio: float = 2.0
    layer_norm_epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        batch, height, width, channels = x.shape
        tokens = x.reshape(batch, height * width, channels)
        # The reference creates an outer LayerNorm its forward never uses; it is called here
        # only so that its parameters exist (checkpoints and parameter counts match), and the
        # result is dropped.
        nn.LayerNorm(self.layer_norm_epsilon, dtype=self.dtype, name="unused_norm")(tokens)
        block = lambda cross, name: TransformerBlock(
            cross, self.num_heads, self.mlp_ratio, self.layer_norm_epsilon, self.dtype, name=name)
        tokens = block(False, "self_block")(tokens)
        tokens = block(True, "cross_block")(tokens, cond, key_mask)
        return tokens.reshape(batch, height, width, channels)


class CondAttentionUNet(nn.Module):
    """The conditional attention U-Net (see the module docstring).

    Attributes:
      num_downs: levels (7: 512 x 512 -> 4 x 4).
      base_width: the outermost level's width (64); level d has base_width * min(2**d, 8).
      out_channels: channels of the output (32).
      attention_levels: levels (0 = outermost) with conditioning blocks after the down residual
        block; (4, 5, 6) at full size, i.e. 16 x 16, 8 x 8 and 4 x 4 maps. The reference ties
        them to its depth (the innermost level and the num_downs - 5 above it).
      num_heads: attention heads (8); must divide the attention levels' widths.
      cond_dim: width of the text token states (768, CLAP's RoBERTa).
      mlp_ratio: MLP hidden width over the token width (2).
      num_res_layers: conv layers per residual block (1).
      num_cond_blocks: conditioning blocks per attention level (1).
      mask_padding: False (the reference): cross-attention attends to every token, padding
        included; True: ``token_mask`` removes the padding tokens from the softmax.
      dtype: computation dtype; parameters and BatchNorm statistics stay float32.
      batch_norm_momentum, batch_norm_epsilon: PyTorch's conventions (0.1, 1e-5).
      layer_norm_epsilon: 1e-5 (PyTorch's default, not Flax's).
    """

    num_downs: int = 7
    base_width: int = 64
    out_channels: int = 32
    attention_levels: Sequence[int] = (4, 5, 6)
    num_heads: int = 8
    cond_dim: int = 768
    mlp_ratio: float = 2.0
    num_res_layers: int = 1
    num_cond_blocks: int = 1
    mask_padding: bool = False
    dtype: Dtype = jnp.float32
    batch_norm_momentum: float = 0.1
    batch_norm_epsilon: float = 1e-5
    layer_norm_epsilon: float = 1e-5

    def _norm(self, name: str) -> TorchBatchNorm:
        return TorchBatchNorm(self.batch_norm_momentum, self.batch_norm_epsilon, self.dtype,
                              name=name)

    def _res_block(self, name: str) -> ResBlock:
        return ResBlock(self.num_res_layers, self.dtype, self.batch_norm_momentum,
                        self.batch_norm_epsilon, name=name)

    def _check(self, x: jax.Array, cond: jax.Array, token_mask: jax.Array | None) -> None:
        divisor = 2**self.num_downs
        if x.ndim != 4 or x.shape[1] % divisor or x.shape[2] % divisor:
            raise ValueError(
                f"U-Net input of shape {x.shape}: expected [B, F, T, C] with F and T divisible "
                f"by 2**num_downs = {divisor}")
        if cond.ndim != 3 or cond.shape[0] != x.shape[0] or cond.shape[-1] != self.cond_dim:
            raise ValueError(
                f"cond of shape {cond.shape}: expected [{x.shape[0]}, S, cond_dim={self.cond_dim}]")
        bad_levels = [d for d in self.attention_levels if not 0 <= d < self.num_downs]
        if bad_levels:
            raise ValueError(f"attention_levels {bad_levels} outside 0..{self.num_downs - 1}")
        widths = level_widths(self.num_downs, self.base_width)
        if any(widths[d] % self.num_heads for d in self.attention_levels):
            raise ValueError(
                f"num_heads={self.num_heads} must divide the attention levels' widths "
                f"{[widths[d] for d in self.attention_levels]}")
        if self.mask_padding and (token_mask is None or token_mask.shape != cond.shape[:2]):
            raise ValueError(
                f"mask_padding=True needs token_mask of shape {cond.shape[:2]}, got "
                f"{None if token_mask is None else token_mask.shape}")

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array, token_mask: jax.Array | None = None,
                 train: bool = False) -> jax.Array:
        """Features of the mixture for one text condition.

        Args:
          x: log1p(|X_mix|), [B, F, T, C_in] (C_in = 1).
          cond: the text encoder's token states (unnormalised), [B, S, cond_dim].
          token_mask: [B, S], nonzero for real tokens; used only when ``mask_padding``.
          train: BatchNorm batch statistics (and running-statistic updates) when True.
        Returns:
          [B, F, T, out_channels] in ``self.dtype``.
        """
        self._check(x, cond, token_mask)
        key_mask = token_mask.astype(bool) if self.mask_padding else None
        cond = cond.astype(self.dtype)
        widths = level_widths(self.num_downs, self.base_width)
        x = self._norm("input_norm")(x, train)

        level_inputs = []
        for level in range(self.num_downs):
            level_inputs.append(x)
            x = DownConv(widths[level], self.dtype, name=f"down_conv_{level}")(x)
            x = nn.leaky_relu(self._norm(f"down_norm_{level}")(x, train), 0.2)
            x = self._res_block(f"down_res_{level}")(x, train)
            if level in self.attention_levels:
                for block in range(self.num_cond_blocks):
                    x = ConditioningBlock(self.num_heads, self.mlp_ratio, self.layer_norm_epsilon,
                                          self.dtype, name=f"cond_block_{level}_{block}")(
                        x, cond, key_mask)

        for level in reversed(range(self.num_downs)):
            x = self._res_block(f"up_res_{level}")(upsample_bilinear_2x(x), train)
            features = self.out_channels if level == 0 else widths[level - 1]
            init = torch_default_init(9 * x.shape[-1])
            x = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=level == 0,
                        kernel_init=init, bias_init=init, dtype=self.dtype,
                        name=f"up_conv_{level}")(x)
            if level > 0:
                x = nn.relu(self._norm(f"up_norm_{level}")(x, train))
                x = jnp.concatenate([level_inputs[level].astype(self.dtype), x], axis=-1)
        return x


class QueryHead(nn.Module):
    """CLIPSep-style late fusion of a text embedding with the U-Net features into a ratio mask.

    q = sigmoid(fc(e)) ([k]); z[f, t] = sum_c scale_c * q_c * F[f, t, c] + bias; mask = sigmoid(z).
    ``fc`` is Linear(embedding_dim -> k) initialised N(0, 1e-4^2) with PyTorch's default bias
    init; ``scale`` starts at 1 and the scalar ``bias`` at 0 (the reference's values).

    Attributes:
      features: k, the U-Net's output channels (32).
      dtype: computation dtype of the fusion.
    """

    features: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, unet_features: jax.Array, text_embedding: jax.Array) -> jax.Array:
        """unet_features: [B, F, T, k]; text_embedding: L2-normalised [B, D] (D = 512)
        -> mask in (0, 1), float32 [B, F, T]."""
        if unet_features.shape[-1] != self.features:
            raise ValueError(
                f"U-Net features of shape {unet_features.shape}: expected {self.features} "
                "channels")
        query = QueryProjection(self.features, self.dtype, name="query_projection")(
            text_embedding[:, None, :])
        logits = MaskSynthesis(self.dtype, name="mask_synthesis")(nn.sigmoid(query),
                                                                  unet_features)
        return nn.sigmoid(logits[:, 0])
