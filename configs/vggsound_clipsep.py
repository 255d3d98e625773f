"""CLIPSep on VGGSound, trained with image queries."""

from clipsep_jax.config import default_config


def get_config():
    config = default_config()
    config.data.name = "vggsound"
    config.model.kind = "clipsep"
    config.query.mode = "image"
    return config
