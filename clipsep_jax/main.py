r"""Train a model: ``python -m clipsep_jax.main --config=configs/vggsound_nit.py
--workdir=runs/nit [--config.train.batch_size=64 ...]``.

The workdir receives checkpoints (``checkpoints/``; a restarted run resumes from the last one),
TensorBoard logs (``logs/``), ``train_log.jsonl`` and a copy of the config. On several hosts
(a TPU pod slice, or a SLURM job with ``--distributed=on``), every host runs this same command:
every host trains, validates, checkpoints and evaluates its share, and the first host writes the
logs and tables.
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from clipsep_jax import config as config_lib
from clipsep_jax import errors, sharding, train
from clipsep_jax.runs import run_prerequisites, train_and_report

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and logs go.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Call jax.distributed.initialize(): auto does on TPU pods and under SLURM with several "
    "tasks, or when JAX_COORDINATOR_ADDRESS is set.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("--config and --workdir are required")
    if not flags.FLAGS["verbosity"].present:  # progress lines are printed; libraries' INFO
        logging.set_verbosity(logging.WARNING)  # logs come back with --verbosity=0
    try:
        sys.exit(_run(errors.config_value(_CONFIG), _WORKDIR.value))
    except KeyboardInterrupt:  # before or after the loop, which saves and stops on its own
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


def _run(config, workdir: str) -> int:
    """Trains and evaluates; the exit code: 0 done, 1 non-finite loss, 2 a user error,
    128 + the signal after a SIGTERM (pre-empted) or SIGINT (interrupted), checkpoint saved."""
    try:
        config_lib.validate(config)
        sharding.initialize_distributed(_DISTRIBUTED.value)
        print(f"process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} "
              f"devices ({jax.local_device_count()} local, {jax.devices()[0].platform})",
              flush=True)
        run_prerequisites(config)
        train_and_report(config, workdir)
    except train.NonFiniteLossError as e:
        return errors.report(e, code=1)
    except train.Stopped as e:
        print(str(e), file=sys.stderr, flush=True)
        return 128 + e.signal_number
    except errors.USER_ERRORS as e:
        return errors.report(e)
    if jax.process_count() > 1:  # no host leaves while another still needs it
        multihost_utils.sync_global_devices("run finished")
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=errors.parse_flags)
