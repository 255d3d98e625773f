"""CLIPSep-NIT on MUSIC: two noise heads, permutation-minimum loss."""

from clipsep_jax.config import default_config


def get_config():
    config = default_config()
    config.data.name = "music"
    config.model.kind = "clipsep_nit"
    config.model.num_noise_heads = 2
    config.query.mode = "image"
    return config
