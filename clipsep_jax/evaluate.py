r"""Evaluation tables of a trained model on its test set, for every model family.

    python -m clipsep_jax.evaluate --workdir=runs/nit [--config=configs/music_clipsep_nit.py]
        [--checkpoint=best|latest|STEP|PRETRAINED_FOLDER|HUB_ID|MODEL_DIR|reference.pt
         --model_kind=clipsep_nit]
        [--config.eval.num_sources=3 --config.eval.query_modes=text ...]

The model's family builds the test set and scores it (CLIPSep's:
:mod:`clipsep_jax.families.clipsep.evaluation`, the paper's SDR / SIR / SAR tables). Writes
``WORKDIR/evaluation/<split>_<n>src_<checkpoint>.md`` (the printed table) and ``.json`` (the
report). On several hosts every host runs this command (``--distributed``, as for
``clipsep_jax.main``): each scores its share of the test set on the global mesh, and the first
host writes the files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from clipsep_jax import checkpoints, errors, inference, sharding
from clipsep_jax.families import get_family
from clipsep_jax.files import write_text_atomic

__all__ = ["run", "format_table", "main"]


def format_table(report: dict) -> str:
    """The report's table, as its family formats it."""
    from clipsep_jax.families import family_of_kind

    return family_of_kind(report["model_kind"]).format_table(report)


def run(config: ml_collections.ConfigDict, workdir: str, checkpoint: str = "best",
        model_kind: str | None = None, progress: bool = True) -> tuple[dict, Path]:
    """Loads the checkpoint, evaluates it on ``config.eval``'s test set on every device of every
    host; the first host writes the table and the JSON into ``workdir/evaluation/``. Returns
    (report, path of the JSON) on every host.

    ``checkpoint``: ``best``, ``latest`` or a step of the workdir's checkpoints, or a model
    directory, or a reference checkpoint file (with ``model_kind``). The model's own config
    (its ``model`` and ``audio`` sections, ``num_sources`` and its family's section except that
    section's ``eval`` settings) replaces ``config``'s."""
    path = Path(checkpoint)
    if checkpoint in ("best", "latest") or checkpoint.isdigit():
        model_config, variables, step = checkpoints.load_workdir(
            workdir, checkpoint if not checkpoint.isdigit() else int(checkpoint))
        tag = f"step{step}"
    else:
        model_config, variables = inference.load_for_inference(path, model_kind)
        tag = path.stem if path.is_file() else path.name
    config = ml_collections.ConfigDict(config.to_dict())
    config.model = model_config.model
    config.audio = model_config.audio
    config.num_sources = model_config.num_sources
    family = get_family(config)
    if family.name in model_config:  # the family's own settings are the model's too,
        usage = {name: config[family.name].get(name)  # but not how it is evaluated
                 for name in family.usage_sections}
        config[family.name] = model_config[family.name]
        for name, settings in usage.items():
            if settings is not None:
                config[family.name][name] = settings
    mesh = sharding.make_mesh(config)
    report = family.evaluate(config, variables, mesh, progress=progress)
    report["checkpoint"] = str(checkpoint if not path.exists() else path.absolute())
    report.setdefault("model_kind", config.model.kind)
    name = f"{config.eval.split}_{config.eval.num_sources}src_{tag}"
    out = Path(workdir) / "evaluation"
    if jax.process_index() == 0:
        if config.eval.num_audio_examples:
            folders = family.write_examples(config, variables, out / f"{name}_examples",
                                            config.eval.num_audio_examples)
            report["audio_examples"] = [str(f) for f in folders]
        write_text_atomic(out / f"{name}.json", json.dumps(report, indent=1))
        write_text_atomic(out / f"{name}.md", family.format_table(report))
    return report, out / f"{name}.json"


_FLAGS: dict = {}


def _define_flags() -> dict:
    # Defined when this module runs as the command: clipsep_jax.main, which imports it, has
    # flags of the same names.
    if not _FLAGS:
        _FLAGS["config"] = config_flags.DEFINE_config_file(
            "config", None,
            "Experiment config (configs/*.py); default: the workdir's config.json.")
        _FLAGS["workdir"] = flags.DEFINE_string(
            "workdir", None, "Training workdir; results go to WORKDIR/evaluation/.")
        _FLAGS["checkpoint"] = flags.DEFINE_string(
            "checkpoint", "best", "best | latest | a step of the workdir's checkpoints, or a "
            "pretrained folder or hub id, a model directory, or a reference checkpoint (with "
            "--model_kind).")
        _FLAGS["model_kind"] = flags.DEFINE_string(
            "model_kind", None, "Kind of a reference checkpoint.")
        _FLAGS["distributed"] = flags.DEFINE_enum(
            "distributed", "auto", ["auto", "on", "off"],
            "Call jax.distributed.initialize(): auto does on TPU pods and under SLURM with "
            "several tasks, or when JAX_COORDINATOR_ADDRESS is set.")
    return _FLAGS


def _main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = {name: flag.value for name, flag in _FLAGS.items()}
    if not f["workdir"]:
        raise app.UsageError("--workdir is required")
    sharding.initialize_distributed(f["distributed"])
    try:
        config = f["config"]
        if config is None:
            config = checkpoints.load_config(f["workdir"])
        report, path = run(config, f["workdir"], f["checkpoint"], f["model_kind"])
    except errors.USER_ERRORS as e:
        return errors.report(e)
    if jax.process_index() == 0:
        print(format_table(report))
        print(f"written: {path} and {path.with_suffix('.md')}")
    return 0


def main() -> None:
    _define_flags()
    app.run(lambda argv: sys.exit(_main(argv)), flags_parser=errors.parse_flags)


if __name__ == "__main__":
    main()
