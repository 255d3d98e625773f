"""A CLAP trained here as a frozen :class:`clipsep_jax.encoders.clap.CLAP`: the object
``CLAP.from_pretrained`` gives for LAION's checkpoints (``encode_text``, ``encode_audio``,
``text_token_states``, ``audio_embedding``, ``logit_scale_audio`` / ``logit_scale_text``), for
the families that query or score with CLAP.

    clap = load_trained_clap("runs/clap_demo")  # a workdir, model directory or pretrained folder
    clap.encode_text(["The sound of cello"])  # [1, projection_dim], unit norm
    clap.encode_audio(waveforms, sample_rate=16000)  # [B, projection_dim]

The input BatchNorm's running statistics (the model state) go back into the towers' parameters,
and the learned log scales are capped as the loss caps them (``clap.max_logit_scale``), so the
logit scales are the ones training used. ``save_trained_clap`` writes a model directory with the
tokenizer's files beside the weights.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_collections
import transformers
from jax.sharding import Mesh

from clipsep_jax import checkpoints, inference
from clipsep_jax.encoders.clap import CLAP
from clipsep_jax.errors import UserError
from clipsep_jax.families.clap.model import clap_config, front_end, full_params
from clipsep_jax.families.clap.tokenizer import byte_tokenizer

__all__ = ["TOKENIZER_DIR", "clap_from_variables", "load_trained_clap", "save_trained_clap"]

TOKENIZER_DIR = "tokenizer"


def clap_from_variables(config: ml_collections.ConfigDict, variables: dict, *,
                        tokenizer: Any = None, dtype: Any = jnp.float32, mesh: Mesh | None = None,
                        batch_size: int = 32) -> CLAP:
    """The frozen CLAP of a ``clap`` model's config and variables (``{"params",
    "batch_stats"}``); ``tokenizer`` defaults to the byte tokenizer it was trained with."""
    if config.model.kind != "clap":
        raise UserError(f"config.model.kind={config.model.kind!r}: not a CLAP trained by the "
                        "clap family")
    stats = variables["batch_stats"]
    params = dict(full_params(variables["params"], stats["mean"], stats["var"]))
    cap = math.log(config.clap.max_logit_scale)
    for name in ("logit_scale_a", "logit_scale_t"):
        params[name] = jnp.minimum(jnp.asarray(params[name], jnp.float32), cap)
    tokenizer = tokenizer if tokenizer is not None else byte_tokenizer()
    if len(tokenizer) > config.model.text_vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens; config.model."
                        f"text_vocab_size={config.model.text_vocab_size} embeds fewer")
    return CLAP(clap_config(config), params, tokenizer, front_end(config), dtype, mesh,
                batch_size)


def load_trained_clap(path: str | Path, step: int | str = "best", *, dtype: Any = jnp.float32,
                      mesh: Mesh | None = None, batch_size: int = 32) -> CLAP:
    """The frozen CLAP of a training workdir (checkpoint ``step``: ``"best"``, the lowest
    validation loss, ``"latest"`` or a number), a model directory or a pretrained folder
    (``python -m clipsep_jax.export``). A ``tokenizer/`` folder there (``save_trained_clap``)
    is the tokenizer; otherwise the byte tokenizer the family trains with.

    Args:
      dtype: compute and parameter dtype; embeddings are float32.
      mesh: its first axis shards the batch (default: all local devices).
      batch_size: clips or texts per compiled call.
    """
    config, variables = inference.load_for_inference(path, step=step)
    folder = Path(path) / TOKENIZER_DIR
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder)) if folder.is_dir() \
        else None
    return clap_from_variables(config, variables, tokenizer=tokenizer, dtype=dtype, mesh=mesh,
                               batch_size=batch_size)


def save_trained_clap(path: str | Path, output: str | Path, step: int | str = "best") -> Path:
    """Writes a model directory of the CLAP in ``path`` (as :func:`load_trained_clap` reads it)
    to the new folder ``output``: ``config.json``, ``variables/`` and the tokenizer's files in
    ``tokenizer/`` (``transformers.AutoTokenizer`` reads them). Returns ``output``."""
    config, variables = inference.load_for_inference(path, step=step)
    if config.model.kind != "clap":
        raise UserError(f"{path}: a {config.model.kind!r} model, not a CLAP")
    folder = checkpoints.save_model(output, config, variables)
    byte_tokenizer().save_pretrained(str(folder / TOKENIZER_DIR))
    return folder
