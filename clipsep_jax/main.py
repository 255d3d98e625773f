r"""Train a CLIPSep model: ``python -m clipsep_jax.main --config=configs/vggsound_nit.py
--workdir=runs/nit [--config.train.batch_size=64 ...]``.

The workdir receives checkpoints (``checkpoints/``; a restarted run resumes from the last one),
TensorBoard logs (``logs/``), ``train_log.jsonl`` and a copy of the config. On several hosts
(a TPU pod slice, or a SLURM job with ``--distributed=on``), every host runs this same command.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and logs go.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Call jax.distributed.initialize(): auto does on TPU pods and under SLURM with several "
    "tasks, or when JAX_COORDINATOR_ADDRESS is set.")


def _wants_distributed() -> bool:
    if _DISTRIBUTED.value != "auto":
        return _DISTRIBUTED.value == "on"
    return bool(
        os.environ.get("JAX_COORDINATOR_ADDRESS")
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("--config and --workdir are required")
    if not flags.FLAGS["verbosity"].present:  # progress lines are printed; libraries' INFO
        logging.set_verbosity(logging.WARNING)  # logs come back with --verbosity=0
    import jax

    if _wants_distributed():
        jax.distributed.initialize()
    print(f"process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} "
          f"devices ({jax.local_device_count()} local, {jax.devices()[0].platform})", flush=True)

    from clipsep_jax import train

    config = _CONFIG.value
    if config.data.prepare_if_missing:
        from data_prep import synth_music

        if jax.process_count() > 1:  # the first host builds; the others then read it
            from jax.experimental import multihost_utils

            if jax.process_index() == 0:
                synth_music.prepare_for_config(config)
            multihost_utils.sync_global_devices("dataset prepared")
            if jax.process_index() != 0:
                synth_music.prepare_for_config(config)
        else:
            synth_music.prepare_for_config(config)
    os.makedirs(_WORKDIR.value, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(_WORKDIR.value, "config.json.tmp"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        os.replace(os.path.join(_WORKDIR.value, "config.json.tmp"),
                   os.path.join(_WORKDIR.value, "config.json"))
    try:
        train.train_and_evaluate(config, _WORKDIR.value)
    except train.NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    if config.eval.after_training and jax.process_index() == 0:
        from clipsep_jax import evaluate

        report, path = evaluate.run(config, _WORKDIR.value, "best")
        print("\n" + evaluate.format_table(report), flush=True)
        print(f"evaluation: {path.with_suffix('.md')} and {path.name}", flush=True)
        for folder in report.get("audio_examples", []):
            print(f"example separation: {folder}/", flush=True)


if __name__ == "__main__":
    app.run(main)
