"""Loading a model for inference from whatever a user has: a pretrained folder or Hugging Face
hub id, a model directory, a training workdir, or a checkpoint of the original implementation
(converted by its family)."""

from __future__ import annotations

from pathlib import Path

import ml_collections

from clipsep_jax import checkpoints
from clipsep_jax.checkpoints import CheckpointError
from clipsep_jax.families import family_of_kind

__all__ = ["load_for_inference", "CheckpointError"]


def load_for_inference(
    path: str | Path, model_kind: str | None = None, step: int | str = "latest"
) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, variables) from a pretrained folder or hub id, a model directory, a training
    workdir or a reference file.

    Args:
      path: a pretrained folder (``save_pretrained``: config.json + model.safetensors) or a
        Hugging Face hub id (``owner/name``, from the cache when ``HF_HUB_OFFLINE=1``), a model
        directory (``checkpoints.save_model``, ``python -m clipsep_jax.convert``), a
        training workdir (``config.json`` + ``checkpoints/``) or a reference checkpoint file.
      model_kind: the model kind of a reference file (e.g. clipsep, clipsep_nit, pit, labelsep).
      step: for a workdir, ``"latest"``, ``"best"`` or a step number
        (:func:`clipsep_jax.checkpoints.load_workdir`).
    """
    p = Path(path)
    if p.is_file():
        if not model_kind:
            raise CheckpointError(f"{path}: a reference checkpoint file needs --model_kind")
        return family_of_kind(model_kind).load_reference_checkpoint(str(p), model_kind)
    if checkpoints.is_pretrained_folder(p):
        return checkpoints.load_pretrained(p)
    if (p / checkpoints.VARIABLES_DIR).is_dir():
        return checkpoints.load_model(p)
    if (p / checkpoints.CHECKPOINTS_DIR).is_dir() and (p / checkpoints.CONFIG_FILE).is_file():
        config, variables, _ = checkpoints.load_workdir(p, step)
        return config, variables
    if not p.exists():
        if checkpoints.looks_like_hub_id(str(path)):
            return checkpoints.load_pretrained(str(path))
        raise CheckpointError(f"{path}: no such file or folder (nor a hub id owner/name)")
    raise CheckpointError(
        f"{path}: not a pretrained folder (config.json + model.safetensors), a model directory "
        "(config.json + variables/), a training workdir (config.json + checkpoints/), a "
        "checkpoint file or a hub id (owner/name)")
