"""Neural vocoders for CLIPSonic's log-mels (issue 17): HiFi-GAN's generator (:mod:`.hifigan`,
with a converter for the reference's checkpoints) and a frame-rate inverse-STFT generator
(:mod:`.istft`), trained against HiFi-GAN's discriminators (:mod:`.discriminators`) by
``python -m clipsep_jax.main`` (model kinds ``hifigan`` and ``istft``), evaluated by resynthesising
real clips against Griffin-Lim (:mod:`.evaluation`), and used by ``python -m
clipsep_jax.generate --vocoder``.
"""

from clipsep_jax.families.vocoder.family import VocoderFamily

FAMILY = VocoderFamily()
