"""The CLAP family's model pieces: the towers and front end a config names, its variables, the
training examples and the contrastive loss.

The model is :class:`clipsep_jax.encoders.clap_towers.ClapModel` (HTSAT audio tower, RoBERTa text
tower, two-layer projections, the learned log scales ``logit_scale_a`` / ``logit_scale_t``) at
the sizes of ``config.model``, reading the log-mel of :class:`clipsep_jax.encoders.clap.FrontEnd`
at ``config.model.sample_rate`` (clips at the dataset's ``config.audio.sample_rate`` are
resampled with :func:`clipsep_jax.encoders.clap.resample` when the two differ).

Variables: ``params`` are the towers' parameters without the audio tower's input BatchNorm
statistics, which are the model state ``batch_stats = {"mean", "var"}`` ([mel bins] each). As
HTSAT trains its input BatchNorm, a training step normalises the log-mel with the batch's own
statistics per mel bin (over clips and frames; biased variance) and moves the running ones
towards them by ``clap.batch_norm_momentum`` (the variance unbiased, as PyTorch's BatchNorm);
validation, evaluation and the exported CLAP use the running statistics.

Loss (:func:`contrastive_loss`): CLAP's symmetric InfoNCE. For L2-normalised audio and text
embeddings a_i, t_j of a batch of B (clip crop, caption) pairs and similarities s_ij = a_i . t_j,

    L = ( mean_i CE(softmax_j(exp(la) s_ij), q_i.) + mean_j CE(softmax_i(exp(lt) s_ij), q_.j) ) / 2

with la, lt the learned log scales (each capped at ln ``clap.max_logit_scale``, LAION-CLAP's
clamp) and the targets q: clips of one label are false negatives of each other's captions
(a batch of 32 crops of 11 instruments holds many), so with ``clap.duplicates = "positives"`` every
pair of the same label is a positive, q_ij = [y_i = y_j] / #{k: y_k = y_i} (a uniform
multi-positive target; it is symmetric, so the same for both directions); ``"ignore"`` keeps
the one-positive target q = I of plain InfoNCE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from clipsep_jax.encoders.clap import FrontEnd, log_mel, resample
from clipsep_jax.encoders.clap_towers import (
    ClapAudioConfig,
    ClapConfig,
    ClapModel,
    ClapTextConfig,
)
from clipsep_jax.errors import UserError
from clipsep_jax.families.clap.tokenizer import PAD_TOKEN_ID, text_length, tokenize
from clipsep_jax.families.weaksep.captions import clean_label
from clipsep_jax.input_pipeline import open_split, record_column

__all__ = ["clap_config", "front_end", "build_model", "crop_samples", "init_variables",
           "full_params", "split_statistics", "logit_scales", "positive_targets",
           "contrastive_loss", "features", "batch_statistics", "update_statistics",
           "training_loss", "caption", "label_names", "Examples"]

# The audio tower's input BatchNorm: these two parameters are the model state.
_STATISTICS = ("mean", "var")
_BATCH_NORM = ("audio_encoder", "batch_norm")
_HIGHEST = jax.lax.Precision.HIGHEST


def clap_config(config: ml_collections.ConfigDict) -> ClapConfig:
    """The towers' sizes of ``config.model``."""
    m = config.model
    text = ClapTextConfig(
        vocab_size=m.text_vocab_size, hidden_size=m.text_hidden_size,
        num_hidden_layers=m.text_layers, num_attention_heads=m.text_heads,
        intermediate_size=m.text_intermediate_size,
        max_position_embeddings=m.text_max_positions, pad_token_id=PAD_TOKEN_ID)
    patch = (m.patch_size, m.patch_size)
    audio = ClapAudioConfig(
        window_size=m.window_size, num_mel_bins=m.num_mel_bins, spec_size=m.spec_size,
        patch_size=patch, patch_stride=patch, hidden_size=m.audio_embed_dim * 2 ** (
            len(m.audio_depths) - 1),
        depths=tuple(m.audio_depths), num_attention_heads=tuple(m.audio_heads),
        patch_embeds_hidden_size=m.audio_embed_dim)
    return ClapConfig(text=text, audio=audio, projection_dim=m.projection_dim)


def front_end(config: ml_collections.ConfigDict) -> FrontEnd:
    """The log-mel front end of ``config.model`` (Slaney mel scale, repeat-padding as LAION's
    ``rand_trunc`` extractor)."""
    m = config.model
    return FrontEnd(sampling_rate=m.sample_rate, feature_size=m.num_mel_bins,
                    fft_window_size=m.fft_window_size, hop_length=m.hop_length,
                    max_length=m.clip_samples, frequency_min=m.frequency_min,
                    frequency_max=m.frequency_max)


def build_model(config: ml_collections.ConfigDict) -> ClapModel:
    """The towers and projections of ``config.model`` (float32)."""
    return ClapModel(clap_config(config))


