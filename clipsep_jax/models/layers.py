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


@functools.lru_cache(maxsize=32)
def _parity_tap_weights(in_size: int) -> np.ndarray:
    """Weights [2 (output parity), 2 (tap), in_size] of x2 align-corners upsampling.

    With src = o * (n - 1) / (2n - 1), output 2k interpolates source rows k - 1 and k, and output
    2k + 1 rows k and k + 1; PyTorch's float32 taps are placed into those two slots.
    """
    lower, upper, weight = _align_corners_taps(in_size, 2 * in_size)
    taps = np.zeros((2, 2, in_size), np.float32)
    for out in range(2 * in_size):
        k, parity = divmod(out, 2)
        first_row = k - 1 + parity  # even: k - 1, k; odd: k, k + 1
        for row, tap_weight in ((lower[out], np.float32(1.0) - weight[out]),
                                (upper[out], weight[out])):
            if tap_weight == 0:
                continue
            slot = row - first_row
            if slot not in (0, 1):
                raise AssertionError(f"unexpected upsampling tap {row} for output {out}")
            taps[parity, slot, k] += tap_weight
    return taps


def _upsample_axis(x: jax.Array, axis: int) -> jax.Array:
    """x2 align-corners linear upsampling along ``axis`` with shifted slices, no gathers.

    Gathers would be scatter-adds in the backward pass, which XLA:CPU runs slowly.
    """
    size = x.shape[axis]
    shape = [1] * x.ndim
    shape[axis] = size
    taps = jnp.asarray(_parity_tap_weights(size), x.dtype).reshape(2, 2, *shape)
    padding = [(0, 0)] * x.ndim
    padding[axis] = (1, 1)
    padded = jnp.pad(x, padding)
    previous = jax.lax.slice_in_dim(padded, 0, size, axis=axis)
    following = jax.lax.slice_in_dim(padded, 2, size + 2, axis=axis)
    even = previous * taps[0, 0] + x * taps[0, 1]
    odd = x * taps[1, 0] + following * taps[1, 1]
    out_shape = list(x.shape)
    out_shape[axis] = 2 * size
    return jnp.stack([even, odd], axis=axis + 1).reshape(out_shape)


def upsample_bilinear_2x(x: jax.Array) -> jax.Array:
    """Bilinear x2 upsampling of NHWC ``x`` with align_corners=True -> [B, 2H, 2W, C]."""
    return _upsample_axis(_upsample_axis(x, 1), 2)
