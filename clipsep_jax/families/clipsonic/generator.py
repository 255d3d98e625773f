"""Generating audio from text or image queries with a CLIPSonic model: :class:`Generator`.

A text query is embedded by the model's CLIP text tower (the config's ``query.text_template``,
"a photo of {query}": CLIPSonic-ZS for a model trained on image embeddings, -SD for one trained
on text), an image query by its vision tower (CLIPSonic-IQ). DDIM with classifier-free guidance
(:func:`clipsonic.diffusion.ddim_sample`) draws ``num_samples`` log-mels per query, and
Griffin-Lim (:mod:`clipsonic.waveforms`) or a HiFi-GAN checkpoint (:meth:`Generator.use_vocoder`)
turns them into 16 kHz waveforms; :meth:`Generator.use_prior` maps text queries through a
CLIPSonic-PD prior.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipsep_jax import inference
from clipsep_jax.encoders import clap, load_query_encoder
from clipsep_jax.encoders.clip import text_prompt
from clipsep_jax.errors import UserError
from clipsep_jax.families import get_family
from clipsep_jax.families.clipsonic import diffusion, mel
from clipsep_jax.families.clipsonic.model import build_model, mel_settings
from clipsep_jax.families.clipsonic.pd import PRIOR_KINDS, describe_prior, fit_prior
from clipsep_jax.families.clipsonic.waveforms import griffin_lim_from_log_mel
from clipsep_jax.families.vocoder import model as vocoder_model
from clipsep_jax.families.vocoder.hifigan import hop_length, load_hifigan

__all__ = ["Generator", "sample_batch", "trained_vocoder"]


class Generator:
    """A CLIPSonic model with its query encoder.

    Args:
        config, variables: the model (EMA parameters when the run kept them).
        encoder: a query encoder, or a hub id / folder (default: ``config.query.encoder_model``).
    """

    def __init__(self, config: ml_collections.ConfigDict, variables: dict, encoder: Any = None):
        if config.model.kind != "clipsonic":
            raise UserError(f"model kind {config.model.kind!r} does not generate audio")
        self.config = config
        self.variables = jax.device_put(variables)
        self._encoder = encoder
        self.prior: Any = None  # text embeddings [N, D] -> image embeddings (CLIPSonic-PD)
        self.vocoder: Any = None  # log-mels [B, n_mels, T] -> waveforms; None: Griffin-Lim
        self.settings = mel_settings(config)
        self._sample = jax.jit(functools.partial(_sample, config),
                               static_argnames=("num_samples", "steps", "frames"))
        self._vocode = jax.jit(functools.partial(griffin_lim_from_log_mel,
                                                 settings=self.settings),
                               static_argnames="iterations")

    @classmethod
    def from_checkpoint(cls, path: str, encoder: Any = None) -> Generator:
        """A training workdir (its latest checkpoint), model directory or pretrained folder."""
        config, variables = inference.load_for_inference(path)
        return cls(config, variables, encoder)

    def use_prior(self, kind: str | None = None, split: str | None = None,
                  checkpoint: str | None = None) -> str | None:
        """Maps text queries through a prior: ``kind`` (one of ``PRIOR_KINDS``), else the
        config's ``clipsonic.prior.kind``; none when both are empty. Ridge and retrieval are
        fitted on ``split`` of the run's dataset (default the config's); ``diffusion`` loads
        ``checkpoint`` (default the config's: a trained prior's workdir or model directory,
        or LAION's file). Returns a description of the prior in use, or None."""
        if kind and kind not in PRIOR_KINDS:
            raise UserError(f"prior {kind!r}: expected one of {', '.join(PRIOR_KINDS)}")
        prior = ml_collections.ConfigDict(self.config.clipsonic.prior.to_dict())
        prior.kind = kind or prior.kind
        prior.split = split or prior.split
        prior.checkpoint = checkpoint or prior.checkpoint
        if prior.kind == "diffusion" and not prior.checkpoint:
            raise UserError("the diffusion prior needs a checkpoint (a trained prior's workdir "
                            "or model directory, or a DALLE2-pytorch file)")
        if not prior.kind:
            if split or checkpoint:
                raise UserError(f"a prior split or checkpoint ({split or checkpoint!r}) but no "
                                f"prior: name one "
                                f"({', '.join(PRIOR_KINDS)})")
            self.prior = None
            return None
        if self.config.query.mode == "text":
            raise UserError("this model was trained on text embeddings (CLIPSonic-SD): a "
                            "text -> image embedding prior does not apply to it")
        config = ml_collections.ConfigDict(self.config.to_dict())
        config.clipsonic.prior = prior
        self.prior = fit_prior(config)
        return describe_prior(config)

    def use_vocoder(self, checkpoint: str, config_file: str | None = None) -> str:
        """Waveforms from a neural vocoder instead of Griffin-Lim: a vocoder trained here (a
        training workdir, model directory or pretrained folder of model kind ``hifigan`` or
        ``istft``) or a HiFi-GAN generator checkpoint file in the reference's layout (with its
        ``config.json``). Its mel settings must be the model's (sample rate, bands, hop, FFT
        size, frequency range), else UserError naming them. The reference HiFi-GAN frames its
        mels without centring ((n_fft - hop) / 2 reflect padding) and the model's are centred,
        so its waveforms lag by about half a hop (8 ms at 16 kHz); vocoders trained here read
        the model's framing. Returns a description."""
        if Path(checkpoint).is_file():
            self.vocoder = _reference_hifigan(checkpoint, config_file, self.settings)
            return f"HiFi-GAN {checkpoint}"
        self.vocoder = trained_vocoder(checkpoint, self.settings)
        return f"vocoder {checkpoint}"

    @property
    def encoder(self):
        if self._encoder is None or isinstance(self._encoder, str):
            self._encoder = load_query_encoder(self.config.query, self._encoder)
        return self._encoder

    def embed_queries(self, queries: Sequence[str | np.ndarray]) -> np.ndarray:
        """Texts (through ``query.text_template``) or uint8 RGB images -> [N, D] embeddings."""
        if not queries:
            raise UserError("no queries: give at least one text or image")
        out = []
        for q in queries:
            if isinstance(q, str):
                if not q.strip():
                    raise UserError("empty text query")
                embedding = self.encoder.encode_text(
                    [text_prompt(q, self.config.query.text_template)])[0]
                out.append(embedding if self.prior is None else self.prior(embedding[None])[0])
            else:
                out.append(self.encoder.encode_image([np.asarray(q)])[0])
        return np.stack(out).astype(np.float32)

    def frames_for(self, seconds: float) -> int:
        """Mel frames whose waveform (hop * (frames - 1) samples) covers ``seconds``, rounded
        up to what the U-Net halves."""
        multiple = 2 ** (len(self.config.model.widths) - 1)
        samples = seconds * self.settings.sample_rate
        frames = int(np.ceil(samples / self.settings.hop_length)) + 1
        return max(multiple, -(-frames // multiple) * multiple)

    def generate(self, queries: Sequence[str | np.ndarray], *, num_samples: int = 1,
                 seconds: float = 4.0, guidance: float = 3.0, steps: int = 50, seed: int = 0,
                 griffin_lim_iterations: int = 64) -> list[dict[str, np.ndarray]]:
        """Per query: ``mels`` [K, n_mels, T] (log-mel, not normalised) and ``waveforms``
        [K, samples] (16 kHz; the vocoder's when one is in use, else Griffin-Lim),
        K = ``num_samples``; deterministic for ``seed``."""
        if num_samples < 1 or steps < 1 or seconds <= 0:
            raise UserError(f"num_samples={num_samples}, steps={steps}, seconds={seconds}: "
                            "each must be positive")
        embeddings = self.embed_queries(queries)
        frames = self.frames_for(seconds)
        samples = int(round(seconds * self.settings.sample_rate))
        results = []
        for index, embedding in enumerate(embeddings):
            key = jax.random.fold_in(jax.random.key(seed), index)
            normalised = self._sample(self.variables, jnp.asarray(embedding), key,
                                      num_samples=num_samples, steps=steps, frames=frames,
                                      guidance=guidance)
            log_mels = mel.denormalize(normalised, self.settings)
            if self.vocoder is not None:
                waves = self.vocoder(log_mels)
            else:
                waves = self._vocode(log_mels, iterations=griffin_lim_iterations,
                                     key=jax.random.fold_in(key, 1))
            results.append({"mels": np.asarray(log_mels),
                            "waveforms": np.asarray(waves)[:, :samples]})
        return results


def sample_batch(config: ml_collections.ConfigDict, variables: dict, conditions: jax.Array,
                 key: jax.Array, *, steps: int, frames: int, guidance: float | jax.Array
                 ) -> jax.Array:
    """One normalised log-mel [N, n_mels, frames] per condition [N, D] (jit-able with
    ``steps`` and ``frames`` static)."""
    model = build_model(config)

    def denoise(z, t, condition):
        embeddings, drop = condition
        return model.apply(variables, z, diffusion.logsnr_schedule(t), embeddings, drop)

    count = conditions.shape[0]
    noise = jax.random.normal(key, (count, config.clipsonic.mel.n_mels, frames))
    keep = jnp.zeros((count,), bool)
    return diffusion.ddim_sample(denoise, (conditions, keep), (conditions, ~keep), noise, steps,
                                 guidance)


def _sample(config, variables, embedding, key, *, num_samples, steps, frames, guidance):
    conditions = jnp.broadcast_to(embedding, (num_samples, embedding.shape[-1]))
    return sample_batch(config, variables, conditions, key, steps=steps, frames=frames,
                        guidance=guidance)


def _reference_hifigan(checkpoint: str, config_file: str | None,
                       settings: mel.MelSettings) -> Callable[[jax.Array], jax.Array]:
    """A reference HiFi-GAN as ``log-mels [B, n_mels, T] -> waveforms [B, >= hop * T]`` at the
    model's rate. Bands (count, fmin, fmax) must be the model's; a vocoder of another sampling
    rate (e.g. 22.05 kHz, 80 bands to 8 kHz) reads the log-mels interpolated linearly to its
    frame rate and its waveform is resampled to the model's rate: the bands cover the same
    hertz, so tones keep their level; noise-like bands read about 10 log10(rate ratio) / 2 dB
    off (1.4 dB for 22.05 vs 16 kHz) since a band's sum of bin magnitudes scales so."""
    generator, params, vocoder_config = load_hifigan(checkpoint, config_file)
    rate = int(vocoder_config.get("sampling_rate", settings.sample_rate))
    if vocoder_config.get("fmax") is None and "fmax" in vocoder_config:
        vocoder_config = {**vocoder_config, "fmax": rate / 2}  # the reference's null: Nyquist
    wanted = {"num_mels": settings.n_mels, "fmin": settings.fmin, "fmax": settings.fmax}
    if rate == settings.sample_rate:
        wanted.update(hop_size=settings.hop_length, n_fft=settings.n_fft,
                      win_size=settings.win_length)
    differ = {k: (vocoder_config.get(k), v) for k, v in wanted.items()
              if k in vocoder_config and float(vocoder_config[k]) != float(v)}
    hop = int(vocoder_config.get("hop_size", settings.hop_length))
    if hop_length(generator) != hop:
        differ["upsample_rates (product)"] = (hop_length(generator), hop)
    if differ:
        raise UserError(f"{checkpoint}: the vocoder's mel settings (vocoder, model) differ: "
                        f"{differ}")

    def apply(log_mels: jax.Array) -> jax.Array:
        return generator.apply({"params": params}, log_mels)

    if rate == settings.sample_rate:
        return jax.jit(apply)
    # frame u of the vocoder is at u hop / rate seconds: frame (u hop / rate) / (model's hop /
    # model's rate) of the model
    step = (hop / rate) / (settings.hop_length / settings.sample_rate)

    def resampled(log_mels: jax.Array) -> jax.Array:
        frames = log_mels.shape[-1]
        position = jnp.arange(int((frames - 1) / step) + 1) * step
        low = jnp.floor(position).astype(jnp.int32)
        high = jnp.minimum(low + 1, frames - 1)
        weight = position - low
        interpolated = (log_mels[..., low] * (1.0 - weight) + log_mels[..., high] * weight)
        return clap.resample(apply(interpolated), rate, settings.sample_rate)

    return jax.jit(resampled)


def trained_vocoder(path: str, settings: mel.MelSettings) -> Callable[[jax.Array], jax.Array]:
    """A vocoder trained by ``python -m clipsep_jax.main`` (workdir, model directory or
    pretrained folder) as a jitted ``log-mels [B, n_mels, T] -> waveforms [B, hop * T]``,
    after checking that it reads ``settings``' log-mel (UserError naming what differs)."""
    config, variables = inference.load_for_inference(path)
    if get_family(config).name != "vocoder":
        raise UserError(f"{path}: model kind {config.model.kind!r} is not a vocoder")
    theirs = vocoder_model.mel_settings(config)
    fields = ("sample_rate", "n_fft", "hop_length", "win_length", "n_mels", "fmin", "fmax",
              "clamp")
    differ = {f: (getattr(theirs, f), getattr(settings, f)) for f in fields
              if float(getattr(theirs, f)) != float(getattr(settings, f))}
    if differ:
        raise UserError(f"{path}: the vocoder's mel settings (vocoder, model) differ: {differ}")
    params = jax.device_put(variables["params"]["generator"])
    return jax.jit(lambda m: vocoder_model.vocode(config, params, m,
                                                  settings.hop_length * m.shape[-1]))
