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
   (the vocoder's cost is the difference); with ``clipsonic.eval.vocoder`` (a vocoder trained
   by ``python -m clipsep_jax.main``, e.g. ``configs/vocoder_demo.py``) a third time, on its
   waveforms: relevance (accuracy against the queried label) and the
   Frechet distance of the classifier's features to the real test clips', with the real
   training clips' distance as the floor.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from clipsep_jax.families.clipsonic import mel
from clipsep_jax.families.clipsonic.classifier import (
    frechet_distance,
)
from clipsep_jax.families.clipsonic.generator import sample_batch, trained_vocoder
from clipsep_jax.families.clipsonic.model import (
    MiddleCrops,
    mel_settings,
)
from clipsep_jax.families.clipsonic.pd import describe_prior, fit_prior
from clipsep_jax.families.clipsonic.real_clips import clip_mels, real_clips
from clipsep_jax.families.clipsonic.waveforms import griffin_lim_from_log_mel

__all__ = ["generation_metrics", "format_generation"]

MODE_NAMES = {"image": "image (IQ)", "text_zs": "text (ZS)", "text_sd": "text (SD)",
              "text_pd": "text (PD)"}


def generation_metrics(config: ml_collections.ConfigDict, variables: dict, *,
                       progress: bool = True) -> dict:
    """{"classifier": {...}, "generation": [rows], "floor": {...}} (see the module docs)."""
    e = config.clipsonic.eval
    neural = None  # loaded first: a vocoder of other mel settings fails before any work
    if e.vocoder:  # waveforms from a trained vocoder too, scored like Griffin-Lim's
        neural = trained_vocoder(e.vocoder, mel_settings(config))
    real = real_clips(config, progress=progress)
    test_source, test_mels, test_ids = real["test_source"], real["test_mels"], real["test_ids"]
    classifier = real["classifier"]
    count = len(test_source) if not config.eval.num_examples else min(
        config.eval.num_examples, len(test_source))
    out: dict[str, Any] = {"classifier": real["report"]}
    if neural is not None:
        out["vocoder"] = e.vocoder
    if "floor" not in real:
        out["generation"] = []
        out["note"] = (f"the classifier scores {classifier.test_accuracy:.3f} on real test "
                       f"clips, below {e.classifier_min_accuracy}: generation metrics are not "
                       "reported")
        return out
    real_test_features = real["test_features"]
    out["floor"] = real["floor"]

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
                        "split": config.clipsonic.prior.split,
                        "description": describe_prior(config)}
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
            generated, waves, neural_waves = [], [], []
            for start in range(0, count, 16):
                key = jax.random.fold_in(jax.random.key(config.eval.seed), start)
                mels = sample(jnp.asarray(condition[start:start + 16]), key, w)
                generated.append(np.asarray(mels))
                waves.append(np.asarray(vocode(mel.denormalize(mels, settings),
                                               jax.random.fold_in(key, 1))))
                if neural is not None:
                    neural_waves.append(np.asarray(neural(mel.denormalize(mels, settings))))
                bar.update(len(mels))
            generated = np.concatenate(generated)
            resynth = clip_mels(config, np.concatenate(waves)[:, :config.audio.crop_samples])
            row = {"mode": mode, "guidance": w, "count": count}
            domains = [("mel", generated), ("waveform", resynth)]
            if neural is not None:
                domains.append(("vocoder", clip_mels(config, np.concatenate(neural_waves)[
                    :, :config.audio.crop_samples])))
            for domain, mels in domains:
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
    vocoder = bool(report.get("vocoder"))
    lines += ["", "| query | guidance | n | relevance (mel) | FD (mel) | relevance (Griffin-Lim) "
              "| FD (Griffin-Lim) |" + (" relevance (vocoder) | FD (vocoder) |" if vocoder else ""),
              "|---|---|---|---|---|---|---|" + ("---|---|" if vocoder else "")]
    for r in report["generation"]:
        lines.append(f"| {MODE_NAMES[r['mode']]} | {r['guidance']:g} | {r['count']} | "
                     f"{r['relevance_mel']:.3f} | {r['frechet_mel']:.2f} | "
                     f"{r['relevance_waveform']:.3f} | {r['frechet_waveform']:.2f} |"
                     + (f" {r['relevance_vocoder']:.3f} | {r['frechet_vocoder']:.2f} |"
                        if vocoder else ""))
    lines.append(f"\nFrechet distance (FD) of the classifier's features to the real test clips'; "
                 f"floor (real training vs real test clips): "
                 f"{report['floor']['frechet_distance']:.2f}.")
    if vocoder:
        lines.append(f"Vocoder: waveforms from {report['vocoder']} (Griffin-Lim's beside them).")
    if report.get("prior"):
        p = report["prior"]
        lines.append("PD: the test texts mapped to image embeddings by the " + p.get(
            "description", f"{p['kind']} prior fitted on the {p['split']} split") + ".")
    return "\n".join(lines)
