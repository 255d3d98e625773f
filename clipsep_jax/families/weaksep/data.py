"""The weakly supervised separator's examples: mixtures of mixtures with captions and clauses for
training, mixtures of two single sources with their prompts for validation, evaluation and the
supervised term.

Two kinds of prepared datasets are read:

- labelled clips (MUSIC, VGGSound, synth_music: records with ``label``): a training constituent is
  a natural mixture made here of 2..P single-instrument clips of distinct classes (N x that many
  distinct classes per example, as the reference draws), captioned from the labels:
  ``weaksep.data.mixture_template`` ("The sound mixture of {labels}", the labels joined with
  " and ") for the mixture prompt and ``weaksep.data.source_template`` ("The sound of {label}") for
  each clause. Only the constituents' sums reach the loss: no clean source is in a weak example.
- captioned clips (AudioCaps: records with ``caption`` and ``clauses``, see
  ``data_prep/audiocaps.py``): a constituent is one natural clip, its prompt the caption, its
  clauses P chosen from the caption's split clauses
  (:func:`clipsep_jax.families.weaksep.captions.choose_clauses`).

Each clip is a crop of ``audio.crop_samples`` (random in training, the middle otherwise; zeros
past a short clip's end), scaled in training by U(audio.gain_min, audio.gain_max) and clipped to
[-1, 1]. Constituent n with p_n clips is sum_k s_k / (N p_n) (the reference's mixing when
p_n = P), the mixture of mixtures their sum. ``weaksep.loss.reference_target_scaling`` keeps the
reference's MUSIC/VGGSound targets, p_n times smaller than the constituent (spec 1.4); captioned
constituents are single clips, for which both agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from clipsep_jax.errors import UserError
from clipsep_jax.families.clap.tokenizer import tokenize
from clipsep_jax.families.weaksep.captions import choose_clauses, clean_label
from clipsep_jax.input_pipeline import record_column

__all__ = ["Clips", "Prompts", "TrainingExamples", "PairExamples", "fill_template",
           "clause_key"]


def fill_template(template: str, labels: Sequence[str]) -> str:
    """``template`` with ``{label}`` (one label) or ``{labels}`` (all, joined with " and ")
    filled in, underscores as spaces."""
    names = [clean_label(label) for label in labels]
    return template.replace("{labels}", " and ".join(names)).replace(
        "{label}", names[0] if names else "")


def clause_key(text: str) -> int:
    """A stable non-negative int32 for a prompt text (equal texts, equal keys)."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:4], "big") & 0x7FFFFFFF


class Prompts:
    """Token ids and masks of prompt texts for the frozen CLAP's tokenizer (cached per text)."""

    def __init__(self, tokenizer: Any, length: int):
        self.tokenizer, self.length = tokenizer, length
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> (ids, mask), int32 [len(texts), length]."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            ids, mask = tokenize(self.tokenizer, missing, self.length)
            self._cache.update({t: (i, m) for t, i, m in zip(missing, ids, mask, strict=True)})
        return (np.stack([self._cache[t][0] for t in texts]),
                np.stack([self._cache[t][1] for t in texts]))


