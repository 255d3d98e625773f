"""Frozen query encoders: what turns a text or an image into the vector a model is queried with.

Every encoder has the same interface (:class:`QueryEncoder`): ``from_pretrained(name_or_path)``,
``embedding_dim``, ``encode_text(list_of_strings) -> [B, D]`` and, where it has an image tower,
``encode_image(images) -> [B, D]`` (float32 numpy). :func:`load_encoder` picks one by the name in
``config.query.encoder``; the modules are imported only when asked for.

- ``clip`` (:mod:`clipsep_jax.encoders.clip`): CLIP's text and image towers
  (:mod:`clipsep_jax.encoders.clip_towers`), loaded from Hugging Face checkpoints;
- ``resnet`` (:mod:`clipsep_jax.encoders.resnet`): an ImageNet ResNet-18 (dilated, max-pooled),
  images only: the SOP baseline's frame vectors;
- ``bert`` (:mod:`clipsep_jax.encoders.bert`): a BERT-family text encoder, text only: the
  BERTSep baseline's label vectors.
- ``clap`` (:mod:`clipsep_jax.encoders.clap`): LAION-CLAP's text and audio towers
  (:mod:`clipsep_jax.encoders.clap_towers`), text and audio only (no ``encode_image``), with
  ``encode_audio`` and a differentiable audio path for losses.

:func:`load_query_encoder` loads the encoder a config's ``query`` section names, with its
options. Shared loading and batching code is in :mod:`clipsep_jax.encoders.common`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from clipsep_jax.errors import UserError

__all__ = ["QueryEncoder", "ENCODERS", "encoder_class", "load_encoder", "load_query_encoder"]

# encoder name -> "module:class"
ENCODERS = {
    "clip": "clipsep_jax.encoders.clip:CLIP",
    "resnet": "clipsep_jax.encoders.resnet:ResNet",
    "bert": "clipsep_jax.encoders.bert:BERT",
    "clap": "clipsep_jax.encoders.clap:CLAP",
}


@runtime_checkable
class QueryEncoder(Protocol):
    """What a query encoder provides (CLIP, the ResNet and BERT do)."""

    @property
    def embedding_dim(self) -> int: ...

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """[B] strings -> [B, embedding_dim] float32."""

    def encode_image(self, images: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
        """uint8 RGB images -> [B, embedding_dim] float32 (encoders without an image tower
        raise ValueError)."""


def encoder_class(name: str) -> type:
    """The class registered as ``name`` (config.query.encoder)."""
    if name not in ENCODERS:
        raise UserError(f"config.query.encoder={name!r}: expected one of {', '.join(ENCODERS)}")
    module, cls = ENCODERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def load_encoder(name: str, name_or_path: str, **kwargs: Any) -> QueryEncoder:
    """``encoder_class(name).from_pretrained(name_or_path, **kwargs)``."""
    return encoder_class(name).from_pretrained(name_or_path, **kwargs)


def encoder_options(query: Any) -> dict[str, Any]:
    """The options of ``query.encoder`` that a config's ``query`` section sets."""
    if query.encoder == "bert":
        return {"pooling": query.bert_pooling}
    return {}


def load_query_encoder(query: Any, name_or_path: str | None = None,
                       **kwargs: Any) -> QueryEncoder:
    """The encoder a config's ``query`` section names (``encoder``, ``encoder_model`` unless
    ``name_or_path`` is given, and its options)."""
    return load_encoder(query.encoder, name_or_path or query.encoder_model,
                        **encoder_options(query), **kwargs)
