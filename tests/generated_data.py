"""A small generated dataset (tones, class-coloured frames) and a tiny training config."""

import csv
from pathlib import Path

import numpy as np
import soundfile as sf
from media_trees import SR, tone

from clipsep_jax.config import default_config


def write_class_frames(folder: Path, count: int, label: str, seed: int) -> None:
    """Frames whose colour says the class (so the query carries the source's identity)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colour = np.array([220, 60, 40] if label == "accordion" else [40, 80, 220], np.float32)
    for i in range(1, count + 1):
        image = np.clip(colour + rng.normal(0, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i:06d}.jpg", quality=95)


def clean_tree(root: Path, per_split=(8, 8, 4), seconds=6.0) -> None:
    for split, count in zip(("train", "val", "test"), per_split, strict=True):
        rows = []
        for i in range(count):
            label = ("accordion", "tuba")[i % 2]
            name = f"{split}{i}"
            audio_path = root / "audio" / label / f"{name}.wav"
            audio_path.parent.mkdir(parents=True, exist_ok=True)
            frequency = (220 if label == "accordion" else 70) * (1 + 0.1 * i)
            sf.write(audio_path, tone(seconds, SR, frequency, seed=i), SR)
            write_class_frames(root / "frames" / label / name, int(seconds), label, seed=i)
            rows.append([str(audio_path), str(root / "frames" / label / name), str(int(seconds))])
        with open(root / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)


def tiny_config(data_dir: str, kind: str = "clipsep", **train_overrides):
    config = default_config(kind)
    config.data.data_dir = data_dir
    config.data.num_workers = 0
    config.model.num_downs = 5
    config.model.base_width = 8
    config.model.num_mask_channels = 4
    # The tiny encoders' widths (tests/conftest.py): CLIP 40, ResNet 128, BERT 32.
    config.model.query_dim = {"sop": 128, "bertsep": 32}.get(kind, 40)
    config.audio.crop_samples = 16383  # 64 STFT frames
    config.query.frame_margin_seconds = 2.0
    config.train.batch_size = 8  # one example per emulated device in-process
    config.train.lr_warmup_steps = 10
    config.train.log_every_steps = 1
    config.train.checkpoint_every_steps = 10
    config.train.validation_every_steps = 1000
    config.train.validation_sdr_examples = 4
    config.train.num_summary_examples = 1
    for key, value in train_overrides.items():
        setattr(config.train, key, value)
    return config


