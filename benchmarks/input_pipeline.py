"""Examples/s of the training input pipeline on this machine, reading a prepared dataset.

    python -m benchmarks.input_pipeline [--clips=32] [--seconds=10] [--batches=20]

Builds a dataset of ``clips`` generated clips of ``seconds`` seconds with data_prep (a tiny
random CLIP: only the reading side is measured), then times ``batches`` batches of the full
configuration (N = 2, 65535-sample crops, batch 8) from ``input_pipeline.training_dataset`` with
0 and 2 worker processes, after one warm-up batch. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

from absl import flags

from benchmarks.data_prep import make_tree
from clipsep_jax import input_pipeline
from clipsep_jax.config import default_config
from clipsep_jax.encoders.clip import CLIP
from clipsep_jax.encoders.clip_towers import CLIPConfig, TowerConfig
from clipsep_jax.families import get_family
from data_prep import build

TINY = CLIPConfig(
    vision=TowerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, image_size=32, patch_size=16),
    text=TowerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, vocab_size=520, max_position_embeddings=64),
    projection_dim=512,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tree, out, clip_dir = (os.path.join(tmp, x) for x in ("in", "out", "clip"))
        make_tree(tree, args.clips, args.seconds)
        CLIP.random(TINY).save_pretrained(clip_dir)
        build.run(["--dataset=music", f"--manual_dir={tree}", f"--data_dir={out}",
                   f"--clip={clip_dir}"])
        config = default_config()
        config.data.data_dir = out
        config.train.batch_size = 8
        source, metadata = input_pipeline.open_split(config.data, "train")
        transform = get_family(config).training_transform(config, source, metadata)
        start = time.perf_counter()
        for i in range(len(source)):
            source[i]
        read_s = (time.perf_counter() - start) / len(source)
        rows.append(("read + decode one 10 s record", f"{read_s * 1000:.1f} ms"))
        for workers in (0, 2):
            config.data.num_workers = workers
            iterator = iter(input_pipeline.training_dataset(
                transform, len(source), batch_size=8, seed=0, num_workers=workers))
            next(iterator)
            start = time.perf_counter()
            for _ in range(args.batches):
                next(iterator)
            seconds = time.perf_counter() - start
            rows.append((f"training batches, {workers} worker processes",
                         f"{args.batches * 8 / seconds:.1f} examples/s"))
            del iterator
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")
    print("| measurement | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
