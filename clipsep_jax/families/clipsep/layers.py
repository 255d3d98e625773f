"""Building blocks with the reference's (PyTorch's) numerics: BatchNorm, upsampling followed by
convolution, inits."""

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


@functools.lru_cache(maxsize=32)
def _tap_phase_coefficients(in_size: int) -> np.ndarray:
    """Coefficients [2 (output parity), 3 (kernel tap), 3 (source offset), in_size].

    Output ``2k + parity`` of a 3-tap convolution (padding 1) applied after x2 align-corners
    upsampling of a length-``in_size`` source is
    ``sum_{tap, offset} coef[parity, tap, offset, k] * z_tap[k + offset - 1]``, where ``z_tap`` is
    the source multiplied by the kernel's tap (zero beyond the ends).
    """
    taps = _parity_tap_weights(in_size)  # [parity, slot, k]: upsampled 2k + parity
    coef = np.zeros((2, 3, 3, in_size), np.float32)
    for k in range(in_size):
        for parity in range(2):
            for tap in range(3):
                upsampled = 2 * k + parity + tap - 1
                if not 0 <= upsampled < 2 * in_size:
                    continue  # the convolution's zero padding
                source, source_parity = divmod(upsampled, 2)
                first_row = source - 1 + source_parity
                for slot in range(2):
                    row = first_row + slot
                    if 0 <= row < in_size:
                        coef[parity, tap, row - k + 1, k] += taps[source_parity, slot, source]
    return coef


def _adjoint_coefficients(coef: np.ndarray) -> np.ndarray:
    """``_stencil``'s adjoint: coef [O, I, 3, L] -> [I, O, 3, L + 2], applied to the outputs'
    cotangents padded by 2 on both sides."""
    outputs, inputs, offsets, length = coef.shape
    adjoint = np.zeros((inputs, outputs, offsets, length + offsets - 1), np.float32)
    for offset in range(offsets):
        # Input position m is read by output m - offset, at m + (2 - offset) in the padded array.
        adjoint[:, :, offsets - 1 - offset, offset : offset + length] = (
            coef[:, :, offset].transpose(1, 0, 2))
    return adjoint


def _stencil(inputs: list[jax.Array], coef: np.ndarray, axis: int) -> list[jax.Array]:
    """``out[o][k] = sum_{i, offset} coef[o, i, offset, k] * inputs[i][k + offset]`` along ``axis``.

    inputs: I arrays of length L + 2 along ``axis``; coef: [O, I, 3, L] -> O arrays of length L.
    """
    length = coef.shape[-1]
    shape = [1] * inputs[0].ndim
    shape[axis] = length
    outputs = []
    for o in range(coef.shape[0]):
        total = None
        for i, source in enumerate(inputs):
            for offset in range(coef.shape[2]):
                if not np.any(coef[o, i, offset]):
                    continue
                window = jax.lax.slice_in_dim(source, offset, offset + length, axis=axis)
                term = jnp.asarray(coef[o, i, offset]).reshape(shape) * window
                total = term if total is None else total + term
        outputs.append(total)
    return outputs


@jax.custom_vjp
def _upsample_taps(taps: jax.Array) -> jax.Array:
    """Sums the nine kernel taps' products, each upsampled and shifted into place.

    taps: [B, H + 2, W + 2, 3 (kernel row), 3 (kernel column), C] float32, the zero-padded source
    times each tap of a 3x3 kernel -> [B, 2H, 2W, C]: the 3x3 convolution (padding 1) of the x2
    align-corners bilinear upsampling. Two passes, each written as one array (rows upsampled and
    interleaved, then columns), which XLA runs as one loop each; the backward pass is the adjoint
    written the same way (autodiff of the slices would pad and add every term separately).
    """
    batch, rows, cols, _, _, channels = taps.shape
    height, width = rows - 2, cols - 2
    row_phases = _stencil([taps[:, :, :, i] for i in range(3)],
                          _tap_phase_coefficients(height), axis=1)
    upsampled_rows = jnp.stack(row_phases, axis=2).reshape(batch, 2 * height, cols, 3, channels)
    col_phases = _stencil([upsampled_rows[:, :, :, j] for j in range(3)],
                          _tap_phase_coefficients(width), axis=2)
    return jnp.stack(col_phases, axis=3).reshape(batch, 2 * height, 2 * width, channels)


def _upsample_taps_forward(taps: jax.Array):
    return _upsample_taps(taps), taps.shape


