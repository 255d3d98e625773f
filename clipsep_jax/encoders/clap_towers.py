"""CLAP's towers in Flax: the HTSAT audio transformer and the RoBERTa text transformer, each with
its two-layer projection (LAION-CLAP as transformers' ``ClapModel`` has it).

Audio: a log-mel spectrogram [B, T, F] (T frames, F mel bins, as ``ClapFeatureExtractor`` gives
with one channel) is normalised per mel bin (a frozen BatchNorm), stretched in time to
``spec_size * freq_ratio`` frames (bicubic, corners aligned), folded into a square image
(``freq_ratio`` time chunks stacked along frequency), cut into patches and run through Swin
stages (window attention with a learned relative position bias, every second block on windows
shifted by half a window, patch merging between stages). The pooled vector is the mean over the
last stage's positions. Only the checkpoints without feature fusion (``enable_fusion=False``)
are supported.

Text: RoBERTa (post-norm BERT layers, positions counted from ``pad_token_id + 1`` over the
non-padding tokens); the pooled vector is BERT's pooler, tanh(W h_<s> + b).

Both pooled vectors go through ``linear2(act(linear1(x)))`` and are L2-normalised, as
``ClapModel.get_text_features`` / ``get_audio_features`` return them in transformers 5.
Parameter names follow the transformers state-dict keys closely enough for
:mod:`clipsep_jax.encoders.clap` to map them with a small table.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clipsep_jax.encoders.clip_towers import activation
from clipsep_jax.errors import UserError

__all__ = [
    "ClapTextConfig",
    "ClapAudioConfig",
    "ClapConfig",
    "ClapTextModel",
    "ClapAudioEncoder",
    "ClapProjectionLayer",
    "ClapModel",
    "l2_normalize",
    "bicubic_taps",
    "HTSAT_TINY",
    "HTSAT_BASE",
]


@dataclasses.dataclass(frozen=True)
class ClapTextConfig:
    """The fields of transformers' ``ClapTextConfig`` that inference needs (RoBERTa-base)."""

    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 1


@dataclasses.dataclass(frozen=True)
class ClapAudioConfig:
    """The fields of transformers' ``ClapAudioConfig`` that inference needs (HTSAT-tiny)."""

    window_size: int = 8
    num_mel_bins: int = 64
    spec_size: int = 256
    hidden_act: str = "gelu"
    patch_size: tuple[int, int] = (4, 4)
    patch_stride: tuple[int, int] = (4, 4)
    hidden_size: int = 768
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_attention_heads: tuple[int, ...] = (4, 8, 16, 32)
    patch_embed_input_channels: int = 1
    patch_embeds_hidden_size: int = 96
    enable_patch_layer_norm: bool = True
    qkv_bias: bool = True
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-5

    @property
    def freq_ratio(self) -> int:
        """Time chunks stacked along frequency to make the spectrogram square."""
        return self.spec_size // self.num_mel_bins

    @property
    def spec_frames(self) -> int:
        """Frames the spectrogram is stretched to before folding (1024 for HTSAT)."""
        return self.spec_size * self.freq_ratio

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns) of the first stage."""
        return (self.spec_size // self.patch_stride[0], self.spec_size // self.patch_stride[1])

    @property
    def num_features(self) -> int:
        """Width of the last stage: the pooled audio vector's size."""
        return self.patch_embeds_hidden_size * 2 ** (len(self.depths) - 1)

    def stage_window(self, stage: int) -> tuple[int, int]:
        """(window, shift of the odd blocks) of a stage: a stage no larger than one window
        attends over all of it, unshifted."""
        side = min(self.grid_size) // 2**stage
        if side <= self.window_size:
            return side, 0
        return self.window_size, self.window_size // 2


