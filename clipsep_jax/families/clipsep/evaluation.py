"""CLIPSep's evaluation tables, like the paper's: SDR, SIR and SAR of the queried source.

Test mixtures follow the reference's evaluation: mixture i puts clip i of ``eval.split`` (the
queried source) with ``eval.num_sources - 1`` clips drawn from ``eval.interference_split``
(deterministically from i and ``eval.seed``), each crop around its clip's middle frame; several
interfering clips are averaged into one, and the two are halved and summed. The queried
source's mask (unwarped, thresholded at 0.5, applied to the mixture's magnitude with its phase)
and its complement are scored against the queried clip and the interference with BSSEval; the
unprocessed mixture is scored as the baseline. CLIPSep-NIT is scored without its noise heads and
with them (each head added in turn, the better one kept: the reference's oracle); PIT keeps the
better of its two output assignments.

The model runs jit-compiled on the device mesh in global batches of which every host builds and
scores only its own rows (metrics in ``eval.num_workers`` processes per host); the per-example
scores are then gathered, so every host returns the whole report.
"""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import soundfile
from tqdm import tqdm

from clipsep_jax import audio, bss_eval, sharding
from clipsep_jax.errors import UserError
from clipsep_jax.families.clipsep.data import MixSettings, mix_sources, partner_indices
from clipsep_jax.families.clipsep.model import forward
from clipsep_jax.input_pipeline import open_split, sharded_batches
from clipsep_jax.pictures import save_png, spectrogram_picture
from clipsep_jax.separation import linear_masks, masked_waveforms

__all__ = ["test_mixtures", "query_modes", "candidate_masks", "evaluate", "format_table",
           "write_examples", "QUERY_KEYS"]

# query mode -> the test mixture's key holding its embedding
QUERY_KEYS = {"text": "text_queries", "text_ensemble": "text_queries_ensemble",
              "image": "image_queries"}


def test_mixtures(config: ml_collections.ConfigDict, source: Any, metadata: dict,
                  interference: Any | None = None) -> Any:
    """Random-access test mixtures (``len`` and ``[i]``), deterministic per index.

    Element ``i``: ``mag_mix`` [513, T], ``mix_stft`` [513, T, 2], ``waveforms`` [2, crop]
    (the queried clip and the interference, as mixed), ``image_queries``, ``text_queries``,
    ``text_queries_ensemble`` [D] and ``labels`` (the queried clip's), ``index``, ``partners``
    (indices into the interference split).
    """
    e = config.eval
    if e.num_sources < 2:
        raise UserError(f"config.eval.num_sources={e.num_sources}: a test mixture needs >= 2")
    settings = MixSettings.from_config(config, metadata)
    others = source if interference is None else interference
    count = e.num_sources - 1
    scales = [0.5] + [0.5 / count] * count
    size = len(source) if not e.num_examples else min(e.num_examples, len(source))

    def make(index: int) -> dict:
        rng = np.random.default_rng([e.seed, index])
        if interference is None:
            partners = partner_indices(index, len(source), count, rng)
        else:
            if len(others) < count:
                raise UserError(f"{count} interfering clips per mixture, the interference "
                                 f"split has {len(others)}")
            partners = [int(i) for i in rng.choice(len(others), size=count, replace=False)]
        records = [source[index]] + [others[i] for i in partners]
        example = mix_sources(records, settings, None, with_waveforms=True, scales=scales)
        waves = example["waveforms"]
        return {
            "mag_mix": example["mag_mix"],
            "mix_stft": example["mix_stft"],
            "waveforms": np.stack([waves[0], waves[1:].sum(0)]),
            "image_queries": example["image_queries"][0],
            "text_queries": example["text_queries"][0],
            "text_queries_ensemble": example["text_queries_ensemble"][0],
            "labels": example["labels"][0],
            "index": np.int32(index),
            "partners": np.asarray(partners, np.int32),
        }

    return grain.MapDataset.range(size).map(make)


def query_modes(config: ml_collections.ConfigDict) -> list[str]:
    """The query modes evaluated for ``config.model.kind``: CLIP models take
    ``config.eval.query_modes`` (image, text, text_ensemble), LabelSep its label, PIT none,
    SOP its image queries (ResNet vectors), BERTSep its text queries (label vectors)."""
    kind = config.model.kind
    if kind == "pit":
        return ["none"]
    if kind == "labelsep":
        return ["label"]
    if kind in ("sop", "bertsep"):
        return [config.query.mode]
    modes = [m.strip() for m in config.eval.query_modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in QUERY_KEYS]
    if unknown or not modes:
        raise UserError(f"config.eval.query_modes={config.eval.query_modes!r}: expected a comma-"
                         f"separated list of {', '.join(QUERY_KEYS)}")
    return modes


