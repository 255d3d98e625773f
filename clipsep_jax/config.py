"""The one configuration schema of clipsep-jax: shared sections plus the model family's.

Shared: ``num_sources``, ``audio`` (the front end), ``query`` (the query encoder and how queries
are formed), ``train`` (optimizer, schedule, loop), ``data``, ``eval``, ``mesh``. The family of
``model.kind`` (:mod:`clipsep_jax.families`) supplies ``model`` and its own section (CLIPSep:
``config.clipsep.loss`` and ``config.clipsep.nit``). The files in ``configs/`` start from
:func:`default_config` and override what their experiment changes. Command lines override single
fields (``--config.model.num_mask_channels=16``); ml_collections refuses keys that are not in the
schema. :func:`validate` checks every field with a fixed set of choices, in one pass.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from clipsep_jax.encoders import ENCODERS
from clipsep_jax.errors import UserError
from clipsep_jax.families import all_kinds, family_of_kind
from clipsep_jax.families.base import check_choices

# Every model kind of every registered family.
MODEL_KINDS = all_kinds()


def default_config(kind: str = "clipsep") -> ml_collections.ConfigDict:
    """The shared sections, plus ``config.model`` and the family section of model ``kind``
    (default: the reference's CLIPSep configuration: MUSIC, image queries, N = 2)."""
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

    # The model: config.model.kind chooses the family (clipsep_jax.families), which supplies the
    # rest of this section and its own section config.<family name>.
    family = family_of_kind(kind)
    config.model = family.model_config(kind)
    section = family.family_config()
    if section is not None:
        config[family.name] = section

    config.query = ml_collections.ConfigDict()
    config.query.mode = "image"  # image | text | hybrid (hybrid: image on even steps)
    config.query.num_frames = 3  # frames averaged into an image query
    config.query.frame_stride = 1
    config.query.fps = 1.0
    config.query.frame_margin_seconds = 3.0  # training centre frame avoids the clip's ends
    config.query.text_template = "a photo of {}"
    config.query.encoder = "clip"  # clipsep_jax.encoders: what embeds text and image queries
    config.query.encoder_model = "openai/clip-vit-base-patch32"  # its hub id or local folder
    config.query.image_size = 224  # CLIP input frames (the reference's img_size)
    # BERT encoders (BERTSep): how a text's token states become one vector: mean | cls | pooler
    config.query.bert_pooling = "mean"

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 32  # global batch over all hosts
    config.train.num_steps = 200_000
    config.train.learning_rate = 1e-3  # peak
    # warmup_linear (the reference's: linear rise, linear fall to lr_decay_end_multiplier at
    # lr_decay_end_step, then flat), warmup_cosine (to lr_decay_end_multiplier at
    # lr_decay_end_step), constant (after the warm-up)
    config.train.lr_schedule = "warmup_linear"
    config.train.lr_warmup_steps = 5_000
    config.train.lr_decay_end_step = 100_000
    config.train.lr_decay_end_multiplier = 0.1
    config.train.grad_norm_clip = 1.0
    config.train.adam_b1 = 0.9
    config.train.adam_b2 = 0.999
    config.train.adam_eps = 1e-8
    config.train.weight_decay = 0.0  # > 0: AdamW's decoupled weight decay
    # > 0: keep an exponential moving average of the parameters (decay per step); evaluation and
    # inference use it when present
    config.train.ema_decay = 0.0
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

    # The dataset written by data_prep (TFDS ArrayRecord) and how it is read.
    config.data = ml_collections.ConfigDict()
    config.data.name = "music"  # music | vggsound | a builder of the same features
    config.data.data_dir = ""  # TFDS data dir (data_prep's --data_dir)
    config.data.train_split = "train"
    config.data.val_split = "val"
    config.data.test_split = "test"
    # Train on every train_stride-th clip of the training split from train_offset (1, 0: all).
    config.data.train_stride = 1
    config.data.train_offset = 0
    config.data.num_workers = 8  # input worker processes per host (the reference's workers)
    config.data.cache_in_memory = False  # keep decoded records (datasets that fit in memory)
    # Build the dataset on first use when it is missing (synth_music only: it needs no input).
    config.data.prepare_if_missing = False
    config.data.synth_clips_per_class = (16, 3, 4)  # synth_music: train, val, test per class
    config.data.synth_seconds = 8.0
    config.data.synth_seed = 0
    config.data.synth_vary = True  # synth_music: vary how each clip is played and recorded

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
    # Comma-separated splits main also evaluates then, each as eval.split with its own clips as
    # interferers (synth_music's held_out, say).
    config.eval.extra_splits = ""
    config.eval.num_audio_examples = 0  # mixtures written as audio and pictures with the table

    # Runs python -m clipsep_jax.main trains first, each "CONFIG_FILE[:ARG]=WORKDIR" (comma-
    # separated): models this one reads (e.g. a frozen encoder); a finished run is reused.
    config.prerequisites = ""

    # Device mesh (clipsep_jax/sharding.py): the batch is split over data x fsdp devices;
    # parameters and optimizer state of at least fsdp_min_size elements are split over fsdp.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # -1: all devices that fsdp leaves
    config.mesh.fsdp = 1
    config.mesh.fsdp_min_size = 2**14

    family.kind_defaults(config)
    return config


# Shared fields with a fixed set of values (families check theirs with the same helper).
CHOICES = {
    "query.mode": ("image", "text", "hybrid"),
    "query.bert_pooling": ("mean", "cls", "pooler"),
    "train.lr_schedule": ("warmup_linear", "warmup_cosine", "constant"),
    "eval.metric": ("museval", "mir_eval"),
}


def use_plain_synth_music(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Points ``config.data`` at the generative demos' dataset (CLIPSonic, its vocoder and prior,
    the CLAP demo): synth_music rendered plainly into ``data/synth_plain`` (64 / 3 / 8 / 4
    train / val / test / held_out clips of 8 s per instrument), prepared on first use, read in
    process and kept in memory. Returns ``config``."""
    d = config.data
    d.name = "synth_music"
    d.data_dir = "data/synth_plain"
    d.prepare_if_missing = True
    d.synth_clips_per_class = (64, 3, 8, 4)
    d.synth_vary = False
    d.synth_seconds = 8.0
    d.num_workers = 0
    d.cache_in_memory = True
    return config


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field when a configuration cannot describe a run: the shared
    sections here, the model and family sections by the family."""
    family = family_of_kind(config.model.kind)
    check_choices(config, CHOICES)
    if config.query.encoder not in ENCODERS:
        raise UserError(f"config.query.encoder={config.query.encoder!r}: expected one of "
                         f"{', '.join(ENCODERS)}")
    if config.num_sources < 1:
        raise UserError(f"config.num_sources={config.num_sources}: must be >= 1")
    if config.audio.n_fft // 2 + 1 < 2 or config.audio.hop_length < 1:
        raise UserError("config.audio: n_fft must be >= 2 and hop_length >= 1")
    t = config.train
    if t.batch_size < 1:
        raise UserError(f"config.train.batch_size={t.batch_size}: must be >= 1")
    if not 0.0 <= t.ema_decay < 1.0:
        raise UserError(f"config.train.ema_decay={t.ema_decay}: must be in [0, 1)")
    for name in ("log_every_steps", "checkpoint_every_steps", "validation_every_steps"):
        if t[name] < 1:
            raise UserError(f"config.train.{name}={t[name]}: must be >= 1")
    family.validate_config(config)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``FILE.py`` or ``FILE.py:ARG`` -> the file's ``get_config()`` (``get_config(ARG)``), as
    ``--config`` reads it."""
    path, _, argument = spec.partition(":")
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} not found")
    module_spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {path!r} has no get_config()")
    return module.get_config(argument) if argument else module.get_config()


def prerequisite_runs(config: ml_collections.ConfigDict
                      ) -> list[tuple[str, ml_collections.ConfigDict, str]]:
    """``config.prerequisites`` -> [(its spec, its config, its workdir)], in order."""
    runs = []
    for entry in (e.strip() for e in config.prerequisites.split(",")):
        if not entry:
            continue
        spec, _, workdir = entry.partition("=")
        if not spec.strip() or not workdir.strip():
            raise UserError(f"config.prerequisites: {entry!r} is not CONFIG_FILE[:ARG]=WORKDIR")
        runs.append((spec.strip(), load_config_file(spec.strip()), workdir.strip()))
    return runs


def migrate(saved: dict) -> dict:
    """A config.json of an older version (a dict) -> today's layout: ``query.clip_model`` is
    ``query.encoder_model``; the family moves its own fields (CLIPSep's ``loss`` and ``nit``
    sections now live in ``config.clipsep``)."""
    saved = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    query = saved.get("query", {})
    if "clip_model" in query:
        query.setdefault("encoder_model", query.pop("clip_model"))
    kind = saved.get("model", {}).get("kind", "clipsep")
    return family_of_kind(kind).migrate_config(saved)


def from_dict(saved: dict, source: str) -> ml_collections.ConfigDict:
    """A saved config (today's or an older layout) merged over today's defaults of its kind (new
    fields filled); ValueError naming ``source`` and the field for an unknown one."""
    saved = migrate(saved)
    config = default_config(saved.get("model", {}).get("kind", "clipsep"))
    _merge(config, saved, source)
    return config


def _merge(config: ml_collections.ConfigDict, values: dict, source: str, prefix: str = "") -> None:
    for key, value in values.items():
        if key not in config:
            raise UserError(f"{source}: unknown config field {prefix}{key}")
        if isinstance(config[key], ml_collections.ConfigDict):
            if not isinstance(value, dict):
                raise UserError(f"{source}: config field {prefix}{key} should be a section")
            _merge(config[key], value, source, f"{prefix}{key}.")
        else:
            config[key] = value
