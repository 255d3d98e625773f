"""The CLAP family behind the family interface: contrastive language-audio pretraining of a
Flax CLAP (:mod:`clipsep_jax.encoders.clap_towers`) on a prepared dataset's clips and captions
made from their labels, trained by ``python -m clipsep_jax.main`` (model kind ``clap``).

Training examples are random crops of the training clips with a caption of the clip's label in
a template drawn from ``clap.templates``; the loss is CLAP's symmetric InfoNCE with the labels'
duplicates as positives (:mod:`.model`). Validation scores zero-shot classification of the
validation clips' middle crops against ``clap.eval.template`` of every label: ``loss`` (the
cross-entropy of the clip's label at the audio logit scale; the best checkpoint has the lowest)
and ``zero_shot_top1``. Evaluation is the same over ``eval.split``, top-1 and top-3
(:mod:`.evaluation`). The trained model is used as a frozen CLAP through
:func:`clipsep_jax.families.clap.load_trained_clap`; it neither separates nor generates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from clipsep_jax.encoders.clap_towers import ClapModel
from clipsep_jax.errors import UserError
from clipsep_jax.families.base import Family, check_choices
from clipsep_jax.families.clap import evaluation
from clipsep_jax.families.clap.model import (
    Examples,
    build_model,
    clap_config,
    features,
    full_params,
    init_variables,
    label_names,
    logit_scales,
    training_loss,
)
from clipsep_jax.families.clap.tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer, text_length
from clipsep_jax.families.clap.trained import clap_from_variables

__all__ = ["ClapFamily"]

_POSITIVE_FIELDS = (
    "text_vocab_size", "text_hidden_size", "text_layers", "text_heads", "text_intermediate_size",
    "text_max_positions", "sample_rate", "num_mel_bins", "fft_window_size", "hop_length",
    "clip_samples", "spec_size", "patch_size", "window_size", "audio_embed_dim",
    "projection_dim")
_MIN_TEXT_LENGTH = 8  # tokens a caption may have, <s> and </s> included


class ClapFamily(Family):
    """CLAP trained contrastively on (clip, caption) pairs."""

    name = "clap"
    kinds = ("clap",)
    # An encoder for other families: it neither separates nor generates.
    task = "encoding"

    def model_config(self, kind: str) -> ml_collections.ConfigDict:
        """LAION's clap-htsat-unfused sizes (HTSAT-tiny, RoBERTa-base), with the byte
        tokenizer's vocabulary; the demo shrinks them."""
        m = ml_collections.ConfigDict()
        m.kind = kind
        # Text tower (RoBERTa)
        m.text_vocab_size = BYTE_VOCAB_SIZE  # at least the tokenizer's 261 ids
        m.text_hidden_size = 768
        m.text_layers = 12
        m.text_heads = 12
        m.text_intermediate_size = 3072
        m.text_max_positions = 514  # captions are padded to min(77, this - 2) tokens
        # Audio front end (the model's own: clips are resampled from config.audio.sample_rate)
        m.sample_rate = 48000  # Hz
        m.num_mel_bins = 64
        m.fft_window_size = 1024  # samples
        m.hop_length = 480  # samples
        m.clip_samples = 480000  # samples per clip at sample_rate: training crops, evaluation
        m.frequency_min = 50.0  # Hz
        m.frequency_max = 14000.0  # Hz
        # Audio tower (HTSAT: a Swin transformer over the folded spectrogram)
        m.spec_size = 256  # the folded square's side; spec_size // num_mel_bins time chunks
        m.patch_size = 4
        m.window_size = 8
        m.audio_embed_dim = 96  # the first stage's width, doubled at each later stage
        m.audio_depths = (2, 2, 6, 2)
        m.audio_heads = (4, 8, 16, 32)
        m.projection_dim = 512
        return m

    def family_config(self) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        # Captions of a training clip: one of these drawn at random, {label} its label
        c.templates = ("The sound of {label}", "A recording of {label}", "{label} playing",
                       "Music played on the {label}", "Someone playing a {label}",
                       "This is the sound of a {label}")
        # Clips of one label in a batch: "positives" (every same-label caption is a positive,
        # uniform multi-positive targets) or "ignore" (plain InfoNCE: false negatives)
        c.duplicates = "positives"
        c.max_logit_scale = 100.0  # cap of exp(logit scale), LAION-CLAP's clamp
        c.batch_norm_momentum = 0.1  # running statistics of the audio tower's input BatchNorm
        c.eval = ml_collections.ConfigDict()
        c.eval.template = "The sound of {label}"  # zero-shot prompts (validation, evaluation)
        return c

    def kind_defaults(self, config: ml_collections.ConfigDict) -> None:
        config.train.batch_size = 64
        config.train.learning_rate = 1e-4
        config.train.lr_schedule = "warmup_cosine"
        config.train.lr_warmup_steps = 2000
        config.train.lr_decay_end_step = 100_000
        config.train.lr_decay_end_multiplier = 0.0

    # -- configuration ----------------------------------------------------------------------

    def validate_config(self, config: ml_collections.ConfigDict) -> None:
        check_choices(config, {"model.kind": self.kinds,
                               "clap.duplicates": ("positives", "ignore")})
        m = config.model
        for field in _POSITIVE_FIELDS:
            if not isinstance(m[field], int) or m[field] < 1:
                raise UserError(f"config.model.{field}={m[field]!r}: must be an integer >= 1")
        if m.text_vocab_size < BYTE_VOCAB_SIZE:
            raise UserError(f"config.model.text_vocab_size={m.text_vocab_size}: the byte "
                            f"tokenizer has {BYTE_VOCAB_SIZE} ids")
        if m.text_hidden_size % m.text_heads:
            raise UserError(f"config.model.text_hidden_size={m.text_hidden_size} is not "
                            f"divisible by config.model.text_heads={m.text_heads}")
        if text_length(m.text_max_positions) < _MIN_TEXT_LENGTH:
            raise UserError(f"config.model.text_max_positions={m.text_max_positions}: captions "
                            f"would get fewer than {_MIN_TEXT_LENGTH} tokens")
        self._validate_audio(config)
        for name, templates in (("templates", tuple(config.clap.templates)),
                                ("eval.template", (config.clap.eval.template,))):
            if not templates:
                raise UserError(f"config.clap.{name} is empty")
            for template in templates:
                if not isinstance(template, str) or "{label}" not in template:
                    raise UserError(f"config.clap.{name}: {template!r} has no {{label}}")
        if not config.clap.max_logit_scale >= 1.0:
            raise UserError(f"config.clap.max_logit_scale={config.clap.max_logit_scale}: must "
                            "be >= 1")
        if not 0.0 < config.clap.batch_norm_momentum <= 1.0:
            raise UserError(f"config.clap.batch_norm_momentum={config.clap.batch_norm_momentum}"
                            ": must be in (0, 1]")

    def _validate_audio(self, config: ml_collections.ConfigDict) -> None:
        m = config.model
        if not 0.0 <= m.frequency_min < m.frequency_max <= m.sample_rate / 2:
            raise UserError(f"config.model.frequency_min={m.frequency_min} and frequency_max="
                            f"{m.frequency_max} must satisfy 0 <= min < max <= "
                            f"config.model.sample_rate / 2 = {m.sample_rate / 2}")
        if m.clip_samples <= m.fft_window_size // 2:
            raise UserError(f"config.model.clip_samples={m.clip_samples}: shorter than half "
                            f"config.model.fft_window_size={m.fft_window_size}")
        if m.spec_size % m.num_mel_bins:
            raise UserError(f"config.model.spec_size={m.spec_size} is not a multiple of "
                            f"config.model.num_mel_bins={m.num_mel_bins}")
        spec_frames = m.spec_size * (m.spec_size // m.num_mel_bins)
        frames = 1 + m.clip_samples // m.hop_length
        if frames > spec_frames:
            raise UserError(f"config.model.clip_samples={m.clip_samples}: {frames} frames of "
                            f"hop {m.hop_length}, more than the {spec_frames} the audio tower "
                            "takes (spec_size x spec_size / num_mel_bins)")
        if len(m.audio_depths) != len(m.audio_heads) or not m.audio_depths:
            raise UserError(f"config.model.audio_depths={tuple(m.audio_depths)} and "
                            f"audio_heads={tuple(m.audio_heads)} must be as long, and not empty")
        for i, (depth, heads) in enumerate(zip(m.audio_depths, m.audio_heads, strict=True)):
            if depth < 1 or heads < 1 or (m.audio_embed_dim * 2**i) % heads:
                raise UserError(f"config.model.audio_depths[{i}]={depth} / audio_heads[{i}]="
                                f"{heads}: need >= 1 each, and heads dividing the stage's width "
                                f"{m.audio_embed_dim * 2**i} (audio_embed_dim x 2^{i})")
        grid, stages = m.spec_size // m.patch_size, len(m.audio_depths)
        if m.spec_size % m.patch_size or grid % 2 ** (stages - 1):
            raise UserError(f"config.model.patch_size={m.patch_size}: the spec_size "
                            f"{m.spec_size} square must split into a patch grid that halves "
                            f"{stages - 1} times (len(audio_depths) - 1)")
        if grid // 2 ** (stages - 1) < m.window_size:
            raise UserError(f"config.model.window_size={m.window_size}: wider than the last "
                            f"stage's {grid // 2 ** (stages - 1)} patches")
        try:
            clap_config(config).validate()
        except UserError as e:
            raise UserError(f"config.model: {e}") from e

    # -- model and loss ---------------------------------------------------------------------

    def init_variables(self, config, rng):
        return init_variables(config, rng)

    def loss(self, config, params, model_state, batch, rng, step):
        return training_loss(config, params, model_state, batch)

    # -- data -------------------------------------------------------------------------------

    def _examples(self, config, source, metadata, split) -> Examples:
        rate = metadata.get("sample_rate")
        if rate is not None and int(rate) != config.audio.sample_rate:
            raise UserError(f"config.audio.sample_rate={config.audio.sample_rate}: the dataset's "
                            f"clips are at {rate} Hz")
        return Examples(config, source, label_names(config, metadata), byte_tokenizer(), split)

    def training_transform(self, config, source, metadata):
        return self._examples(config, source, metadata, config.data.train_split)

    def validation_transform(self, config, source, metadata):
        examples = self._examples(config, source, metadata, config.data.val_split)
        return lambda index: examples(index)

    def validation_step(self, config, variables, batch):
        model = build_model(config)
        stats = variables["batch_stats"]
        params = full_params(variables["params"], stats["mean"], stats["var"])
        audio = model.apply({"params": params}, features(config, batch["waveform"]),
                            method=ClapModel.encode_audio)
        # every row holds the same prompts: the labels' evaluation captions
        text = model.apply({"params": params}, batch["prompt_ids"][0], batch["prompt_mask"][0],
                           method=ClapModel.encode_text)
        scale, _ = logit_scales(params, config.clap.max_logit_scale)
        logits = scale * jnp.einsum("bd,kd->bk", audio, text, precision=jax.lax.Precision.HIGHEST)
        labels = batch["label"]
        loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
        top1 = (jnp.argmax(logits, axis=1) == labels).astype(jnp.float32)
        return {"per_example": {"loss": loss, "zero_shot_top1": top1}, "summary": None}

    # -- evaluation -------------------------------------------------------------------------

    def evaluate(self, config, variables, mesh, *, progress=True):
        clap = clap_from_variables(config, variables, batch_size=config.eval.batch_size)
        return {"model_kind": config.model.kind,
                **evaluation.zero_shot(config, clap, progress=progress)}

    def format_table(self, report: dict) -> str:
        return evaluation.format_zero_shot(report)

    def describe_model(self, config) -> str:
        m = config.model
        return (f"CLAP: HTSAT {tuple(m.audio_depths)} x {m.audio_embed_dim} on {m.num_mel_bins} "
                f"mels at {m.sample_rate} Hz ({m.clip_samples / m.sample_rate:.2f} s), RoBERTa "
                f"{m.text_layers} x {m.text_hidden_size}, projection {m.projection_dim}")
