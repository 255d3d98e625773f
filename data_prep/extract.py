"""Turning listed clips into dataset examples: decode, check, CLIP-embed frames, STFT.

:class:`Extractor` streams: worker threads decode clips ahead (audio, frames resized and cropped
for CLIP), the main thread gathers their frames into fixed-size batches for the CLIP vision tower
(sharded over the local devices) and hands back each clip, in input order, once its frames are
embedded. Memory stays bounded by the read-ahead. Given a frozen ResNet (the SOP baseline's
image encoder), the same resized and cropped frames also get its vectors, as the reference feeds
both networks the same frames.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np

from clipsep_jax import audio
from clipsep_jax.encoders.clip import CLIP, TEXT_TEMPLATE, text_prompt
from data_prep import media
from data_prep.sources import ClipSource, Skip

__all__ = ["ExtractOptions", "ExtractedClip", "Extractor", "stored_spectrogram", "make_example"]


@dataclasses.dataclass(frozen=True)
class ExtractOptions:
    """How clips are decoded and what is stored (defaults: the reference's numbers)."""

    sample_rate: int = 16000  # Hz
    n_fft: int = 1024
    hop_length: int = 256
    win_length: int = 1024
    fps: float = 1.0  # frames per second of video
    min_samples: int = 65535  # shorter clips cannot give a training crop
    silence_threshold: float = 1e-4  # peak amplitude below which a clip is silent
    clip_seconds: float = 10.0  # segment length cut from full-length videos (trim mode)
    text_template: str = TEXT_TEMPLATE

    @property
    def num_bins(self) -> int:
        return self.n_fft // 2 + 1


@dataclasses.dataclass
class ExtractedClip:
    """A decoded clip whose frames are embedded: what a cache shard stores per clip."""

    source: ClipSource
    waveform: np.ndarray  # float32 [samples] at options.sample_rate
    frame_embeddings: np.ndarray  # float16 [frames, D]
    notes: list[str]
    resnet_embeddings: np.ndarray | None = None  # float16 [frames, D'] (SOP), when asked for


@dataclasses.dataclass
class _Decoded:
    source: ClipSource
    waveform: np.ndarray
    frames: np.ndarray  # uint8 [frames, h, w, 3], resized and cropped for CLIP
    notes: list[str]


def decode_clip(
    source: ClipSource, options: ExtractOptions, preprocess: Callable[[np.ndarray], np.ndarray]
) -> _Decoded:
    """Reads and checks one clip; raises :class:`media.SkipClip`."""
    if source.video_path:
        with tempfile.TemporaryDirectory(prefix="clipsep-frames-") as frames_dir:
            waveform, paths, notes = media.decode_video(
                source.video_path,
                frames_dir,
                sample_rate=options.sample_rate,
                fps=options.fps,
                start_seconds=source.start_seconds,
                duration_seconds=options.clip_seconds if source.start_seconds is not None else None,
            )
            media.check_waveform(
                waveform, options.sample_rate, options.min_samples, options.silence_threshold
            )
            frames = np.stack([preprocess(media.load_frame(p)) for p in paths])
    else:
        waveform, notes = media.load_audio_file(source.audio_path, options.sample_rate)
        media.check_waveform(
            waveform, options.sample_rate, options.min_samples, options.silence_threshold
        )
        if not source.frame_count or source.frame_count < 1:
            raise media.SkipClip(f"missing frames: the index lists {source.frame_count} frames")
        paths = media.frame_paths(source.frames_dir, source.frame_count)
        frames = np.stack([preprocess(media.load_frame(p)) for p in paths])
    return _Decoded(source, waveform, frames, notes)


class Extractor:
    """Decodes clips and embeds their frames with CLIP; text embeddings per label.

    Args:
        clip: the CLIP whose vision tower embeds frames (its ``batch_size`` frames per call).
        options: decoding and storage options.
        num_workers: decoding threads (ffmpeg, libsndfile and PIL release the GIL).
        resnet: a :class:`clipsep_jax.encoders.resnet.ResNet` that also embeds every frame
            (SOP's frame vectors), or None.
    """

    def __init__(self, clip: CLIP, options: ExtractOptions, num_workers: int = 4,
                 resnet: Any = None):
        self.clip = clip
        self.resnet = resnet
        self.options = options
        self.num_workers = max(1, num_workers)
        self._text: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def text_embeddings(self, label: str) -> tuple[np.ndarray, np.ndarray]:
        """(embedding of the label's prompt, mean over the prompt ensemble), float32 [D] each."""
        if label not in self._text:
            prompt = self.clip.encode_text([text_prompt(label, self.options.text_template)])[0]
            ensemble = self.clip.encode_prompt_ensemble([label])[0]
            self._text[label] = (prompt, ensemble)
        return self._text[label]

    def run(
        self, sources: Iterable[ClipSource]
    ) -> Iterator[tuple[ClipSource, ExtractedClip | Skip]]:
        """Each source, in order, with its :class:`ExtractedClip` or the :class:`Skip` it got."""
        preprocess = self.clip.preprocessing.resize_and_crop
        decode = functools.partial(decode_clip, options=self.options, preprocess=preprocess)
        sources = iter(sources)
        read_ahead = 2 * self.num_workers
        with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
            pending = []  # futures in input order
            waiting: list[_Decoded] = []  # decoded, frames not yet embedded
            exhausted = False
            while True:
                while not exhausted and len(pending) < read_ahead:
                    source = next(sources, None)
                    if source is None:
                        exhausted = True
                    else:
                        pending.append((source, pool.submit(decode, source)))
                if not pending and not waiting:
                    return
                waiting_frames = sum(len(d.frames) for d in waiting)
                # Embed once a full batch is waiting, or when nothing else can arrive.
                if waiting and (waiting_frames >= self.clip.batch_size or not pending):
                    yield from self._embed(waiting)
                    waiting = []
                    continue
                source, future = pending.pop(0)
                try:
                    decoded = future.result()
                except media.SkipClip as e:
                    if waiting:  # keep the output in input order
                        yield from self._embed(waiting)
                        waiting = []
                    yield source, Skip(source.split, source.source, str(e))
                    continue
                waiting.append(decoded)

    def _embed(self, decoded: list[_Decoded]) -> Iterator[tuple[ClipSource, ExtractedClip]]:
        frames = np.concatenate([d.frames for d in decoded])
        embeddings = self.clip.encode_preprocessed(frames).astype(np.float16)
        resnet = None
        if self.resnet is not None:
            resnet = self.resnet.encode_preprocessed(frames).astype(np.float16)
        start = 0
        for d in decoded:
            count = len(d.frames)
            part = slice(start, start + count)
            yield (
                d.source,
                ExtractedClip(d.source, d.waveform, embeddings[part], d.notes,
                              None if resnet is None else resnet[part]),
            )
            start += count


@functools.lru_cache(maxsize=8)
def _stft_fn(n_fft: int, hop_length: int, win_length: int):
    return jax.jit(
        functools.partial(
            audio.stft, n_fft=n_fft, hop_length=hop_length, win_length=win_length, center=False
        )
    )


def stored_spectrogram(waveform: np.ndarray, options: ExtractOptions) -> np.ndarray:
    """The stored spectrogram of a whole clip: its centred STFT as float32 [T, bins, 2]
    (real, imaginary), T = 1 + samples // hop; equal to ``audio.stft(waveform)``.

    The reflect padding is done here and the padded signal is zero-extended to one of a few
    bucket lengths, so that clips of every length share a handful of compiled programs.
    """
    pad = options.n_fft // 2
    if len(waveform) <= pad:
        raise ValueError(
            f"{len(waveform)} samples is too short for an STFT of n_fft {options.n_fft}"
        )
    padded = np.pad(np.asarray(waveform, np.float32), pad, mode="reflect")
    frames = audio.num_frames(len(waveform), options.hop_length)
    step = 1 << max(10, int(math.log2(len(padded))) - 2)  # <= 25% padding, few buckets
    bucket = -(-len(padded) // step) * step
    padded = np.pad(padded, (0, bucket - len(padded)))
    spectrum = _stft_fn(options.n_fft, options.hop_length, options.win_length)(padded)
    spectrum = np.asarray(spectrum)[:, :frames].T  # [T, bins]
    return np.stack([spectrum.real, spectrum.imag], axis=-1).astype(np.float32)


def make_example(
    clip: ExtractedClip, text_embeddings: tuple[np.ndarray, np.ndarray], options: ExtractOptions
) -> dict:
    """The dataset example of an extracted clip (the features of :func:`features`)."""
    prompt, ensemble = text_embeddings
    s = clip.source
    example = {
        "id": s.clip_id,
        "label": s.label,
        "split": s.split,
        "source": s.source,
        "waveform": clip.waveform.astype(np.float32),
        "stft": stored_spectrogram(clip.waveform, options),
        "frame_embeddings": clip.frame_embeddings.astype(np.float16),
        "text_embedding": prompt.astype(np.float32),
        "text_embedding_ensemble": ensemble.astype(np.float32),
    }
    if clip.resnet_embeddings is not None:
        example["resnet_frame_embeddings"] = clip.resnet_embeddings.astype(np.float16)
    return example
