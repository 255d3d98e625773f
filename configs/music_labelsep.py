"""The LabelSep baseline on MUSIC: a learned embedding per instrument label."""

from clipsep_jax.config import default_config


def get_config():
    config = default_config()
    config.data.name = "music"
    config.model.kind = "labelsep"
    config.model.num_labels = 11
    return config
