"""The weakly supervised separator's evaluation, as the reference's: mixtures of two test clips,
each source queried with its prompt, SDR / SIR / SAR averaged over the two.

Test mixture i puts clip i of ``eval.split`` with a clip of another label drawn from
(``eval.seed``, i) (captioned clips: any other clip), both middle crops of ``audio.crop_samples``
halved and summed; labelled clips are queried with ``weaksep.eval.template`` ("The sound of
{label}"), captioned ones with their captions. Each prompt's ratio mask (thresholded at
``eval.threshold`` when ``eval.binary_masks``) times |X| with the mixture's phase gives that
source's estimate; BSSEval (``eval.metric``) scores the two estimates against the two sources
and the mixture against both (the baseline). As the reference, a mixture with a silent source or
estimate (summed |samples| <= 1e-5) is left out and listed.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import soundfile
from tqdm import tqdm

from clipsep_jax import bss_eval, sharding
from clipsep_jax.encoders.clap import CLAP
from clipsep_jax.errors import UserError
from clipsep_jax.families.weaksep import losses
from clipsep_jax.families.weaksep.data import Clips, PairExamples, Prompts
from clipsep_jax.families.weaksep.model import pair_masks
from clipsep_jax.input_pipeline import open_split, sharded_batches
from clipsep_jax.pictures import save_png, spectrogram_picture

__all__ = ["test_mixtures", "separate_pairs", "evaluate", "format_table", "write_examples"]


def test_mixtures(config: ml_collections.ConfigDict, clap: CLAP) -> tuple[PairExamples, int]:
    """(the test mixtures of ``config.eval.split``, how many are scored)."""
    source, metadata = open_split(config.data, config.eval.split)
    labels = [str(label) for label in metadata.get("labels", [])]
    examples = PairExamples(Clips(config, source, config.eval.split),
                            Prompts(clap.tokenizer, clap.text_length),
                            config.weaksep.eval.template, seed=config.eval.seed, labels=labels)
    size = len(source) if not config.eval.num_examples else min(config.eval.num_examples,
                                                                 len(source))
    return examples, size


def separate_pairs(config: ml_collections.ConfigDict, clap: CLAP, variables: dict,
                   clap_params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
    """A batch of test mixtures -> (estimates [B, 2, L], masks [B, 2, F, T] as applied)."""
    a, e = config.audio, config.eval
    state = {k: v for k, v in variables.items() if k != "params"}
    state["frozen"] = {"clap": clap_params}
    out, _ = pair_masks(config, clap, variables["params"], state, batch["sources"],
                        batch["source_ids"], batch["source_mask"], train=False)
    masks = out["masks"]
    if e.binary_masks:
        masks = (masks > e.threshold).astype(jnp.float32)
    estimates = losses.masked_waveform(masks, out["magnitude"][:, None], out["cos"][:, None],
                                       out["sin"][:, None], batch["sources"].shape[-1],
                                       n_fft=a.n_fft, hop_length=a.hop_length)
    return estimates, masks


def _score(references: np.ndarray, estimates: np.ndarray, config: ml_collections.ConfigDict
           ) -> tuple[dict | None, dict | None, str | None]:
    """(the estimates' metrics, the mixture's, why skipped), each averaged over the sources."""
    e = config.eval
    if any(np.abs(r).sum() <= bss_eval.SILENCE for r in references):
        return None, None, "a source is silent"
    mixture = np.broadcast_to(references.sum(0), references.shape)
    mixture_scores = {k: float(np.mean(v)) for k, v in bss_eval.source_metrics(
        references, mixture, e.metric, e.fast_metrics).items()}
    if any(np.abs(x).sum() <= bss_eval.SILENCE for x in estimates):
        return None, mixture_scores, "an estimate is silent"
    scores = {k: float(np.mean(v)) for k, v in bss_eval.source_metrics(
        references, estimates, e.metric, e.fast_metrics).items()}
    return scores, mixture_scores, None


def evaluate(config: ml_collections.ConfigDict, variables: dict, clap: CLAP,
             mesh: jax.sharding.Mesh | None = None, *, progress: bool = True) -> dict:
    """Scores the test mixtures -> the report: {"rows": [{"query", "sdr", "sir", "sar"
    (summaries), "skipped"}], "per_example", "skipped", ...}. Every host scores its own rows and
    returns the whole report."""
    e = config.eval
    mesh = mesh if mesh is not None else sharding.make_mesh(config)
    examples, total = test_mixtures(config, clap)
    if total == 0:
        raise UserError(f"no test mixtures: the split {e.split!r} is empty")
    devices = mesh.devices.size
    batch_size = -(-max(1, min(e.batch_size, total)) // devices) * devices
    variables = sharding.replicate(variables, mesh)
    clap_params = sharding.replicate(jax.device_get(clap.params), mesh)
    separate = jax.jit(functools.partial(separate_pairs, config, clap))
    results: dict[int, tuple] = {}
    bar = tqdm(total=total, unit="mixture", file=sys.stderr, desc="evaluate",
               disable=not progress or jax.process_index() != 0)
    start = time.time()
    try:
        for batch in sharded_batches(examples, total, batch_size, mesh):
            estimates, _ = separate(variables, clap_params, batch)
            estimates = sharding.host_rows(estimates)
            references = sharding.host_rows(batch["sources"])
            valid = sharding.host_rows(batch["valid"]) > 0
            for row, index in enumerate(sharding.host_rows(batch["index"])):
                if valid[row]:
                    results[int(index)] = _score(references[row], estimates[row], config)
                    bar.update()
    finally:
        bar.close()
    for part in sharding.gather_objects(results):
        results.update(part)
    return _report(config, results, total, time.time() - start)


def _report(config: ml_collections.ConfigDict, results: dict, total: int,
            seconds: float) -> dict:
    e = config.eval
    rows, per_example, skipped = [], {"text": [], "mixture": []}, []
    for index in range(total):
        scores, mixture, reason = results[index]
        if reason:
            skipped.append({"index": index, "reason": reason})
        if mixture is not None:
            per_example["mixture"].append({"index": index, **mixture})
        if scores is not None:
            per_example["text"].append({"index": index, **scores})
    for query in ("mixture", "text"):
        chosen = per_example[query]
        rows.append({"query": query, **{m: bss_eval.summarise([x[m] for x in chosen])
                                        for m in bss_eval.METRICS},
                     "skipped": total - len(chosen)})
    return {"model_kind": config.model.kind, "split": e.split, "num_examples": total,
            "template": config.weaksep.eval.template, "metric": e.metric,
            "fast_metrics": e.fast_metrics, "binary_masks": e.binary_masks,
            "threshold": e.threshold, "loss_terms": config.weaksep.loss.terms,
            "mode": config.weaksep.mode, "seconds": seconds, "rows": rows,
            "per_example": per_example, "skipped": skipped}


def format_table(report: dict) -> str:
    """The report's rows as a markdown table: mean ± 95% CI and median, in dB."""
    lines = ["| query | n | SDR | SDR median | SIR | SIR median | SAR | SAR median |",
             "|" + "---|" * 8]
    names = {"mixture": "mixture (baseline)", "text": "text"}
    for row in report["rows"]:
        cells = [names[row["query"]], str(row["sdr"]["count"])]
        for m in bss_eval.METRICS:
            s = row[m]
            cells += [f"{s['mean']:.2f} ± {s['ci95']:.2f}", f"{s['median']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    masks = (f"binary masks (> {report['threshold']})" if report["binary_masks"]
             else "ratio masks")
    notes = [f"{report['num_examples']} test mixtures of 2 sources ({report['split']}), each "
             f"source queried with {report['template']!r} (captioned clips: their captions); "
             f"{masks}; {report['metric']} averaged over both sources; mean ± 95% confidence "
             f"interval, dB. Trained {report['mode']} on {report['loss_terms']}."]
    if report["skipped"]:
        notes.append(f"{len(report['skipped'])} mixtures left out (a silent source or "
                     "estimate), as the reference does (listed in the JSON).")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def write_examples(config: ml_collections.ConfigDict, variables: dict, clap: CLAP,
                   folder: Path, count: int) -> list[Path]:
    """The first ``count`` test mixtures as audio and pictures, one folder each: ``mixture``,
    ``source_<k>`` (the truth) and ``estimate_<k>`` (``.wav``), ``mixture.png`` (log-magnitude)
    and ``mask_<k>.png``; ``prompts.txt`` names each k's prompt."""
    examples, total = test_mixtures(config, clap)
    separate = jax.jit(functools.partial(separate_pairs, config, clap))
    variables, clap_params = jax.device_get((variables, clap.params))  # one device
    rate, written = config.audio.sample_rate, []
    for i in range(min(count, total)):
        example = examples(i)
        batch = {k: jnp.asarray(v)[None] for k, v in example.items()}
        estimates, masks = separate(variables, clap_params, batch)
        out = folder / f"{i:03d}"
        out.mkdir(parents=True, exist_ok=True)
        mixture = example["sources"].sum(0)
        soundfile.write(out / "mixture.wav", mixture, rate)
        a = config.audio
        magnitude, _, _ = losses.stft_magphase(jnp.asarray(mixture), n_fft=a.n_fft,
                                               hop_length=a.hop_length)
        save_png(out / "mixture.png", spectrogram_picture(np.log1p(20 * np.asarray(magnitude))))
        texts = []
        for k in range(2):
            soundfile.write(out / f"source_{k}.wav", example["sources"][k], rate)
            soundfile.write(out / f"estimate_{k}.wav", np.asarray(estimates)[0, k], rate)
            save_png(out / f"mask_{k}.png",
                     spectrogram_picture(np.asarray(masks)[0, k], value_range=(0.0, 1.0)))
            ids = example["source_ids"][k][example["source_mask"][k] > 0]
            texts.append(f"{k}: {clap.tokenizer.decode(ids, skip_special_tokens=True)}")
        (out / "prompts.txt").write_text("\n".join(texts) + "\n")
        written.append(out)
    return written

