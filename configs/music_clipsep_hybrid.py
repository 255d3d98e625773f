"""CLIPSep on MUSIC, image queries on even steps and text on odd (CLIPSep-Hybrid)."""

from clipsep_jax.config import default_config


def get_config():
    config = default_config()
    config.data.name = "music"
    config.model.kind = "clipsep"
    config.query.mode = "hybrid"
    return config
