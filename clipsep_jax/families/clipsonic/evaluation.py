"""CLIPSonic's generation metrics: relevance and fidelity from the project's own classifier.

:func:`generation_metrics` (called by the family's ``evaluate``):

1. trains :class:`~.classifier.MelClassifier` on random crops of the training split's real clips
   (``clipsonic.eval.classifier_crops`` per clip), or reuses the one cached in
   ``DATA_DIR/_clipsonic_classifier/<fingerprint>/``; it scores the middle crops of the real
   test clips, and below ``classifier_min_accuracy`` no generation metric is reported;
2. generates one clip per test clip, query mode and guidance scale (seeded by the clip's index):
   ``image`` (the clip's frames' CLIP embedding: CLIPSonic-IQ) and ``text`` (the label prompt's
   CLIP text embedding: CLIPSonic-ZS for a model trained on images, -SD for one trained on text)
   and, with ``clipsonic.prior.kind`` set, ``text_pd`` (that text embedding mapped to an image
   embedding by the prior: CLIPSonic-PD);
3. scores them twice: the generated mels directly, and the mels of their Griffin-Lim waveforms
   (the vocoder's cost is the difference): relevance (accuracy against the queried label) and the
   Frechet distance of the classifier's features to the real test clips', with the real
   training clips' distance as the floor.
"""

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
from tqdm import tqdm

from clipsep_jax.errors import UserError
from clipsep_jax.families.clipsonic import mel
from clipsep_jax.families.clipsonic.classifier import (
    frechet_distance,
    load_classifier,
    save_classifier,
    train_classifier,
)
from clipsep_jax.families.clipsonic.generator import sample_batch
from clipsep_jax.families.clipsonic.model import (
    MiddleCrops,
    TrainingCrops,
    clean_mels,
    mel_settings,
)
from clipsep_jax.families.clipsonic.prior_baselines import fit_prior
from clipsep_jax.families.clipsonic.waveforms import griffin_lim_from_log_mel
from clipsep_jax.input_pipeline import open_split

__all__ = ["generation_metrics", "format_generation"]

# In the cache's fingerprint: a classifier saved by another design is trained again.
CLASSIFIER_VERSION = "mel-cnn-1d"
MODE_NAMES = {"image": "image (IQ)", "text_zs": "text (ZS)", "text_sd": "text (SD)",
              "text_pd": "text (PD)"}


def _label_ids(source: Any, labels: list[str]) -> np.ndarray:
    out = []
    for i in range(len(source)):
        label = source[i]["label"]
        label = label.decode() if isinstance(label, bytes) else str(label)
        out.append(labels.index(label))
    return np.asarray(out, np.int32)


def _mels(config: ml_collections.ConfigDict, waveforms: np.ndarray) -> np.ndarray:
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
    result = train_classifier(_mels(config, np.stack(waves)), np.asarray(ids), test_mels,
                              test_ids, tuple(labels), steps=e.classifier_steps,
                              seed=config.train.seed)
    save_classifier(folder, result, fingerprint)
    return result


