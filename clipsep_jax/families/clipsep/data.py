"""CLIPSep's mix-and-separate examples, built from the clips ``data_prep`` stores.

Each training example mixes N clips as the reference's data loader does: the first clip is the
element's, the other N - 1 are drawn uniformly from the rest; each clip gets a random centre
frame (margins excluded), its image query is the mean embedding of ``num_frames`` frames around
it, its audio crop (65535 samples) is centred at (centre - 0.5) / fps seconds and scaled by a
gain U(gain_min, gain_max), clipped to [-1, 1] and divided by N. Validation examples use the
middle frame, no gain, and partners drawn deterministically from the element's index.

The crop's spectrum is a slice of the clip's stored whole-clip STFT (mixing stays exact: STFTs
add), starting at the STFT frame nearest the reference's crop start. Where a gain would push a
crop past +-1, that source's crop is clipped as in the reference and its STFT computed from the
clipped waveform. Frames beyond the clip's ends are zeros, as the reference zero-pads.

:func:`mix_sources` gives (numpy, per element): ``mag_mix`` [513, 256], ``mags`` [N, 513, 256],
``image_queries`` and ``text_queries`` [N, D], ``labels`` [N] (index into the dataset's label
list); image queries come from the stored CLIP frame embeddings (SOP: the ResNet's,
``resnet_frame_embeddings``), text queries from the label prompt's CLIP embedding (BERTSep:
the label's BERT vector from the dataset's metadata, ``label_embeddings``); with waveforms
also ``waveforms`` [N, crop] (the scaled sources), ``mix_stft`` [513, 256, 2] and
``text_queries_ensemble`` [N, D] (the prompt-ensemble embeddings).
:func:`model_inputs` keeps what the model of a kind reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from clipsep_jax import audio
from clipsep_jax.errors import UserError

__all__ = [
    "MixSettings",
    "mix_sources",
    "partner_indices",
    "model_inputs",
    "TrainingMixer",
    "ValidationMixer",
]


@dataclasses.dataclass(frozen=True)
class MixSettings:
    """The numbers the mixing needs, from the config and the dataset's metadata."""

    num_sources: int
    crop_samples: int
    sample_rate: int
    n_fft: int
    hop_length: int
    win_length: int
    fps: float
    frame_margin: int  # frames excluded at each end when drawing a training centre frame
    num_frames: int  # frames averaged into an image query
    frame_stride: int
    gain_min: float
    gain_max: float
    labels: tuple[str, ...]
    image_feature: str = "frame_embeddings"  # the stored frame vectors image queries average
    label_vectors: dict[str, np.ndarray] | None = None  # label -> text query (BERTSep)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, metadata: dict) -> MixSettings:
        a, q = config.audio, config.query
        for key, ours in (
            ("sample_rate", a.sample_rate),
            ("n_fft", a.n_fft),
            ("hop_length", a.hop_length),
            ("win_length", a.win_length),
            ("fps", q.fps),
        ):
            if key in metadata and float(metadata[key]) != float(ours):
                raise UserError(
                    f"the dataset was prepared with {key}={metadata[key]}, the config says "
                    f"{ours}; prepare it again or change config.audio / config.query"
                )
        kind = config.model.kind
        return cls(
            image_feature="resnet_frame_embeddings" if kind == "sop" else "frame_embeddings",
            label_vectors=bert_label_vectors(config, metadata) if kind == "bertsep" else None,
            num_sources=config.num_sources,
            crop_samples=a.crop_samples,
            sample_rate=a.sample_rate,
            n_fft=a.n_fft,
            hop_length=a.hop_length,
            win_length=a.win_length,
            fps=q.fps,
            frame_margin=int(round(q.frame_margin_seconds * q.fps)),
            num_frames=q.num_frames,
            frame_stride=q.frame_stride,
            gain_min=a.gain_min,
            gain_max=a.gain_max,
            labels=tuple(metadata.get("labels", ())),
        )

    @property
    def crop_frames(self) -> int:
        return audio.num_frames(self.crop_samples, self.hop_length)


