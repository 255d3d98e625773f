"""The diffusion prior demo: DALLE2-pytorch's prior network (small) trained on the image-text
pairs of the CLIPSonic demo dataset's ``held_out`` split (other melodies, another soundfont: not
the generator's training clips), then evaluated on the ``val`` split against the ridge and
retrieval priors fitted on the same pairs.

    python -m clipsep_jax.main --config=configs/prior_demo.py --workdir=runs/prior_demo

CLIPSonic's demo uses it for its PD rows with ``--config.clipsonic.prior.kind=diffusion
--config.clipsonic.prior.checkpoint=runs/prior_demo`` (see the README). Sized for a 2-core CPU.
"""

from clipsep_jax.config import default_config, use_plain_synth_music


def get_config():
    config = default_config("diffusion_prior")
    use_plain_synth_music(config)
    config.data.train_split = "held_out"

    config.model.dim = 512  # the demo's CLIP (ViT-B/32 layout, random weights)
    config.model.depth = 2
    config.model.heads = 4

    config.train.batch_size = 32
    config.train.num_steps = 2000
    config.train.learning_rate = 3e-4
    config.train.lr_decay_end_step = 2000
    config.train.log_every_steps = 200
    config.train.checkpoint_every_steps = 1000
    config.train.validation_every_steps = 1000
    config.train.keep_checkpoints = 2

    config.eval.split = "val"
    config.eval.after_training = True
    config.eval.num_audio_examples = 0
    config.mesh.data = -1
    return config
