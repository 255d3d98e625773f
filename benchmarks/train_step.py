"""Compile time and step time of the full-size train step, per model kind, on this machine.

    python -m benchmarks.train_step [--batch_size=4] [--kinds=clipsep,clipsep_nit] [--repeats=5]

Prints a markdown table: compile seconds, median step seconds over ``repeats`` timed steps after
one warm-up step, examples/s, and each kind's step time relative to the first kind's.
"""

from __future__ import annotations

import argparse
import functools
import platform
import resource
import statistics
import time

import jax
import numpy as np

from clipsep_jax.config import default_config
from clipsep_jax.train import create_train_state, make_optimizer, train_step


def synthetic_batch(config, batch_size: int, seed: int = 0) -> dict:
    """Random magnitudes of a 65535-sample crop (513 x 256) and CLIP-sized queries."""
    rng = np.random.default_rng(seed)
    n = config.num_sources
    frames = 1 + config.audio.crop_samples // config.audio.hop_length
    bins = config.audio.n_fft // 2 + 1
    mags = rng.gamma(0.5, 1.0, (batch_size, n, bins, frames)).astype(np.float32) / n
    batch = {"mag_mix": mags.sum(axis=1), "mags": mags}
    if config.model.kind == "labelsep":
        batch["queries"] = rng.integers(0, config.model.num_labels, (batch_size, n), np.int32)
    elif config.model.kind != "pit":
        batch["queries"] = rng.normal(size=(batch_size, n, config.model.query_dim)).astype(
            np.float32)
    return batch


def _config(kind: str, compute_dtype: str, up_conv_formulation: str):
    config = default_config()
    config.model.kind = kind
    config.model.compute_dtype = compute_dtype
    config.model.up_conv_formulation = up_conv_formulation
    return config


def model_flops_per_step(kind: str, batch_size: int, compute_dtype: str = "float32") -> float:
    """FLOPs of one train step of the model as the reference defines it (upsampling, then each
    3x3 convolution at full resolution), from XLA's cost analysis of that formulation."""
    config = _config(kind, compute_dtype, "upsample_first")
    optimizer = make_optimizer(config)
    state = jax.eval_shape(lambda: create_train_state(config, jax.random.key(0), optimizer))
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                         synthetic_batch(config, batch_size))
    step = jax.jit(functools.partial(train_step, config, optimizer))
    cost = step.lower(state, batch).cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float((cost or {}).get("flops", float("nan")))


def measure(kind: str, batch_size: int, repeats: int, compute_dtype: str,
            up_conv_formulation: str = "taps_first") -> dict:
    """Compile time, median step time, and the step's FLOPs as compiled (``flops_per_step``)."""
    config = _config(kind, compute_dtype, up_conv_formulation)
    optimizer = make_optimizer(config)
    state = create_train_state(config, jax.random.key(0), optimizer)
    batch = jax.device_put(synthetic_batch(config, batch_size))
    step = jax.jit(functools.partial(train_step, config, optimizer), donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return {"kind": kind, "up_conv_formulation": up_conv_formulation, "compile_s": compile_s,
            "step_s": step_s, "examples_per_s": batch_size / step_s, "loss": float(metrics["loss"]),
            "flops_per_step": float((cost or {}).get("flops", float("nan")))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--kinds", default="clipsep,clipsep_nit")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compute_dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--up_conv_formulations", default="taps_first",
                        help="comma-separated, measured in this order for each kind (list one "
                        "twice, e.g. taps_first,upsample_first,taps_first, to alternate)")
    args = parser.parse_args()
    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    print(f"# train step, batch {args.batch_size}, {args.compute_dtype}, "
          f"{device.platform} ({device.device_kind}), {cpu}, jax {jax.__version__}")
    rows = [measure(kind, args.batch_size, args.repeats, args.compute_dtype, formulation)
            for kind in args.kinds.split(",")
            for formulation in args.up_conv_formulations.split(",")]
    print("| kind | up conv | compile s | step s (median) | examples/s | GFLOP per step | "
          "step time vs first |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['kind']} | {row['up_conv_formulation']} | {row['compile_s']:.1f} | "
              f"{row['step_s']:.3f} | {row['examples_per_s']:.2f} | "
              f"{row['flops_per_step'] / 1e9:.0f} | {row['step_s'] / rows[0]['step_s']:.3f}x |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"\npeak host memory (max RSS of this process): {peak:.2f} GiB")


if __name__ == "__main__":
    main()
