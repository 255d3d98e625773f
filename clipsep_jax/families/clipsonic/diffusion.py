"""The diffusion math of CLIPSonic's generator, as pure jit-able functions.

The paper does not say which diffusion formulation it used; this is a well-established one
(Kingma et al. 2021's continuous time, Salimans & Ho 2022's v-prediction, Hoogeboom et al.
2023's schedule) documented here:

- **Schedule.** Continuous time t in [0, 1]; a cosine schedule in log signal-to-noise ratio,
  logsnr(t) = -2 log tan(a t + b), running from ``logsnr_max`` (t = 0, almost clean) to
  ``logsnr_min`` (t = 1, almost pure noise); alpha(t)^2 = sigmoid(logsnr), sigma(t)^2 =
  sigmoid(-logsnr), so alpha^2 + sigma^2 = 1 (variance preserving). The noisy sample is
  z_t = alpha x0 + sigma eps.
- **Prediction.** The network predicts v = alpha eps - sigma x0; then x0 = alpha z - sigma v and
  eps = sigma z + alpha v (:func:`x0_eps_from_v`).
- **Guidance.** Classifier-free: the condition is dropped (replaced by a learned null) for a
  fraction of training examples; at sampling, v = v_uncond + w (v_cond - v_uncond), so w = 1 is
  the conditional model and w = 0 the unconditional one (:func:`guided`). Both passes run as one
  batch.
- **Sampler.** DDIM (deterministic, eta = 0) over ``steps`` uniform steps from t = 1 to t = 0,
  with the loop inside the compiled function (``lax.fori_loop``): z_s = alpha_s x0_hat +
  sigma_s eps_hat. It returns the last x0 prediction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["LOGSNR_MIN", "LOGSNR_MAX", "logsnr_schedule", "alpha_sigma", "noisy",
           "v_target", "x0_eps_from_v", "v_from_x0", "guided", "ddim_sample"]

LOGSNR_MIN, LOGSNR_MAX = -15.0, 15.0


def logsnr_schedule(t: jax.Array, logsnr_min: float = LOGSNR_MIN,
                    logsnr_max: float = LOGSNR_MAX) -> jax.Array:
    """Cosine schedule: logsnr(t) = -2 log tan(a t + b), logsnr(0) = max, logsnr(1) = min."""
    b = jnp.arctan(jnp.exp(-0.5 * logsnr_max))
    a = jnp.arctan(jnp.exp(-0.5 * logsnr_min)) - b
    return -2.0 * jnp.log(jnp.tan(a * jnp.asarray(t, jnp.float32) + b))


def alpha_sigma(logsnr: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha, sigma) with alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr)."""
    return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def _expand(x: jax.Array, like: jax.Array) -> jax.Array:
    """[B] (or a scalar) -> broadcastable against ``like`` [B, ...]."""
    x = jnp.asarray(x, jnp.float32)
    return x.reshape(x.shape + (1,) * (like.ndim - x.ndim)) if x.ndim else x


def noisy(x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """z_t = alpha(t) x0 + sigma(t) eps; ``t`` [B] or a scalar."""
    alpha, sigma = alpha_sigma(logsnr_schedule(t))
    return _expand(alpha, x0) * x0 + _expand(sigma, x0) * eps


def v_target(x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """The training target v = alpha eps - sigma x0."""
    alpha, sigma = alpha_sigma(logsnr_schedule(t))
    return _expand(alpha, x0) * eps - _expand(sigma, x0) * x0


def x0_eps_from_v(z: jax.Array, v: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x0, eps) from the noisy sample and the v prediction."""
    alpha, sigma = alpha_sigma(logsnr_schedule(t))
    alpha, sigma = _expand(alpha, z), _expand(sigma, z)
    return alpha * z - sigma * v, sigma * z + alpha * v


def v_from_x0(z: jax.Array, x0: jax.Array, t: jax.Array) -> jax.Array:
    """The v that predicts ``x0`` from ``z`` at ``t`` (for denoisers that predict x0)."""
    alpha, sigma = alpha_sigma(logsnr_schedule(t))
    alpha, sigma = _expand(alpha, z), _expand(sigma, z)
    # z = alpha x0 + sigma eps and v = alpha eps - sigma x0  =>  v = (alpha z - x0) / sigma
    return (alpha * z - x0) / sigma


def guided(v_cond: jax.Array, v_uncond: jax.Array, guidance: float | jax.Array) -> jax.Array:
    """Classifier-free guidance: v_uncond + w (v_cond - v_uncond)."""
    return v_uncond + guidance * (v_cond - v_uncond)


def ddim_sample(
    denoise: Callable[[jax.Array, jax.Array, Any], jax.Array],
    condition: Any,
    null_condition: Any,
    noise: jax.Array,
    steps: int,
    guidance: float | jax.Array = 1.0,
) -> jax.Array:
    """DDIM from pure noise to a sample, the loop compiled inside.

    Args:
      denoise: ``(z [2B, ...], t [2B], condition [2B, ...]) -> v [2B, ...]``: the network,
        called once per step on the conditional and the unconditional rows together.
      condition, null_condition: [B, ...] each (the null: what condition dropout trains on).
      noise: the starting sample z_1 [B, ...] (standard normal).
      steps: number of denoising steps (static).
      guidance: w (1: conditional only, 0: unconditional only).
    Returns: the x0 prediction of the last step [B, ...].
    """
    batch = noise.shape[0]
    both_conditions = jax.tree_util.tree_map(lambda c, n: jnp.concatenate([c, n]),
                                             condition, null_condition)
    times = jnp.linspace(1.0, 0.0, steps + 1)

    def prediction(z, t):
        v = denoise(jnp.concatenate([z, z]), jnp.full((2 * batch,), t), both_conditions)
        v = guided(v[:batch], v[batch:], guidance)
        return x0_eps_from_v(z, v, t)

    def step(i, z):
        x0, eps = prediction(z, times[i])
        alpha_s, sigma_s = alpha_sigma(logsnr_schedule(times[i + 1]))
        return alpha_s * x0 + sigma_s * eps

    z = jax.lax.fori_loop(0, steps - 1, step, noise.astype(jnp.float32))
    x0, _ = prediction(z, times[steps - 1])
    return x0
