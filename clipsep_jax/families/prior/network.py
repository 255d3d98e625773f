"""CLIPSonic-PD's diffusion prior: a CLIP text embedding -> a plausible CLIP image embedding.

The network is DALLE2-pytorch's ``DiffusionPriorNetwork`` (the layout of LAION's published
priors), rebuilt in Flax from its description:

- **Tokens**: the text tower's token states (``max_text_len`` rows; rows that are exactly zero,
  the padding after the end token, are replaced by learned per-position null tokens), the text
  embedding, the time step's embedding, the noisy image embedding and a learned query, in that
  order; the prediction is the learned query's output (x0, the clean image embedding).
- **Causal transformer**: pre-norm blocks of multi-query attention (one key/value head shared
  by all query heads, plus a learned null key/value slot every position sees), rotary position
  embeddings on the first ``min(32, dim_head)`` features of each head (interleaved pairs), a
  one-sided T5 relative-position bias (32 buckets up to distance 128), a causal mask, and SwiGLU
  feed-forward blocks (``normformer``: a LayerNorm after the activation). LayerNorms have a gain
  and no bias; the final one first divides by the row's maximum (``stable``).
- **Variants** (``variant``): ``"laion"`` is the code LAION's priors were trained with
  (DALLE2-pytorch 1.1.0): attention logits ``q.k / sqrt(dh) + 128 bias``, one null token table,
  and no condition dropout (their guidance scale is 1 by construction); ``"head"`` is the current
  code: cosine-similarity attention (``16 cos(q, k) + bias``) and separate null tokens for the
  token states, the text embedding and the noisy image embedding, so that classifier-free
  guidance works.

The diffusion is the prior's own: a discrete cosine schedule (s = 0.008, 1000 steps, betas
clipped at 0.999), x0 prediction, image embeddings scaled by sqrt(dim) inside the diffusion, DDIM
sampling (eta 1, LAION's time grid) and best-of-k by cosine similarity to the text embedding
(:func:`sample_prior`).

Shapes: ``image_embed`` [B, D] (noisy, in the scaled space), ``timesteps`` [B] int32 (or float
for continuous time), ``text_embed`` [B, D], ``text_encodings`` [B, L, D] or None.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["PriorNetwork", "relative_position_buckets", "apply_rotary", "cosine_schedule",
           "ddim_time_pairs", "sample_prior"]

NUM_BUCKETS, MAX_DISTANCE, EXACT_BUCKETS = 32, 128, 16
ROTARY_MAX_DIM = 32


class GainLayerNorm(nn.Module):
    """LayerNorm with a gain ``g`` and no bias (eps 1e-5); ``stable`` divides each row by its
    maximum first, as the reference's final norm does."""

    stable: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.stable:  # kept for parity with the reference (it also changes how eps acts)
            x = x / jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        g = self.param("g", nn.initializers.ones, (x.shape[-1],))
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * g


def relative_position_buckets(queries: int, keys: int) -> np.ndarray:
    """T5's one-sided buckets [queries, keys] for query i and key slot j (slot 0 is the null
    key/value, so token k sits at slot k + 1): distance max(i - j, 0), exact below 16, then
    logarithmic up to bucket 31 at distance 128."""
    i = np.arange(queries)[:, None]
    j = np.arange(keys)[None, :]
    n = np.maximum(i - j, 0)
    far = EXACT_BUCKETS + (np.log(np.maximum(n, 1).astype(np.float32) / EXACT_BUCKETS)
                           / np.float32(math.log(MAX_DISTANCE / EXACT_BUCKETS))
                           * (NUM_BUCKETS - EXACT_BUCKETS)).astype(np.int64)
    far = np.minimum(far, NUM_BUCKETS - 1)
    return np.where(n < EXACT_BUCKETS, n, far)


