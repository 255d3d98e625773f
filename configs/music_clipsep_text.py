"""CLIPSep on MUSIC trained with text queries (the paper's CLIPSep-Text)."""

from clipsep_jax.config import default_config


def get_config():
    config = default_config()
    config.data.name = "music"
    config.model.kind = "clipsep"
    config.query.mode = "text"
    return config
