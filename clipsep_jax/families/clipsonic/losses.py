"""CLIPSonic's training loss: v-prediction mean squared error with condition dropout."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from clipsep_jax.families.clipsonic import diffusion

__all__ = ["diffusion_loss"]


def diffusion_loss(denoise: Callable[..., jax.Array], x0: jax.Array, condition: jax.Array,
                   rng: jax.Array, condition_dropout: float = 0.1) -> tuple[jax.Array, dict]:
    """Mean over examples and elements of (v_pred - v)^2 at a time t ~ U(0, 1) per example.

    Args:
      denoise: ``(z, logsnr [B], condition, drop [B] bool) -> v`` (the network, bound to its
        parameters).
      x0: clean normalised log-mels [B, n_mels, T].
      condition: [B, D] CLIP embeddings.
      rng: one key per call (split here into time, noise and dropout draws).
      condition_dropout: probability that an example trains the unconditional model.
    Returns: (scalar float32 loss, {} (no extra metrics)).
    """
    time_key, noise_key, drop_key = jax.random.split(rng, 3)
    batch = x0.shape[0]
    t = jax.random.uniform(time_key, (batch,))
    eps = jax.random.normal(noise_key, x0.shape, jnp.float32)
    drop = jax.random.bernoulli(drop_key, condition_dropout, (batch,))
    z = diffusion.noisy(x0, eps, t)
    v = diffusion.v_target(x0, eps, t)
    predicted = denoise(z, diffusion.logsnr_schedule(t), condition, drop)
    return jnp.mean((predicted.astype(jnp.float32) - v) ** 2), {}
