"""Old import path of :mod:`clipsep_jax.encoders.clip`: ``import clipsep_jax.clip`` gives that
module itself, so ``from clipsep_jax.clip import CLIP`` goes on working."""

import sys

from clipsep_jax.encoders import clip

sys.modules[__name__] = clip
