"""Model checkpoints on disk: an orbax checkpoint of the variables beside the config as JSON.

Layout of a model directory::

    DIR/config.json   the ml_collections config (clipsep_jax.config schema)
    DIR/variables/    orbax checkpoint of {'params', 'batch_stats'}

The directory is written under a temporary name and renamed when complete, so a reader never sees
half a checkpoint.
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
