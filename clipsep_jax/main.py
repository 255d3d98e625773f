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
    import jax

    if _wants_distributed():
        jax.distributed.initialize()
    logging.info("process %d of %d, %d devices (%d local)", jax.process_index(),
                 jax.process_count(), jax.device_count(), jax.local_device_count())

    from clipsep_jax import train

    config = _CONFIG.value
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


if __name__ == "__main__":
    app.run(main)