def apply_rotary(x: jax.Array, rot_dim: int) -> jax.Array:
    """Rotary position embedding on the first ``rot_dim`` features of x [..., N, dh] (positions
    0..N-1 along axis -2), pairs (2k, 2k+1) rotated by position * 10000^(-2k / rot_dim)."""
    positions = jnp.arange(x.shape[-2], dtype=jnp.float32)
    freqs = 1.0 / (10000.0 ** (jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim))
    angles = jnp.repeat(positions[:, None] * freqs[None, :], 2, axis=-1)  # [N, rot_dim]
    head, tail = x[..., :rot_dim], x[..., rot_dim:]
    pairs = head.reshape(*head.shape[:-1], rot_dim // 2, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(head.shape)
    head = head * jnp.cos(angles) + rotated * jnp.sin(angles)
    return jnp.concatenate([head, tail], axis=-1)


class PriorAttention(nn.Module):
    """Pre-norm causal multi-query attention with a null key/value slot; x [B, N, dim]."""

    heads: int
    dim_head: int
    variant: str

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        batch, n, dim = x.shape
        h = GainLayerNorm(name="norm")(x)
        q = nn.Dense(self.heads * self.dim_head, use_bias=False, name="to_q")(h)
        q = q.reshape(batch, n, self.heads, self.dim_head).transpose(0, 2, 1, 3)
        k, v = jnp.split(nn.Dense(2 * self.dim_head, use_bias=False, name="to_kv")(h), 2, -1)
        rot_dim = min(ROTARY_MAX_DIM, self.dim_head)
        q, k = apply_rotary(q, rot_dim), apply_rotary(k, rot_dim)
        null_kv = self.param("null_kv", nn.initializers.normal(1.0), (2, self.dim_head))
        k = jnp.concatenate([jnp.broadcast_to(null_kv[0], (batch, 1, self.dim_head)), k], 1)
        v = jnp.concatenate([jnp.broadcast_to(null_kv[1], (batch, 1, self.dim_head)), v], 1)
        if self.variant == "head":
            q = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
            k = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
            logits = 16.0 * jnp.einsum("bhid,bjd->bhij", q, k) + bias
        else:
            logits = (jnp.einsum("bhid,bjd->bhij", q, k) / math.sqrt(self.dim_head)
                      + 128.0 * bias)
        causal = np.triu(np.ones((n, n + 1), bool), 2)
        logits = jnp.where(causal, -jnp.finfo(jnp.float32).max, logits.astype(jnp.float32))
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhij,bjd->bhid", weights, v).transpose(0, 2, 1, 3)
        out = nn.Dense(dim, use_bias=False, name="to_out")(out.reshape(batch, n, -1))
        return GainLayerNorm(name="out_norm")(out)


class SwiGLUFeedForward(nn.Module):
    """Pre-norm SwiGLU: LN -> Dense(2 inner) -> value * silu(gate) [-> LN] -> Dense(dim)."""

    mult: float
    normformer: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inner = int(self.mult * x.shape[-1])
        h = nn.Dense(2 * inner, use_bias=False, name="proj_in")(GainLayerNorm(name="norm")(x))
        value, gate = jnp.split(h, 2, axis=-1)
        h = value * nn.silu(gate)
        if self.normformer:
            h = GainLayerNorm(name="inner_norm")(h)
        return nn.Dense(x.shape[-1], use_bias=False, name="proj_out")(h)


class PriorNetwork(nn.Module):
    """DALLE2-pytorch's diffusion prior network (see the module docs); returns x0 [B, dim]."""

    dim: int
    depth: int
    dim_head: int = 64
    heads: int = 8
    ff_mult: float = 4.0
    num_timesteps: int = 1000  # 0: continuous time (sinusoidal embedding and an MLP)
    max_text_len: int = 77
    normformer: bool = False
    norm_in: bool = False
    final_proj: bool = True
    variant: str = "laion"  # "laion" (DALLE2-pytorch 1.1.0) or "head" (the current code)

    @nn.compact
    def __call__(self, image_embed: jax.Array, timesteps: jax.Array, text_embed: jax.Array,
                 text_encodings: jax.Array | None = None, drop_text: jax.Array | None = None,
                 drop_image: jax.Array | None = None) -> jax.Array:
        if self.variant not in ("laion", "head"):
            raise ValueError(f"variant={self.variant!r}: expected 'laion' or 'head'")
        batch, dim = image_embed.shape
        length = self.max_text_len
        if text_encodings is None:
            text_encodings = jnp.zeros((batch, length, dim), image_embed.dtype)
        text_encodings = text_encodings[:, :length]
        text_encodings = jnp.pad(text_encodings,
                                 ((0, 0), (0, length - text_encodings.shape[1]), (0, 0)))
        present = jnp.any(text_encodings != 0, axis=-1)[..., None]  # [B, L, 1]
        text_embed = text_embed[:, None]
        image_embed = image_embed[:, None]
        normal = nn.initializers.normal(1.0)
        if self.variant == "laion":
            if drop_text is not None or drop_image is not None:
                raise ValueError("the 'laion' prior has no null condition: it cannot drop "
                                 "the text or the image (guidance needs variant='head')")
            if length:  # no token states at all (max_text_len 0): no null table either
                null = self.param("null_text_encodings", normal, (length, dim))
                text_encodings = jnp.where(present, text_encodings, null[None])
        else:
            keep_text = (jnp.ones((batch,), bool) if drop_text is None else ~drop_text)
            keep_image = (jnp.ones((batch,), bool) if drop_image is None else ~drop_image)
            if length:
                null = self.param("null_text_encodings", normal, (length, dim))
                text_encodings = jnp.where(present & keep_text[:, None, None], text_encodings,
                                           null[None])
            null_text = self.param("null_text_embed", normal, (dim,))
            text_embed = jnp.where(keep_text[:, None, None], text_embed, null_text)
            null_image = self.param("null_image_embed", normal, (dim,))
            image_embed = jnp.where(keep_image[:, None, None], image_embed, null_image)

        if self.num_timesteps:
            time = nn.Embed(self.num_timesteps, dim, embedding_init=normal,
                            name="time_embedding")(timesteps.astype(jnp.int32))
        else:
            half = dim // 2
            freqs = jnp.exp(-jnp.arange(half) * math.log(10000.0) / (half - 1))
            angles = timesteps.astype(jnp.float32)[:, None] * freqs[None]
            time = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
            time = nn.silu(nn.Dense(2 * dim, name="time_mlp_0")(time))
            time = nn.silu(nn.Dense(2 * dim, name="time_mlp_1")(time))
            time = nn.Dense(dim, name="time_mlp_2")(time)
        query = self.param("learned_query", normal, (dim,))
        tokens = jnp.concatenate([text_encodings, text_embed, time[:, None], image_embed,
                                  jnp.broadcast_to(query, (batch, 1, dim))], axis=1)

        n = tokens.shape[1]
        table = self.param("relative_attention_bias", nn.initializers.normal(0.02),
                           (NUM_BUCKETS, self.heads))
        bias = jnp.transpose(table[relative_position_buckets(n, n + 1)], (2, 0, 1))
        x = GainLayerNorm(name="init_norm")(tokens) if self.norm_in else tokens
        for layer in range(self.depth):
            x = x + PriorAttention(self.heads, self.dim_head, self.variant,
                                   name=f"attention_{layer}")(x, bias)
            x = x + SwiGLUFeedForward(self.ff_mult, self.normformer,
                                      name=f"feed_forward_{layer}")(x)
        x = GainLayerNorm(stable=True, name="final_norm")(x)
        if self.final_proj:
            x = nn.Dense(dim, use_bias=False, name="project_out")(x)
        return x[:, -1]


def cosine_schedule(num_timesteps: int = 1000, s: float = 0.008) -> dict[str, np.ndarray]:
    """The prior's discrete cosine schedule (computed in float64): ``alphas_cumprod`` [T] and
    ``betas`` [T], betas = clip(1 - abar(t + 1) / abar(t), 0, 0.999)."""
    x = np.linspace(0, num_timesteps, num_timesteps + 1, dtype=np.float64)
    abar = np.cos(((x / num_timesteps) + s) / (1 + s) * math.pi / 2) ** 2
    abar = abar / abar[0]
    betas = np.clip(1 - abar[1:] / abar[:-1], 0, 0.999)
    return {"betas": betas, "alphas_cumprod": np.cumprod(1.0 - betas)}


def ddim_time_pairs(num_timesteps: int, steps: int) -> list[tuple[int, int]]:
    """LAION's DDIM grid (DALLE2-pytorch 1.1.0): (t, t_next) from about T down to 0, ``steps``
    pairs; used for both variants (the current code's grid ends one step differently)."""
    times = np.linspace(0, num_timesteps, steps + 2)[:-1].astype(np.int64)[::-1]
    pairs = list(zip(times[:-1].tolist(), times[1:].tolist(), strict=True))
    # more steps than time steps repeat a time: a (t, t) step would divide 0 by 0
    return [(t, t_next) for t, t_next in pairs if t != t_next]


def sample_prior(apply_fn: Any, text_embed: jax.Array, text_encodings: jax.Array | None,
                 rng: jax.Array, *, num_timesteps: int = 1000, steps: int = 64,
                 guidance: float = 1.0, best_of: int = 2, eta: float = 1.0) -> jax.Array:
    """Image embeddings [B, D] for text embeddings [B, D] (L2-normalised) by DDIM (``eta`` 1:
    as random as DDPM) with ``steps`` steps, keeping for each text the best of ``best_of``
    samples by cosine similarity to it. ``apply_fn(x_t, t, text_embed, text_encodings,
    drop)`` is the network (x0 in the scaled space); ``guidance`` != 1 mixes the conditional
    and the dropped (``drop`` all True) predictions: null + w (cond - null). Returned unscaled
    (divided by sqrt(D)), not renormalised."""
    batch, dim = text_embed.shape
    scale = math.sqrt(dim)
    texts = jnp.repeat(text_embed, best_of, axis=0)
    encodings = None if text_encodings is None else jnp.repeat(text_encodings, best_of, axis=0)
    schedule = cosine_schedule(num_timesteps)["alphas_cumprod"]
    abar = jnp.asarray(schedule, jnp.float32)
    # The reference's DDIM indexes alphas_cumprod_prev for the step's coefficients (so the last
    # step, to t = 0, returns x0 itself) and alphas_cumprod for the noise estimate.
    abar_prev = jnp.asarray(np.concatenate([[1.0], schedule[:-1]]), jnp.float32)
    pairs = jnp.asarray(ddim_time_pairs(num_timesteps, steps), jnp.int32)
    n = batch * best_of
    keep = jnp.zeros((n,), bool)

    def predict(x, t):
        times = jnp.full((n,), t, jnp.int32)
        x0 = apply_fn(x, times, texts, encodings, None if guidance == 1.0 else keep)
        if guidance != 1.0:
            null = apply_fn(x, times, texts, encodings, ~keep)
            x0 = null + guidance * (x0 - null)
        return x0

    def step(i, carry):
        x, key = carry
        t, t_next = pairs[i, 0], pairs[i, 1]
        x0 = predict(x, t)
        eps = (x / jnp.sqrt(abar[t]) - x0) / jnp.sqrt(1.0 / abar[t] - 1.0)
        a, a_next = abar_prev[t], abar_prev[t_next]
        c1 = eta * jnp.sqrt((1 - a / a_next) * (1 - a_next) / (1 - a))
        c2 = jnp.sqrt(jnp.maximum(1 - a_next - c1**2, 0.0))
        key, noise_key = jax.random.split(key)
        noise = jnp.where(t_next > 0, jax.random.normal(noise_key, x.shape), 0.0)
        return x0 * jnp.sqrt(a_next) + c1 * noise + c2 * eps, key

    start_key, loop_key = jax.random.split(rng)
    x = jax.random.normal(start_key, (n, dim))
    x, _ = jax.lax.fori_loop(0, pairs.shape[0], step, (x, loop_key))
    samples = (x / scale).reshape(batch, best_of, dim)
    unit = samples / jnp.linalg.norm(samples, axis=-1, keepdims=True)
    text_unit = text_embed / jnp.linalg.norm(text_embed, axis=-1, keepdims=True)
    best = jnp.argmax(jnp.einsum("bkd,bd->bk", unit, text_unit), axis=-1)
    return jnp.take_along_axis(samples, best[:, None, None], axis=1)[:, 0]
