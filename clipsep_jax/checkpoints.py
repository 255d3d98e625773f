"""Model checkpoints on disk: an orbax checkpoint of the variables beside the config as JSON.

Layout of a model directory::

    DIR/config.json   the ml_collections config (clipsep_jax.config schema)
    DIR/variables/    orbax checkpoint of {'params', 'batch_stats'}

The directory is written under a temporary name and renamed when complete, so a reader never sees
half a checkpoint. :func:`load_for_inference` also reads a training workdir (its best or latest
orbax checkpoint) and a reference PyTorch checkpoint file.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from clipsep_jax.config import default_config

CONFIG_FILE = "config.json"
VARIABLES_DIR = "variables"


def save_model(directory: str | Path, config: ml_collections.ConfigDict, variables: dict) -> Path:
    """Writes ``config`` and ``variables`` to a new directory (refused if it exists)."""
    directory = Path(directory).absolute()
    if directory.exists():
        raise FileExistsError(f"{directory}: already exists; choose a new output directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        (staging / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2, sort_keys=True))
        host_variables = jax.tree_util.tree_map(np.asarray, variables)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging / VARIABLES_DIR, host_variables)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def load_config(directory: str | Path) -> ml_collections.ConfigDict:
    """The config saved in a model directory, merged over today's defaults (new fields filled)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {directory} a clipsep-jax model directory?")
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    config = default_config()
    _merge(config, saved, str(path))
    return config


def _merge(config: ml_collections.ConfigDict, values: dict, source: str, prefix: str = "") -> None:
    for key, value in values.items():
        if key not in config:
            raise ValueError(f"{source}: unknown config field {prefix}{key}")
        if isinstance(config[key], ml_collections.ConfigDict):
            _merge(config[key], value, source, f"{prefix}{key}.")
        else:
            config[key] = value


def load_model(directory: str | Path) -> tuple[ml_collections.ConfigDict, dict]:
    """Reads a model directory written by :func:`save_model` -> (config, variables as numpy)."""
    directory = Path(directory).absolute()
    config = load_config(directory)
    variables_path = directory / VARIABLES_DIR
    if not variables_path.is_dir():
        raise FileNotFoundError(f"{variables_path}: no variables checkpoint")
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(variables_path)
    return config, variables


class CheckpointError(ValueError):
    """A path that holds no usable checkpoint; the message names it and says why."""


def load_for_inference(
    path: str | Path, model_kind: str | None = None, step: int | str = "latest"
) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, variables) from a model directory, a training workdir or a reference .pt file.

    Args:
      path: a model directory (:func:`save_model`, ``clipsep_jax.convert``), a training workdir
        (``config.json`` + ``checkpoints/``) or a reference PyTorch state-dict file.
      model_kind: the kind of a reference file (clipsep, clipsep_nit, pit, labelsep).
      step: for a workdir, ``"latest"``, ``"best"`` (lowest validation loss; the latest when no
        checkpoint has one, as the reference's best_model.pt) or a step number.
    """
    p = Path(path)
    if p.is_file():
        if not model_kind:
            raise CheckpointError(f"{path}: a PyTorch checkpoint needs --model_kind")
        from clipsep_jax.convert import load_reference_checkpoint

        return load_reference_checkpoint(str(p), model_kind)
    if (p / VARIABLES_DIR).is_dir():
        return load_model(p)
    if (p / "checkpoints").is_dir() and (p / CONFIG_FILE).is_file():
        config, variables, _ = load_workdir(p, step)
        return config, variables
    raise CheckpointError(
        f"{path}: not a model directory (config.json + variables/), a training workdir "
        "(config.json + checkpoints/) or a checkpoint file")


def load_workdir(
    workdir: str | Path, step: int | str = "latest"
) -> tuple[ml_collections.ConfigDict, dict, int]:
    """(config, {'params', 'batch_stats'}, step) of a training workdir's checkpoint ``step``
    (``"latest"``, ``"best"`` or a number; see :func:`load_for_inference`)."""
    from clipsep_jax.models import init_variables

    workdir = Path(workdir).absolute()
    config = load_config(workdir)
    manager = ocp.CheckpointManager(
        str(workdir / "checkpoints"), item_names=("state", "data"),
        options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise CheckpointError(f"{workdir}: no finished checkpoint in checkpoints/")
        if step == "latest":
            chosen = steps[-1]
        elif step == "best":
            losses = {}
            for s in steps:
                metrics = manager.metrics(s) or {}
                if "validation_loss" in metrics:
                    losses[s] = float(metrics["validation_loss"])
            chosen = min(losses, key=lambda s: (losses[s], -s)) if losses else steps[-1]
        else:
            chosen = int(step)
            if chosen not in steps:
                raise CheckpointError(
                    f"{workdir}: no checkpoint at step {chosen} (there are {steps})")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shapes = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
            jax.eval_shape(lambda: init_variables(config, jax.random.PRNGKey(0))))
        item = {"params": shapes["params"], "batch_stats": shapes["batch_stats"]}
        restored = manager.restore(chosen, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True)))
    finally:
        manager.close()
    state = restored["state"]
    return config, {"params": state["params"], "batch_stats": state["batch_stats"]}, chosen
