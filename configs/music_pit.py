"""The PIT baseline on MUSIC: N masks, permutation-minimum loss, no queries."""

from clipsep_jax.config import default_config


def get_config():
    config = default_config()
    config.data.name = "music"
    config.model.kind = "pit"
    return config
