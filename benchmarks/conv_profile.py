"""Where the full-size train step's time goes: each U-Net convolution's forward and backward
time and achieved GFLOP/s, as the project computes it and in the reference's formulation.

    python -m benchmarks.conv_profile [--batch_size=8] [--repeats=3] [--side=256] [--frames=256]

The U-Net of the reference's size (7 levels, width 64, k 32) has one 4x4 stride-2 convolution
down and one (bilinear x2 upsampling, 3x3 convolution) up per level; the up path's input is the
concatenation of the skip and the inner output (twice the level's width, except at the innermost
level). Each layer is jit-compiled alone at its place's shape (``--side`` frequency bins x
``--frames`` frames, NHWC), as ``clipsep_jax.models.layers`` computes it: the down convolutions
by ``down_conv4x4`` and the up layers by ``upsample_conv3x3`` in the taps-first formulation
(this project) and upsample-first (the reference's order). GFLOP are the reference
formulation's (model FLOPs), so GFLOP/s compare the two. Prints a markdown table, outermost
level first.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from clipsep_jax.families.clipsep.layers import down_conv4x4, upsample_conv3x3


def _median_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layer_shapes(num_downs: int = 7, width: int = 64, k: int = 32, side: int = 256,
                 frames: int = 256):
    """(name, layer input shape without batch, kernel shape, output shape without batch)."""
    widths = [min(width * 2**i, width * 8) for i in range(num_downs)]
    layers = []
    for level in range(num_downs):
        h, w = side // 2**level, frames // 2**level
        cin = 1 if level == 0 else widths[level - 1]
        layers.append((f"down {level}", (h, w, cin), (4, 4, cin, widths[level]),
                       (h // 2, w // 2, widths[level])))
    for level in range(num_downs):
        h, w = side // 2 ** (level + 1), frames // 2 ** (level + 1)
        inner = widths[level] if level == num_downs - 1 else 2 * widths[level]
        cout = k if level == 0 else widths[level - 1]
        layers.append((f"up {level}", (h, w, inner), (3, 3, inner, cout), (2 * h, 2 * w, cout)))
    return layers


def profile_layer(fn, x, kernel, repeats: int) -> tuple[float, float]:
    """(forward seconds, backward seconds: both gradients) of ``fn(x, kernel)``."""
    y = jax.eval_shape(fn, x, kernel)
    cotangent = jnp.ones(y.shape, jnp.float32)
    forward = jax.jit(fn)
    backward = jax.jit(lambda x, k, g: jax.vjp(fn, x, k)[1](g))
    return (_median_seconds(forward, x, kernel, repeats=repeats),
            _median_seconds(backward, x, kernel, cotangent, repeats=repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--frames", type=int, default=256)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows, totals = [], np.zeros(4)
    for name, shape, kernel_shape, out_shape in layer_shapes(side=args.side, frames=args.frames):
        x = jnp.asarray(rng.standard_normal((args.batch_size, *shape)), jnp.float32)
        kernel = jnp.asarray(rng.standard_normal(kernel_shape) * 0.01, jnp.float32)
        flops = 2 * np.prod(kernel_shape) * args.batch_size * np.prod(out_shape[:2])
        if name.startswith("down"):
            ours = profile_layer(down_conv4x4, x, kernel, args.repeats)
            reference = ours
        else:
            ours = profile_layer(upsample_conv3x3, x, kernel, args.repeats)
            reference = profile_layer(
                functools.partial(upsample_conv3x3, formulation="upsample_first"), x, kernel,
                args.repeats)
        times = np.array([*ours, *reference])
        totals += times
        rows.append((name, shape, kernel_shape, flops, times))
    print(f"# U-Net layers, batch {args.batch_size}, {args.side} x {args.frames}, "
          f"{jax.devices()[0].platform}, median of {args.repeats}; ms (model GFLOP/s)\n")
    print("| layer | input (H, W, C) | kernel | model GFLOP | forward | backward | "
          "reference formulation: forward | backward |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, shape, kernel_shape, flops, times in rows:
        cells = [f"{t * 1e3:.0f} ({flops * (1 if i % 2 == 0 else 2) / t / 1e9:.0f})"
                 for i, t in enumerate(times)]
        if name.startswith("down"):
            cells[2:] = ["same", "same"]
        print(f"| {name} | {shape} | {kernel_shape[0]}x{kernel_shape[1]}, "
              f"{kernel_shape[2]}->{kernel_shape[3]} | {flops / 1e9:.1f} | " + " | ".join(cells)
              + " |")
    print(f"\ntotal: forward {totals[0]:.2f} s, backward {totals[1]:.2f} s "
          f"({totals[0] + totals[1]:.2f} s); in the reference formulation forward "
          f"{totals[2]:.2f} s, backward {totals[3]:.2f} s ({totals[2] + totals[3]:.2f} s)")


if __name__ == "__main__":
    main()