def bert_label_vectors(config: ml_collections.ConfigDict, metadata: dict) -> dict[str, np.ndarray]:
    """The dataset's BERT label vectors (``metadata["label_embeddings"]``, written by
    ``data_prep.build --bert=...``), checked against ``config.query``: the same encoder, pooling
    and text template, since separation embeds its text queries with them."""
    stored = metadata.get("label_embeddings")
    if not stored:
        raise UserError("the dataset has no BERT label embeddings (metadata label_embeddings); "
                        "prepare it with data_prep.build --bert=<hub id or folder>")
    q = config.query
    for key, ours, field in (("model", q.encoder_model, "encoder_model"),
                             ("pooling", q.bert_pooling, "bert_pooling"),
                             ("template", q.text_template, "text_template")):
        if stored.get(key) != ours:
            raise UserError(f"the dataset's label embeddings were made with {key} "
                            f"{stored.get(key)!r}, config.query.{field} is {ours!r}: set it "
                            "to the dataset's, or prepare the dataset again")
    vectors = {label: np.asarray(v, np.float32) for label, v in stored["vectors"].items()}
    dims = {v.shape for v in vectors.values()}
    if dims != {(config.model.query_dim,)}:
        raise UserError(f"the dataset's label embeddings have shape(s) {sorted(dims)}, "
                        f"config.model.query_dim is {config.model.query_dim}")
    return vectors


def _frame_vectors(record: dict, settings: MixSettings) -> np.ndarray:
    if settings.image_feature not in record:
        raise UserError(f"the dataset has no {settings.image_feature} (SOP's ResNet frame "
                        "vectors); prepare it with data_prep.build --resnet=<hub id, folder or "
                        ".pth file>")
    return record[settings.image_feature]


def _label_name(record: dict) -> str:
    label = record["label"]
    return label.decode() if isinstance(label, bytes) else str(label)


def _text_query(record: dict, settings: MixSettings) -> np.ndarray:
    if settings.label_vectors is None:
        return np.asarray(record["text_embedding"], np.float32)
    label = _label_name(record)
    if label not in settings.label_vectors:
        raise UserError(f"label {label!r} has no BERT vector in the dataset's metadata")
    return settings.label_vectors[label]


