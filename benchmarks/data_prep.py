"""Throughput of the offline extraction job on this machine, with a ViT-B/32-sized random CLIP.

    python -m benchmarks.data_prep [--clips=24] [--seconds=10] [--batch_size=64]

Measures (1) CLIP vision-tower frames/s on preprocessed 224 x 224 frames (float32, and bfloat16),
(2) host preprocessing (JPEG decode + resize + crop of 360 x 480 frames) frames/s, and (3) the
whole ``data_prep.build`` job on a generated index-layout tree of ``clips`` clips of ``seconds``
seconds with 1 fps frames: clips/s and bytes on disk per 10 s of audio. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import tempfile
import time

import jax
import numpy as np
import soundfile as sf
from PIL import Image

from clipsep_jax.encoders.clip import CLIP
from clipsep_jax.encoders.clip_towers import VIT_B32
from data_prep import build, media


def frames_per_second(clip: CLIP, batch_size: int, repeats: int = 3) -> float:
    frames = np.random.default_rng(0).integers(0, 256, (batch_size, 224, 224, 3), np.uint8)
    clip.encode_preprocessed(frames)  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        clip.encode_preprocessed(frames)
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def make_tree(root: str, clips: int, seconds: float) -> None:
    rng = np.random.default_rng(0)
    rows = {"train": [], "val": [], "test": []}
    for i in range(clips):
        split = ("train", "val", "test")[i % 3]
        label = ("accordion", "tuba", "violin")[i % 3]
        audio_path = os.path.join(root, "audio", label, f"clip{i:04d}.wav")
        frames_dir = os.path.join(root, "frames", label, f"clip{i:04d}")
        os.makedirs(os.path.dirname(audio_path), exist_ok=True)
        os.makedirs(frames_dir, exist_ok=True)
        t = np.arange(int(seconds * 16000)) / 16000
        wave = 0.3 * np.sin(2 * np.pi * (200 + 10 * i) * t) + 0.01 * rng.standard_normal(len(t))
        sf.write(audio_path, wave.astype(np.float32), 16000, subtype="PCM_16")
        count = int(seconds)
        base = rng.integers(0, 256, (360, 480, 3), np.uint8)
        for f in range(1, count + 1):
            Image.fromarray(np.roll(base, 7 * f, axis=1)).save(
                os.path.join(frames_dir, f"{f:06d}.jpg"), quality=90
            )
        rows[split].append([audio_path, frames_dir, str(count)])
    for split, split_rows in rows.items():
        with open(os.path.join(root, f"{split}.csv"), "w", newline="") as f:
            csv.writer(f).writerows(split_rows)


def folder_bytes(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, fs in os.walk(path)
        for f in fs
        if "array_record" in f
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()

    rows = []
    clip = CLIP.random(VIT_B32, seed=0, batch_size=args.batch_size)
    rows.append(
        (
            "CLIP ViT-B/32 image tower, float32",
            f"{frames_per_second(clip, args.batch_size):.1f} frames/s",
        )
    )
    half = CLIP.random(VIT_B32, seed=0, batch_size=args.batch_size, dtype="bfloat16")
    rows.append(
        (
            "CLIP ViT-B/32 image tower, bfloat16",
            f"{frames_per_second(half, args.batch_size):.1f} frames/s",
        )
    )
    del half

    with tempfile.TemporaryDirectory() as tmp:
        tree, out, clip_dir = (os.path.join(tmp, x) for x in ("in", "out", "clip"))
        make_tree(tree, args.clips, args.seconds)
        frame_files = [
            os.path.join(d, f) for d, _, fs in os.walk(os.path.join(tree, "frames")) for f in fs
        ][:64]
        start = time.perf_counter()
        for path in frame_files:
            clip.preprocessing.resize_and_crop(media.load_frame(path))
        rows.append(
            (
                "JPEG decode + resize + crop, 360x480, one thread",
                f"{len(frame_files) / (time.perf_counter() - start):.1f} frames/s",
            )
        )
        clip.save_pretrained(clip_dir)
        del clip
        start = time.perf_counter()
        builder = build.run(
            [
                "--dataset=music",
                f"--manual_dir={tree}",
                f"--data_dir={out}",
                f"--clip={clip_dir}",
                f"--clip_batch_size={args.batch_size}",
            ]
        )
        seconds = time.perf_counter() - start
        clips = sum(s.num_examples for s in builder.info.splits.values())
        size = folder_bytes(os.fspath(builder.data_path))
        rows.append(
            (
                f"whole job, {clips} clips of {args.seconds:g} s (index layout)",
                f"{clips / seconds:.2f} clips/s ({seconds:.1f} s incl. CLIP load+compile)",
            )
        )
        rows.append(
            ("bytes on disk per 10 s clip", f"{size / clips * 10 / args.seconds / 2**20:.2f} MiB")
        )

    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}\n"
    )
    print("| measurement | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