def _upsample_taps_backward(shape: tuple[int, ...], cotangent: jax.Array):
    batch, rows, cols, _, _, channels = shape
    height, width = rows - 2, cols - 2
    by_column_parity = cotangent.astype(jnp.float32).reshape(batch, 2 * height, width, 2, channels)
    padded = jnp.pad(by_column_parity, ((0, 0), (0, 0), (2, 2), (0, 0), (0, 0)))
    upsampled_rows = jnp.stack(
        _stencil([padded[:, :, :, p] for p in range(2)],
                 _adjoint_coefficients(_tap_phase_coefficients(width)), axis=2),
        axis=3)  # [B, 2H, W + 2, 3, C]
    by_row_parity = upsampled_rows.reshape(batch, height, 2, cols, 3, channels)
    padded = jnp.pad(by_row_parity, ((0, 0), (2, 2), (0, 0), (0, 0), (0, 0), (0, 0)))
    taps = _stencil([padded[:, :, p] for p in range(2)],
                    _adjoint_coefficients(_tap_phase_coefficients(height)), axis=1)
    return (jnp.stack(taps, axis=3),)


_upsample_taps.defvjp(_upsample_taps_forward, _upsample_taps_backward)


def upsample_conv3x3(x: jax.Array, kernel: jax.Array, formulation: str = "taps_first",
                     dtype: Dtype = jnp.float32) -> jax.Array:
    """Conv 3x3 (padding 1, no bias) of the bilinear x2 (align-corners) upsampling of ``x``.

    x: [B, H, W, C_in]; kernel: [3, 3, C_in, C_out] (HWIO) -> [B, 2H, 2W, C_out] in ``dtype``.

    formulation:
      "upsample_first": upsample, then convolve at full resolution (the reference's order).
      "taps_first": multiply by the kernel's nine taps at the input's resolution, then upsample
        and sum the shifted taps. Channel mixing commutes with the per-channel spatial maps, so
        this is the same function with a quarter of the multiply-adds; the rest is elementwise.
    """
    x = x.astype(dtype)
    kernel = kernel.astype(dtype)
    if formulation == "upsample_first":
        return jax.lax.conv_general_dilated(
            upsample_bilinear_2x(x), kernel, (1, 1), ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
    if formulation != "taps_first":
        raise ValueError(f"formulation={formulation!r}: expected taps_first or upsample_first")
    batch, height, width, channels = x.shape
    features = kernel.shape[-1]
    mixing = kernel.transpose(2, 0, 1, 3).reshape(channels, 9 * features)
    # Padding before the product gives every shifted read a zero border to slice from.
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = jnp.dot(padded, mixing, preferred_element_type=jnp.float32)
    taps = taps.reshape(batch, height + 2, width + 2, 3, 3, features)
    return _upsample_taps(taps).astype(dtype)


def down_conv4x4(x: jax.Array, kernel: jax.Array, dtype: Dtype = jnp.float32) -> jax.Array:
    """Conv 4x4, stride 2, padding 1, no bias: [B, H, W, C_in] -> [B, H/2, W/2, C_out].

    kernel: [4, 4, C_in, C_out] (HWIO). Inputs of at most 8 rows (the innermost levels) run as
    one matrix product over gathered 4x4 patches: their gradients as convolutions run on
    XLA:CPU at a few GFLOP/s (the 4x4-input level's input gradient took 134 ms against 9 ms).
    """
    x = x.astype(dtype)
    kernel = kernel.astype(dtype)
    if x.shape[1] > 8:
        return jax.lax.conv_general_dilated(
            x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    batch, height, width, channels = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows, cols = height // 2, width // 2
    patches = jnp.concatenate(
        [padded[:, i : i + 2 * rows : 2, j : j + 2 * cols : 2] for i in range(4) for j in range(4)],
        axis=-1)  # [B, H/2, W/2, 16 C_in], tap-major like the kernel's reshape
    return jnp.dot(patches, kernel.reshape(16 * channels, kernel.shape[-1]))


class DownConv4x4(nn.Module):
    """Conv 4x4 stride 2 padding 1 without bias; ``nn.Conv``'s parameter (``kernel``)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C_in] -> [B, H/2, W/2, features]."""
        kernel = self.param("kernel", conv_kernel_init, (4, 4, x.shape[-1], self.features))
        return down_conv4x4(x, kernel, self.dtype)


class UpsampleConv3x3(nn.Module):
    """Bilinear x2 upsampling (align_corners=True) then Conv 3x3 padding 1, as one layer.

    Its parameters are ``nn.Conv``'s (``kernel`` [3, 3, C_in, C_out], ``bias`` [C_out]), so
    checkpoints do not depend on ``formulation`` (see ``upsample_conv3x3``).

    Attributes:
      features: C_out.
      bias_fan_in: 0 for no bias; otherwise the fan-in of PyTorch's default bias init.
      formulation: "taps_first" or "upsample_first".
      dtype: computation and output dtype; parameters stay float32.
    """

    features: int
    bias_fan_in: int = 0
    formulation: str = "taps_first"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C_in] -> [B, 2H, 2W, features]."""
        kernel = self.param("kernel", conv_kernel_init, (3, 3, x.shape[-1], self.features))
        y = upsample_conv3x3(x, kernel, self.formulation, self.dtype)
        if self.bias_fan_in:
            bias = self.param("bias", torch_default_bias_init(self.bias_fan_in), (self.features,))
            y = y + bias.astype(self.dtype)
        return y
