"""The weak-supervision demo: a text-queried separator trained on mixtures of 2-3 instruments
with templated captions and no clean sources, scored by a CLAP trained here first.

    python -m clipsep_jax.main --config=configs/weak_demo.py --workdir=runs/weak_demo

Two stages, both on the plain synth_music of the generative demos (``data/synth_plain``, rendered
on first use), on disjoint halves of its training clips:

1. ``configs/weak_demo.py:clap`` in ``runs/weak_demo_clap`` (a prerequisite; reused once
   trained): the CLAP demo's small CLAP trained contrastively on the even training clips of
   single instruments, then its zero-shot 11-way accuracy on the test clips and on the held_out
   clips (another soundfont);
2. the separator (``weaksep``) on the odd training clips: each example mixes two natural
   mixtures of 2-3 distinct instruments, captioned "The sound mixture of A and B[ and C]", with
   clauses "The sound of A", ...; the loss (0.5 CNT + 5 (URL + CRL)) sees only the two mixtures'
   sums, never a single instrument. Then its test table: 2-source mixtures of test clips, each
   source queried with "The sound of {instrument}", against the unprocessed mixture.

Sized for a 2-core CPU: 16 kHz, n_fft 254 (128 bins), hop 128, 1 s crops (128 frames); a 5-level
U-Net of widths 8..64 with attention at its two innermost levels (8 x 8 and 4 x 4 maps) reading
the CLAP's 128-wide token states; the CLAP's audio tower repeat-pads the 1 s separated clauses to
its 2 s input. ``python -m clipsep_jax.families.weaksep.ablation --config=configs/weak_demo.py``
trains URL only, URL + CRL and the full loss on the same data and prints their tables side by
side.

Measured on a fresh clone, 2-core CPU, from nothing: 9 min 38 s. CLAP zero-shot top-1 0.886
(test) / 0.455 (held_out); the separator's text queries 3.04 ± 0.34 dB SDR against the mixture's
0.00 (88 test mixtures). The ablation (20 min): URL only 2.94, URL + CRL 2.27, full 3.04 dB SDR.
"""

from pathlib import Path

from clipsep_jax.config import default_config, load_config_file, use_plain_synth_music

CLAP_WORKDIR = "runs/weak_demo_clap"


def clap_config():
    """The CLAP demo's model and schedule on the even training clips."""
    config = load_config_file(str(Path(__file__).with_name("clap_demo.py")))
    config.data.train_stride, config.data.train_offset = 2, 0
    config.train.num_steps = 1000
    config.train.lr_decay_end_step = 1000
    return config


def get_config(stage: str = ""):
    if stage == "clap":
        return clap_config()
    if stage:
        raise ValueError(f"configs/weak_demo.py:{stage}: the stages are '' and 'clap'")
    config = default_config("weaksep")
    use_plain_synth_music(config)
    config.data.train_stride, config.data.train_offset = 2, 1
    config.prerequisites = f"configs/weak_demo.py:clap={CLAP_WORKDIR}"

    a = config.audio
    a.n_fft, a.win_length, a.hop_length = 254, 254, 128
    a.crop_samples = 16256  # 127 hops: 128 frames

    m = config.model
    m.num_downs = 5
    m.base_width = 8
    m.out_channels = 16
    m.attention_levels = (3, 4)
    m.num_heads = 4
    m.cond_dim = 128  # the demo CLAP's text width
    m.embedding_dim = 128  # and its joint space

    w = config.weaksep
    w.clap = CLAP_WORKDIR
    w.num_mixtures = 2
    w.clauses_per_mixture = 3
    w.data.min_sources_per_mixture = 2
    # The reference's known problems, fixed here (each a documented option; the reference's
    # behaviour stays the default for parity): targets at the constituents' true scale, a
    # clause prompt repeated in the batch not a negative of itself, no attention to padding.
    w.loss.reference_target_scaling = False
    w.loss.dedup_clauses = True
    m.mask_padding = True
    # The reference weighs 0.5 CNT + 5 (URL + CRL) on n_fft 1022 magnitudes; those of n_fft 254
    # are about 4x smaller (the window's sum), so the reconstruction terms get 4 x 5 to keep the
    # reference's balance. Measured with 5: full loss SDR 2.10 against URL only 2.68.
    w.loss.reconstruction_weight = 20.0

    t = config.train
    t.batch_size = 8
    t.num_steps = 600
    t.learning_rate = 1e-3
    t.lr_schedule = "warmup_cosine"
    t.lr_warmup_steps = 50
    t.lr_decay_end_step = 600
    t.lr_decay_end_multiplier = 0.05
    t.log_every_steps = 100
    t.checkpoint_every_steps = 200
    t.validation_every_steps = 200
    t.keep_checkpoints = 2

    config.eval.after_training = True
    config.eval.split = "test"
    config.eval.batch_size = 16
    config.eval.num_workers = 0
    config.eval.num_audio_examples = 4
    config.mesh.data = -1
    return config
