"""The one configuration schema of clipsep-jax.

Every hyperparameter of the reference implementation (sony/CLIPSep) has a name here; the files in
``configs/`` start from :func:`default_config` and override what their experiment changes. Command
lines override single fields (``--config.model.num_mask_channels=16``); ml_collections refuses keys
that are not in this schema.
"""

from __future__ import annotations

import ml_collections

MODEL_KINDS = ("clipsep", "clipsep_nit", "pit", "labelsep")


def default_config() -> ml_collections.ConfigDict:
    """Returns the reference's CLIPSep configuration (MUSIC, image queries, N = 2)."""
    config = ml_collections.ConfigDict()

    # Number of sources mixed per training example (the reference's n_mix).
    config.num_sources = 2

    config.audio = ml_collections.ConfigDict()
    config.audio.sample_rate = 16000  # Hz
    config.audio.crop_samples = 65535  # training crop, about 4.1 s
    config.audio.n_fft = 1024
    config.audio.hop_length = 256
    config.audio.win_length = 1024
    config.audio.log_freq = True  # warp 513 linear bins to a log-frequency axis
    config.audio.num_log_freq_bins = 256
    config.audio.mixture_epsilon = 1e-10  # added to the mixture magnitude before the log
    # Training gain: each source is scaled by U(min, max), clipped to [-1, 1], divided by N.
    config.audio.gain_min = 0.5
    config.audio.gain_max = 1.5

    config.model = ml_collections.ConfigDict()
    config.model.kind = "clipsep"  # one of MODEL_KINDS
    config.model.num_downs = 7  # U-Net levels (the reference's `layers`; at least 5)
    config.model.base_width = 64  # channels of the outermost level (the reference's ngf)
    config.model.num_mask_channels = 32  # k: intermediate masks (the reference's `channels`)
    config.model.query_dim = 512  # CLIP embedding size
    config.model.num_labels = 11  # LabelSep: rows of the label-embedding table
    config.model.num_noise_heads = 2  # CLIPSep-NIT
    # Computation dtype of convolutions and matmuls; parameters and BatchNorm stay float32.
    config.model.compute_dtype = "float32"
    config.model.batch_norm_momentum = 0.1  # PyTorch convention: weight of the new batch
    config.model.batch_norm_epsilon = 1e-5
    # How each up level's upsampling + 3x3 convolution is computed (the same function):
    # "taps_first" mixes channels at the lower resolution (a quarter of the multiply-adds),
    # "upsample_first" is the reference's order.
    config.model.up_conv_formulation = "taps_first"
    config.model.fusion = "late"  # query head: the reference's late fusion (the only one used)

    config.loss = ml_collections.ConfigDict()
    config.loss.binary_mask = True  # False: ratio masks |S_n| / sum_m |S_m| as soft targets
    config.loss.binary_mask_threshold = 0.5  # target = |S_n| > threshold * |mixture|
    config.loss.weighted = True  # weight = clip(log1p(|mixture|), weight_min, weight_max)
    config.loss.weight_min = 1e-3
    config.loss.weight_max = 10.0

    # Noise invariant training (CLIPSep-NIT). Names follow the reference's flags.
    config.nit = ml_collections.ConfigDict()
    config.nit.warmup_steps = 0  # steps trained on query masks alone (pit_warmup_steps)
    config.nit.reg_coef = 0.0  # noise-head-must-help regulariser (off in the reference)
    config.nit.reg_epsilon = 0.1
    config.nit.activation_reg_coef = 0.1  # reg2_coef: penalises busy noise heads
    config.nit.activation_reg_epsilon = 0.25  # reg2_epsilon

    config.query = ml_collections.ConfigDict()
    config.query.mode = "image"  # image | text | hybrid (hybrid: image on even steps)
    config.query.num_frames = 3  # frames averaged into an image query
    config.query.frame_stride = 1
    config.query.fps = 1.0
    config.query.frame_margin_seconds = 3.0  # training centre frame avoids the clip's ends
    config.query.text_template = "a photo of {}"
    config.query.clip_model = "openai/clip-vit-base-patch32"
    config.query.image_size = 224  # CLIP input frames (the reference's img_size)

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 32  # global batch over all hosts
    config.train.num_steps = 200_000
    config.train.learning_rate = 1e-3
    config.train.lr_warmup_steps = 5_000
    config.train.lr_decay_end_step = 100_000
    config.train.lr_decay_end_multiplier = 0.1
    config.train.grad_norm_clip = 1.0
    config.train.adam_b1 = 0.9
    config.train.adam_b2 = 0.999
    config.train.adam_eps = 1e-8
    config.train.validation_every_steps = 10_000
    config.train.seed = 1234
    config.train.num_validation_examples = 0  # 0: the whole validation split (n_validation)
    config.train.validation_sdr_examples = 64  # fixed subset scored with image and text queries
    config.train.num_summary_examples = 3  # validation examples written as pictures and audio
    config.train.log_every_steps = 100
    config.train.checkpoint_every_steps = 1000
    config.train.keep_checkpoints = 3  # the last K, plus the best by validation loss
    config.train.profile_start_step = -1  # >= 0: trace profile_num_steps steps from here
    config.train.profile_num_steps = 5
    # The reference's drop_closest: drop this many most-similar pairs per batch after
    # drop_closest_steps (off by default there and here).
    config.train.drop_closest = 0
    config.train.drop_closest_steps = 10_000

    # The dataset written by data_prep (TFDS ArrayRecord) and how it is read.
    config.data = ml_collections.ConfigDict()
    config.data.name = "music"  # music | vggsound | a builder of the same features
    config.data.data_dir = ""  # TFDS data dir (data_prep's --data_dir)
    config.data.train_split = "train"
    config.data.val_split = "val"
    config.data.test_split = "test"
    config.data.num_workers = 8  # input worker processes per host (the reference's workers)
    config.data.cache_in_memory = False  # keep decoded records (datasets that fit in memory)
    # Build the dataset on first use when it is missing (synth_music only: it needs no input).
    config.data.prepare_if_missing = False
    config.data.synth_clips_per_class = (16, 3, 4)  # synth_music: train, val, test per class
    config.data.synth_seconds = 8.0
    config.data.synth_seed = 0

    # Evaluation (python -m clipsep_jax.evaluate): test mixtures as the reference builds them.
    config.eval = ml_collections.ConfigDict()
    config.eval.split = "test"  # the queried clips (the reference's test list)
    config.eval.interference_split = ""  # where interfering clips come from ("": eval.split)
    config.eval.num_sources = 2  # clips per test mixture; > 2: the interferers are averaged
    config.eval.num_examples = 0  # 0: one mixture per clip of eval.split (n_evaluation)
    config.eval.seed = 0  # draws the interfering clips of mixture i from (seed, i)
    # image, text ("a photo of {label}"), text_ensemble (the reference's five prompts averaged)
    config.eval.query_modes = "image,text,text_ensemble"
    config.eval.binary_masks = True  # threshold the predicted masks (the paper's evaluation)
    config.eval.threshold = 0.5
    config.eval.metric = "museval"  # museval (BSSEval v4, whole signal) | mir_eval (v3)
    config.eval.fast_metrics = True  # compute the metric with fast_bss_eval
    config.eval.check_examples = 8  # also scored by the metric's own library; gap reported
    config.eval.batch_size = 32  # mixtures per model call
    config.eval.num_workers = -1  # metric worker processes (-1: one per CPU, 0: in-process)
    config.eval.after_training = False  # python -m clipsep_jax.main evaluates when training ends
    config.eval.num_audio_examples = 0  # mixtures written as audio and pictures with the table

    # Device mesh (clipsep_jax/sharding.py): the batch is split over data x fsdp devices;
    # parameters and optimizer state of at least fsdp_min_size elements are split over fsdp.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # -1: all devices that fsdp leaves
    config.mesh.fsdp = 1
    config.mesh.fsdp_min_size = 2**14

    return config


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field when a configuration cannot describe a model."""
    kind = config.model.kind
    if kind not in MODEL_KINDS:
        raise ValueError(f"config.model.kind={kind!r}: expected one of {', '.join(MODEL_KINDS)}")
    if config.model.num_downs < 5:
        raise ValueError(f"config.model.num_downs={config.model.num_downs}: the U-Net needs >= 5")
    if config.num_sources < 1:
        raise ValueError(f"config.num_sources={config.num_sources}: must be >= 1")
    if kind == "clipsep_nit" and config.model.num_noise_heads < config.num_sources:
        raise ValueError(
            f"config.model.num_noise_heads={config.model.num_noise_heads} is smaller than "
            f"config.num_sources={config.num_sources}: every query needs its own noise head"
        )
    if config.model.compute_dtype not in ("float32", "bfloat16"):
        raise ValueError(
            f"config.model.compute_dtype={config.model.compute_dtype!r}: "
            "expected float32 or bfloat16"
        )
    if config.model.up_conv_formulation not in ("taps_first", "upsample_first"):
        raise ValueError(
            f"config.model.up_conv_formulation={config.model.up_conv_formulation!r}: "
            "expected taps_first or upsample_first"
        )
    if config.model.fusion != "late":
        raise ValueError(f"config.model.fusion={config.model.fusion!r}: only 'late' is built")
    if config.query.mode not in ("image", "text", "hybrid"):
        raise ValueError(
            f"config.query.mode={config.query.mode!r}: expected image, text or hybrid"
        )
    if config.train.drop_closest:
        raise ValueError("config.train.drop_closest: dropping closest pairs is not built yet")
    if config.eval.metric not in ("museval", "mir_eval"):
        raise ValueError(f"config.eval.metric={config.eval.metric!r}: expected museval or "
                         "mir_eval")
    if config.audio.n_fft // 2 + 1 < 2 or config.audio.hop_length < 1:
        raise ValueError("config.audio: n_fft must be >= 2 and hop_length >= 1")
