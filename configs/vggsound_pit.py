"""The PIT baseline on VGGSound."""

from clipsep_jax.config import default_config


def get_config():
    config = default_config()
    config.data.name = "vggsound"
    config.model.kind = "pit"
    return config