def centre_frame(frame_count: int, settings: MixSettings, rng: np.random.Generator | None) -> int:
    """1-based centre frame: uniform in [margin + 1, count - margin] for training (``rng``), the
    middle frame ``count // 2`` for evaluation; clips too short for the margins use all frames."""
    if rng is None:
        return max(1, frame_count // 2)
    low, high = settings.frame_margin + 1, frame_count - settings.frame_margin
    if high < low:
        low, high = 1, frame_count
    return int(rng.integers(low, high + 1))


def image_query(frame_embeddings: np.ndarray, centre: int, settings: MixSettings) -> np.ndarray:
    """Mean embedding of ``num_frames`` frames spaced ``frame_stride`` around the 1-based
    ``centre`` (indices clamped into the clip), float32 [D]."""
    offsets = (np.arange(settings.num_frames) - settings.num_frames // 2) * settings.frame_stride
    index = np.clip(centre - 1 + offsets, 0, len(frame_embeddings) - 1)
    return frame_embeddings[index].astype(np.float32).mean(axis=0)


def crop_start(centre: int, settings: MixSettings) -> int:
    """First sample of the reference's crop around frame ``centre``'s time (may be negative)."""
    centre_sample = int((centre - 0.5) / settings.fps * settings.sample_rate)
    return centre_sample - settings.crop_samples // 2


def _slice_frames(stft: np.ndarray, first: int, count: int) -> np.ndarray:
    """Frames [first, first + count) of a stored STFT [T, F, 2] as complex64 [F, count], zeros
    where the range leaves the clip."""
    out = np.zeros((count, stft.shape[1]), np.complex64)
    lo, hi = max(first, 0), min(first + count, len(stft))
    if hi > lo:
        part = stft[lo:hi]
        out[lo - first : hi - first] = part[..., 0] + 1j * part[..., 1]
    return out.T


def _crop_waveform(waveform: np.ndarray, start: int, length: int) -> np.ndarray:
    out = np.zeros(length, np.float32)
    lo, hi = max(start, 0), min(start + length, len(waveform))
    if hi > lo:
        out[lo - start : hi - start] = waveform[lo:hi]
    return out


def mix_sources(
    records: Sequence[dict],
    settings: MixSettings,
    rng: np.random.Generator | None,
    with_waveforms: bool = False,
    scales: Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """One mix-and-separate example from N clip records (``rng`` None: evaluation).

    ``scales``: each record's factor in place of 1 / N (the test mixtures of
    ``clipsep_jax.evaluate`` average several interfering clips into one)."""
    n = len(records)
    scales = [1.0 / n] * n if scales is None else list(scales)
    if len(scales) != n:
        raise UserError(f"{len(scales)} scales for {n} records")
    spectra, image_queries, text_queries, labels, waveforms = [], [], [], [], []
    ensembles = []
    for record, scale in zip(records, scales, strict=True):
        count = len(record["frame_embeddings"])
        centre = centre_frame(count, settings, rng)
        start = crop_start(centre, settings)
        first = int(round(start / settings.hop_length))
        gain = 1.0 if rng is None else float(rng.uniform(settings.gain_min, settings.gain_max))
        crop = None
        if with_waveforms or rng is not None:
            crop = _crop_waveform(
                record["waveform"], first * settings.hop_length, settings.crop_samples
            )
        if rng is not None and gain * float(np.abs(crop).max(initial=0.0)) > 1.0:
            crop = np.clip(gain * crop, -1.0, 1.0) * scale
            spectrum = audio.stft_numpy(
                crop,
                n_fft=settings.n_fft,
                hop_length=settings.hop_length,
                win_length=settings.win_length,
            )
        else:
            spectrum = _slice_frames(record["stft"], first, settings.crop_frames) * (gain * scale)
            if crop is not None:
                crop = crop * (gain * scale)
        spectra.append(spectrum)
        waveforms.append(crop)
        image_queries.append(image_query(_frame_vectors(record, settings), centre, settings))
        text_queries.append(_text_query(record, settings))
        if with_waveforms:
            ensembles.append(text_queries[-1] if settings.label_vectors is not None else
                             np.asarray(record.get("text_embedding_ensemble",
                                                   record["text_embedding"]), np.float32))
        label = _label_name(record)
        labels.append(settings.labels.index(label) if label in settings.labels else -1)
    spectra = np.stack(spectra)
    mixture = spectra.sum(axis=0)
    example = {
        "mag_mix": np.abs(mixture).astype(np.float32),
        "mags": np.abs(spectra).astype(np.float32),
        "image_queries": np.stack(image_queries),
        "text_queries": np.stack(text_queries),
        "labels": np.asarray(labels, np.int32),
    }
    if with_waveforms:
        example["waveforms"] = np.stack(waveforms).astype(np.float32)
        example["mix_stft"] = np.stack([mixture.real, mixture.imag], axis=-1).astype(np.float32)
        example["text_queries_ensemble"] = np.stack(ensembles)
    return example


def partner_indices(index: int, size: int, count: int, rng: np.random.Generator) -> list[int]:
    """``count`` distinct indices other than ``index``, uniform (the reference's sampling)."""
    if size - 1 < count:
        raise UserError(f"mixing {count + 1} sources needs at least {count + 1} clips, got {size}")
    others = rng.choice(size - 1, size=count, replace=False)
    return [int(i) + (i >= index) for i in others]


def model_inputs(config: ml_collections.ConfigDict, example: dict, mode: str | None = None) -> dict:
    """The arrays the model of ``config.model.kind`` reads from a mixed example: ``mag_mix``,
    ``mags`` and the queries of the query ``mode`` (default ``config.query.mode``): ``queries``
    (embeddings, or label ids for LabelSep; none for PIT), or for hybrid training both
    ``image_queries`` and ``text_queries`` (the loss picks one per step)."""
    out = {"mag_mix": example["mag_mix"], "mags": example["mags"]}
    kind, mode = config.model.kind, mode or config.query.mode
    if kind == "labelsep":
        out["queries"] = example["labels"]
    elif kind != "pit":
        if mode == "hybrid":
            out["image_queries"] = example["image_queries"]
            out["text_queries"] = example["text_queries"]
        else:
            out["queries"] = example[f"{mode}_queries"]
    return out


class TrainingMixer:
    """``(index, rng) -> model inputs``: element ``index`` mixed with N - 1 random partners."""

    def __init__(self, config: ml_collections.ConfigDict, source: Any, metadata: dict):
        self.config = config
        self.source = source
        self.settings = MixSettings.from_config(config, metadata)

    def __call__(self, index: int, rng: np.random.Generator) -> dict:
        others = partner_indices(index, len(self.source), self.settings.num_sources - 1, rng)
        records = [self.source[i] for i in [index, *others]]
        return model_inputs(self.config, mix_sources(records, self.settings, rng))


class ValidationMixer:
    """``index -> example``: element ``index`` with partners drawn from (seed, index), middle
    frames, no gain; every query kind and the waveforms for scoring."""

    def __init__(self, config: ml_collections.ConfigDict, source: Any, metadata: dict,
                 seed: int):
        self.source = source
        self.seed = seed
        self.settings = MixSettings.from_config(config, metadata)

    def __call__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index])
        others = partner_indices(index, len(self.source), self.settings.num_sources - 1, rng)
        records = [self.source[i] for i in [index, *others]]
        return mix_sources(records, self.settings, None, with_waveforms=True)
