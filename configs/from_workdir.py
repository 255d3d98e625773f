"""The config a training run saved (WORKDIR/config.json), to evaluate or resume it with overrides:

    python -m clipsep_jax.evaluate --workdir=runs/demo --config=configs/from_workdir.py:runs/demo \\
        --config.eval.num_sources=3
"""

from clipsep_jax.checkpoints import load_config


def get_config(workdir: str):
    if not workdir:
        raise ValueError("configs/from_workdir.py needs the workdir: --config=configs/"
                         "from_workdir.py:WORKDIR")
    return load_config(workdir)
