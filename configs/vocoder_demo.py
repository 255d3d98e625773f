"""The vocoder demo: a small inverse-STFT vocoder trained on the CLIPSonic demo's dataset
(``data/synth_plain``, prepared on first use) with CLIPSonic's mel settings, then evaluated by
resynthesising the real test clips against Griffin-Lim (log-mel distance, the project's
classifier's accuracy and Frechet distance).

    python -m clipsep_jax.main --config=configs/vocoder_demo.py --workdir=runs/vocoder_demo

Sized for a 2-core CPU. CLIPSonic's demo uses it for its waveforms with
``--config.clipsonic.eval.vocoder=runs/vocoder_demo`` (see the README).
"""

from clipsep_jax.config import default_config, use_plain_synth_music


def get_config():
    config = default_config("istft")
    use_plain_synth_music(config)

    config.model.dim = 128
    config.model.depth = 4
    config.model.discriminator_width_divisor = 8

    # Segments of 2 s (128 hops): trained on 8,192-sample segments the generator learnt phases
    # that rely on the segment's edges (its receptive field spans them) and lost to Griffin-Lim
    # on 2 s test crops (log-mel distance 0.276 against 0.215); on 2 s segments it does not.
    config.audio.crop_samples = 32768
    config.train.batch_size = 4
    # The discriminators cost about 100x the generator on 2 CPU cores: the demo trains on the mel
    # loss alone (a full run sets this to 0, as HiFi-GAN does).
    config.vocoder.loss.adversarial_start_step = 9000
    config.train.num_steps = 9000
    config.train.learning_rate = 2e-3
    config.train.lr_warmup_steps = 100
    config.train.lr_decay_end_step = 9000
    config.train.lr_decay_end_multiplier = 0.05
    config.train.log_every_steps = 200
    config.train.checkpoint_every_steps = 3000
    config.train.validation_every_steps = 3000
    config.train.keep_checkpoints = 2

    config.eval.after_training = True
    config.eval.batch_size = 16
    config.eval.num_audio_examples = 4
    config.mesh.data = -1
    return config
