"""Contrastive language-audio pretraining (CLAP) of a Flax CLAP on a prepared dataset (issue 15):
a small model for the demo, the weak-supervision separator's frozen encoder when LAION's is not
at hand.

- ``tokenizer``: the byte-level RoBERTa tokenizer without merges that the text tower reads;
- ``model``: the towers and front end of a config, the variables, the examples and CLAP's
  symmetric InfoNCE with multi-positive targets;
- ``family``: the family interface (model kind ``clap``), trained by ``python -m
  clipsep_jax.main``;
- ``evaluation``: zero-shot classification, top-1 and top-3;
- ``trained``: :func:`load_trained_clap`, a trained model as a frozen
  :class:`clipsep_jax.encoders.clap.CLAP`.
"""

from clipsep_jax.families.clap.family import ClapFamily
from clipsep_jax.families.clap.trained import load_trained_clap, save_trained_clap

__all__ = ["FAMILY", "load_trained_clap", "save_trained_clap"]

FAMILY = ClapFamily()
