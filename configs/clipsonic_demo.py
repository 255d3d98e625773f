"""The CLIPSonic demo: on a synth_music dataset of its own (prepared on first use, as
configs/demo.py does), train a small 1D diffusion denoiser of log-mels conditioned on the CLIP
embedding of the clips' frames, then evaluate: the project's classifier, and generations queried
with images (IQ), with text (ZS) and with text through a ridge-regression prior (PD) at two
guidance scales.

    python -m clipsep_jax.main --config=configs/clipsonic_demo.py --workdir=runs/clipsonic_demo

Sized for a 2-core CPU. Its dataset differs from the separation demo's: 64 training clips per
instrument (and 3 / 8 / 4 for val, test and held_out) rendered plainly (``synth_vary=False``:
each instrument's own program, no performance or recording variation). The generation metrics
need a classifier that scores >= 0.95 on real 2-second test crops, and a classifier trained from
scratch does not get there on the varied 16-clip set: 0.66 on its test crops (0.86 with 64
varied clips per instrument, 0.90 with 160), against 0.98 with 64 plain clips (measured with
this module's classifier). With the demo's random-weight CLIP (no weights downloaded), text and
image embeddings live in unrelated spaces, so ZS shows what a text query does to a model that
only saw image embeddings, not what CLIP's shared space gives; PD maps the text into the image
space with a prior fitted on other clips' image-text pairs.
"""

from clipsep_jax.config import default_config, use_plain_synth_music


def get_config():
    config = default_config("clipsonic")
    use_plain_synth_music(config)

    config.audio.crop_samples = 32767  # 128 mel frames, about 2 s
    config.query.mode = "image"
    config.query.frame_margin_seconds = 1.0
    config.model.widths = (64, 128, 128)
    config.model.blocks_per_level = 1
    config.model.embedding_dim = 128

    config.train.batch_size = 16
    config.train.num_steps = 6000
    config.train.learning_rate = 1e-3
    config.train.lr_schedule = "warmup_cosine"
    config.train.lr_warmup_steps = 200
    config.train.lr_decay_end_step = 6000
    config.train.ema_decay = 0.995
    config.train.log_every_steps = 100
    config.train.checkpoint_every_steps = 2000
    config.train.validation_every_steps = 3000
    config.train.keep_checkpoints = 2

    config.clipsonic.eval.steps = 25
    config.clipsonic.eval.guidance = "1,5"
    # CLIPSonic-PD: text embeddings mapped into the image space by ridge regression fitted on
    # the held_out split's frames and label prompts (other clips, another soundfont).
    config.clipsonic.prior.kind = "ridge"
    config.clipsonic.prior.split = "held_out"
    config.eval.after_training = True
    config.eval.batch_size = 16
    config.eval.num_audio_examples = 4  # the first labels as text queries (ZS and PD)
    config.mesh.data = -1
    return config
