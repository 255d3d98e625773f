"""The CLIPSep family (Dong et al., ICLR 2023): CLIPSep, CLIPSep-NIT and the PIT and LabelSep
baselines.

- ``model``: ``forward`` (the reference's model forward and loss), ``init_variables``;
  ``networks``, ``unet``, ``layers``: the Flax modules;
- ``losses``: targets, BCE, the permutation-minimum NIT and PIT losses;
- ``data``: mix-and-separate examples from prepared clips;
- ``evaluation``: test mixtures and the paper's tables;
- ``separator``: ``Separator``, separating recordings with text or image queries;
- ``convert``: the reference's PyTorch checkpoints;
- ``family``: all of it behind :class:`clipsep_jax.families.base.Family` (``FAMILY``).
"""

from clipsep_jax.families.clipsep.family import CLIPSepFamily

FAMILY = CLIPSepFamily()
