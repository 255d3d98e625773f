"""The embedded demo: prepare synth_music on first use, train a small CLIPSep with hybrid
image/text queries, evaluate on the test split and on the held-out soundfont's split, write
example separations.

    python -m clipsep_jax.main --config=configs/demo.py --workdir=runs/demo

Sized for a 2-core CPU (about 9 minutes in all, see the README); nothing is downloaded (the
soundfonts come with the set-up's Debian packages). Frames
are embedded by CLIP ViT-B/32 when its weights are in the local Hugging Face cache, otherwise by
a random-weight small CLIP made on the spot (hybrid training teaches the model both kinds of
query either way).
"""

from clipsep_jax.config import default_config


def get_config():
    config = default_config()
    config.data.name = "synth_music"
    config.data.data_dir = "data/tfds"
    config.data.prepare_if_missing = True
    config.data.synth_clips_per_class = (16, 3, 4, 4)  # train, val, test, held_out
    config.data.synth_seconds = 8.0
    config.data.num_workers = 0  # grain threads; worker processes only compete for 2 cores
    config.data.cache_in_memory = True  # about 0.6 GB; decompressing records costs more than
    # the model's step on 2 cores otherwise

    config.audio.crop_samples = 16383  # 64 STFT frames (about 1 s)
    config.audio.num_log_freq_bins = 128  # half the reference's 256: twice the steps per minute
    config.query.frame_margin_seconds = 1.0
    config.query.mode = "hybrid"
    config.model.num_downs = 6
    config.model.base_width = 16
    config.model.num_mask_channels = 16

    config.train.batch_size = 16
    config.train.num_steps = 4000
    config.train.learning_rate = 4e-3
    config.train.lr_warmup_steps = 100
    config.train.lr_decay_end_step = 4000
    config.train.lr_decay_end_multiplier = 0.1
    config.train.log_every_steps = 50
    config.train.checkpoint_every_steps = 500
    config.train.validation_every_steps = 2000
    config.train.validation_sdr_examples = 32
    config.train.keep_checkpoints = 2

    config.eval.after_training = True
    config.eval.extra_splits = "held_out"  # FluidR3_GM, a soundfont training never hears
    config.eval.num_audio_examples = 4
    config.eval.batch_size = 16
    config.mesh.data = -1
    return config
