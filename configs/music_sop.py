"""The SOP baseline (Sound of Pixels, as the CLIPSep paper trains it) on MUSIC: image queries are
frozen ImageNet ResNet-18 frame vectors (last stage dilated, max-pooled over space, averaged over
the query's 3 frames) through CLIPSep's query head; the reference's hyperparameters (those of its
train.py: batch 32, Adam 1e-3 with 5k warm-up steps and linear decay to 0.1x at 100k, 200k
steps, k = 32, binary weighted masks).

Prepare the dataset with the ResNet's vectors beside CLIP's:
  python -m data_prep.build --dataset=music --manual_dir=IN --data_dir=OUT \\
      --resnet=timm/resnet18.tv_in1k
"""

from clipsep_jax.config import default_config


def get_config():
    config = default_config("sop")  # query.encoder resnet, encoder_model timm/resnet18.tv_in1k
    config.data.name = "music"
    return config
