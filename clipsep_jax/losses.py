"""Old import path of :mod:`clipsep_jax.families.clipsep.losses` (CLIPSep's targets and losses):
``import clipsep_jax.losses`` gives that module itself."""

import sys

from clipsep_jax.families.clipsep import losses

sys.modules[__name__] = losses
