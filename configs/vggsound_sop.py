"""The SOP baseline on VGGSound: frozen ImageNet ResNet-18 frame vectors as image queries
(see configs/music_sop.py), the reference's hyperparameters.

  python -m data_prep.build --dataset=vggsound --manual_dir=IN --data_dir=OUT \\
      --resnet=timm/resnet18.tv_in1k
"""

from clipsep_jax.config import default_config


def get_config():
    config = default_config("sop")
    config.data.name = "vggsound"
    return config