@dataclasses.dataclass(frozen=True)
class ClapConfig:
    text: ClapTextConfig = ClapTextConfig()
    audio: ClapAudioConfig = ClapAudioConfig()
    projection_dim: int = 512
    projection_hidden_act: str = "relu"

    @classmethod
    def from_transformers(cls, hf_config: Any) -> ClapConfig:
        """From a transformers ``ClapConfig`` (object or dict); refuses what is not supported
        (feature fusion, unflattened patches, sizes transformers itself cannot run)."""
        d = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
        text_d, audio_d = dict(d.get("text_config") or {}), dict(d.get("audio_config") or {})
        if audio_d.get("enable_fusion", False):
            raise UserError("audio_config.enable_fusion=True: only the CLAP checkpoints without "
                            "feature fusion (e.g. laion/clap-htsat-unfused) are supported")
        if not audio_d.get("flatten_patch_embeds", True):
            raise UserError("audio_config.flatten_patch_embeds=False is not supported")
        for key in ("patch_size", "patch_stride"):
            if key in audio_d and audio_d[key] is not None:
                audio_d[key] = _pair(audio_d[key])
        for key in ("depths", "num_attention_heads"):
            if key in audio_d and audio_d[key] is not None:
                audio_d[key] = tuple(int(v) for v in audio_d[key])
        text = _fields(ClapTextConfig, text_d)
        audio = _fields(ClapAudioConfig, audio_d)
        config = cls(text=text, audio=audio,
                     projection_dim=int(d.get("projection_dim", 512)),
                     projection_hidden_act=d.get("projection_hidden_act", "relu"))
        config.validate()
        return config

    def validate(self) -> None:
        """Raises UserError for audio sizes the tower cannot fold or window."""
        a = self.audio
        if a.spec_size % a.num_mel_bins or a.freq_ratio < 1:
            raise UserError(f"audio_config: spec_size={a.spec_size} is not a multiple of "
                            f"num_mel_bins={a.num_mel_bins}")
        if len(a.depths) != len(a.num_attention_heads):
            raise UserError(f"audio_config: {len(a.depths)} depths but "
                            f"{len(a.num_attention_heads)} num_attention_heads")
        stages = len(a.depths)
        rows, cols = a.grid_size
        if rows != cols or rows % 2 ** (stages - 1):
            raise UserError(f"audio_config: a patch grid of {rows}x{cols} cannot be merged "
                            f"{stages - 1} times")
        if rows // 2 ** (stages - 1) < a.window_size:
            # transformers shrinks the window to such a stage but keeps the bias table of the
            # full window, which does not fit: such a model does not run there either.
            raise UserError(f"audio_config: the last stage ({rows // 2 ** (stages - 1)} "
                            f"patches wide) is smaller than window_size={a.window_size}")


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _fields(cls: type, d: Mapping[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names and v is not None})


# laion/clap-htsat-unfused (HTSAT-tiny) and laion/larger_clap_music (HTSAT-base); both with
# RoBERTa-base text towers and 512-wide projections.
HTSAT_TINY = ClapConfig()
HTSAT_BASE = ClapConfig(audio=ClapAudioConfig(patch_embeds_hidden_size=128, hidden_size=1024,
                                              depths=(2, 2, 12, 2)))


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) over the last axis (``torch.nn.functional.normalize``)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def _layer_norm(eps: float, name: str, dtype: Any, param_dtype: Any) -> nn.LayerNorm:
    # Two-pass variance: RoBERTa's eps of 1e-12 leaves no slack for E[x^2] - E[x]^2 rounding.
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name, dtype=dtype,
                        param_dtype=param_dtype)


# ---------------------------------------------------------------------------------------------
# Text: RoBERTa