def candidate_masks(config: ml_collections.ConfigDict, variables: dict, mag_mix: jax.Array,
                    queries: jax.Array | None) -> jax.Array:
    """Mask probabilities of the queried source [B, C, F', T] for each candidate the scoring
    chooses from: the query mask (CLIPSep, LabelSep); the query mask, then the query mask plus
    each noise head, min(1, sigmoid(z) + sigmoid(n_h)) (CLIPSep-NIT); the first output and its
    complement (PIT)."""
    out = forward(config, variables, mag_mix, queries)
    query = jax.nn.sigmoid(out["query_logits"][:, :1].astype(jnp.float32))
    if config.model.kind == "clipsep_nit":
        noise = jax.nn.sigmoid(out["noise_logits"].astype(jnp.float32))
        return jnp.concatenate([query, jnp.minimum(1.0, query + noise)], axis=1)
    if config.model.kind == "pit":
        return jnp.concatenate([query, 1.0 - query], axis=1)
    return query


def _waveforms(config: ml_collections.ConfigDict, probabilities: jax.Array, mix_stft: jax.Array,
               length: int) -> tuple[jax.Array, jax.Array]:
    """[B, C, F', T] mask probabilities -> (estimates [B, C, 2, length]: each candidate's masked
    mixture and its complement's, mixture [B, length]: the mixture through the same inverse)."""
    e = config.eval
    b, c = probabilities.shape[:2]
    # The complement is thresholded on its own, as the reference does: (1 - p) > threshold.
    pairs = jnp.stack([probabilities, 1.0 - probabilities], axis=2)
    masks = linear_masks(config, pairs.reshape(b, 2 * c, *probabilities.shape[2:]),
                         e.threshold if e.binary_masks else None)
    ones = jnp.ones_like(masks[:, :1])
    waves = masked_waveforms(config, jnp.concatenate([masks, ones], axis=1), mix_stft, length)
    return waves[:, :-1].reshape(b, c, 2, length), waves[:, -1]


def _variants(kind: str, candidates: int) -> list[tuple[str, list[int]]]:
    """(row name, candidate indices it chooses from: the best SDR wins)."""
    if kind == "clipsep_nit":
        return [("without noise heads", [0]),
                ("with noise heads (oracle)", list(range(1, candidates)))]
    if kind == "pit":
        return [("best assignment (oracle)", [0, 1])]
    return [("", [0])]


def _score_in_worker(args: tuple) -> bss_eval.ExampleScores:
    return bss_eval.score_example(*args)


def _mode_queries(mode: str, batch: dict) -> Any:
    if mode == "none":
        return None
    if mode == "label":
        return batch["labels"][:, None]
    return batch[QUERY_KEYS[mode]][:, None]


def _separate(config: ml_collections.ConfigDict, mode: str, variables: dict, batch: dict,
              length: int) -> tuple[jax.Array, jax.Array]:
    """One query mode on a test batch -> (estimates [B, C, 2, length], mixture [B, length])."""
    probabilities = candidate_masks(config, variables, batch["mag_mix"],
                                    _mode_queries(mode, batch))
    mix_stft = batch["mix_stft"][..., 0] + 1j * batch["mix_stft"][..., 1]
    return _waveforms(config, probabilities, mix_stft, length)


def open_test_mixtures(config: ml_collections.ConfigDict) -> tuple[Any, dict]:
    """(the test mixtures of ``config.eval``, the dataset's metadata)."""
    e = config.eval
    source, metadata = open_split(config.data, e.split)
    interference = None
    if e.interference_split and e.interference_split != e.split:
        interference, _ = open_split(config.data, e.interference_split)
    return test_mixtures(config, source, metadata, interference), metadata


