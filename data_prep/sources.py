"""What a dataset is built from: the clips listed in the input folder, per split.

Two input layouts are read:

- ``index``: the reference's index CSVs ``train.csv``, ``val.csv``, ``test.csv``, one row per
  clip: ``audio path, frames folder, frame count[, label]`` (no header; paths absolute or
  relative to the root; without a label, the audio file's parent folder name is the label).
- ``videos``: a folder of video files and the CSV VGGSound distributes (``vggsound.csv``:
  ``youtube_id, start_seconds, label, split`` with split ``train`` or ``test``); a fixed fraction
  of the training clips, chosen by a hash of their id, becomes the validation split.

Reading the lists is cheap and finds the problems that need no decoding (malformed rows, missing
files, duplicate ids); those come back as skip entries.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
from collections.abc import Iterable

from data_prep.media import VIDEO_EXTENSIONS

__all__ = [
    "ClipSource",
    "Skip",
    "SPLITS",
    "detect_layout",
    "read_index",
    "read_videos",
    "index_media",
    "find_media",
]

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class ClipSource:
    """One clip to extract. Exactly one of (``audio_path``, ``frames_dir``) and ``video_path``."""

    split: str
    clip_id: str
    label: str
    source: str  # what the skip report names: the audio or video file
    audio_path: str | None = None
    frames_dir: str | None = None
    frame_count: int | None = None
    video_path: str | None = None
    start_seconds: float | None = None  # where to cut a segment out of a full-length video


@dataclasses.dataclass(frozen=True)
class Skip:
    """An entry of the skip report."""

    split: str
    source: str
    reason: str


def detect_layout(manual_dir: str) -> str:
    """``index`` when the folder has ``train.csv``, ``videos`` when it has ``vggsound.csv``."""
    if os.path.exists(os.path.join(manual_dir, "train.csv")):
        return "index"
    if os.path.exists(os.path.join(manual_dir, "vggsound.csv")):
        return "videos"
    raise FileNotFoundError(
        f"{manual_dir}: neither train.csv (index layout) nor vggsound.csv (videos layout) found"
    )


def _dedupe(sources: Iterable[ClipSource], skips: list[Skip]) -> list[ClipSource]:
    first_seen: dict[str, ClipSource] = {}
    kept = []
    for source in sources:
        if source.clip_id in first_seen:
            first = first_seen[source.clip_id]
            skips.append(
                Skip(
                    source.split,
                    source.source,
                    f"duplicate id: {source.clip_id} (first in {first.split}: {first.source})",
                )
            )
            continue
        first_seen[source.clip_id] = source
        kept.append(source)
    return kept


def read_index(manual_dir: str, root: str | None = None) -> tuple[list[ClipSource], list[Skip]]:
    """The clips of ``train.csv``, ``val.csv`` and ``test.csv`` in ``manual_dir`` (a missing
    split file is an error: name the three)."""
    root = root or manual_dir
    sources, skips = [], []
    for split in SPLITS:
        path = os.path.join(manual_dir, f"{split}.csv")
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path}: the index layout needs train.csv, val.csv and test.csv"
            )
        with open(path, newline="") as f:
            for line_number, row in enumerate(csv.reader(f), start=1):
                if not row or not "".join(row).strip():
                    continue
                where = f"{split}.csv:{line_number}"
                if len(row) < 3:
                    skips.append(Skip(split, where, f"malformed index row: {row!r}"))
                    continue
                audio, frames, count = (x.strip() for x in row[:3])
                try:
                    frame_count = int(count)
                except ValueError:
                    if line_number > 1:  # a header row is allowed
                        skips.append(
                            Skip(
                                split,
                                where,
                                f"malformed index row: frame count {count!r} is not a number",
                            )
                        )
                    continue
                audio = os.path.normpath(os.path.join(root, audio))
                frames = os.path.normpath(os.path.join(root, frames))
                label = (
                    row[3].strip()
                    if len(row) > 3 and row[3].strip()
                    else (os.path.basename(os.path.dirname(audio)))
                )
                clip_id = (
                    f"{os.path.basename(os.path.dirname(audio))}/"
                    + (os.path.splitext(os.path.basename(audio))[0])
                )
                sources.append(
                    ClipSource(
                        split,
                        clip_id,
                        label,
                        audio,
                        audio_path=audio,
                        frames_dir=frames,
                        frame_count=frame_count,
                    )
                )
    return _dedupe(sources, skips), skips


def _is_validation(clip_id: str, val_fraction: float) -> bool:
    digest = hashlib.sha256(clip_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def index_media(folders: Iterable[str], extensions: Iterable[str]) -> dict[str, str]:
    """{file name without extension: path} of the files under ``folders`` (walked in the order
    given, files sorted by name within a folder) whose extension, in any case, is one of
    ``extensions`` (with the dot: ``.wav``). The first file of a stem wins."""
    extensions = tuple(e.lower() for e in extensions)
    by_stem: dict[str, str] = {}
    for top in folders:
        for folder, _, files in os.walk(top):
            for name in sorted(files):
                stem, ext = os.path.splitext(name)
                if ext.lower() in extensions:
                    by_stem.setdefault(stem, os.path.join(folder, name))
    return by_stem


def find_media(by_stem: dict[str, str], youtube_id: str, start_seconds: int) -> str | None:
    """The file of a YouTube clip in :func:`index_media`'s map: the first of the stems
    ``{youtube_id}_{start_seconds:06d}``, ``{youtube_id}_{start_seconds}`` and ``{youtube_id}``
    that is there, or None."""
    candidates = (f"{youtube_id}_{start_seconds:06d}", f"{youtube_id}_{start_seconds}", youtube_id)
    return next((by_stem[c] for c in candidates if c in by_stem), None)


def read_videos(
    manual_dir: str,
    video_dir: str | None = None,
    csv_name: str = "vggsound.csv",
    val_fraction: float = 0.1,
    trim: bool = False,
) -> tuple[list[ClipSource], list[Skip]]:
    """The clips of a VGGSound-style CSV whose videos are found under ``video_dir``.

    A clip's video is the first file whose name (without extension) is ``{id}_{start:06d}``,
    ``{id}_{start}`` or ``{id}``. With ``trim``, videos are full-length and the clip is cut from
    ``start_seconds``; otherwise each file already is the clip.
    """
    video_dir = video_dir or (
        os.path.join(manual_dir, "video")
        if os.path.isdir(os.path.join(manual_dir, "video"))
        else manual_dir
    )
    by_stem = index_media([video_dir], VIDEO_EXTENSIONS)
    csv_path = os.path.join(manual_dir, csv_name)
    sources, skips = [], []
    with open(csv_path, newline="") as f:
        for line_number, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip():
                continue
            where = f"{csv_name}:{line_number}"
            if len(row) < 4:
                skips.append(Skip("unknown", where, f"malformed csv row: {row!r}"))
                continue
            youtube_id, start, label, split = (x.strip() for x in row[:4])
            try:
                start_seconds = int(float(start))
            except ValueError:
                if line_number > 1:
                    skips.append(
                        Skip(
                            "unknown", where, f"malformed csv row: start {start!r} is not a number"
                        )
                    )
                continue
            if split not in ("train", "test", "val"):
                skips.append(Skip("unknown", where, f"malformed csv row: unknown split {split!r}"))
                continue
            clip_id = f"{youtube_id}_{start_seconds:06d}"
            if split == "train" and _is_validation(clip_id, val_fraction):
                split = "val"
            path = find_media(by_stem, youtube_id, start_seconds)
            if path is None:
                skips.append(
                    Skip(
                        split,
                        f"{where} ({youtube_id})",
                        f"video file not found: none named {clip_id}.* in {video_dir}",
                    )
                )
                continue
            sources.append(
                ClipSource(
                    split,
                    clip_id,
                    label,
                    path,
                    video_path=path,
                    start_seconds=float(start_seconds) if trim else None,
                )
            )
    return _dedupe(sources, skips), skips
