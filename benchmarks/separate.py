"""Wall time of separating 10 s and 60 s of audio at the reference's full model size.

    python -m benchmarks.separate [--seconds=10,60] [--repeats=3]

A random-weight CLIPSep of the reference's size (7 levels, width 64, k 32) and a ViT-B/32-sized
random CLIP; one text query. Times ``Separator.separate`` (resampling, STFT, windowed model,
masks, inverse STFT) after a warm-up call that compiles, median of ``repeats``, against a
straightforward PyTorch + librosa rendition of the reference's inference path (``infer.py``:
librosa STFT of the whole recording tiled to a multiple of 65535 samples, one pass of the model
from ``tests/torch_reference.py``, grid_sample unwarp, librosa inverse STFT; transformers' CLIP
for the text query), same thread count. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import numpy as np

from clipsep_jax.config import default_config
from clipsep_jax.encoders.clip import CLIP
from clipsep_jax.encoders.clip_towers import VIT_B32
from clipsep_jax.models import init_variables
from clipsep_jax.separate import Separator


def torch_rendition():
    """Returns separate(waveform) -> estimate, the reference's inference path in PyTorch."""
    import sys

    import librosa
    import torch
    import transformers

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import torch_reference as tr

    torch.manual_seed(0)
    model = tr.CLIPSep().eval()
    clip = transformers.CLIPModel(transformers.CLIPConfig()).eval()
    tokens = {"input_ids": torch.randint(0, 49000, (1, 77)), "attention_mask": torch.ones(1, 77)}

    @torch.no_grad()
    def separate(wave: np.ndarray) -> np.ndarray:
        length = len(wave)
        padded_length = 65535 * (length // 65535 + 1)
        audio = np.tile(wave, padded_length // length + 1)[:padded_length]
        spec = librosa.stft(audio, n_fft=1024, hop_length=256, win_length=1024)
        mag = torch.from_numpy(np.abs(spec))[None, None]
        embedding = clip.get_text_features(**tokens).pooler_output
        log_mag = torch.log(tr.warp(mag + 1e-10))
        feat = model.sound_net(log_mag)
        logits = model.synth_net(torch.sigmoid(model.frame_net(embedding)), feat)
        mask = (torch.sigmoid(logits) > 0.5).float()
        grid = tr.reference_grid(1, 513, mask.shape[3], warp=False)
        mask = torch.nn.functional.grid_sample(mask, grid, align_corners=True)[0, 0].numpy()
        out = librosa.istft(mask * spec, hop_length=256, win_length=1024, length=padded_length)
        return np.clip(out[:length], -1, 1)

    return separate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", default="10,60")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch rendition")
    args = parser.parse_args()
    config = default_config()
    separator = Separator(config, init_variables(config, jax.random.PRNGKey(0)),
                          clip=CLIP.random(VIT_B32))
    rng = np.random.default_rng(0)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}\n")
    torch_separate = None if args.no_torch else torch_rendition()
    print("| audio | first call (compiles) | separation (median) | x real time | "
          "PyTorch + librosa (median) | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for seconds in (float(s) for s in args.seconds.split(",")):
        wave = (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)
        start = time.perf_counter()
        separator.separate(wave, 16000, ["playing bagpipes"])
        first = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            separator.separate(wave, 16000, ["playing bagpipes"])
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        reference = ""
        if torch_separate is not None:
            torch_separate(wave)  # warm-up
            torch_times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                torch_separate(wave)
                torch_times.append(time.perf_counter() - start)
            torch_median = statistics.median(torch_times)
            reference = f"{torch_median:.2f} s | {torch_median / median:.2f}x"
        print(f"| {seconds:g} s | {first:.2f} s | {median:.2f} s | {seconds / median:.1f} | "
              f"{reference} |")


if __name__ == "__main__":
    main()
