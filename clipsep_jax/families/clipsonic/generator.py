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
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipsep_jax import inference
from clipsep_jax.encoders import load_query_encoder
from clipsep_jax.encoders.clip import text_prompt
from clipsep_jax.errors import UserError
from clipsep_jax.families.clipsonic import diffusion, mel
from clipsep_jax.families.clipsonic.model import build_model, mel_settings
from clipsep_jax.families.clipsonic.prior_baselines import PRIOR_KINDS, fit_prior
from clipsep_jax.families.clipsonic.vocoder import hop_length, load_hifigan
from clipsep_jax.families.clipsonic.waveforms import griffin_lim_from_log_mel

__all__ = ["Generator", "sample_batch"]


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

    def use_prior(self, kind: str | None = None, split: str | None = None) -> str | None:
        """Maps text queries through a prior fitted on ``split`` of the run's dataset:
        ``kind`` (one of ``PRIOR_KINDS``), else the config's ``clipsonic.prior.kind``; none
        when both are empty. Returns a description of the prior in use, or None."""
        if kind and kind not in PRIOR_KINDS:
            raise UserError(f"prior {kind!r}: expected one of {', '.join(PRIOR_KINDS)}")
        prior = ml_collections.ConfigDict(self.config.clipsonic.prior.to_dict())
        prior.kind = kind or prior.kind
        prior.split = split or prior.split
        if not prior.kind:
            if split:
                raise UserError(f"a prior split ({split!r}) but no prior: name one "
                                f"({', '.join(PRIOR_KINDS)})")
            self.prior = None
            return None
        if self.config.query.mode == "text":
            raise UserError("this model was trained on text embeddings (CLIPSonic-SD): a "
                            "text -> image embedding prior does not apply to it")
        config = ml_collections.ConfigDict(self.config.to_dict())
        config.clipsonic.prior = prior
        self.prior = fit_prior(config)
        return f"{prior.kind} fitted on the {prior.split} split of {config.data.data_dir}"

    def use_vocoder(self, checkpoint: str, config_file: str | None = None) -> str:
        """Waveforms from a HiFi-GAN generator checkpoint (the reference's layout) instead of
        Griffin-Lim; its mel settings must be the model's (sample rate, bands, hop, FFT size,
        frequency range), else UserError naming them. The reference frames its mels without
        centring ((n_fft - hop) / 2 reflect padding) and the model's are centred, so its
        waveforms lag by about half a hop (8 ms at 16 kHz). Returns a description."""
        generator, params, vocoder_config = load_hifigan(checkpoint, config_file)
        s = self.settings
        wanted = {"sampling_rate": s.sample_rate, "num_mels": s.n_mels,
                  "hop_size": s.hop_length, "n_fft": s.n_fft, "win_size": s.win_length,
                  "fmin": s.fmin, "fmax": s.fmax}
        if vocoder_config.get("fmax") is None and "fmax" in vocoder_config:
            vocoder_config = {**vocoder_config,  # the reference's null fmax: up to Nyquist
                              "fmax": vocoder_config.get("sampling_rate", s.sample_rate) / 2}
        differ = {k: (vocoder_config.get(k), v) for k, v in wanted.items()
                  if k in vocoder_config and float(vocoder_config[k]) != float(v)}
        if hop_length(generator) != s.hop_length:
            differ["upsample_rates (product)"] = (hop_length(generator), s.hop_length)
        if differ:
            raise UserError(f"{checkpoint}: the vocoder's mel settings (vocoder, model) differ: "
                            f"{differ}; resampling vocoders are not supported yet")
        self.vocoder = jax.jit(lambda m: generator.apply({"params": params}, m))
        return f"HiFi-GAN {checkpoint}"

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
