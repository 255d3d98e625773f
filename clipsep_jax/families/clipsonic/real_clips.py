"""The real clips CLIPSonic's generations and the vocoders' resyntheses are scored against: the
evaluation split's middle crops, their log-mels and labels, and the project's classifier trained
on the training split's real clips (or reused from ``DATA_DIR/_clipsonic_classifier/``)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipsep_jax.errors import UserError
from clipsep_jax.families.clipsonic.classifier import (
    frechet_distance,
    load_classifier,
    save_classifier,
    train_classifier,
)
from clipsep_jax.families.clipsonic.model import MiddleCrops, TrainingCrops, clean_mels
from clipsep_jax.input_pipeline import open_split, record_column

__all__ = ["real_clips", "clip_mels", "CLASSIFIER_VERSION"]

# In the cache's fingerprint: a classifier saved by another design is trained again.
CLASSIFIER_VERSION = "mel-cnn-1d"


def _label_ids(source: Any, labels: list[str]) -> np.ndarray:
    return np.asarray([labels.index(label) for label in record_column(source, "label")],
                      np.int32)


def clip_mels(config: ml_collections.ConfigDict, waveforms: np.ndarray) -> np.ndarray:
    """Waveforms [N, S] -> the model's normalised log-mels [N, n_mels, T], in batches of 64."""
    fn = jax.jit(lambda w: clean_mels(config, w))
    return np.concatenate([np.asarray(fn(jnp.asarray(waveforms[i:i + 64])))
                           for i in range(0, len(waveforms), 64)])


def _classifier(config, train_source, test_source, labels, test_mels, test_ids, progress):
    e = config.clipsonic.eval
    fingerprint = {"data": [config.data.name, str(Path(config.data.data_dir).absolute()),
                            config.data.train_split, config.eval.split],
                   "mel": dict(config.clipsonic.mel), "crop": config.audio.crop_samples,
                   "steps": e.classifier_steps, "crops": e.classifier_crops,
                   "seed": config.train.seed, "classifier": CLASSIFIER_VERSION}
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(config.data.data_dir) / "_clipsonic_classifier" / digest
    cached = load_classifier(folder, fingerprint)
    if cached is not None:
        return cached
    if progress:
        print("training the evaluation classifier on real training clips", file=sys.stderr)
    crops = TrainingCrops(config, train_source)
    rng = np.random.default_rng(config.train.seed)
    waves, ids = [], []
    train_ids = _label_ids(train_source, labels)
    for i in range(len(train_source)):
        for _ in range(e.classifier_crops):
            waves.append(crops(i, rng)["waveform"])
            ids.append(train_ids[i])
    result = train_classifier(clip_mels(config, np.stack(waves)), np.asarray(ids), test_mels,
                              test_ids, tuple(labels), steps=e.classifier_steps,
                              seed=config.train.seed)
    save_classifier(folder, result, fingerprint)
    return result


def real_clips(config: ml_collections.ConfigDict, *, progress: bool = True) -> dict:
    """The real clips generations (or resyntheses) are scored against: ``labels``, the test
    split's middle crops (``test_waveforms`` [N, S], their normalised log-mels ``test_mels``,
    class ``test_ids``), the trained or cached ``classifier`` and its ``report`` entry; when its
    accuracy reaches ``classifier_min_accuracy``, also the real test clips' classifier
    ``test_features`` and the ``floor`` (training vs test clips' Frechet distance)."""
    e = config.clipsonic.eval
    train_source, metadata = open_split(config.data, config.data.train_split)
    test_source, _ = open_split(config.data, config.eval.split)
    labels = list(metadata.get("labels", []))
    if not labels:
        raise UserError("the dataset lists no labels: the generation metrics need them")
    test = MiddleCrops(config, test_source)
    test_waveforms = np.stack([test(i)["waveform"] for i in range(len(test_source))])
    test_mels = clip_mels(config, test_waveforms)
    test_ids = _label_ids(test_source, labels)
    classifier = _classifier(config, train_source, test_source, labels, test_mels, test_ids,
                             progress)
    out = {"labels": labels, "test_source": test_source, "test_waveforms": test_waveforms,
           "test_mels": test_mels, "test_ids": test_ids, "classifier": classifier,
           "report": {"test_accuracy": classifier.test_accuracy,
                      "min_accuracy": e.classifier_min_accuracy, "classes": len(labels)}}
    if classifier.test_accuracy >= e.classifier_min_accuracy:
        _, out["test_features"] = classifier.predict(test_mels)
        train_crops = MiddleCrops(config, train_source)
        train_mels = clip_mels(config, np.stack([train_crops(i)["waveform"]
                                             for i in range(len(train_source))]))
        _, real_train_features = classifier.predict(train_mels)
        out["floor"] = {"frechet_distance": frechet_distance(real_train_features,
                                                             out["test_features"])}
    return out
