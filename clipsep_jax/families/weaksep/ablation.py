r"""Train URL only, URL + CRL and the full loss on the same data, and print their test tables
side by side (the paper's loss ablation):

    python -m clipsep_jax.families.weaksep.ablation --config=configs/weak_demo.py \
        --workdir=runs/weak_ablation [--config.train.num_steps=...]

Each variant is the config with ``weaksep.loss.terms`` set ("url", "url,crl", "url,crl,cnt"),
trained and evaluated in ``WORKDIR/<variant>`` by the same code as ``python -m
clipsep_jax.main`` (the config's prerequisites first, once; a finished variant is reused). The
comparison is written to ``WORKDIR/ablation.md`` and ``ablation.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import ml_collections
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


def variant_config(config: ml_collections.ConfigDict, terms: str) -> ml_collections.ConfigDict:
    """``config`` training ``terms``, evaluated after training, without prerequisites."""
    variant = ml_collections.ConfigDict(config.to_dict())
    variant.weaksep.loss.terms = terms
    variant.eval.after_training = True
    variant.eval.extra_splits = ""
    variant.prerequisites = ""
    return variant


def format_comparison(results: list[dict]) -> str:
    """[{"variant", "report", "seconds"}] -> one markdown table: the mixture baseline, then each
    variant's text-queried SDR / SIR / SAR (mean ± 95% CI, median; dB) and training time."""
    lines = ["| loss | n | SDR | SDR median | SIR | SAR | train + eval time |",
             "|---|---|---|---|---|---|---|"]

    def cells(row: dict) -> list[str]:
        s = {m: row[m] for m in bss_eval.METRICS}
        return [str(s["sdr"]["count"]), f"{s['sdr']['mean']:.2f} ± {s['sdr']['ci95']:.2f}",
                f"{s['sdr']['median']:.2f}", f"{s['sir']['mean']:.2f} ± {s['sir']['ci95']:.2f}",
                f"{s['sar']['mean']:.2f} ± {s['sar']['ci95']:.2f}"]

    mixture = results[0]["report"]["rows"][0]
    lines.append("| " + " | ".join(["mixture (baseline)", *cells(mixture), "-"]) + " |")
    for result in results:
        text = next(r for r in result["report"]["rows"] if r["query"] == "text")
        lines.append("| " + " | ".join([result["variant"], *cells(text),
                                        f"{result['seconds'] / 60:.1f} min"]) + " |")
    report = results[0]["report"]
    return ("\n".join(lines) + f"\n\n{report['num_examples']} test mixtures of 2 sources "
            f"({report['split']}), each source queried with {report['template']!r}; same data, "
            "steps and seeds for every loss.\n")


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Trains and evaluates every variant; returns [{"variant", "terms", "report", "seconds"}]."""
    if config.model.kind != "weaksep":
        raise errors.UserError(f"config.model.kind={config.model.kind!r}: the loss ablation is "
                               "for weaksep models")
    config_lib.validate(config)
    run_prerequisites(config)
    results = []
    for name, terms in VARIANTS.items():
        print(f"\n== {name}: weaksep.loss.terms={terms}", flush=True)
        start = time.time()
        reports = train_and_report(variant_config(config, terms),
                                   os.path.join(workdir, terms.replace(",", "_")))
        results.append({"variant": name, "terms": terms, "report": reports[0],
                        "seconds": time.time() - start})
    if jax.process_index() == 0:
        table = format_comparison(results)
        print("\n" + table, flush=True)
        write_text_atomic(os.path.join(workdir, "ablation.md"), table)
        summary = [{k: r[k] for k in ("variant", "terms", "seconds")} | {
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
        run(errors.config_value(_CONFIG), _WORKDIR.value)
    except errors.USER_ERRORS as e:
        sys.exit(errors.report(e))


if __name__ == "__main__":
    app.run(main, flags_parser=errors.parse_flags)