def generation_metrics(config: ml_collections.ConfigDict, variables: dict, *,
                       progress: bool = True) -> dict:
    """{"classifier": {...}, "generation": [rows], "floor": {...}} (see the module docs)."""
    e = config.clipsonic.eval
    train_source, metadata = open_split(config.data, config.data.train_split)
    test_source, _ = open_split(config.data, config.eval.split)
    labels = list(metadata.get("labels", []))
    if not labels:
        raise UserError("the dataset lists no labels: the generation metrics need them")
    test = MiddleCrops(config, test_source)
    count = len(test_source) if not config.eval.num_examples else min(
        config.eval.num_examples, len(test_source))
    test_mels = _mels(config, np.stack([test(i)["waveform"] for i in range(len(test_source))]))
    test_ids = _label_ids(test_source, labels)
    classifier = _classifier(config, train_source, test_source, labels, test_mels, test_ids,
                             progress)
    out: dict[str, Any] = {"classifier": {"test_accuracy": classifier.test_accuracy,
                                          "min_accuracy": e.classifier_min_accuracy,
                                          "classes": len(labels)}}
    if classifier.test_accuracy < e.classifier_min_accuracy:
        out["generation"] = []
        out["note"] = (f"the classifier scores {classifier.test_accuracy:.3f} on real test "
                       f"clips, below {e.classifier_min_accuracy}: generation metrics are not "
                       "reported")
        return out
    _, real_test_features = classifier.predict(test_mels)
    train_crops = MiddleCrops(config, train_source)
    train_mels = _mels(config, np.stack([train_crops(i)["waveform"]
                                         for i in range(len(train_source))]))
    _, real_train_features = classifier.predict(train_mels)
    out["floor"] = {"frechet_distance": frechet_distance(real_train_features,
                                                         real_test_features)}

    frames = test_mels.shape[-1]
    image_crops = MiddleCrops(_with_mode(config, "image"), test_source)
    text_mode = "text_sd" if config.query.mode == "text" else "text_zs"
    conditions = {
        "image": np.stack([image_crops(i)["condition"] for i in range(count)]),
        text_mode: np.stack([np.asarray(test_source[i]["text_embedding"], np.float32)
                             for i in range(count)]),
    }
    if config.clipsonic.prior.kind and config.query.mode != "text":  # CLIPSonic-PD
        conditions["text_pd"] = fit_prior(config)(conditions[text_mode])
        out["prior"] = {"kind": config.clipsonic.prior.kind,
                        "split": config.clipsonic.prior.split}
    sample = jax.jit(lambda c, k, w: sample_batch(config, variables, c, k, steps=e.steps,
                                                  frames=frames, guidance=w))
    settings = mel_settings(config)
    vocode = jax.jit(lambda m, k: griffin_lim_from_log_mel(
        m, settings, e.griffin_lim_iterations, k))
    rows = []
    scales = [float(w) for w in e.guidance.split(",") if w.strip()]
    bar = tqdm(total=len(conditions) * len(scales) * count, unit="clip", desc="generate",
               disable=not progress, file=sys.stderr)
    for mode, condition in conditions.items():
        for w in scales:
            generated, waves = [], []
            for start in range(0, count, 16):
                key = jax.random.fold_in(jax.random.key(config.eval.seed), start)
                mels = sample(jnp.asarray(condition[start:start + 16]), key, w)
                generated.append(np.asarray(mels))
                waves.append(np.asarray(vocode(mel.denormalize(mels, settings),
                                               jax.random.fold_in(key, 1))))
                bar.update(len(mels))
            generated = np.concatenate(generated)
            resynth = _mels(config, np.concatenate(waves)[:, :config.audio.crop_samples])
            row = {"mode": mode, "guidance": w, "count": count}
            for domain, mels in (("mel", generated), ("waveform", resynth)):
                predicted, features = classifier.predict(mels)
                row[f"relevance_{domain}"] = float(np.mean(predicted == test_ids[:count]))
                row[f"frechet_{domain}"] = frechet_distance(features, real_test_features)
            rows.append(row)
    bar.close()
    out["generation"] = rows
    return out


def _with_mode(config: ml_collections.ConfigDict, mode: str) -> ml_collections.ConfigDict:
    copy = ml_collections.ConfigDict(config.to_dict())
    copy.query.mode = mode
    return copy


def format_generation(report: dict) -> str:
    """The generation rows as a markdown table, with the classifier and the floor."""
    c = report.get("classifier")
    if not c:
        return ""
    lines = [f"Evaluation classifier: {c['test_accuracy']:.3f} accuracy on real test clips "
             f"({c['classes']} classes; chance {1 / c['classes']:.3f}; needed "
             f"{c['min_accuracy']})."]
    if report.get("note"):
        return "\n".join(lines + ["", report["note"]])
    lines += ["", "| query | guidance | n | relevance (mel) | FD (mel) | relevance (Griffin-Lim) "
              "| FD (Griffin-Lim) |", "|---|---|---|---|---|---|---|"]
    for r in report["generation"]:
        lines.append(f"| {MODE_NAMES[r['mode']]} | {r['guidance']:g} | {r['count']} | "
                     f"{r['relevance_mel']:.3f} | {r['frechet_mel']:.2f} | "
                     f"{r['relevance_waveform']:.3f} | {r['frechet_waveform']:.2f} |")
    lines.append(f"\nFrechet distance (FD) of the classifier's features to the real test clips'; "
                 f"floor (real training vs real test clips): "
                 f"{report['floor']['frechet_distance']:.2f}.")
    if report.get("prior"):
        lines.append(f"PD: the test texts mapped to image embeddings by the "
                     f"{report['prior']['kind']} prior fitted on the "
                     f"{report['prior']['split']} split's image-text pairs.")
    return "\n".join(lines)