class Clips:
    """One split's records: labels or captions (from the dataset's record index, see
    :func:`clipsep_jax.input_pipeline.record_column`), crops and gains."""

    def __init__(self, config: ml_collections.ConfigDict, source: Any, split: str):
        self.source, self.split = source, split
        self.samples = config.audio.crop_samples
        self.gain = (config.audio.gain_min, config.audio.gain_max)
        if len(source) == 0:
            raise UserError(f"split {split!r} of {config.data.name} is empty")
        first = source[0]
        self.captioned = "caption" in first
        if not self.captioned and "label" not in first:
            raise UserError(f"split {split!r} of {config.data.name}: records have neither "
                            "'label' nor 'caption'; the weaksep family needs one of them")
        if self.captioned:
            self._captions = record_column(source, "caption")
            self._clauses = record_column(source, "clauses")
            # AudioCaps' validation and test clips have five captions each: a mixture must not
            # meet its own clip.
            self._groups = (record_column(source, "clip_id") if "clip_id" in first
                            else [str(i) for i in range(len(source))])
        else:
            self._labels = self._groups = record_column(source, "label")
        self.by_label: dict[str, list[int]] = {}
        for i, group in enumerate(self._groups):
            self.by_label.setdefault(group, []).append(i)

    def __len__(self) -> int:
        return len(self.source)

    def group(self, index: int) -> str:
        """What must differ between the clips of one example: the label, or the clip."""
        return self._groups[index]

    def label(self, index: int) -> str:
        return self._labels[index]

    def caption(self, index: int) -> str:
        caption = self._captions[index].strip()
        if not caption:
            raise UserError(f"clip {index} of split {self.split!r} has an empty caption")
        return caption

    def clauses(self, index: int) -> list[str]:
        clauses = list(self._clauses[index])
        if not clauses:
            raise UserError(f"clip {index} of split {self.split!r} has no clauses (caption "
                            f"{self.caption(index)!r})")
        return clauses

    def crop(self, index: int, rng: np.random.Generator | None) -> np.ndarray:
        """A crop of clip ``index`` [crop_samples] float32: random and gained with ``rng``, the
        middle without."""
        waveform = np.asarray(self.source[index]["waveform"], np.float32)
        if not len(waveform):
            raise UserError(f"clip {index} of split {self.split!r} is empty")
        room = len(waveform) - self.samples
        out = np.zeros(self.samples, np.float32)
        if room >= 0:
            start = room // 2 if rng is None else int(rng.integers(0, room + 1))
            out[:] = waveform[start:start + self.samples]
        else:
            out[:len(waveform)] = waveform
        if rng is not None:
            out = np.clip(out * rng.uniform(*self.gain), -1.0, 1.0)
        return out

    def distinct_labels(self, first: int, count: int, rng: np.random.Generator) -> list[int]:
        """``first`` and ``count - 1`` clips of other, pairwise distinct labels (captioned
        clips: of other clips)."""
        labels = sorted(self.by_label)
        if len(labels) < count:
            what = "clips" if self.captioned else "labels"
            raise UserError(f"split {self.split!r} has {len(labels)} {what}; an example needs "
                            f"{count} distinct ones")
        own = self.group(first)
        others = [label for label in labels if label != own]
        chosen = [others[i] for i in rng.choice(len(others), count - 1, replace=False)]
        return [first] + [int(rng.choice(self.by_label[label])) for label in chosen]


class PairExamples:
    """Mixtures of two single sources, each with its prompt: the supervised term (random, with
    ``rng``) and validation / evaluation (deterministic from the index and ``seed``).

    Element: ``sources`` [2, L] (each clip / 2), ``source_ids`` / ``source_mask`` [2, S],
    ``labels`` [2] int32 (indices into ``labels``; -1 for captioned clips), ``index``.
    Labelled clips are paired with a clip of another label and prompted with ``template``;
    captioned clips with another clip (not another caption of the same clip) and prompted with
    their captions.
    """

    def __init__(self, clips: Clips, prompts: Prompts, template: str, seed: int = 0,
                 labels: Sequence[str] = ()):
        self.clips, self.prompts, self.template, self.seed = clips, prompts, template, seed
        self.labels = {label: i for i, label in enumerate(labels)}

    def prompt(self, index: int) -> str:
        if self.clips.captioned:
            return self.clips.caption(index)
        return fill_template(self.template, [self.clips.label(index)])

    def partner(self, index: int, rng: np.random.Generator) -> int:
        return self.clips.distinct_labels(index, 2, rng)[1]

    def __call__(self, index: int, rng: np.random.Generator | None = None) -> dict:
        draw = rng if rng is not None else np.random.default_rng([self.seed, index])
        pair = [index, self.partner(index, draw)]
        sources = np.stack([self.clips.crop(i, rng) for i in pair]) / 2.0
        ids, mask = self.prompts([self.prompt(i) for i in pair])
        labels = [-1 if self.clips.captioned else self.labels.get(self.clips.label(i), -1)
                  for i in pair]
        return {"sources": sources.astype(np.float32), "source_ids": ids, "source_mask": mask,
                "labels": np.asarray(labels, np.int32), "index": np.int32(index)}


