"""AudioCaps (Kim et al., 2019) for the weakly supervised text-queried separator: natural 10 s
YouTube clips with human captions, each caption split into clause prompts.

The input folder holds AudioCaps' CSVs ``train.csv``, ``val.csv`` and ``test.csv`` (header
``audiocap_id,youtube_id,start_time,caption``; without ``val.csv`` a fixed fraction of the training
clips, chosen by a hash of their clip id, becomes the validation split) and the media files,
found as VGGSound's are (:func:`data_prep.sources.find_media`): under ``audio/`` and ``video/``
when the folder has them, else anywhere under it, the first file named
``{youtube_id}_{start:06d}``, ``{youtube_id}_{start}`` or ``{youtube_id}`` with an audio
(:data:`data_prep.media.AUDIO_EXTENSIONS`) or video extension
(:data:`data_prep.media.VIDEO_EXTENSIONS`). Each file is taken to be the clip itself: it is
decoded from its start.

One example per CSV row, keyed by ``audiocap_id`` as the reference keys its captions (a val or
test clip has five captions, so five examples with the same waveform). The TFDS builder
:class:`Audiocaps` (``python -m data_prep.build --dataset=audiocaps``) stores the waveform (16 kHz
mono float32, at most ``max_seconds``), the caption as written and its clauses
(:func:`clipsep_jax.families.weaksep.captions.split_caption`); no CLIP is involved.

Every row left out is in the skip report ``skipped.csv`` beside the dataset, with its reason:
malformed rows (named ``file:line``), duplicate ids, missing media, empty captions or captions
without a clause, undecodable, too short (< 1 s) or silent audio. Nothing is zero-filled.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import soundfile
import tensorflow_datasets as tfds
from tqdm import tqdm

from clipsep_jax.errors import UserError
from clipsep_jax.families.weaksep.captions import split_caption
from data_prep import media, tfds_compat
from data_prep.builders import group_by_split, skip_summary, write_record_index, write_skip_report
from data_prep.sources import Skip, _is_validation, find_media, index_media

__all__ = [
    "CaptionRow",
    "Audiocaps",
    "COLUMNS",
    "CAPTION_SPLITTER",
    "read_audiocaps",
    "split_files",
    "media_folders",
    "load_clip_audio",
]

COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")
CAPTION_SPLITTER = "weaksep.captions.split_caption"
MIN_SECONDS = 1.0  # shorter clips are skipped
_SPLIT_FILES = ("train", "val", "test")  # val.csv may be absent
# Extensions libsndfile reads here; the other audio and all video files go through ffmpeg.
_SOUNDFILE_FORMATS = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".mp3": "MP3"}


@dataclasses.dataclass(frozen=True)
class CaptionRow:
    """One caption (CSV row) of a clip: one example."""

    split: str
    audiocap_id: int
    clip_id: str  # {youtube_id}_{start:06d}
    caption: str  # as written in the CSV
    clauses: tuple[str, ...]  # split_caption(caption), never empty
    where: str  # "train.csv:12", what the skip report names
    media_path: str


def media_folders(manual_dir: str, media_dir: str | None = None) -> list[str]:
    """The folders searched for media: ``media_dir`` if given, else ``manual_dir``'s ``audio/``
    and ``video/`` (those present), else ``manual_dir`` itself."""
    if media_dir:
        if not os.path.isdir(media_dir):
            raise UserError(f"media folder {media_dir}: no such folder")
        return [media_dir]
    subfolders = [os.path.join(manual_dir, n) for n in ("audio", "video")]
    return [f for f in subfolders if os.path.isdir(f)] or [manual_dir]


def _header(path: str, row: list[str]) -> dict[str, int]:
    """Column name -> index, from the header row; a header without AudioCaps' columns is an
    error naming the file."""
    names = [x.strip().lower() for x in row]
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise UserError(
            f"{path}: the first row {row!r} is not AudioCaps' header {','.join(COLUMNS)} "
            f"(missing {', '.join(missing)})"
        )
    return {c: names.index(c) for c in COLUMNS}


def split_files(manual_dir: str) -> dict[str, str]:
    """{split: CSV path} of the split files in ``manual_dir`` (``val`` only when present);
    a missing ``train.csv`` or ``test.csv`` is an error naming it."""
    paths = {split: os.path.join(manual_dir, f"{split}.csv") for split in _SPLIT_FILES}
    for split in ("train", "test"):
        if not os.path.isfile(paths[split]):
            raise FileNotFoundError(
                f"{paths[split]}: AudioCaps needs {split}.csv in the input folder (train.csv, "
                "test.csv, and val.csv unless a fraction of train is to become val)"
            )
    return {split: path for split, path in paths.items() if os.path.isfile(path)}


def read_audiocaps(
    manual_dir: str, media_dir: str | None = None, val_fraction: float = 0.1
) -> tuple[list[CaptionRow], list[Skip]]:
    """The captions of ``train.csv``, ``val.csv`` and ``test.csv`` in ``manual_dir`` whose media
    file exists, and the skip entries of the others (no media is decoded here).

    Without ``val.csv``, the training rows whose clip id hashes below ``val_fraction`` go to
    ``val`` (all captions of a clip go together). ``train.csv`` and ``test.csv`` are required.
    """
    paths = split_files(manual_dir)
    has_val = "val" in paths
    folders = media_folders(manual_dir, media_dir)
    by_stem = index_media(folders, media.AUDIO_EXTENSIONS + media.VIDEO_EXTENSIONS)
    rows: list[CaptionRow] = []
    skips: list[Skip] = []
    first_seen: dict[int, str] = {}
    for file_split, path in paths.items():  # train, val (when present), test
        name = os.path.basename(path)
        with open(path, newline="", encoding="utf-8-sig") as f:
            columns = None
            for line_number, row in _csv_rows(f, path):
                if not row or not "".join(row).strip():
                    continue
                if columns is None:
                    columns = _header(path, row)
                    width = len(row)
                    continue
                where = f"{name}:{line_number}"
                result = _parse_row(row, columns, width)
                if isinstance(result, str):
                    skips.append(Skip(file_split, where, f"malformed csv row: {result}"))
                    continue
                audiocap_id, youtube_id, start, caption = result
                clip_id = f"{youtube_id}_{start:06d}"
                split = file_split
                if split == "train" and not has_val and _is_validation(clip_id, val_fraction):
                    split = "val"
                source = f"{where} ({clip_id})"
                if audiocap_id in first_seen:
                    skips.append(Skip(split, source, f"duplicate id: audiocap_id {audiocap_id} "
                                                     f"(first in {first_seen[audiocap_id]})"))
                    continue
                first_seen[audiocap_id] = where
                if not caption.strip():
                    skips.append(Skip(split, source, "empty caption: the caption column is empty"))
                    continue
                clauses = tuple(split_caption(caption))
                if not clauses:
                    skips.append(Skip(split, source, f"caption without a clause: {caption!r} "
                                                     f"splits into none ({CAPTION_SPLITTER})"))
                    continue
                path = find_media(by_stem, youtube_id, start)
                if path is None:
                    skips.append(Skip(split, source, (
                        f"media file not found: none named {clip_id}.*, "
                        f"{youtube_id}_{start}.* or {youtube_id}.* with an audio or video "
                        f"extension in {', '.join(folders)}")))
                    continue
                rows.append(CaptionRow(split, audiocap_id, clip_id, caption, clauses, where,
                                       path))
        if columns is None:
            raise UserError(f"{path}: empty; expected the header "
                            f"{','.join(COLUMNS)} and one row per caption")
    return rows, skips


def _csv_rows(f, path: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each CSV row; text that is not UTF-8 is an error naming the
    file."""
    try:
        yield from enumerate(csv.reader(f), start=1)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def _parse_row(
    row: list[str], columns: dict[str, int], width: int
) -> tuple[int, str, int, str] | str:
    """(audiocap_id, youtube_id, start seconds, caption) of a data row, or what is wrong."""
    if len(row) != width:
        return f"{len(row)} columns, the header has {width}: {row!r}"
    audiocap_id, youtube_id, start = (row[columns[c]].strip() for c in COLUMNS[:3])
    caption = row[columns["caption"]]
    try:
        audiocap_id = int(audiocap_id)
    except ValueError:
        return f"audiocap_id {audiocap_id!r} is not an integer"
    if not youtube_id:
        return "youtube_id is empty"
    try:
        start_seconds = int(float(start))
    except (ValueError, OverflowError):
        return f"start_time {start!r} is not a number"
    if start_seconds < 0:
        return f"start_time {start!r} is negative"
    return audiocap_id, youtube_id, start_seconds, caption


