"""The registry of model families: ``config.model.kind`` chooses one.

A family is one folder under ``clipsep_jax/families/`` whose ``__init__`` exposes ``FAMILY``, an
instance of :class:`clipsep_jax.families.base.Family`. The generic machinery (training loop,
input pipeline, checkpoints, evaluation and separation commands) asks the registry for the
family of a config and calls only the :class:`~clipsep_jax.families.base.Family` methods; it
never names a model kind. Families are imported when first asked for.
"""

from __future__ import annotations

import importlib

import ml_collections

from clipsep_jax.errors import UserError
from clipsep_jax.families.base import Family

__all__ = ["FAMILY_MODULES", "KINDS", "Family", "family_of_kind", "get_family", "all_kinds"]

# family name -> module exposing FAMILY
FAMILY_MODULES = {"clipsep": "clipsep_jax.families.clipsep",
                  "clipsonic": "clipsep_jax.families.clipsonic",
                  "vocoder": "clipsep_jax.families.vocoder",
                  "prior": "clipsep_jax.families.prior",
                  "clap": "clipsep_jax.families.clap",
                  "weaksep": "clipsep_jax.families.weaksep"}
# model kind -> family name
KINDS = {
    "clipsep": "clipsep",
    "clipsep_nit": "clipsep",
    "pit": "clipsep",
    "labelsep": "clipsep",
    "sop": "clipsep",
    "bertsep": "clipsep",
    "clipsonic": "clipsonic",
    "hifigan": "vocoder",
    "istft": "vocoder",
    "diffusion_prior": "prior",
    "clap": "clap",
    "weaksep": "weaksep",
}


def all_kinds() -> tuple[str, ...]:
    return tuple(KINDS)


def family_of_kind(kind: str) -> Family:
    """The family that builds model kind ``kind``; ValueError naming the field otherwise."""
    if kind not in KINDS:
        raise UserError(f"config.model.kind={kind!r}: expected one of {', '.join(KINDS)}")
    family = importlib.import_module(FAMILY_MODULES[KINDS[kind]]).FAMILY
    if kind not in family.kinds:
        raise RuntimeError(f"registry error: family {family.name!r} does not build {kind!r}")
    return family


def get_family(config: ml_collections.ConfigDict) -> Family:
    """The family of ``config.model.kind``."""
    return family_of_kind(config.model.kind)
