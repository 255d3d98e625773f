"""The vocoder's evaluation: resynthesis of real test clips, against Griffin-Lim.

For the middle crop (``vocoder.eval.crop_samples``) of every clip of the evaluation split: the
log-mel of the real clip, the waveform the vocoder makes from it, and the waveform Griffin-Lim
makes from it (``vocoder.eval.griffin_lim_iterations``, from the mel filterbank's inverse, as
CLIPSonic's generations use it). Each waveform is scored by

- **log-mel distance**: the mean absolute difference between its log-mel and the real clip's
  (natural log, magnitudes clamped at ``vocoder.mel.clamp``; lower is better);
- the project's classifier (:mod:`clipsep_jax.families.clipsonic.classifier`, trained on the
  real training clips or reused from the cache CLIPSonic's evaluation writes): **accuracy**
  against the clip's label and the **Frechet distance** of its features to the real test
  clips' (the real training clips' distance is the floor).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from clipsep_jax.config import default_config
from clipsep_jax.families.clipsonic import mel
from clipsep_jax.families.clipsonic.classifier import frechet_distance
from clipsep_jax.families.clipsonic.real_clips import real_clips
from clipsep_jax.families.clipsonic.waveforms import griffin_lim_from_log_mel
from clipsep_jax.families.vocoder.model import mel_settings, vocode

__all__ = ["classifier_config", "resynthesis_metrics", "resynthesize", "format_resynthesis"]


def classifier_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A CLIPSonic config with the vocoder config's data, framing, mel bands and classifier
    settings: what :func:`~clipsep_jax.families.clipsonic.real_clips.real_clips` reads (the
    same fields give the same cached classifier as a CLIPSonic evaluation on that data)."""
    view = default_config("clipsonic")
    for section in ("data", "eval"):
        view[section] = ml_collections.ConfigDict(config[section].to_dict())
    for field in ("sample_rate", "n_fft", "hop_length", "win_length"):
        view.audio[field] = config.audio[field]
    view.audio.crop_samples = config.vocoder.eval.crop_samples
    for field in ("n_mels", "fmin", "fmax", "clamp"):
        view.clipsonic.mel[field] = config.vocoder.mel[field]
    for field in ("classifier_steps", "classifier_crops", "classifier_min_accuracy"):
        view.clipsonic.eval[field] = config.vocoder.eval[field]
    view.train.seed = config.train.seed
    return view


def resynthesize(config: ml_collections.ConfigDict, variables: dict, waveforms: np.ndarray,
                 *, progress: bool = False) -> dict[str, np.ndarray]:
    """Real waveforms [N, S] -> {"vocoder": [N, S], "griffin_lim": [N, S]} from their log-mels."""
    settings, samples = mel_settings(config), waveforms.shape[1]
    iterations = config.vocoder.eval.griffin_lim_iterations

    def both(wave, key):
        log_mel = mel.log_mel(wave, settings)
        gl = griffin_lim_from_log_mel(log_mel, settings, iterations, key, samples)
        gl = jnp.pad(gl, ((0, 0), (0, samples - gl.shape[1])))
        return vocode(config, variables["params"]["generator"], log_mel, samples), gl

    run = jax.jit(both)
    out = {"vocoder": [], "griffin_lim": []}
    for start in tqdm(range(0, len(waveforms), 16), desc="resynthesize", unit="batch",
                      disable=not progress, file=sys.stderr):
        voc, gl = run(jnp.asarray(waveforms[start:start + 16]),
                      jax.random.fold_in(jax.random.key(config.eval.seed), start))
        out["vocoder"].append(np.asarray(voc))
        out["griffin_lim"].append(np.asarray(gl))
    return {k: np.concatenate(v) for k, v in out.items()}


def resynthesis_metrics(config: ml_collections.ConfigDict, variables: dict, *,
                        progress: bool = True) -> dict:
    """{"classifier": {...}, "floor": {...}, "resynthesis": [rows]} (see the module docs)."""
    view = classifier_config(config)
    real = real_clips(view, progress=progress)
    waveforms = real["test_waveforms"]
    if config.eval.num_examples:
        waveforms = waveforms[:config.eval.num_examples]
    settings = mel_settings(config)
    log_mel = jax.jit(lambda w: mel.log_mel(w, settings))
    normalised = jax.jit(lambda w: mel.normalize(mel.log_mel(w, settings), settings))
    real_log_mels = np.concatenate([np.asarray(log_mel(jnp.asarray(waveforms[i:i + 32])))
                                    for i in range(0, len(waveforms), 32)])
    out = {"classifier": real["report"], "split": config.eval.split, "count": len(waveforms),
           "crop_samples": int(waveforms.shape[1]), "resynthesis": []}
    if "floor" in real:
        out["floor"] = real["floor"]
    for name, waves in resynthesize(config, variables, waveforms, progress=progress).items():
        mels = np.concatenate([np.asarray(log_mel(jnp.asarray(waves[i:i + 32])))
                               for i in range(0, len(waves), 32)])
        row = {"waveform": name, "log_mel_distance": float(np.mean(np.abs(mels - real_log_mels)))}
        if "floor" in real:
            inputs = np.concatenate([np.asarray(normalised(jnp.asarray(waves[i:i + 32])))
                                     for i in range(0, len(waves), 32)])
            predicted, features = real["classifier"].predict(inputs)
            row["accuracy"] = float(np.mean(predicted == real["test_ids"][:len(waves)]))
            row["frechet_distance"] = frechet_distance(features, real["test_features"])
        out["resynthesis"].append(row)
    return out


NAMES = {"vocoder": "vocoder", "griffin_lim": "Griffin-Lim"}


def format_resynthesis(report: dict) -> str:
    """The resynthesis rows as a markdown table with notes."""
    c = report["classifier"]
    scored = "floor" in report
    lines = ["| waveform | log-mel distance | accuracy | FD |", "|---|---|---|---|"]
    for r in report["resynthesis"]:
        extra = (f"{r['accuracy']:.3f} | {r['frechet_distance']:.2f}" if scored else "- | -")
        lines.append(f"| {NAMES[r['waveform']]} | {r['log_mel_distance']:.4f} | {extra} |")
    lines.append(f"\nResynthesis of the {report['count']} real {report['split']} clips' middle "
                 f"{report['crop_samples']} samples from their log-mels; log-mel distance: mean "
                 "|log-mel(resynthesis) - log-mel(real)| (lower is better).")
    lines.append(f"Classifier: {c['test_accuracy']:.3f} accuracy on the real clips "
                 f"({c['classes']} classes; needed {c['min_accuracy']})"
                 + (f"; FD floor (real training vs real test clips) "
                    f"{report['floor']['frechet_distance']:.2f}." if scored else
                    ": below the bar, so accuracy and FD are not reported."))
    return "\n".join(lines)
