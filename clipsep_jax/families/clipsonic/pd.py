"""CLIPSonic-PD: the text -> image embedding prior a CLIPSonic config names
(``config.clipsonic.prior``), for the evaluation's PD rows and ``Generator.use_prior``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import ml_collections
import numpy as np

from clipsep_jax.errors import UserError
from clipsep_jax.families.prior.baselines import (
    RetrievalPrior,
    RidgePrior,
    image_text_pairs,
    unit,
)
from clipsep_jax.families.prior.model import load_prior

__all__ = ["PRIOR_KINDS", "fit_prior", "describe_prior"]

PRIOR_KINDS = ("ridge", "retrieval", "diffusion")


def fit_prior(config: ml_collections.ConfigDict) -> Callable[[np.ndarray], np.ndarray]:
    """The prior ``config.clipsonic.prior`` names: ridge or retrieval fitted on its split's
    image-text pairs, or (``diffusion``) the diffusion prior at ``checkpoint`` (trained by
    ``python -m clipsep_jax.main`` with model kind ``diffusion_prior``, or LAION's file)."""
    p = config.clipsonic.prior
    if p.kind not in PRIOR_KINDS:
        raise UserError(f"config.clipsonic.prior.kind={p.kind!r}: expected one of "
                        f"{PRIOR_KINDS}")
    if p.kind == "diffusion":
        prior, prior_config = load_prior(p.checkpoint, steps=p.steps, best_of=p.best_of,
                                         guidance=p.guidance, seed=config.eval.seed)
        if prior.network.dim != config.model.condition_dim:
            raise UserError(f"config.clipsonic.prior.checkpoint={p.checkpoint!r} maps "
                            f"{prior.network.dim}-dimensional embeddings; the model's are "
                            f"{config.model.condition_dim}")
        if prior_config is not None:
            for split in (config.data.train_split, config.eval.split):
                if _same_clips(prior_config.data, config.data, split):
                    raise UserError(f"config.clipsonic.prior.checkpoint={p.checkpoint!r} was "
                                    f"trained on the generator's {split} split of "
                                    f"{config.data.data_dir}: train the prior on other data")
        return prior
    if p.split == config.data.train_split:
        raise UserError(f"config.clipsonic.prior.split={p.split!r} is the generator's training "
                        "split: fit the prior on other data (no text-audio pairs may leak)")
    texts, images = image_text_pairs(config.data, p.split)
    if p.kind == "ridge":
        return RidgePrior.fit(texts, images, p.ridge_l2)
    return RetrievalPrior(unit(images).astype(np.float32), int(p.top_k))


def _same_clips(prior_data: ml_collections.ConfigDict, data: ml_collections.ConfigDict,
                split: str) -> bool:
    """Whether the prior's training split is ``split`` of the generator's dataset."""
    return (prior_data.name == data.name and prior_data.train_split == split
            and Path(prior_data.data_dir).resolve() == Path(data.data_dir).resolve())


def describe_prior(config: ml_collections.ConfigDict) -> str:
    """What ``config.clipsonic.prior`` names, in words."""
    p = config.clipsonic.prior
    if p.kind == "diffusion":
        return f"diffusion prior {p.checkpoint} ({p.steps} DDIM steps, best of {p.best_of})"
    return f"{p.kind} prior fitted on the {p.split} split of {config.data.data_dir}"