class _TextSelfAttention(nn.Module):
    config: ClapTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        c = self.config
        heads = c.num_attention_heads
        head_dim = c.hidden_size // heads
        dense = lambda name: nn.Dense(c.hidden_size, dtype=self.dtype,
                                      param_dtype=self.param_dtype, name=name)
        split = lambda t: t.reshape(t.shape[:-1] + (heads, head_dim))
        q = split(dense("query")(x)) * head_dim**-0.5
        k, v = split(dense("key")(x)), split(dense("value")(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) + bias
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return out.reshape(out.shape[:-2] + (c.hidden_size,))


class _TextLayer(nn.Module):
    """Post-norm block: LN(x + W_o attn(x)), then LN(h + W_2 act(W_1 h))."""

    config: ClapTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attended = _TextSelfAttention(c, name="attention_self", **kw)(x, bias)
        attended = nn.Dense(c.hidden_size, name="attention_output", **kw)(attended)
        x = _layer_norm(c.layer_norm_eps, "attention_norm", **kw)(x + attended)
        h = nn.Dense(c.intermediate_size, name="intermediate", **kw)(x)
        h = activation(c.hidden_act)(h)
        h = nn.Dense(c.hidden_size, name="output", **kw)(h)
        return _layer_norm(c.layer_norm_eps, "output_norm", **kw)(x + h)


class ClapTextModel(nn.Module):
    """Token ids and attention mask [B, L] (int) -> (last hidden states [B, L, hidden],
    pooler output [B, hidden]), both in ``dtype``."""

    config: ClapTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        length = input_ids.shape[1]
        if length + c.pad_token_id >= c.max_position_embeddings:
            raise ValueError(f"{length} tokens exceed this RoBERTa's "
                             f"{c.max_position_embeddings - c.pad_token_id - 1} positions")
        # RoBERTa numbers the non-padding tokens from pad_token_id + 1; padding keeps
        # pad_token_id. The ids decide, not the attention mask (as transformers does it).
        real = (input_ids != c.pad_token_id).astype(jnp.int32)
        positions = jnp.cumsum(real, axis=1) * real + c.pad_token_id
        embed = lambda n, name: nn.Embed(n, c.hidden_size, name=name, **kw)
        x = (embed(c.vocab_size, "word_embeddings")(input_ids)
             + embed(c.type_vocab_size, "token_type_embeddings")(jnp.zeros_like(input_ids))
             + embed(c.max_position_embeddings, "position_embeddings")(positions))
        x = _layer_norm(c.layer_norm_eps, "embeddings_norm", **kw)(x)
        bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        for i in range(c.num_hidden_layers):
            x = _TextLayer(c, name=f"layer_{i}", **kw)(x, bias)
        pooled = jnp.tanh(nn.Dense(c.hidden_size, name="pooler", **kw)(x[:, 0]))
        return x, pooled


# ---------------------------------------------------------------------------------------------
# Audio: HTSAT (a Swin transformer over the folded spectrogram)


@functools.lru_cache(maxsize=16)
def bicubic_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights, both [n_out, 4], of a bicubic resize of ``n_in`` samples to
    ``n_out`` with the corners aligned (PyTorch's ``interpolate(mode="bicubic",
    align_corners=True)``: Keys' cubic with a = -0.75, indices clamped at the borders)."""
    a = -0.75
    scale = np.float32((n_in - 1) / (n_out - 1)) if n_out > 1 else np.float32(0)
    # The source positions in float32, as PyTorch computes them for float32 inputs.
    source = scale * np.arange(n_out, dtype=np.float32)
    base = np.floor(source)
    t = (source - base).astype(np.float64)
    distances = np.stack([1 + t, t, 1 - t, 2 - t], axis=1)
    near = ((a + 2) * distances - (a + 3)) * distances**2 + 1
    far = ((a * distances - 5 * a) * distances + 8 * a) * distances - 4 * a
    weights = np.where(distances <= 1, near, far)
    index = np.clip(base.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1)
    return index.astype(np.int32), weights.astype(np.float32)


class _FrozenBatchNorm(nn.Module):
    """BatchNorm with its running statistics as parameters (inference only)."""

    features: int
    eps: float = 1e-5
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.features,)
        scale = self.param("scale", nn.initializers.ones, shape, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, shape, self.param_dtype)
        mean = self.param("mean", nn.initializers.zeros, shape, self.param_dtype)
        var = self.param("var", nn.initializers.ones, shape, self.param_dtype)
        f32 = lambda p: p.astype(jnp.float32)
        return (x - f32(mean)) * jax.lax.rsqrt(f32(var) + self.eps) * f32(scale) + f32(bias)


@functools.lru_cache(maxsize=32)
def _relative_position_index(window: int) -> np.ndarray:
    """[window², window²] index into the (2 window - 1)² bias table of each pair of positions."""
    rows, cols = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    d_rows = rows[:, None] - rows[None, :] + window - 1
    d_cols = cols[:, None] - cols[None, :] + window - 1
    return (d_rows * (2 * window - 1) + d_cols).astype(np.int32)


@functools.lru_cache(maxsize=32)
def _shift_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
    """[windows, window², window²] additive mask of shifted-window attention: positions that
    the cyclic shift brought together from different parts of the map may not attend to each
    other (-100, as the reference uses, not -inf)."""

    def regions(size: int) -> np.ndarray:
        i = np.arange(size)
        return (i >= size - window).astype(np.int32) + (i >= size - shift).astype(np.int32)

    labels = regions(height)[:, None] * 3 + regions(width)[None, :]
    labels = _to_windows(labels[None, :, :, None], window)[0, :, :, 0]  # [windows, window²]
    different = labels[:, :, None] != labels[:, None, :]
    return np.where(different, -100.0, 0.0).astype(np.float32)