def evaluate(config: ml_collections.ConfigDict, variables: dict, examples: Any,
             mesh: jax.sharding.Mesh | None = None, *, progress: bool = True) -> dict:
    """Scores ``examples`` (from :func:`test_mixtures`) -> the report (see the module docs):
    {"rows": [{"query", "variant", "sdr", "sir", "sar" (summaries), "skipped"}], ...}.

    ``variables`` are host arrays (the same on every host); ``mesh`` defaults to every device.
    Every host builds and scores its own rows; every host returns the whole report."""
    e = config.eval
    mesh = mesh if mesh is not None else sharding.make_mesh(config)
    modes = query_modes(config)
    total = len(examples)
    if total == 0:
        raise UserError(f"no test mixtures: the split {e.split!r} is empty")
    devices = mesh.devices.size
    batch_size = -(-max(1, min(e.batch_size, total)) // devices) * devices
    multiple = 2**config.model.num_downs
    first = examples[0]
    frames = first["mag_mix"].shape[-1]
    if frames % multiple:
        raise UserError(f"test crops have {frames} STFT frames, not a multiple of {multiple}; "
                         "set config.audio.crop_samples to a multiple of the hop (minus 1)")
    length = (frames - 1) * config.audio.hop_length  # librosa.istft's length, as the reference
    if modes[0] in QUERY_KEYS:
        dim = first[QUERY_KEYS[modes[0]]].shape[-1]
        if dim != config.model.query_dim:
            raise UserError(f"the dataset's {modes[0]} query embeddings have {dim} dimensions, "
                            f"the model takes {config.model.query_dim}: prepare the data with "
                            "the query encoder the model was trained with")

    variables = sharding.replicate(variables, mesh)
    separate = {mode: jax.jit(functools.partial(_separate, config, mode), static_argnums=2)
                for mode in modes}
    workers = os.cpu_count() if e.num_workers < 0 else e.num_workers
    pool = (concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn")) if workers > 0 else None)
    futures: dict[tuple[str, int], Any] = {}
    results: dict[tuple[str, int], bss_eval.ExampleScores] = {}
    share = -(-total // batch_size) * batch_size // jax.process_count()
    bar = tqdm(total=share * len(modes), unit="mixture", file=sys.stderr, desc="evaluate",
               disable=not progress or jax.process_index() != 0)
    start_time = time.time()

    def without_partners(index: int) -> dict:
        return {k: v for k, v in examples[index].items() if k != "partners"}

    try:
        for batch in sharded_batches(without_partners, total, batch_size, mesh):
            indices = sharding.host_rows(batch["index"])
            valid = sharding.host_rows(batch["valid"]) > 0
            references = sharding.host_rows(batch["waveforms"])
            for mode in modes:
                estimates, mixture = separate[mode](variables, batch, length)
                estimates, mixture = sharding.host_rows(estimates), sharding.host_rows(mixture)
                for row, index in enumerate(indices):
                    bar.update()
                    if not valid[row]:
                        continue
                    index = int(index)
                    check = mode == modes[0] and index < e.check_examples and e.fast_metrics
                    job = (index, references[row, :, :length], estimates[row], mixture[row],
                           e.metric, e.fast_metrics, check)
                    if pool is None:
                        results[(mode, index)] = bss_eval.score_example(*job)
                    else:
                        futures[(mode, index)] = pool.submit(_score_in_worker, job)
            if pool is not None:
                for key in [k for k, f in futures.items() if f.done()]:
                    results[key] = futures.pop(key).result()
        for key, future in futures.items():
            results[key] = future.result()
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    for part in sharding.gather_objects(results):
        results.update(part)
    return _report(config, modes, results, total, time.time() - start_time)


def _report(config, modes: list[str], results: dict, total: int, seconds: float) -> dict:
    e, kind = config.eval, config.model.kind
    rows, per_example, skipped = [], {}, []
    mixture = [results[(modes[0], i)].mixture for i in range(total)]
    mixture_ok = [m for m in mixture if m is not None]
    rows.append({"query": "mixture", "variant": "",
                 **{m: bss_eval.summarise([x[m] for x in mixture_ok]) for m in bss_eval.METRICS},
                 "skipped": total - len(mixture_ok)})
    for mode in modes:
        scores = [results[(mode, i)] for i in range(total)]
        for s in scores:
            if s.skipped:
                skipped.append({"query": mode, "index": s.index, "reasons": s.skipped})
        for name, choices in _variants(kind, len(scores[0].candidates)):
            chosen = []
            for s in scores:
                options = [s.candidates[c] for c in choices]
                if all(o is not None for o in options):  # the reference skips the example
                    best = max(options, key=lambda x: x["sdr"])  # when one is silent
                    chosen.append({"index": s.index, **best})
            rows.append({"query": mode, "variant": name,
                         **{m: bss_eval.summarise([x[m] for x in chosen])
                            for m in bss_eval.METRICS},
                         "skipped": total - len(chosen)})
            per_example[f"{mode}/{name}" if name else mode] = chosen
    per_example["mixture"] = [{"index": i, **m} for i, m in enumerate(mixture) if m is not None]
    gaps = [s.agreement_db for s in results.values() if s.agreement_db is not None]
    return {
        "model_kind": kind,
        "split": e.split,
        "interference_split": e.interference_split or e.split,
        "num_sources": e.num_sources,
        "num_examples": total,
        "metric": e.metric,
        "fast_metrics": e.fast_metrics,
        "binary_masks": e.binary_masks,
        "threshold": e.threshold,
        "metric_agreement_db": {"checked_examples": len(gaps),
                                "max_abs_difference": max(gaps) if gaps else None},
        "seconds": seconds,
        "rows": rows,
        "per_example": per_example,
        "skipped": skipped,
    }


def format_table(report: dict) -> str:
    """The report's rows as a markdown table: mean ± 95% CI and median, in dB."""
    header = ("| query | noise heads / assignment | n | SDR | SDR median | SIR | SIR median | SAR "
              "| SAR median |")
    lines = [header, "|" + "---|" * 9]
    names = {"text": "text", "text_ensemble": "text (prompt ensemble)", "image": "image",
             "label": "label", "none": "none (PIT)", "mixture": "mixture (baseline)"}
    # The baselines' queries come from other encoders than CLIP.
    names.update({"sop": {"image": "image (ResNet-18)"},
                  "bertsep": {"text": "label (BERT)"}}.get(report.get("model_kind"), {}))
    for row in report["rows"]:
        cells = [names.get(row["query"], row["query"]), row["variant"] or "-",
                 str(row["sdr"]["count"])]
        for m in bss_eval.METRICS:
            s = row[m]
            cells += [f"{s['mean']:.2f} ± {s['ci95']:.2f}", f"{s['median']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    agreement = report["metric_agreement_db"]
    notes = [f"{report['num_examples']} test mixtures of {report['num_sources']} sources "
             f"({report['split']} + {report['interference_split']}); metric: "
             f"{report['metric']} ({'fast_bss_eval' if report['fast_metrics'] else 'library'}); "
             "mean ± 95% confidence interval, dB."]
    if agreement["checked_examples"]:
        notes.append(f"fast_bss_eval against {report['metric']} on "
                     f"{agreement['checked_examples']} examples: largest difference "
                     f"{agreement['max_abs_difference']:.2g} dB.")
    if report["skipped"]:
        notes.append(f"{len(report['skipped'])} (query, mixture) pairs had a silent reference or "
                     "estimate and are left out as the reference does (listed in the JSON).")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def write_examples(config: ml_collections.ConfigDict, variables: dict, examples: Any,
                   folder: Path, count: int, labels: tuple[str, ...] = ()) -> list[Path]:
    """The first ``count`` test mixtures as audio and pictures, one folder each:
    ``mixture.wav``, ``truth.wav`` (the queried source), ``<mode>.wav`` (its estimate from each
    query mode; NIT without noise heads), and ``mixture.png`` / ``truth.png`` (log-frequency
    spectrograms) and ``<mode>_mask.png`` (the thresholded mask)."""
    infer = jax.jit(functools.partial(candidate_masks, config))
    reconstruct = jax.jit(functools.partial(_waveforms, config), static_argnums=2)
    rate, written = config.audio.sample_rate, []
    for i in range(min(count, len(examples))):
        e = examples[i]
        label = int(e["labels"])
        name = labels[label] if 0 <= label < len(labels) else f"label{label}"
        out = folder / f"{i:03d}_{name.replace(' ', '_')}"
        out.mkdir(parents=True, exist_ok=True)
        stft = (e["mix_stft"][..., 0] + 1j * e["mix_stft"][..., 1])[None]
        length = (stft.shape[-1] - 1) * config.audio.hop_length
        soundfile.write(out / "mixture.wav", e["waveforms"].sum(0), rate)
        soundfile.write(out / "truth.wav", e["waveforms"][0], rate)
        truth = np.abs(audio.stft_numpy(e["waveforms"][0], n_fft=config.audio.n_fft,
                                        hop_length=config.audio.hop_length,
                                        win_length=config.audio.win_length))
        warp = functools.partial(audio.warp_to_log_frequency,
                                 num_log_bins=config.audio.num_log_freq_bins)
        save_png(out / "mixture.png", spectrogram_picture(np.log1p(20 * np.asarray(
            warp(jnp.asarray(e["mag_mix"])[None]))[0])))
        save_png(out / "truth.png", spectrogram_picture(np.log1p(20 * np.asarray(
            warp(jnp.asarray(truth[:, : e["mag_mix"].shape[-1]])[None]))[0])))
        for mode in query_modes(config):
            queries = (None if mode == "none" else np.asarray(e["labels"])[None, None]
                       if mode == "label" else e[QUERY_KEYS[mode]][None, None])
            probabilities = infer(variables, e["mag_mix"][None], queries)
            estimates, _ = reconstruct(probabilities, jnp.asarray(stft), length)
            soundfile.write(out / f"{mode}.wav", np.asarray(estimates)[0, 0, 0], rate)
            mask = np.asarray(probabilities)[0, 0] > config.eval.threshold
            save_png(out / f"{mode}_mask.png", spectrogram_picture(mask.astype(np.float32)))
        written.append(out)
    return written
