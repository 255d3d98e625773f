"""The weakly supervised separator on AudioCaps (the paper's main setting): each constituent is
one natural 10 s clip, its prompt the caption, its P = 3 clauses chosen from the caption's split
clauses (fewer: duplicated with weights 1 / copies, the reference's rule); no clean source.
Prepare the data with ``python -m data_prep.build --dataset=audiocaps --manual_dir=IN
--data_dir=DATA`` (AudioCaps' CSVs and the clips' audio or video files).

    python -m clipsep_jax.main --config=configs/audiocaps_weaksep.py \
        --workdir=runs/audiocaps_weak --config.data.data_dir=DATA

Test mixtures pair each test caption's clip with another clip, both queried with their captions.
AudioCaps has no labels: the supervised and semi-supervised modes need a labelled split
(``weaksep.supervised_split`` of a labelled dataset), which this config does not set.
"""

from pathlib import Path

from clipsep_jax.config import load_config_file


def get_config():
    config = load_config_file(str(Path(__file__).with_name("music_weaksep.py")))
    config.data.name = "audiocaps"
    config.weaksep.clauses_per_mixture = 3
    config.weaksep.data.min_sources_per_mixture = 1
    return config
