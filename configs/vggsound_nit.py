"""CLIPSep-NIT on VGGSound (the paper's main model; the reference's README command)."""

from clipsep_jax.config import default_config


def get_config():
    config = default_config()
    config.data.name = "vggsound"
    config.model.kind = "clipsep_nit"
    config.model.num_noise_heads = 2
    config.query.mode = "image"
    return config
