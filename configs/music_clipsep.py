"""CLIPSep on MUSIC, trained with image queries (the paper's CLIPSep, MUSIC)."""

from clipsep_jax.config import default_config


def get_config():
    config = default_config()
    config.data.name = "music"
    config.model.kind = "clipsep"
    config.query.mode = "image"
    return config
