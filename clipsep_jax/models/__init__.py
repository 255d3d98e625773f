"""Old import path of :mod:`clipsep_jax.families.clipsep.model` (``forward``, ``init_variables``,
``build_model``): ``import clipsep_jax.models`` gives that module itself."""

import sys

from clipsep_jax.families.clipsep import model

sys.modules[__name__] = model
