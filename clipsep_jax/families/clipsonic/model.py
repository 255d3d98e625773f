"""CLIPSonic's model and examples, shared by the family, the generator and the evaluation:
the mel settings and the denoiser of a config, the training and evaluation crops with their CLIP
conditions, and the deterministic per-example denoising loss."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipsep_jax import audio
from clipsep_jax.families.clipsonic import diffusion, mel
from clipsep_jax.families.clipsonic.networks import Denoiser

__all__ = ["mel_settings", "build_model", "clean_mels", "crop_frames", "TrainingCrops",
           "MiddleCrops", "fixed_time_losses"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def mel_settings(config: ml_collections.ConfigDict) -> mel.MelSettings:
    a, m = config.audio, config.clipsonic.mel
    return mel.MelSettings(sample_rate=a.sample_rate, n_fft=a.n_fft, hop_length=a.hop_length,
                           win_length=a.win_length, n_mels=m.n_mels, fmin=m.fmin, fmax=m.fmax,
                           clamp=m.clamp, log_max=m.log_max)


def build_model(config: ml_collections.ConfigDict) -> Denoiser:
    m = config.model
    return Denoiser(spatial_dims=m.spatial_dims, widths=tuple(m.widths),
                    blocks_per_level=m.blocks_per_level, embedding_dim=m.embedding_dim,
                    condition_token=m.condition_token, dtype=_DTYPES[m.compute_dtype])


def clean_mels(config: ml_collections.ConfigDict, waveforms: jax.Array) -> jax.Array:
    """Waveforms [B, S] -> the model's x0: normalised log-mels [B, n_mels, T]."""
    settings = mel_settings(config)
    return mel.normalize(mel.log_mel(waveforms, settings), settings)


def crop_frames(config: ml_collections.ConfigDict) -> int:
    return audio.num_frames(config.audio.crop_samples, config.audio.hop_length)


def _condition(record: dict, config: ml_collections.ConfigDict, centre_seconds: float
               ) -> np.ndarray:
    """The CLIP condition of a crop centred at ``centre_seconds``: the mean embedding of the
    query frames around that time (image), or the label prompt's embedding (text)."""
    if config.query.mode == "text":
        return np.asarray(record["text_embedding"], np.float32)
    frames = record["frame_embeddings"]
    centre = int(np.clip(np.floor(centre_seconds * config.query.fps), 0, len(frames) - 1))
    offsets = (np.arange(config.query.num_frames) - config.query.num_frames // 2)
    index = np.clip(centre + offsets * config.query.frame_stride, 0, len(frames) - 1)
    return frames[index].astype(np.float32).mean(axis=0)


def _crop(record: dict, config: ml_collections.ConfigDict, start: int) -> np.ndarray:
    length = config.audio.crop_samples
    waveform = np.asarray(record["waveform"], np.float32)
    out = np.zeros(length, np.float32)
    piece = waveform[max(start, 0):start + length]
    out[:len(piece)] = piece
    return out


class TrainingCrops:
    """``(index, rng) -> {"waveform": [S], "condition": [D]}``: a random crop and its frames."""

    def __init__(self, config: ml_collections.ConfigDict, source: Any):
        self.config, self.source = config, source

    def __call__(self, index: int, rng: np.random.Generator) -> dict:
        record = self.source[index]
        length, rate = self.config.audio.crop_samples, self.config.audio.sample_rate
        start = int(rng.integers(0, max(1, len(record["waveform"]) - length + 1)))
        return {"waveform": _crop(record, self.config, start),
                "condition": _condition(record, self.config, (start + length / 2) / rate)}


class MiddleCrops:
    """``index -> example``: the clip's middle crop and its frames (validation, evaluation)."""

    def __init__(self, config: ml_collections.ConfigDict, source: Any):
        self.config, self.source = config, source

    def __call__(self, index: int) -> dict:
        record = self.source[index]
        length, rate = self.config.audio.crop_samples, self.config.audio.sample_rate
        start = max(0, (len(record["waveform"]) - length) // 2)
        return {"waveform": _crop(record, self.config, start),
                "condition": _condition(record, self.config, (start + length / 2) / rate)}


def fixed_time_losses(config: ml_collections.ConfigDict, variables: dict, batch: dict
                      ) -> tuple[jax.Array, jax.Array]:
    """Deterministic per-example denoising losses [B] and their times [B]: example ``i`` at
    t = frac(0.5 + i * golden ratio) with noise drawn from (seed, i), conditioned."""
    x0 = clean_mels(config, batch["waveform"])
    index = batch["index"]
    t = jnp.mod(0.5 + index.astype(jnp.float32) * 0.6180339887, 1.0)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(config.train.seed), i))(index)
    eps = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:]))(keys)
    z = diffusion.noisy(x0, eps, t)
    v = diffusion.v_target(x0, eps, t)
    predicted = build_model(config).apply(variables, z, diffusion.logsnr_schedule(t),
                                          batch["condition"])
    return jnp.mean((predicted - v) ** 2, axis=(1, 2)), t