class TrainingExamples:
    """``(index, rng) -> example``: the training example of ``weaksep.mode`` (see the module
    docs and :mod:`clipsep_jax.families.weaksep.model` for the fields)."""

    def __init__(self, config: ml_collections.ConfigDict, clips: Clips, prompts: Prompts,
                 supervised: PairExamples | None):
        w = config.weaksep
        self.clips, self.prompts, self.supervised = clips, prompts, supervised
        self.mode = w.mode
        self.num_mixtures, self.per_mixture = w.num_mixtures, w.clauses_per_mixture
        self.min_sources = w.data.min_sources_per_mixture
        self.mixture_template, self.source_template = (w.data.mixture_template,
                                                       w.data.source_template)
        self.pad_with_duplicates = w.loss.clause_padding == "duplicate"
        self.reference_scaling = w.loss.reference_target_scaling
        if self.mode != "unsupervised" and supervised is None:
            raise UserError(f"weaksep.mode={self.mode!r} needs single-source clips with labels")

    def _labelled(self, index: int, rng: np.random.Generator) -> dict:
        counts = rng.integers(self.min_sources, self.per_mixture + 1, self.num_mixtures)
        clips = self.clips.distinct_labels(index, int(counts.sum()), rng)
        rng.shuffle(clips)
        groups = np.split(np.asarray(clips), np.cumsum(counts)[:-1])
        constituents, scales, mixture_prompts, clauses = [], [], [], []
        for group in groups:
            labels = [self.clips.label(int(i)) for i in group]
            waves = np.stack([self.clips.crop(int(i), rng) for i in group])
            constituents.append(waves.sum(0) / (self.num_mixtures * len(group)))
            scales.append(1.0 / len(group) if self.reference_scaling else 1.0)
            mixture_prompts.append(fill_template(self.mixture_template, labels))
            clauses.append([fill_template(self.source_template, [label]) for label in labels])
        return self._weak(constituents, scales, mixture_prompts, clauses, rng)

    def _captioned(self, index: int, rng: np.random.Generator) -> dict:
        clips = self.clips.distinct_labels(index, self.num_mixtures, rng)
        constituents = [self.clips.crop(i, rng) / self.num_mixtures for i in clips]
        return self._weak(constituents, [1.0] * len(clips), [self.clips.caption(i) for i in clips],
                          [self.clips.clauses(i) for i in clips], rng)

    def _weak(self, constituents: list[np.ndarray], target_scales: list[float],
              mixture_prompts: list[str], clauses: list[list[str]],
              rng: np.random.Generator) -> dict:
        texts, weights, valid = [], [], []
        for own in clauses:
            chosen, w, v = choose_clauses(own, self.per_mixture, rng,
                                          pad_with_duplicates=self.pad_with_duplicates)
            texts += chosen
            weights.append(w)
            valid.append(v)
        mixture_ids, mixture_mask = self.prompts(mixture_prompts)
        clause_ids, clause_mask = self.prompts(texts)
        shape = (self.num_mixtures, self.per_mixture)
        return {
            "constituents": np.stack(constituents).astype(np.float32),
            "target_scale": np.asarray(target_scales, np.float32),
            "mixture_ids": mixture_ids, "mixture_mask": mixture_mask,
            "clause_ids": clause_ids.reshape(*shape, -1),
            "clause_mask": clause_mask.reshape(*shape, -1),
            "clause_weights": np.asarray(weights, np.float32),
            "clause_valid": np.asarray(valid, np.float32),
            "clause_keys": np.asarray([clause_key(t) for t in texts], np.int32).reshape(shape),
        }

    def __call__(self, index: int, rng: np.random.Generator) -> dict:
        example: dict = {}
        if self.mode != "supervised":
            example.update(self._captioned(index, rng) if self.clips.captioned
                           else self._labelled(index, rng))
        if self.mode != "unsupervised":
            pair = self.supervised(int(rng.integers(0, len(self.supervised.clips))), rng)
            example.update({k: pair[k] for k in ("sources", "source_ids", "source_mask")})
        return example