def crop_samples(config: ml_collections.ConfigDict) -> int:
    """Samples at the dataset's rate of one crop: ``model.clip_samples`` at the model's rate."""
    return math.ceil(config.model.clip_samples * config.audio.sample_rate
                     / config.model.sample_rate)


def init_variables(config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
    """Fresh ``{"params": ..., "batch_stats": {"mean": zeros [F], "var": ones [F]}}``; pure."""
    frontend = front_end(config)
    params = build_model(config).init(
        rng, jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32),
        jnp.zeros((1, frontend.num_frames, config.model.num_mel_bins)))["params"]
    params, statistics = split_statistics(params)
    return {"params": params, "batch_stats": statistics}


def split_statistics(params: dict) -> tuple[dict, dict]:
    """ClapModel parameters -> (the same without the input BatchNorm's mean and var, those two)."""
    flat = traverse_util.flatten_dict(dict(params))
    statistics = {name: flat.pop((*_BATCH_NORM, name)) for name in _STATISTICS}
    return traverse_util.unflatten_dict(flat), statistics


def full_params(params: dict, mean: jax.Array, var: jax.Array) -> dict:
    """The trained parameters with the input BatchNorm's statistics ([F] each) put back:
    :class:`ClapModel`'s parameters."""
    flat = traverse_util.flatten_dict(dict(params))
    flat[(*_BATCH_NORM, "mean")], flat[(*_BATCH_NORM, "var")] = mean, var
    return traverse_util.unflatten_dict(flat)


def logit_scales(params: dict, max_scale: float) -> tuple[jax.Array, jax.Array]:
    """(audio-to-text, text-to-audio) logit multipliers: exp of the learned log scales, each
    capped at ``max_scale``."""
    cap = math.log(max_scale)
    return (jnp.exp(jnp.minimum(params["logit_scale_a"], cap)),
            jnp.exp(jnp.minimum(params["logit_scale_t"], cap)))


def positive_targets(labels: jax.Array, duplicates: str) -> jax.Array:
    """The contrastive targets [B, B] (rows sum to 1) of a batch's labels [B] (see the module
    docs): ``"positives"``, uniform over the pairs of the same label; ``"ignore"``, the
    identity."""
    if duplicates == "ignore":
        return jnp.eye(labels.shape[0], dtype=jnp.float32)
    same = (labels[:, None] == labels[None, :]).astype(jnp.float32)
    return same / jnp.sum(same, axis=1, keepdims=True)


def contrastive_loss(audio: jax.Array, text: jax.Array, labels: jax.Array,
                     scale_audio: jax.Array, scale_text: jax.Array,
                     duplicates: str = "positives") -> tuple[jax.Array, dict]:
    """CLAP's symmetric InfoNCE of one batch (the module docs' L).

    Args:
      audio, text: L2-normalised embeddings [B, D]; row i of each is pair i.
      labels: int [B], the pairs' classes (which captions are positives of which clips).
      scale_audio, scale_text: the logit multipliers (scalars) of the two directions.
      duplicates: ``"positives"`` or ``"ignore"`` (:func:`positive_targets`).
    Returns:
      (loss, metrics: audio_to_text and text_to_audio cross-entropies (nats), the two scales and
      retrieval_accuracy, the fraction of clips whose most similar caption has their label).
    """
    similarity = jnp.einsum("id,jd->ij", audio, text, precision=_HIGHEST)
    targets = positive_targets(labels, duplicates)
    audio_to_text = -jnp.mean(jnp.sum(
        targets * jax.nn.log_softmax(scale_audio * similarity, axis=1), axis=1))
    text_to_audio = -jnp.mean(jnp.sum(
        targets.T * jax.nn.log_softmax(scale_text * similarity.T, axis=1), axis=1))
    retrieved = labels[jnp.argmax(similarity, axis=1)]
    metrics = {"audio_to_text": audio_to_text, "text_to_audio": text_to_audio,
               "logit_scale_audio": scale_audio, "logit_scale_text": scale_text,
               "retrieval_accuracy": jnp.mean((retrieved == labels).astype(jnp.float32))}
    return (audio_to_text + text_to_audio) / 2, metrics


def features(config: ml_collections.ConfigDict, waveform: jax.Array) -> jax.Array:
    """Crops [B, S] at ``config.audio.sample_rate`` -> log-mel features [B, frames, mel bins]
    (dB) of the model's front end."""
    wave = resample(waveform, config.audio.sample_rate, config.model.sample_rate)
    return log_mel(wave, front_end(config))


