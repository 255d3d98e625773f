"""The weakly supervised separator on VGGSound: as ``configs/music_weaksep.py`` (the same MODEs)
on the VGGSound dataset of ``python -m data_prep.build --dataset=vggsound`` (labels as the
reference's index files write them: ", " becomes " ", see
``clipsep_jax.families.weaksep.captions.vggsound_index_label``).

    python -m clipsep_jax.main --config=configs/vggsound_weaksep.py[:MODE] \
        --workdir=runs/vggsound_weak --config.data.data_dir=DATA
"""

from pathlib import Path

from clipsep_jax.config import load_config_file


def get_config(mode: str = "unsupervised"):
    config = load_config_file(f"{Path(__file__).with_name('music_weaksep.py')}:{mode}")
    config.data.name = "vggsound"
    return config