def _to_windows(x: Any, window: int) -> Any:
    """[B, H, W, C] -> [B, windows, window², C] (row-major windows, row-major inside)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // window) * (w // window), window * window, c)


def _from_windows(x: jax.Array, window: int, height: int, width: int) -> jax.Array:
    b, _, _, c = x.shape
    x = x.reshape(b, height // window, width // window, window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


class _WindowAttention(nn.Module):
    """Multi-head attention inside windows, plus a learned bias per relative offset and head."""

    dim: int
    heads: int
    window: int
    qkv_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: np.ndarray | None) -> jax.Array:
        """x [B, windows, window², dim]; mask [windows, window², window²] or None."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        head_dim = self.dim // self.heads
        table = self.param("relative_position_bias_table", nn.initializers.zeros,
                           ((2 * self.window - 1) ** 2, self.heads), self.param_dtype)
        split = lambda t: t.reshape(t.shape[:-1] + (self.heads, head_dim))
        dense = lambda name: nn.Dense(self.dim, use_bias=self.qkv_bias, name=name, **kw)
        q = split(dense("query")(x)) * head_dim**-0.5
        k, v = split(dense("key")(x)), split(dense("value")(x))
        logits = jnp.einsum("bwqhd,bwkhd->bwhqk", q, k).astype(jnp.float32)
        bias = table.astype(jnp.float32)[_relative_position_index(self.window)]  # [q, k, heads]
        logits = logits + bias.transpose(2, 0, 1)[None, None]
        if mask is not None:
            logits = logits + jnp.asarray(mask)[None, :, None]
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bwhqk,bwkhd->bwqhd", weights, v)
        out = out.reshape(out.shape[:-2] + (self.dim,))
        return nn.Dense(self.dim, name="output", **kw)(out)