def load_clip_audio(
    path: str,
    sample_rate: int = 16000,
    max_seconds: float = 10.0,
    min_seconds: float = MIN_SECONDS,
    silence_threshold: float = 1e-4,
) -> tuple[np.ndarray, list[str]]:
    """A clip's media file -> (mono float32 waveform [<= max_seconds * sample_rate] at
    ``sample_rate`` Hz, notes on what was repaired), from the file's start.

    WAV, FLAC, OGG and MP3 are read with libsndfile (:func:`media.load_audio_file`); other audio
    and video files through ffmpeg (:func:`media.decode_audio_stream`). Raises
    :class:`media.SkipClip` for missing, undecodable, non-finite, too short (< ``min_seconds``)
    or silent (peak < ``silence_threshold``) audio.
    """
    limit = int(round(max_seconds * sample_rate))
    fmt = _SOUNDFILE_FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is not None and fmt in soundfile.available_formats():
        waveform, notes = media.load_audio_file(path, sample_rate)
    else:
        waveform, notes = media.decode_audio_stream(path, sample_rate,
                                                    duration_seconds=max_seconds)
    waveform = waveform[:limit]
    if len(waveform) < min_seconds * sample_rate:
        raise media.SkipClip(
            f"audio too short: {len(waveform)} samples ({len(waveform) / sample_rate:.2f} s) "
            f"< {min_seconds:g} s"
        )
    media.check_waveform(waveform, sample_rate, 0, silence_threshold)
    return np.ascontiguousarray(waveform, np.float32), notes


