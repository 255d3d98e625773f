"""Zero-shot classification, the CLAP family's evaluation.

Every clip of ``config.eval.split`` is classified among all the dataset's labels by the cosine
similarity of its middle crop's audio embedding (``model.clip_samples`` at the model's rate) to
the text embedding of ``clap.eval.template`` ("The sound of {label}") of each label; a clip is
right at top-k when its own label is among the k most similar. The model runs as the frozen
:class:`clipsep_jax.encoders.clap.CLAP` that other families load
(:func:`clipsep_jax.families.clap.trained.clap_from_variables`), on this host's devices: every
host scores every clip (the evaluation sets are small) and returns the whole report.
"""

from __future__ import annotations

import sys

import ml_collections
import numpy as np
from tqdm import tqdm

from clipsep_jax.encoders.clap import CLAP
from clipsep_jax.families.clap.model import Examples, caption, label_names
from clipsep_jax.input_pipeline import open_split

__all__ = ["zero_shot", "format_zero_shot", "TOP_K"]

TOP_K = (1, 3)
_CHUNK = 256  # clips held in memory at once


def zero_shot(config: ml_collections.ConfigDict, clap: CLAP, *, progress: bool = True) -> dict:
    """The zero-shot report of ``clap`` on ``config.eval.split``: ``top1`` and ``top3``
    (fractions of clips), their chance levels, per-label top-1 and the settings."""
    source, metadata = open_split(config.data, config.eval.split)
    labels = label_names(config, metadata)
    examples = Examples(config, source, labels, clap.tokenizer, config.eval.split)
    text = clap.encode_text([caption(config.clap.eval.template, label) for label in labels])
    ranks, truth = [], []
    chunks = range(0, len(source), _CHUNK)
    for start in tqdm(chunks, desc=f"zero-shot {config.eval.split}", disable=not progress,
                      file=sys.stdout):
        rows = [examples(i) for i in range(start, min(start + _CHUNK, len(source)))]
        audio = clap.encode_audio(np.stack([r["waveform"] for r in rows]),
                                  sample_rate=config.audio.sample_rate)
        order = np.argsort(-(audio @ text.T), axis=1, kind="stable")
        ids = np.asarray([r["label"] for r in rows])
        ranks.append(np.argmax(order == ids[:, None], axis=1))
        truth.append(ids)
    rank = np.concatenate(ranks) if ranks else np.zeros(0, np.int64)
    truth = np.concatenate(truth) if truth else np.zeros(0, np.int64)
    report = {"split": config.eval.split, "clips": int(len(rank)), "labels": labels,
              "template": config.clap.eval.template,
              "crop_seconds": config.model.clip_samples / config.model.sample_rate}
    for k in TOP_K:
        report[f"top{k}"] = float(np.mean(rank < k)) if len(rank) else float("nan")
        report[f"chance_top{k}"] = min(k, len(labels)) / len(labels)
    report["per_label"] = {
        label: {"clips": int(np.sum(truth == i)),
                "top1": float(np.mean(rank[truth == i] == 0)) if np.any(truth == i)
                else float("nan")}
        for i, label in enumerate(labels)}
    return report


def format_zero_shot(report: dict) -> str:
    """The report as markdown: the summary row, then top-1 per label."""
    k_heads = " | ".join(f"top-{k}" for k in TOP_K)
    k_names = " / ".join(f"top-{k}" for k in TOP_K)
    chance = " / ".join(f"{report[f'chance_top{k}']:.3f}" for k in TOP_K)
    lines = [
        f"## CLAP zero-shot classification on {report['split']}",
        "",
        f"| split | clips | labels | {k_heads} | chance ({k_names}) |",
        "|---|---:|---:|" + "---:|" * len(TOP_K) + "---:|",
        f"| {report['split']} | {report['clips']} | {len(report['labels'])} | "
        + " | ".join(f"{report[f'top{k}']:.3f}" for k in TOP_K) + f" | {chance} |",
        "",
        "| label | clips | top-1 |",
        "|---|---:|---:|",
    ]
    for label, row in report["per_label"].items():
        lines.append(f"| {label} | {row['clips']} | {row['top1']:.3f} |")
    lines += [
        "",
        f"Each clip's middle {report['crop_seconds']:.2f} s against \"{report['template']}\" "
        f"for each of the {len(report['labels'])} labels, by cosine similarity; top-k: the "
        "clip's label among the k most similar.",
    ]
    return "\n".join(lines) + "\n"
