"""Where the full-size train step's time goes: each U-Net convolution's forward, input-gradient
and weight-gradient time and achieved GFLOP/s, against the whole step and the matmul peak.

    python -m benchmarks.conv_profile [--batch_size=8] [--repeats=3]

The U-Net of the reference's size (256 x 256 input, 7 levels, width 64, k 32) has one 4x4
stride-2 convolution down and one 3x3 convolution after upsampling per level; the up-path input
is the concatenation of the skip and the upsampled inner output (twice the level's width, except
at the innermost level). Each convolution is jit-compiled alone at its place's shape, NHWC, the
way XLA runs it inside the step. Prints a markdown table, outermost level first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def _median_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _conv(x, w, stride, padding):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), [(padding, padding)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def layer_shapes(num_downs: int = 7, width: int = 64, k: int = 32, side: int = 256):
    """(name, input shape without batch, kernel shape, stride, padding) of every convolution."""
    widths = [min(width * 2**i, width * 8) for i in range(num_downs)]
    layers = []
    for level in range(num_downs):
        size = side // 2**level
        cin = 1 if level == 0 else widths[level - 1]
        cout = widths[level]
        layers.append((f"down {level}", (size, size, cin), (4, 4, cin, cout), 2, 1))
    for level in range(num_downs):
        size = side // 2**level
        inner = widths[level] if level == num_downs - 1 else 2 * widths[level]
        cout = k if level == 0 else widths[level - 1]
        layers.append((f"up {level}", (size, size, inner), (3, 3, inner, cout), 1, 1))
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows, totals = [], np.zeros(3)
    for name, shape, kernel, stride, padding in layer_shapes():
        x = jnp.asarray(rng.standard_normal((args.batch_size, *shape)), jnp.float32)
        w = jnp.asarray(rng.standard_normal(kernel) * 0.01, jnp.float32)
        y = jax.eval_shape(lambda x, w, s=stride, p=padding: _conv(x, w, s, p), x, w)
        dy = jnp.ones(y.shape, jnp.float32)
        forward = jax.jit(lambda x, w, s=stride, p=padding: _conv(x, w, s, p))
        grad_x = jax.jit(lambda x, w, dy, s=stride, p=padding:
                         jax.vjp(lambda x: _conv(x, w, s, p), x)[1](dy))
        grad_w = jax.jit(lambda x, w, dy, s=stride, p=padding:
                         jax.vjp(lambda w: _conv(x, w, s, p), w)[1](dy))
        times = np.array([_median_seconds(forward, x, w, repeats=args.repeats),
                          _median_seconds(grad_x, x, w, dy, repeats=args.repeats),
                          _median_seconds(grad_w, x, w, dy, repeats=args.repeats)])
        flops = 2 * np.prod(kernel) * np.prod(y.shape[:3])
        totals += times
        rows.append((name, shape, kernel, flops, times))
    print(f"# U-Net convolutions, batch {args.batch_size}, {jax.devices()[0].platform}, "
          f"median of {args.repeats}\n")
    print("| conv | input (H, W, C) | kernel | GFLOP | forward ms (GFLOP/s) | input grad ms "
          "(GFLOP/s) | weight grad ms (GFLOP/s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, shape, kernel, flops, times in rows:
        cells = [f"{t * 1e3:.0f} ({flops / t / 1e9:.0f})" for t in times]
        print(f"| {name} | {shape} | {kernel[0]}x{kernel[1]}, {kernel[2]}->{kernel[3]} | "
              f"{flops / 1e9:.1f} | " + " | ".join(cells) + " |")
    print(f"\ntotal: forward {totals[0]:.2f} s, input gradients {totals[1]:.2f} s, weight "
          f"gradients {totals[2]:.2f} s ({totals.sum():.2f} s of convolutions)")


if __name__ == "__main__":
    main()
