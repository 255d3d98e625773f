"""The vocoder family's model pieces, shared by the family, its evaluation and the generators that
use a trained vocoder: the mel settings of a config, the generator and discriminators it names,
waveform segments, and the GAN loss of one batch.

Training is HiFi-GAN's objective (Kong et al., 2020) with simultaneous updates: one optimizer
steps the generator and both discriminators together on

    loss = L_D(discriminators; real, stop_gradient(fake))                       # discriminators
         + lambda_mel * |log-mel(fake) - log-mel(real)|_1                        # generator
         + L_adv(stop_gradient(discriminators); fake) + L_fm(...)                 # generator

(stop-gradients route each term to its own networks, so the gradient is what two optimizers
would apply at the same time; the reference alternates, the discriminators first; one
``optax.clip_by_global_norm`` sees both, so keep ``train.grad_norm_clip`` high, as the
defaults do). Before ``vocoder.loss.adversarial_start_step`` only the mel term trains the
generator (a warm-up): the discriminators are not run and get zero gradients (AdamW's weight
decay still shrinks them a little).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipsep_jax import audio
from clipsep_jax.families.clipsonic import mel
from clipsep_jax.families.vocoder.discriminators import (
    MultiPeriodDiscriminator,
    MultiScaleDiscriminator,
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    mel_reconstruction_loss,
)
from clipsep_jax.families.vocoder.hifigan import HiFiGANGenerator
from clipsep_jax.families.vocoder.istft import ISTFTGenerator

__all__ = ["mel_settings", "build_generator", "build_discriminators", "vocode", "Segments",
           "gan_loss", "segment_frames"]


def mel_settings(config: ml_collections.ConfigDict) -> mel.MelSettings:
    """The log-mel the vocoder reads: ``config.audio``'s framing, ``config.vocoder.mel``'s
    bands (the same fields as ``config.clipsonic.mel``, so the two can be matched)."""
    a, m = config.audio, config.vocoder.mel
    return mel.MelSettings(sample_rate=a.sample_rate, n_fft=a.n_fft, hop_length=a.hop_length,
                           win_length=a.win_length, n_mels=m.n_mels, fmin=m.fmin, fmax=m.fmax,
                           clamp=m.clamp)


def build_generator(config: ml_collections.ConfigDict) -> HiFiGANGenerator | ISTFTGenerator:
    m = config.model
    if m.kind == "hifigan":
        return HiFiGANGenerator(
            upsample_rates=tuple(m.upsample_rates),
            upsample_kernel_sizes=tuple(m.upsample_kernel_sizes),
            upsample_initial_channel=m.upsample_initial_channel, resblock=m.resblock,
            resblock_kernel_sizes=tuple(m.resblock_kernel_sizes),
            resblock_dilation_sizes=tuple(tuple(d) for d in m.resblock_dilation_sizes))
    return ISTFTGenerator(mel_settings(config), dim=m.dim, depth=m.depth, kernel=m.kernel,
                          pseudo_inverse_start=m.pseudo_inverse_start)


def build_discriminators(config: ml_collections.ConfigDict
                         ) -> tuple[MultiPeriodDiscriminator, MultiScaleDiscriminator]:
    m = config.model
    return (MultiPeriodDiscriminator(tuple(m.mpd_periods), m.discriminator_width_divisor),
            MultiScaleDiscriminator(m.msd_scales, m.discriminator_width_divisor))


def vocode(config: ml_collections.ConfigDict, generator_params: Any, log_mel: jax.Array,
           samples: int) -> jax.Array:
    """Log-mels [B, n_mels, T] -> waveforms [B, samples] (cut or zero-padded)."""
    generator = build_generator(config)
    if isinstance(generator, ISTFTGenerator):  # it can make every sample the frames cover
        wave = generator.apply({"params": generator_params}, log_mel,
                               min(samples, config.audio.hop_length * (log_mel.shape[-1] - 1)
                                   + config.audio.n_fft // 2))
    else:
        wave = generator.apply({"params": generator_params}, log_mel)
    wave = wave[:, :samples]
    return jnp.pad(wave, ((0, 0), (0, samples - wave.shape[1])))


def segment_frames(config: ml_collections.ConfigDict) -> int:
    """Log-mel frames of a training segment."""
    return audio.num_frames(config.audio.crop_samples, config.audio.hop_length)


class Segments:
    """``(index, rng) -> {"waveform": [crop_samples]}``: a random segment of clip ``index``
    (training), or ``index -> ...`` its middle segment (``rng=None``: validation), zero-padded
    where the clip is shorter."""

    def __init__(self, config: ml_collections.ConfigDict, source: Any, samples: int | None = None):
        self.source, self.samples = source, samples or config.audio.crop_samples

    def __call__(self, index: int, rng: np.random.Generator | None = None) -> dict:
        waveform = np.asarray(self.source[index]["waveform"], np.float32)
        room = max(0, len(waveform) - self.samples)
        start = room // 2 if rng is None else int(rng.integers(0, room + 1))
        out = np.zeros(self.samples, np.float32)
        piece = waveform[start:start + self.samples]
        out[:len(piece)] = piece
        return {"waveform": out}


def gan_loss(config: ml_collections.ConfigDict, params: dict, waveform: jax.Array,
             step: jax.Array) -> tuple[jax.Array, dict]:
    """The training loss of a batch of real segments [B, S] (see the module docs) ->
    (scalar, metrics: mel_l1, generator_adversarial, feature_matching, discriminator)."""
    settings, weights = mel_settings(config), config.vocoder.loss
    real_mel = mel.log_mel(waveform, settings)
    fake = vocode(config, params["generator"], real_mel, waveform.shape[1])
    mel_l1 = mel_reconstruction_loss(real_mel, mel.log_mel(fake, settings), weight=1.0)

    def adversarial(fake: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        loss_d = loss_adv = loss_fm = jnp.zeros(())
        for name, module in zip(("mpd", "msd"), build_discriminators(config), strict=True):
            # three passes: real and (detached) fake with the live discriminator for its
            # loss; fake with the frozen one for the generator's. The real pass's features are
            # the feature-matching targets (constants for the generator).
            real_logits, real_features = module.apply({"params": params[name]}, waveform)
            fake_logits, _ = module.apply({"params": params[name]},
                                          jax.lax.stop_gradient(fake))
            loss_d += discriminator_loss(real_logits, fake_logits)
            frozen = jax.lax.stop_gradient(params[name])
            fooled_logits, fake_features = module.apply({"params": frozen}, fake)
            loss_adv += generator_adversarial_loss(fooled_logits)
            loss_fm += feature_matching_loss(jax.lax.stop_gradient(real_features),
                                             fake_features)
        return loss_d, loss_adv, loss_fm

    def warm_up(fake: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return jnp.zeros(()), jnp.zeros(()), jnp.zeros(())

    # cond, not a multiplied gate: the warm-up steps skip the discriminators' compute
    loss_d, loss_adv, loss_fm = jax.lax.cond(step >= weights.adversarial_start_step,
                                             adversarial, warm_up, fake)
    loss = (weights.mel_weight * mel_l1 + loss_d + weights.adversarial_weight * loss_adv
            + weights.feature_weight * loss_fm)
    return loss, {"mel_l1": mel_l1, "generator_adversarial": loss_adv,
                  "feature_matching": loss_fm, "discriminator": loss_d}