class _SwinBlock(nn.Module):
    """x + WindowAttention(LN(x)) on (shifted) windows, then x + MLP(LN(x)); x [B, H, W, C]."""

    config: ClapAudioConfig
    dim: int
    heads: int
    window: int
    shift: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        _, height, width, _ = x.shape
        w, s = self.window, self.shift
        h = _layer_norm(c.layer_norm_eps, "layernorm_before", **kw)(x)
        # Zero-pad (after the norm, as the reference does) to whole windows.
        pad_h, pad_w = (-height) % w, (-width) % w
        h = jnp.pad(h, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        if s:
            h = jnp.roll(h, (-s, -s), axis=(1, 2))
        mask = _shift_mask(height + pad_h, width + pad_w, w, s) if s else None
        attention = _WindowAttention(self.dim, self.heads, w, c.qkv_bias, name="attention", **kw)
        h = _from_windows(attention(_to_windows(h, w), mask), w, height + pad_h, width + pad_w)
        if s:
            h = jnp.roll(h, (s, s), axis=(1, 2))
        x = x + h[:, :height, :width]
        h = _layer_norm(c.layer_norm_eps, "layernorm_after", **kw)(x)
        h = nn.Dense(int(c.mlp_ratio * self.dim), name="intermediate", **kw)(h)
        h = activation(c.hidden_act)(h)
        return x + nn.Dense(self.dim, name="output", **kw)(h)


class _PatchMerging(nn.Module):
    """2x2 neighbourhoods concatenated ((0,0), (1,0), (0,1), (1,1)), normalised, projected to
    twice the width: [B, H, W, C] -> [B, H/2, W/2, 2C]."""

    dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        _, height, width, _ = x.shape
        x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
        x = jnp.concatenate([x[:, r::2, c::2] for c in range(2) for r in range(2)], axis=-1)
        x = _layer_norm(1e-5, "norm", **kw)(x)
        return nn.Dense(2 * self.dim, use_bias=False, name="reduction", **kw)(x)


class ClapAudioEncoder(nn.Module):
    """HTSAT: log-mel features [B, T, F] (T <= ``spec_frames``, F = ``num_mel_bins``) ->
    pooled audio vector [B, num_features] in ``dtype``."""

    config: ClapAudioConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, frames, bins = features.shape
        if bins != c.num_mel_bins:
            raise ValueError(f"features have {bins} mel bins; this CLAP expects {c.num_mel_bins}")
        if frames > c.spec_frames:
            raise ValueError(f"features have {frames} frames; this CLAP takes at most "
                             f"{c.spec_frames}")
        x = _FrozenBatchNorm(bins, param_dtype=self.param_dtype, name="batch_norm")(
            features.astype(jnp.float32))
        if frames < c.spec_frames:
            index, weights = bicubic_taps(frames, c.spec_frames)
            x = jnp.einsum("btkf,tk->btf", x[:, index], weights)
        # Fold: time chunk k of spec_size frames becomes rows [k F, (k + 1) F) of the image.
        ratio = c.freq_ratio
        x = x.reshape(batch, ratio, c.spec_size, bins).transpose(0, 1, 3, 2)
        x = x.reshape(batch, ratio * bins, c.spec_size, 1).astype(self.dtype)
        padding = [((k - s) // 2, (k - s) // 2) for k, s in zip(c.patch_size, c.patch_stride,
                                                                 strict=True)]
        x = nn.Conv(c.patch_embeds_hidden_size, c.patch_size, strides=c.patch_stride,
                    padding=padding, name="patch_embed_proj", **kw)(x)
        if c.enable_patch_layer_norm:
            x = _layer_norm(1e-5, "patch_embed_norm", **kw)(x)
        for i, (depth, heads) in enumerate(zip(c.depths, c.num_attention_heads, strict=True)):
            dim = c.patch_embeds_hidden_size * 2**i
            window, shift = c.stage_window(i)
            for j in range(depth):
                x = _SwinBlock(c, dim, heads, window, shift if j % 2 else 0,
                               name=f"layers_{i}_blocks_{j}", **kw)(x)
            if i < len(c.depths) - 1:
                x = _PatchMerging(dim, name=f"layers_{i}_downsample", **kw)(x)
        x = _layer_norm(1e-5, "norm", **kw)(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)


class ClapProjectionLayer(nn.Module):
    """linear2(act(linear1(x))): pooled vector [B, hidden] -> [B, projection_dim]."""

    projection_dim: int
    hidden_act: str = "relu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Dense(self.projection_dim, name="linear1", **kw)(x)
        x = activation(self.hidden_act)(x)
        return nn.Dense(self.projection_dim, name="linear2", **kw)(x)


class ClapModel(nn.Module):
    """Both towers and projections; ``logit_scale_a`` / ``logit_scale_t`` are the checkpoint's
    log contrastive temperatures (audio / text), kept for the callers that score pairs."""

    config: ClapConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = self.config
        self.text_model = ClapTextModel(c.text, **kw)
        self.text_projection = ClapProjectionLayer(c.projection_dim, c.projection_hidden_act, **kw)
        self.audio_encoder = ClapAudioEncoder(c.audio, **kw)
        self.audio_projection = ClapProjectionLayer(c.projection_dim, c.projection_hidden_act,
                                                    **kw)
        init = nn.initializers.constant(float(np.log(1 / 0.07)))
        self.logit_scale_a = self.param("logit_scale_a", init, (), jnp.float32)
        self.logit_scale_t = self.param("logit_scale_t", init, (), jnp.float32)

    def text_states(self, input_ids: jax.Array, attention_mask: jax.Array):
        """Token ids and mask [B, L] -> (last hidden states [B, L, hidden], pooler output
        [B, hidden]), float32."""
        hidden, pooled = self.text_model(input_ids, attention_mask)
        return hidden.astype(jnp.float32), pooled.astype(jnp.float32)

    def text_states_and_embedding(self, input_ids: jax.Array, attention_mask: jax.Array):
        """Token ids and mask [B, L] -> (last hidden states [B, L, hidden], L2-normalised text
        embeddings [B, projection_dim]), float32, from one pass of the text tower."""
        hidden, pooled = self.text_model(input_ids, attention_mask)
        return (hidden.astype(jnp.float32),
                l2_normalize(self.text_projection(pooled).astype(jnp.float32)))

    def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Token ids and mask [B, L] -> L2-normalised text embeddings [B, projection_dim]."""
        _, pooled = self.text_model(input_ids, attention_mask)
        return l2_normalize(self.text_projection(pooled).astype(jnp.float32))

    def encode_audio(self, features: jax.Array) -> jax.Array:
        """Log-mel features [B, T, F] -> L2-normalised audio embeddings [B, projection_dim]."""
        pooled = self.audio_encoder(features)
        return l2_normalize(self.audio_projection(pooled).astype(jnp.float32))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, features: jax.Array):
        return self.encode_text(input_ids, attention_mask), self.encode_audio(features)