def _in_order(
    work: Callable, items: Iterable, num_workers: int
) -> Iterator[tuple[object, object]]:
    """(item, work(item) or the SkipClip it raised) for each item, in order, decoded by
    ``num_workers`` threads at most ``2 * num_workers`` items ahead."""

    def attempt(item):
        try:
            return work(item)
        except media.SkipClip as e:
            return e

    items = iter(items)
    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append((item, pool.submit(attempt, item)))
            if len(pending) >= 2 * max(1, num_workers):
                item, future = pending.popleft()
                yield item, future.result()
        while pending:
            item, future = pending.popleft()
            yield item, future.result()


class Audiocaps(tfds.core.GeneratorBasedBuilder):
    """AudioCaps: about 50k 10-second YouTube clips with captions (Kim et al., 2019); one example
    per caption (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Waveform, caption and its clauses per AudioCaps caption."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    The manual folder holds AudioCaps' train.csv, val.csv (optional) and test.csv
    (audiocap_id,youtube_id,start_time,caption) and the clips' audio or video files, named
    {youtube_id}_{start:06d}, {youtube_id}_{start} or {youtube_id}, under audio/, video/ or the
    folder itself.
    """

    def __init__(
        self,
        *,
        sample_rate: int = 16000,
        max_seconds: float = 10.0,
        min_seconds: float = MIN_SECONDS,
        silence_threshold: float = 1e-4,
        val_fraction: float = 0.1,
        media_dir: str | None = None,
        num_workers: int = 4,
        work_dir: str | None = None,
        **kwargs,
    ):
        if max_seconds < min_seconds:
            raise UserError(f"max_seconds={max_seconds:g} is below the shortest clip kept "
                            f"({min_seconds:g} s)")
        self.sample_rate = int(sample_rate)
        self.max_seconds = float(max_seconds)
        self.min_seconds = float(min_seconds)
        self.silence_threshold = float(silence_threshold)
        self.val_fraction = float(val_fraction)
        self.media_dir = media_dir or None
        self.num_workers = num_workers
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)
        self.work_dir = work_dir or os.path.join(
            os.fspath(self._data_dir_root), "_work", self.name, str(self.version)
        )
        self._skips: list[Skip] | None = None
        self._notes: collections.Counter = collections.Counter()

    def _info(self) -> tfds.core.DatasetInfo:
        raw = tfds.features.Encoding.BYTES
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "clip_id": tfds.features.Text(doc="{youtube_id}_{start:06d}; several captions "
                                                  "(examples) may share it"),
                "audiocap_id": tfds.features.Scalar(
                    dtype=np.int64, doc="AudioCaps' caption id, unique in the dataset"),
                "caption": tfds.features.Text(doc="the caption as written in the CSV"),
                "clauses": tfds.features.Sequence(
                    tfds.features.Text(), doc=f"the caption's clauses ({CAPTION_SPLITTER})"),
                "waveform": tfds.features.Tensor(
                    shape=(None,), dtype=np.float32, encoding=raw,
                    doc=f"mono waveform at {self.sample_rate} Hz, at most "
                        f"{self.max_seconds:g} s from the file's start"),
            }),
            metadata=tfds.core.MetadataDict(),
            homepage="https://audiocaps.github.io/",
            disable_shuffling=False,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        return self._splits_from(os.fspath(dl_manager.manual_dir))

    def _splits_from(self, manual_dir: str):
        rows, skips = read_audiocaps(manual_dir, self.media_dir, self.val_fraction)
        self._skips = list(skips)
        self.info.metadata.update({
            "sample_rate": self.sample_rate,
            "caption_splitter": CAPTION_SPLITTER,
            "max_seconds": self.max_seconds,
            "min_seconds": self.min_seconds,
            "silence_threshold": self.silence_threshold,
        })
        by_split = group_by_split(rows, skips, manual_dir, self._work_report_dir(), "caption")
        return {split: self._generate_examples(split, items) for split, items in by_split.items()}

    def _generate_examples(self, split: str, rows: Sequence[CaptionRow]) -> Iterator:
        """Decodes each media file once (a clip's captions share it) and yields one example per
        caption, keyed by audiocap_id."""
        by_media: dict[str, list[CaptionRow]] = collections.defaultdict(list)
        for row in rows:
            by_media[row.media_path].append(row)

        def decode(path: str):
            return load_clip_audio(path, self.sample_rate, self.max_seconds, self.min_seconds,
                                   self.silence_threshold)

        progress = tqdm(total=len(rows), desc=f"{self.name} {split}", unit="caption",
                        file=sys.stderr, dynamic_ncols=True)
        yielded = 0
        for path, result in _in_order(decode, by_media, self.num_workers):
            captions = by_media[path]
            progress.update(len(captions))
            if isinstance(result, media.SkipClip):
                self._skips.extend(Skip(split, f"{row.where} ({path})", str(result))
                                   for row in captions)
                continue
            waveform, notes = result
            self._notes.update(notes)
            for row in captions:
                yielded += 1
                yield row.audiocap_id, {
                    "clip_id": row.clip_id,
                    "audiocap_id": row.audiocap_id,
                    "caption": row.caption,
                    "clauses": list(row.clauses),
                    "waveform": waveform,
                }
        progress.close()
        if not yielded:
            split_skips = [s for s in self._skips if s.split == split]
            report = write_skip_report(self._work_report_dir(), self._skips)
            raise UserError(
                f"split {split}: all {len(rows)} captions were skipped, listed with their reasons "
                f"in {report} (" + ", ".join(
                    f"{n} x {r}" for r, n in skip_summary(split_skips).items()) + ")")

    def _work_report_dir(self) -> str:
        """Where the skip report goes when no dataset is written (the work folder)."""
        os.makedirs(self.work_dir, exist_ok=True)
        return self.work_dir

    def download_and_prepare(self, *args, **kwargs):
        tfds_compat.install()  # splits over 1 GB spill to disk, which TFDS does through TF
        super().download_and_prepare(*args, **kwargs)
        if self._skips is None:  # already prepared: nothing was generated this time
            return
        write_skip_report(os.fspath(self.data_path), self._skips)
        write_record_index(self)
        self.last_skips = list(self._skips)
        self.last_notes = dict(self._notes)
