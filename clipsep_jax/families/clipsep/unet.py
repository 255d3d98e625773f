"""The reference's audio U-Net (pix2pix style), NHWC.

Level 0 is the outermost. With ``num_downs`` levels and base width ``w`` the down path's widths are
w, 2w, 4w, 8w, 8w, ... (8w from level 3 inwards). Per level:

- down: LeakyReLU(0.2) (not at level 0), Conv 4x4 stride 2 padding 1 without bias, BatchNorm (not
  at level 0 and not at the innermost level);
- up: ReLU, bilinear x2 upsampling (align_corners=True), Conv 3x3 padding 1 (with bias only at
  level 0), BatchNorm (not at level 0); ``up_conv_formulation`` picks how the upsampling and
  convolution are computed (the same function; see ``layers.upsample_conv3x3``);
- every level but the outermost returns concat(its input, its up-path output) on channels.

The input is a single-channel log-magnitude spectrogram [B, F, T, 1] normalised by a BatchNorm;
F and T must be divisible by 2**num_downs. The output has ``out_channels`` (k) channels, no
activation.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipsep_jax.families.clipsep.layers import (
    BatchNorm,
    DownConv4x4,
    UpsampleConv3x3,
)


def level_widths(num_downs: int, base_width: int) -> list[int]:
    """Output channels of each level's down convolution, outermost first."""
    return [base_width * min(2**level, 8) for level in range(num_downs)]


class UNet(nn.Module):
    """Attributes: num_downs (levels), base_width, out_channels (k), dtype, BatchNorm settings,
    up_conv_formulation ("taps_first" or "upsample_first")."""

    num_downs: int = 7
    base_width: int = 64
    out_channels: int = 32
    dtype: Any = jnp.float32
    batch_norm_momentum: float = 0.1
    batch_norm_epsilon: float = 1e-5
    up_conv_formulation: str = "taps_first"

    def _norm(self, name: str) -> BatchNorm:
        return BatchNorm(
            momentum=self.batch_norm_momentum,
            epsilon=self.batch_norm_epsilon,
            dtype=self.dtype,
            name=name,
        )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """x: [B, F, T, C_in] -> [B, F, T, out_channels] (dtype ``self.dtype``)."""
        depth = self.num_downs
        divisor = 2**depth
        if x.shape[1] % divisor or x.shape[2] % divisor:
            raise ValueError(
                f"U-Net input {x.shape[1]}x{x.shape[2]} (frequency x time) must be divisible by "
                f"2**num_downs = {divisor}"
            )
        widths = level_widths(depth, self.base_width)
        x = self._norm("input_norm")(x, train)

        level_inputs = []
        for level in range(depth):
            level_inputs.append(x)
            if level > 0:
                x = nn.leaky_relu(x, 0.2)
            x = DownConv4x4(widths[level], self.dtype, name=f"down_conv_{level}")(x)
            if 0 < level < depth - 1:
                x = self._norm(f"down_norm_{level}")(x, train)

        for level in reversed(range(depth)):
            if level < depth - 1:
                x = jnp.concatenate([level_inputs[level + 1], x], axis=-1)
            x = nn.relu(x)
            features = self.out_channels if level == 0 else widths[level - 1]
            x = UpsampleConv3x3(
                features,
                bias_fan_in=x.shape[-1] * 9 if level == 0 else 0,
                formulation=self.up_conv_formulation,
                dtype=self.dtype,
                name=f"up_conv_{level}",
            )(x)
            if level > 0:
                x = self._norm(f"up_norm_{level}")(x, train)
        return x