def batch_statistics(mel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Log-mels [B, T, F] -> their mean and (biased) variance per mel bin, [F] each: what the
    input BatchNorm normalises a training batch with."""
    mean = jnp.mean(mel, axis=(0, 1))
    return mean, jnp.mean(jnp.square(mel - mean), axis=(0, 1))


def update_statistics(running: dict, mean: jax.Array, var: jax.Array, count: int,
                      momentum: float) -> dict:
    """The running ``{"mean", "var"}`` moved towards a batch's statistics of ``count`` values
    per bin, PyTorch's BatchNorm update (the variance made unbiased)."""
    unbiased = var * count / max(count - 1, 1)
    return {"mean": (1 - momentum) * running["mean"] + momentum * mean,
            "var": (1 - momentum) * running["var"] + momentum * unbiased}


def training_loss(config: ml_collections.ConfigDict, params: dict, model_state: dict,
                  batch: dict) -> tuple[jax.Array, tuple[dict, dict]]:
    """The loss of a batch of :class:`Examples` -> (loss, (metrics, new model state)); the input
    BatchNorm normalises with the batch's statistics and updates the running ones."""
    model = build_model(config)
    mel = jax.lax.stop_gradient(features(config, batch["waveform"]))
    mean, var = batch_statistics(mel)
    tower_params = full_params(params, mean, var)
    audio = model.apply({"params": tower_params}, mel, method=ClapModel.encode_audio)
    text = model.apply({"params": tower_params}, batch["input_ids"], batch["attention_mask"],
                       method=ClapModel.encode_text)
    scale_audio, scale_text = logit_scales(params, config.clap.max_logit_scale)
    loss, metrics = contrastive_loss(audio, text, batch["label"], scale_audio, scale_text,
                                     config.clap.duplicates)
    statistics = update_statistics(model_state["batch_stats"], mean, var,
                                   mel.shape[0] * mel.shape[1], config.clap.batch_norm_momentum)
    return loss, (metrics, {"batch_stats": statistics})


def caption(template: str, label: str) -> str:
    """``template`` with ``{label}`` replaced by the label (underscores as spaces)."""
    return template.replace("{label}", clean_label(label))


def label_names(config: ml_collections.ConfigDict, metadata: dict) -> list[str]:
    """The dataset's class labels, in its order: the metadata's ``labels``, else the sorted labels
    of the training split's clips."""
    if metadata.get("labels"):
        return [str(label) for label in metadata["labels"]]
    source, _ = open_split(config.data, config.data.train_split)
    return sorted(set(record_column(source, "label")))


def _label(record: dict) -> str:
    label = record["label"]
    return label.decode() if isinstance(label, bytes) else str(label)


class Examples:
    """Training and validation examples of one split.

    ``(index, rng)``: a random crop of clip ``index`` (:func:`crop_samples` samples at the
    dataset's rate, repeat-padded when the clip is shorter, as the front end pads) with a caption
    of its label in one of ``clap.templates`` drawn at random: ``{"waveform": [S] float32,
    "input_ids": [L] int32, "attention_mask": [L] int32, "label": int32}``.
    ``(index)``: the middle crop, with the evaluation prompt ``clap.eval.template`` of every
    label (``"prompt_ids"``, ``"prompt_mask"``: [K, L] int32) in place of the caption.
    """

    def __init__(self, config: ml_collections.ConfigDict, source: Any, labels: Sequence[str],
                 tokenizer: Any, split: str):
        self.source, self.split = source, split
        self.samples = crop_samples(config)
        self.labels = {label: i for i, label in enumerate(labels)}
        length = text_length(config.model.text_max_positions)
        templates = list(config.clap.templates)
        ids, mask = tokenize(tokenizer, [caption(t, label) for t in templates for label in labels],
                             length)
        self.caption_ids = ids.reshape(len(templates), len(labels), length)
        self.caption_mask = mask.reshape(len(templates), len(labels), length)
        self.prompt_ids, self.prompt_mask = tokenize(
            tokenizer, [caption(config.clap.eval.template, label) for label in labels], length)

    def label_index(self, record: dict, index: int) -> int:
        label = _label(record)
        if label not in self.labels:
            raise UserError(f"clip {index} of split {self.split!r} has label {label!r}, which is "
                            f"not among the dataset's labels ({', '.join(self.labels)})")
        return self.labels[label]

    def crop(self, waveform: np.ndarray, rng: np.random.Generator | None,
             index: int) -> np.ndarray:
        waveform = np.asarray(waveform, np.float32)
        room = len(waveform) - self.samples
        if room >= 0:
            start = room // 2 if rng is None else int(rng.integers(0, room + 1))
            return waveform[start:start + self.samples]
        if not len(waveform):
            raise UserError(f"clip {index} of split {self.split!r} is empty")
        out = np.zeros(self.samples, np.float32)
        repeats = np.tile(waveform, self.samples // len(waveform))
        out[:len(repeats)] = repeats
        return out

    def __call__(self, index: int, rng: np.random.Generator | None = None) -> dict:
        record = self.source[index]
        label = self.label_index(record, index)
        example = {"waveform": self.crop(record["waveform"], rng, index),
                   "label": np.int32(label)}
        if rng is None:
            example["prompt_ids"], example["prompt_mask"] = self.prompt_ids, self.prompt_mask
        else:
            template = int(rng.integers(0, len(self.caption_ids)))
            example["input_ids"] = self.caption_ids[template, label]
            example["attention_mask"] = self.caption_mask[template, label]
        return example
