"""The frozen CLAP a weaksep config names (``weaksep.clap``), loaded once per process."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import ml_collections

from clipsep_jax import checkpoints
from clipsep_jax.encoders.clap import CLAP
from clipsep_jax.errors import UserError
from clipsep_jax.families.clap.trained import load_trained_clap

__all__ = ["load_frozen_clap"]


@functools.lru_cache(maxsize=4)
def _load_clap(name: str, step: str) -> CLAP:
    path = Path(name)
    ours = path / checkpoints.CONFIG_FILE
    if ours.is_file():
        saved = json.loads(ours.read_text())
        if isinstance(saved.get("model"), dict) and "kind" in saved["model"]:
            return load_trained_clap(name, step=int(step) if step.isdigit() else step)
    try:
        return CLAP.from_pretrained(name)
    except OSError as e:  # transformers: neither a folder nor a cached hub id
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"config.weaksep.clap={name!r}: cannot load this CLAP ({first}); give a "
                        "Hugging Face CLAP folder or cached hub id, or a clap-family workdir"
                        ) from e


def load_frozen_clap(config: ml_collections.ConfigDict) -> CLAP:
    """The frozen CLAP of ``config.weaksep.clap`` (loaded once per process), checked against the
    network's ``model.cond_dim`` and ``model.embedding_dim``."""
    w = config.weaksep
    clap = _load_clap(str(w.clap), str(w.clap_step))
    hidden, dim = clap.config.text.hidden_size, clap.embedding_dim
    if config.model.cond_dim != hidden or config.model.embedding_dim != dim:
        raise UserError(
            f"config.model.cond_dim={config.model.cond_dim} and embedding_dim="
            f"{config.model.embedding_dim}: the CLAP {w.clap!r} has {hidden}-wide text token "
            f"states and {dim}-dim embeddings; set them to those")
    return clap
