"""Building blocks with the reference's (PyTorch's) numerics: BatchNorm, upsampling, inits."""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# The reference's `init_weights`: conv kernels N(0, 0.001), linear weights N(0, 1e-4),
# BatchNorm weight N(1, 0.02) and bias 0.
conv_kernel_init = nn.initializers.normal(stddev=1e-3)
dense_kernel_init = nn.initializers.normal(stddev=1e-4)


def batch_norm_scale_init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32):
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def torch_default_bias_init(fan_in: int):
    """PyTorch's default bias init for Linear and Conv: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class BatchNorm(nn.Module):
    """BatchNorm over all axes but the last, with PyTorch's conventions.

    Normalises with the biased batch variance in training and keeps running statistics updated as
    ``(1 - momentum) * running + momentum * batch``, the variance unbiased (n / (n - 1)), so that
    statistics converted from or compared with the reference agree. Statistics are computed in
    float32 over the whole (global) batch: under ``jax.jit`` with a batch-sharded input the
    reduction spans every device.

    Attributes:
      momentum: PyTorch's momentum (weight of the new batch), 0.1 in the reference.
      epsilon: added to the variance, 1e-5 in the reference.
      dtype: dtype of the output.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", batch_norm_scale_init, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        x32 = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            count = math.prod(x.shape[:-1])
            if count < 2:
                raise ValueError(
                    f"BatchNorm in training needs more than one value per channel, got input "
                    f"shape {x.shape}"
                )
            mean = jnp.mean(x32, axis=axes)
            var = jnp.mean(jnp.square(x32 - mean), axis=axes)
            if not self.is_initializing():
                m = self.momentum
                running_mean.value = (1.0 - m) * running_mean.value + m * mean
                running_var.value = (1.0 - m) * running_var.value + m * var * (count / (count - 1))
        else:
            mean, var = running_mean.value, running_var.value
        multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
        return ((x32 - mean) * multiplier + bias).astype(self.dtype)


@functools.lru_cache(maxsize=32)
def _align_corners_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower index, upper index and upper weight of align_corners=True linear interpolation.

    Computed in float32 as PyTorch's upsample_bilinear2d does: src = o * (in - 1) / (out - 1).
    """
    scale = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0.0)
    src = np.arange(out_size, dtype=np.float32) * scale
    lower = np.floor(src).astype(np.int64)
    upper = np.minimum(lower + 1, in_size - 1)
    weight = (src - lower.astype(np.float32)).astype(np.float32)
    return lower, upper, weight


def _upsample_axis(x: jax.Array, axis: int, factor: int) -> jax.Array:
    size = x.shape[axis]
    lower, upper, weight = _align_corners_taps(size, size * factor)
    shape = [1] * x.ndim
    shape[axis] = -1
    weight = jnp.asarray(weight.reshape(shape), x.dtype)
    return jnp.take(x, lower, axis=axis) * (1 - weight) + jnp.take(x, upper, axis=axis) * weight


def upsample_bilinear_2x(x: jax.Array) -> jax.Array:
    """Bilinear x2 upsampling of NHWC ``x`` with align_corners=True -> [B, 2H, 2W, C]."""
    return _upsample_axis(_upsample_axis(x, 1, 2), 2, 2)
