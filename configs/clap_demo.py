"""The CLAP demo: contrastive language-audio pretraining of a small Flax CLAP (HTSAT audio tower,
RoBERTa text tower, byte-level tokenizer) on the CLIPSonic demo's synth_music dataset
(``data/synth_plain``, prepared on first use with the same settings, so the two share it), with
captions such as "The sound of cello" made from the clips' labels; then zero-shot classification
of the test clips and of the held_out clips (another soundfont) among the 11 instruments by
cosine similarity to "The sound of {label}".

    python -m clipsep_jax.main --config=configs/clap_demo.py --workdir=runs/clap_demo

Sized for a 2-core CPU. The model reads 16 kHz audio, the dataset's rate: LAION's CLAP resamples
to 48 kHz for a 64-bin log-mel up to 14 kHz, but the synthesised clips hold nothing above 8 kHz
and resampling would triple the front end's cost, so the demo's front end is a 32-bin log-mel of
50-8,000 Hz at 16 kHz (512-sample window, hop 256): 128 frames per 2.03 s crop, folded into
the 64 x 64 square of a three-stage HTSAT. Load the trained model as a frozen CLAP with
``clipsep_jax.families.clap.load_trained_clap("runs/clap_demo")``.

Measured on a 2-core CPU shared with another run, from the prepared dataset: 4 min 6 s in all
(1,500 steps of 32 pairs, about 7 steps/s). Zero-shot top-1 / top-3 among the 11 instruments
(chance 0.091 / 0.273): test clips 0.977 / 1.000, held_out clips (a soundfont training never
heard) 0.455 / 0.818. With ``--config.clap.duplicates=ignore`` (same-label captions as
negatives): 0.989 / 1.000 and 0.545 / 0.795, a difference of one to four clips.
"""

from clipsep_jax.config import default_config, use_plain_synth_music


def get_config():
    config = default_config("clap")
    use_plain_synth_music(config)

    m = config.model
    m.text_hidden_size = 128
    m.text_layers = 2
    m.text_heads = 4
    m.text_intermediate_size = 256
    m.text_max_positions = 80  # 77 tokens per caption, as LAION's
    m.sample_rate = 16000
    m.num_mel_bins = 32
    m.fft_window_size = 512
    m.hop_length = 256
    m.clip_samples = 32512  # 127 hops: 128 frames
    m.frequency_min = 50.0
    m.frequency_max = 8000.0
    m.spec_size = 64
    m.patch_size = 4
    m.window_size = 4
    m.audio_embed_dim = 32
    m.audio_depths = (1, 1, 1)
    m.audio_heads = (2, 4, 8)
    m.projection_dim = 128

    config.train.batch_size = 32
    config.train.num_steps = 1500
    config.train.learning_rate = 1e-3
    config.train.lr_schedule = "warmup_cosine"
    config.train.lr_warmup_steps = 100
    config.train.lr_decay_end_step = 1500
    config.train.lr_decay_end_multiplier = 0.05
    config.train.log_every_steps = 100
    config.train.checkpoint_every_steps = 500
    config.train.validation_every_steps = 500
    config.train.keep_checkpoints = 2

    config.eval.after_training = True
    config.eval.split = "test"
    config.eval.extra_splits = "held_out"
    config.eval.batch_size = 32
    config.mesh.data = -1
    return config
