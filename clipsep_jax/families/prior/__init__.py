"""CLIPSonic-PD's text -> image embedding diffusion prior as a model family (kind
``diffusion_prior``): DALLE2-pytorch's prior network in Flax (:mod:`.network`), LAION's
checkpoints (:mod:`.convert`), its training pairs, loss and a loaded prior (:mod:`.model`), and
the family (:mod:`.family`): trained by ``python -m clipsep_jax.main``, used by CLIPSonic with
``config.clipsonic.prior.kind="diffusion"``.
"""

from clipsep_jax.families.prior.family import PriorFamily

FAMILY = PriorFamily()
