r"""Train URL only, URL + CRL and the full loss on the same data, and print their test tables
side by side (the paper's loss ablation):

    python -m clipsep_jax.families.weaksep.ablation --config=configs/weak_demo.py \
        --workdir=runs/weak_ablation [--seeds=1234,1,2] [--config.train.num_steps=...]

Each variant is the config with ``weaksep.loss.terms`` set ("url", "url,crl", "url,crl,cnt"),
trained and evaluated in ``WORKDIR/<terms>`` (``WORKDIR/<terms>_seed<S>`` for a seed other than
the config's ``train.seed``) by the same code as ``python -m clipsep_jax.main`` (the config's
prerequisites first, once; a finished variant is reused). Every variant meets the same test
mixtures, so the table also gives each loss's SDR minus URL only's, mixture by mixture (a paired
difference: the mixtures' own spread cancels). With several ``--seeds`` every loss trains once
per seed and the figures pool their mixtures. The comparison is written to
``WORKDIR/ablation.md`` and ``ablation.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from clipsep_jax import bss_eval, errors, sharding
from clipsep_jax import config as config_lib
from clipsep_jax.files import write_text_atomic
from clipsep_jax.runs import run_prerequisites, train_and_report

__all__ = ["VARIANTS", "variant_config", "format_comparison", "run"]

VARIANTS = {"URL only": "url", "URL + CRL": "url,crl", "full (URL + CRL + CNT)": "url,crl,cnt"}

_CONFIG = config_flags.DEFINE_config_file("config", None, "A weaksep config (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the variants' runs go.")
_SEEDS = flags.DEFINE_list("seeds", [], "Training seeds (config.train.seed) to train every loss "
                           "with, e.g. 1234,1,2; default: the config's.")


def variant_config(config: ml_collections.ConfigDict, terms: str,
                   seed: int | None = None) -> ml_collections.ConfigDict:
    """``config`` training ``terms`` (with training seed ``seed``), evaluated after training,
    without prerequisites."""
    variant = ml_collections.ConfigDict(config.to_dict())
    variant.weaksep.loss.terms = terms
    if seed is not None:
        variant.train.seed = seed
    variant.eval.after_training = True
    variant.eval.extra_splits = ""
    variant.prerequisites = ""
    return variant


def _text_scores(report: dict) -> dict[int, dict]:
    """{test mixture index: its text-query scores} of an evaluation report."""
    return {row["index"]: row for row in report["per_example"]["text"]}


def _cell(summary: dict) -> str:
    return f"{summary['mean']:.2f} ± {summary['ci95']:.2f}"


def format_comparison(results: list[dict]) -> str:
    """[{"variant", "seed", "report", "seconds"}] -> one markdown table: the mixture baseline,
    then each variant's text-queried SDR / SIR / SAR (mean ± 95% CI, median; dB; pooled over
    seeds), its SDR minus the first variant's on the same mixtures and seed (paired), its mean
    SDR per seed and its mean training + evaluation time."""
    variants = list(dict.fromkeys(r["variant"] for r in results))
    seeds = list(dict.fromkeys(r["seed"] for r in results))
    by_key = {(r["variant"], r["seed"]): r for r in results}
    baseline = variants[0]
    lines = ["| loss | n | SDR | SDR median | SIR | SAR | SDR - " + baseline + " (paired) | "
             "SDR by seed | train + eval time |", "|---|---|---|---|---|---|---|---|---|"]
    mixture = next(r for r in results[0]["report"]["rows"] if r["query"] == "mixture")
    lines.append("| " + " | ".join([
        "mixture (baseline)", str(mixture["sdr"]["count"]), _cell(mixture["sdr"]),
        f"{mixture['sdr']['median']:.2f}", _cell(mixture["sir"]), _cell(mixture["sar"]),
        "-", "-", "-"]) + " |")
    for variant in variants:
        runs = [by_key[variant, seed] for seed in seeds if (variant, seed) in by_key]
        pooled = {m: [] for m in bss_eval.METRICS}
        differences, per_seed = [], []
        for run in runs:
            scores = _text_scores(run["report"])
            for m in bss_eval.METRICS:
                pooled[m] += [row[m] for row in scores.values()]
            per_seed.append(f"{np.mean([row['sdr'] for row in scores.values()]):.2f}")
            reference = _text_scores(by_key[baseline, run["seed"]]["report"])
            differences += [row["sdr"] - reference[i]["sdr"] for i, row in scores.items()
                            if i in reference]
        s = {m: bss_eval.summarise(pooled[m]) for m in bss_eval.METRICS}
        paired = "-" if variant == baseline else _cell(bss_eval.summarise(differences))
        seconds = np.mean([run["seconds"] for run in runs])
        lines.append("| " + " | ".join([
            variant, str(s["sdr"]["count"]), _cell(s["sdr"]), f"{s['sdr']['median']:.2f}",
            _cell(s["sir"]), _cell(s["sar"]), paired, " / ".join(per_seed),
            f"{seconds / 60:.1f} min"]) + " |")
    report = results[0]["report"]
    seed_text = (f"training seed {seeds[0]}" if len(seeds) == 1 else
                 f"training seeds {', '.join(map(str, seeds))}, their mixtures pooled")
    return ("\n".join(lines) + f"\n\n{report['num_examples']} test mixtures of 2 sources "
            f"({report['split']}), each source queried with {report['template']!r}; same data, "
            f"steps and test mixtures for every loss; {seed_text}. Mean ± 95% CI, dB. Times are "
            "this command's, per seed (a finished run found in the workdir is only "
            "evaluated).\n")


def run(config: ml_collections.ConfigDict, workdir: str,
        seeds: list[int] | tuple[int, ...] = ()) -> list[dict]:
    """Trains and evaluates every variant with every training seed (default: the config's);
    returns [{"variant", "terms", "seed", "report", "seconds"}]."""
    if config.model.kind != "weaksep":
        raise errors.UserError(f"config.model.kind={config.model.kind!r}: the loss ablation is "
                               "for weaksep models")
    config_lib.validate(config)
    run_prerequisites(config)
    results = []
    for seed in seeds or [config.train.seed]:
        for name, terms in VARIANTS.items():
            print(f"\n== {name}: weaksep.loss.terms={terms}, train.seed={seed}", flush=True)
            folder = terms.replace(",", "_") + (
                "" if seed == config.train.seed else f"_seed{seed}")
            start = time.time()
            reports = train_and_report(variant_config(config, terms, seed),
                                       os.path.join(workdir, folder))
            results.append({"variant": name, "terms": terms, "seed": seed,
                            "report": reports[0], "seconds": time.time() - start})
    if jax.process_index() == 0:
        table = format_comparison(results)
        print("\n" + table, flush=True)
        write_text_atomic(os.path.join(workdir, "ablation.md"), table)
        summary = [{k: r[k] for k in ("variant", "terms", "seed", "seconds")} | {
            "rows": r["report"]["rows"]} for r in results]
        write_text_atomic(os.path.join(workdir, "ablation.json"),
                          json.dumps(summary, indent=1))
    return results


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("--config and --workdir are required")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        sharding.initialize_distributed("auto")
        try:
            seeds = [int(seed) for seed in _SEEDS.value]
        except ValueError as e:
            raise errors.UserError(f"--seeds={','.join(_SEEDS.value)}: not integers") from e
        run(errors.config_value(_CONFIG), _WORKDIR.value, seeds)
    except errors.USER_ERRORS as e:
        sys.exit(errors.report(e))


if __name__ == "__main__":
    app.run(main, flags_parser=errors.parse_flags)
