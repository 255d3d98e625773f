"""A 16 kHz HiFi-GAN (V1: upsampling 8 x 8 x 2 x 2 = the 256-sample hop, 512 initial channels,
13.9 M generator parameters) trained on MUSIC's waveforms against the multi-period and
multi-scale discriminators, reading the log-mel CLIPSonic's configs generate (80 Slaney bands to
8 kHz, n_fft 1024, hop 256, centred). For the inverse-STFT generator start from
``default_config("istft")`` as ``configs/vocoder_demo.py`` does (its fields differ).

    python -m clipsep_jax.main --config=configs/music_hifigan.py --workdir=runs/music_hifigan

then ``python -m clipsep_jax.generate --workdir=CLIPSONIC_RUN --vocoder=runs/music_hifigan ...``
or ``--config.clipsonic.eval.vocoder=runs/music_hifigan`` for CLIPSonic's evaluation table.
HiFi-GAN's recipe: AdamW (2e-4, betas 0.8 / 0.99, weight decay 0.01), batch 16 of 8,192-sample
segments, mel weight 45, the adversarial losses from the first step.
"""

from clipsep_jax.config import default_config


def get_config():
    config = default_config("hifigan")
    config.data.name = "music"
    config.train.batch_size = 16
    config.train.num_steps = 500_000
    config.train.lr_decay_end_step = 500_000
    config.train.lr_decay_end_multiplier = 0.1
    config.train.checkpoint_every_steps = 5000
    config.train.validation_every_steps = 5000
    return config
