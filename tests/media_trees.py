"""Tiny generated input trees for data preparation: good clips and one bad item of each kind."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

SR = 16000


def tone(seconds: float, rate: int, frequency: float, channels: int = 1, seed: int = 0):
    """A decaying tone plus a little noise: never silent, different per seed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    signal = 0.4 * np.sin(2 * np.pi * frequency * t) * np.exp(-0.2 * t)
    signal = signal + 0.02 * rng.standard_normal(len(t))
    if channels > 1:
        signal = np.stack([signal * (0.5 + 0.5 * c) for c in range(channels)], axis=1)
    return signal.astype(np.float32)


def write_frames(folder: Path, count: int, seed: int, size=(96, 128)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(1, count + 1):
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / f"{i:06d}.jpg", quality=95)


def index_tree(root: Path) -> dict[str, str]:
    """The reference's index layout under ``root``; returns {source path: expected outcome},
    where the outcome is ``"ok"``, ``"ok:<note>"`` or the skip reason's category."""
    expected: dict[str, str] = {}
    rows = {"train": [], "val": [], "test": []}

    def clip(
        split,
        label,
        name,
        seconds=5.0,
        rate=SR,
        channels=1,
        frames=5,
        frames_listed=None,
        audio=None,
        outcome="ok",
        relative=True,
        seed=0,
    ):
        audio_path = root / "audio" / label / f"{name}.wav"
        frames_dir = root / "frames" / label / name
        audio_path.parent.mkdir(parents=True, exist_ok=True)
        if audio is None:
            sf.write(
                audio_path,
                tone(seconds, rate, 220 + 50 * seed, channels, seed),
                rate,
                subtype="PCM_16",
            )
        else:
            audio(audio_path)
        if frames:
            write_frames(frames_dir, frames, seed)
        a = os.path.relpath(audio_path, root) if relative else str(audio_path)
        f = os.path.relpath(frames_dir, root) if relative else str(frames_dir)
        rows[split].append([a, f, str(frames_listed or frames)])
        expected[str(audio_path)] = outcome

    clip("train", "accordion", "acc1", seed=1)
    clip("train", "accordion", "acc2", seed=2, relative=False)
    clip("train", "tuba", "tuba1", seed=3, rate=44100, outcome="ok:resampled from 44100 Hz")
    clip("train", "tuba", "tuba2", seed=4, channels=2, outcome="ok:downmixed 2 channels")
    clip("val", "accordion", "acc3", seed=5)
    clip("test", "tuba", "tuba3", seed=6)
    # One bad item of each kind.
    clip(
        "train",
        "tuba",
        "garbage",
        audio=lambda p: p.write_bytes(np.random.default_rng(7).bytes(4000)),
        outcome="unreadable audio",
    )

    def truncated(p):
        sf.write(p, tone(5.0, SR, 300), SR, subtype="PCM_16")
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])

    clip("train", "tuba", "truncated", audio=truncated, outcome="truncated audio")
    clip("train", "tuba", "short", seconds=2.0, outcome="audio too short")
    clip(
        "train",
        "accordion",
        "noframes",
        frames=0,
        frames_listed=5,
        outcome="frames folder not found",
    )
    clip(
        "train",
        "accordion",
        "fewframes",
        frames=3,
        frames_listed=5,
        outcome="fewer frames than listed",
    )
    clip(
        "train",
        "accordion",
        "silent",
        audio=lambda p: sf.write(p, np.zeros(5 * SR, np.float32), SR),
        outcome="silent audio",
    )
    clip("val", "accordion", "badframe", seed=8, outcome="unreadable frame")
    (root / "frames" / "accordion" / "badframe" / "000002.jpg").write_bytes(b"not a jpeg")
    # The same clip listed twice: the second listing is the duplicate.
    rows["test"].append(list(rows["train"][0]))
    expected["dup:" + str(root / rows["train"][0][0])] = "duplicate id"
    for split, split_rows in rows.items():
        with open(root / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(split_rows)
    return expected


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


def make_video(
    path: Path,
    seconds: float,
    *,
    audio: str = "sine",
    video: bool = True,
    frequency: int = 440,
    rate: int = 44100,
    channels: int = 2,
    faststart: bool = False,
) -> None:
    source = (
        f"sine=frequency={frequency}:sample_rate={rate}:duration={seconds}"
        if audio == "sine"
        else f"anullsrc=r={rate}:cl=stereo:d={seconds}"
    )
    args = []
    if video:
        args += ["-f", "lavfi", "-i", f"testsrc=size=160x120:rate=8:duration={seconds}"]
    args += ["-f", "lavfi", "-i", source, "-ac", str(channels), "-shortest"]
    if video:
        args += ["-c:v", "mpeg4", "-q:v", "5"]
    args += ["-c:a", "aac", "-b:a", "96k"]
    if faststart:
        args += ["-movflags", "+faststart"]
    _ffmpeg(*args, str(path))


def videos_tree(root: Path) -> dict[str, str]:
    """A VGGSound-style folder (vggsound.csv + video/); returns {clip id: expected outcome}."""
    video_dir = root / "video"
    video_dir.mkdir(parents=True)
    rows, expected = [], {}

    def clip(youtube_id, label, split, outcome="ok", start=30, make=None, **kwargs):
        path = video_dir / f"{youtube_id}_{start:06d}.mp4"
        if make is not None:
            make(path)
        else:
            make_video(path, kwargs.pop("seconds", 5.0), **kwargs)
        rows.append([youtube_id, str(start), label, split])
        expected[f"{youtube_id}_{start:06d}"] = outcome

    clip(
        "dogA",
        "dog barking",
        "train",
        frequency=500,
        outcome="ok:downmixed 2 channels,resampled from 44100 Hz",
    )
    clip("dogB", "dog barking", "train", frequency=600, rate=16000, channels=1)
    clip("carA", "people, crowd", "train", frequency=300, rate=16000, channels=1)
    clip("carB", "people, crowd", "test", frequency=350, rate=16000, channels=1)
    clip(
        "garbage",
        "dog barking",
        "train",
        make=lambda p: p.write_bytes(np.random.default_rng(1).bytes(5000)),
        outcome="unreadable video",
    )

    def truncated(p):
        make_video(p, 5.0, faststart=True)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])

    clip("trunc", "dog barking", "train", make=truncated, outcome="truncated media")
    clip("short", "dog barking", "train", seconds=2.0, outcome="audio too short")
    clip("audioonly", "dog barking", "train", video=False, outcome="missing frames")
    clip("quiet", "dog barking", "train", audio="silence", outcome="silent audio")
    clip("nofile", "dog barking", "train", make=lambda p: None, outcome="video file not found")
    rows.append(list(rows[0]))  # duplicate row
    expected["dup:dogA_000030"] = "duplicate id"
    with open(root / "vggsound.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return expected
