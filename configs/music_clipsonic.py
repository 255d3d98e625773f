"""CLIPSonic on MUSIC: a 1D diffusion denoiser of 80-band log-mels (2 s crops) conditioned on
the CLIP image embedding of the crop's frames (CLIPSonic-IQ; query it with text for -ZS). Set
``--config.query.mode=text`` for CLIPSonic-SD (label-prompt conditioning).

Train with python -m clipsep_jax.main, generate with python -m clipsep_jax.generate, and
python -m clipsep_jax.evaluate prints the generation table (the project's classifier's
relevance and Frechet distance per query mode and guidance scale).
"""

from clipsep_jax.config import default_config


def get_config():
    config = default_config("clipsonic")
    config.data.name = "music"
    config.train.batch_size = 32
    config.train.num_steps = 200_000
    config.train.lr_warmup_steps = 1000
    config.train.lr_schedule = "warmup_cosine"
    config.train.lr_decay_end_step = 200_000
    return config
