"""CLIP's vision and text transformer towers with their projections, in Flax.

The modules mirror the parameter layout of Hugging Face's ``CLIPModel`` (module names follow its
state-dict keys, ``pre_layrnorm`` spelling included) so that :mod:`clipsep_jax.clip` can load its
checkpoints by renaming keys alone. Only inference is needed: CLIP stays frozen in CLIPSep.

Shapes: images enter normalised, channels last, [B, S, S, 3] float; token ids [B, L] int32 with an
attention mask [B, L] (1 = token, 0 = padding). Both towers return projected, unnormalised
embeddings [B, projection_dim] in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["TowerConfig", "CLIPConfig", "CLIPModel", "activation", "VIT_B32"]


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """Sizes of one transformer tower (the fields of transformers' CLIP{Text,Vision}Config)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # Vision only.
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    # Text only.
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    vision: TowerConfig
    text: TowerConfig
    projection_dim: int = 512


# openai/clip-vit-base-patch32's sizes (transformers' CLIPConfig defaults).
VIT_B32 = CLIPConfig(
    vision=TowerConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=32,
    ),
    text=TowerConfig(
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=8,
        vocab_size=49408,
        max_position_embeddings=77,
    ),
    projection_dim=512,
)


def activation(name: str):
    """The MLP activation named by a transformers config's ``hidden_act``."""
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"unsupported CLIP hidden_act {name!r}")


class Attention(nn.Module):
    """Multi-head self-attention; ``bias`` [B, 1, L, L] is added to the logits (0 or -inf-like)."""

    config: TowerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        c = self.config
        heads = c.num_attention_heads
        head_dim = c.hidden_size // heads
        dense = lambda name: nn.Dense(
            c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        split = lambda t: t.reshape(t.shape[:-1] + (heads, head_dim))
        q = split(dense("q_proj")(x)) * head_dim**-0.5
        k = split(dense("k_proj")(x))
        v = split(dense("v_proj")(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        if bias is not None:
            logits = logits + bias
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        out = out.reshape(out.shape[:-2] + (c.hidden_size,))
        return dense("out_proj")(out)


class EncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    config: TowerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, name=name, **kw)
        x = x + Attention(c, name="self_attn", **kw)(norm("layer_norm1")(x), bias)
        h = norm("layer_norm2")(x)
        h = nn.Dense(c.intermediate_size, name="fc1", **kw)(h)
        h = activation(c.hidden_act)(h)
        h = nn.Dense(c.hidden_size, name="fc2", **kw)(h)
        return x + h


class Encoder(nn.Module):
    config: TowerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = EncoderLayer(
                self.config, dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers_{i}"
            )(x, bias)
        return x


class VisionTransformer(nn.Module):
    """ViT: patches + class token + positions, pre-norm, encoder, post-norm of the class token.

    Returns the pooled class-token state [B, hidden_size] (before the visual projection).
    """

    config: TowerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        patches = nn.Conv(
            c.hidden_size,
            (c.patch_size, c.patch_size),
            strides=(c.patch_size, c.patch_size),
            padding="VALID",
            use_bias=False,
            name="patch_embedding",
            **kw,
        )(pixels.astype(self.dtype))
        batch = patches.shape[0]
        patches = patches.reshape(batch, -1, c.hidden_size)
        class_embedding = self.param(
            "class_embedding", nn.initializers.normal(0.02), (c.hidden_size,), self.param_dtype
        )
        num_positions = (c.image_size // c.patch_size) ** 2 + 1
        if patches.shape[1] + 1 != num_positions:
            raise ValueError(
                f"images of {pixels.shape[1]}x{pixels.shape[2]} give {patches.shape[1]} patches; "
                f"this CLIP expects {c.image_size}x{c.image_size}"
            )
        positions = nn.Embed(num_positions, c.hidden_size, name="position_embedding", **kw)
        tokens = jnp.concatenate(
            [
                jnp.broadcast_to(class_embedding.astype(self.dtype), (batch, 1, c.hidden_size)),
                patches,
            ],
            axis=1,
        )
        tokens = tokens + positions(jnp.arange(num_positions))[None]
        tokens = nn.LayerNorm(epsilon=c.layer_norm_eps, name="pre_layrnorm", **kw)(tokens)
        tokens = Encoder(c, name="encoder", **kw)(tokens)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="post_layernorm", **kw)(tokens[:, 0])


class TextTransformer(nn.Module):
    """Causal text transformer; returns the final-norm state at the end-of-text token [B, hidden].

    The pooled position follows transformers: with the legacy ``eos_token_id == 2`` it is the
    position of the largest token id (CLIP's end-of-text id is its largest), otherwise the first
    position holding ``eos_token_id``.
    """

    config: TowerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        length = input_ids.shape[1]
        if length > c.max_position_embeddings:
            raise ValueError(
                f"{length} tokens exceed this CLIP's {c.max_position_embeddings} positions"
            )
        tokens = nn.Embed(c.vocab_size, c.hidden_size, name="token_embedding", **kw)(input_ids)
        positions = nn.Embed(
            c.max_position_embeddings, c.hidden_size, name="position_embedding", **kw
        )(jnp.arange(length))
        x = tokens + positions[None]
        causal = jnp.tril(jnp.ones((length, length), bool))
        allowed = causal[None, None] & (attention_mask[:, None, None, :] > 0)
        bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
        x = Encoder(c, name="encoder", **kw)(x, bias)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="final_layer_norm", **kw)(x)
        if c.eos_token_id == 2:
            pooled_at = jnp.argmax(input_ids, axis=-1)
        else:
            pooled_at = jnp.argmax(input_ids == c.eos_token_id, axis=-1)
        return jnp.take_along_axis(x, pooled_at[:, None, None], axis=1)[:, 0]


class CLIPModel(nn.Module):
    """Both towers and their bias-free projections. Call ``encode_image`` or ``encode_text``.

    ``logit_scale`` is kept so that a converted checkpoint round-trips; CLIPSep does not use it.
    """

    config: CLIPConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.vision_model = VisionTransformer(self.config.vision, **kw)
        self.text_model = TextTransformer(self.config.text, **kw)
        self.visual_projection = nn.Dense(self.config.projection_dim, use_bias=False, **kw)
        self.text_projection = nn.Dense(self.config.projection_dim, use_bias=False, **kw)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(2.6592), ())

    def encode_image(self, pixels: jax.Array) -> jax.Array:
        """Normalised pixels [B, S, S, 3] -> image embeddings [B, projection_dim] float32."""
        return self.visual_projection(self.vision_model(pixels)).astype(jnp.float32)

    def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Token ids and mask [B, L] -> text embeddings [B, projection_dim] float32."""
        pooled = self.text_model(input_ids, attention_mask)
        return self.text_projection(pooled).astype(jnp.float32)

    def __call__(self, pixels: jax.Array, input_ids: jax.Array, attention_mask: jax.Array):
        return self.encode_image(pixels), self.encode_text(input_ids, attention_mask)
