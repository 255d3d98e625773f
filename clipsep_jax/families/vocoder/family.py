"""The vocoder family behind the family interface: neural vocoders trained on a prepared
dataset's waveforms by ``python -m clipsep_jax.main``, for CLIPSonic's log-mels.

Kinds: ``hifigan`` (HiFi-GAN's generator, :mod:`.hifigan`; the reference's checkpoints convert)
and ``istft`` (a frame-rate ConvNeXt generator with an inverse-STFT output, :mod:`.istft`, much
cheaper to train). Both train against HiFi-GAN's multi-period and multi-scale discriminators with
the mel, feature-matching and least-squares adversarial losses (:func:`.model.gan_loss`).
The parameters are ``{"generator", "mpd", "msd"}``; inference uses only the generator.
Training examples are random ``audio.crop_samples`` segments of the training clips; validation
scores the log-mel distance of the resynthesised middle segment; evaluation compares the
vocoder's resynthesis of real test clips with Griffin-Lim's (:mod:`.evaluation`).
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipsep_jax.errors import UserError
from clipsep_jax.families.base import Family, check_choices
from clipsep_jax.families.clipsonic import mel
from clipsep_jax.families.vocoder import evaluation
from clipsep_jax.families.vocoder.model import (
    Segments,
    build_discriminators,
    build_generator,
    gan_loss,
    mel_settings,
    segment_frames,
    vocode,
)
from clipsep_jax.files import write_wav_atomic
from clipsep_jax.input_pipeline import open_split
from clipsep_jax.pictures import save_png, spectrogram_picture

__all__ = ["VocoderFamily"]


class VocoderFamily(Family):
    """Neural vocoders: log-mel -> waveform, trained adversarially."""

    name = "vocoder"
    kinds = ("hifigan", "istft")
    task = "vocoding"

    def model_config(self, kind: str) -> ml_collections.ConfigDict:
        m = ml_collections.ConfigDict()
        m.kind = kind
        if kind == "hifigan":  # HiFi-GAN V1 (hop 256 = 8 x 8 x 2 x 2)
            m.upsample_rates = (8, 8, 2, 2)
            m.upsample_kernel_sizes = (16, 16, 4, 4)
            m.upsample_initial_channel = 512
            m.resblock = "1"
            m.resblock_kernel_sizes = (3, 7, 11)
            m.resblock_dilation_sizes = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
        else:  # Vocos' base size
            m.dim = 512
            m.depth = 8
            m.kernel = 7
            m.pseudo_inverse_start = True
        m.mpd_periods = (2, 3, 5, 7, 11)
        m.msd_scales = 3
        m.discriminator_width_divisor = 1  # > 1 shrinks the discriminators (small demos)
        return m

    def family_config(self) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        # The log-mel the vocoder reads (framing from config.audio): set these to the
        # generator's config.clipsonic.mel values; a CLIPSonic generator refuses a vocoder
        # whose mel differs.
        c.mel = ml_collections.ConfigDict()
        c.mel.n_mels = 80
        c.mel.fmin = 0.0
        c.mel.fmax = 8000.0
        c.mel.clamp = 1e-5
        c.loss = ml_collections.ConfigDict()
        c.loss.mel_weight = 45.0
        c.loss.feature_weight = 1.0  # the feature-matching loss carries HiFi-GAN's factor 2
        c.loss.adversarial_weight = 1.0
        c.loss.adversarial_start_step = 0  # mel-only steps before the discriminators join
        c.eval = ml_collections.ConfigDict()
        c.eval.crop_samples = 32767  # CLIPSonic's crop: the classifier's cache is shared
        c.eval.griffin_lim_iterations = 32
        c.eval.classifier_steps = 2000
        c.eval.classifier_crops = 4
        c.eval.classifier_min_accuracy = 0.95
        return c

    def kind_defaults(self, config: ml_collections.ConfigDict) -> None:
        config.audio.crop_samples = 8192  # 32 hops: HiFi-GAN's segment
        config.train.batch_size = 16
        config.train.learning_rate = 2e-4
        config.train.adam_b1 = 0.8
        config.train.adam_b2 = 0.99
        config.train.weight_decay = 0.01
        config.train.lr_schedule = "warmup_cosine"
        config.train.lr_warmup_steps = 100
        config.train.grad_norm_clip = 1e6  # the reference clips nothing
        config.train.ema_decay = 0.0

    def validate_config(self, config: ml_collections.ConfigDict) -> None:
        check_choices(config, {"model.kind": self.kinds})
        missing = sorted(set(self.model_config(config.model.kind)) - set(config.model))
        if missing:
            raise UserError(f"config.model lacks {', '.join(missing)} for model kind "
                            f"{config.model.kind!r}: start from default_config("
                            f"{config.model.kind!r}) (e.g. configs/vocoder_demo.py for istft)")
        a = config.audio
        if a.crop_samples % a.hop_length:
            raise UserError(f"config.audio.crop_samples={a.crop_samples} is not a multiple of "
                            f"config.audio.hop_length={a.hop_length}")
        m = config.model
        if m.kind == "hifigan":
            hop = int(np.prod(m.upsample_rates))
            if hop != a.hop_length:
                raise UserError(f"config.model.upsample_rates={tuple(m.upsample_rates)} "
                                f"multiply to {hop}, not config.audio.hop_length="
                                f"{a.hop_length}")
            if len(m.upsample_kernel_sizes) != len(m.upsample_rates):
                raise UserError("config.model.upsample_kernel_sizes and upsample_rates differ "
                                "in length")
            if len(m.resblock_kernel_sizes) != len(m.resblock_dilation_sizes):
                raise UserError("config.model.resblock_kernel_sizes and "
                                "resblock_dilation_sizes differ in length")
        if m.discriminator_width_divisor < 1 or 32 % m.discriminator_width_divisor:
            raise UserError(f"config.model.discriminator_width_divisor="
                            f"{m.discriminator_width_divisor}: must divide 32")
        if config.vocoder.mel.fmax > a.sample_rate / 2:
            raise UserError(f"config.vocoder.mel.fmax={config.vocoder.mel.fmax} is above "
                            f"Nyquist ({a.sample_rate / 2} Hz)")

    def init_variables(self, config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
        keys = jax.random.split(rng, 3)
        log_mel = jnp.zeros((1, config.vocoder.mel.n_mels, segment_frames(config)))
        wave = jnp.zeros((1, config.audio.crop_samples))
        mpd, msd = build_discriminators(config)
        return {"params": {
            "generator": build_generator(config).init(keys[0], log_mel)["params"],
            "mpd": mpd.init(keys[1], wave)["params"],
            "msd": msd.init(keys[2], wave)["params"]}}

    def loss(self, config, params, model_state, batch, rng, step):
        loss, metrics = gan_loss(config, params, batch["waveform"], step)
        return loss, (metrics, {})

    def training_transform(self, config, source, metadata):
        return Segments(config, source)

    def validation_transform(self, config, source, metadata):
        segments = Segments(config, source)
        return lambda index: segments(index)

    def validation_step(self, config, variables, batch):
        settings = mel_settings(config)
        wave = batch["waveform"]
        real = mel.log_mel(wave, settings)
        fake = vocode(config, variables["params"]["generator"], real, wave.shape[1])
        distance = jnp.mean(jnp.abs(mel.log_mel(fake, settings) - real), axis=(1, 2))
        # "loss" is what picks the best checkpoint
        return {"per_example": {"loss": distance, "log_mel_distance": distance},
                "summary": None}

    def evaluate(self, config, variables, mesh, *, progress=True):
        report = {"model_kind": config.model.kind}
        report.update(evaluation.resynthesis_metrics(config, variables, progress=progress))
        return report

    def format_table(self, report: dict) -> str:
        return evaluation.format_resynthesis(report)

    def write_examples(self, config: ml_collections.ConfigDict, variables: dict, folder: Path,
                       count: int) -> list[Path]:
        """For the first ``count`` evaluation clips: ``real``, ``vocoder`` and ``griffin_lim``
        .wav (the middle ``vocoder.eval.crop_samples``) with their log-mel pictures."""
        source, _ = open_split(config.data, config.eval.split)
        crops = Segments(config, source, config.vocoder.eval.crop_samples)
        real = np.stack([crops(i)["waveform"] for i in range(min(count, len(source)))])
        if not len(real):
            return []
        waves = {"real": real, **evaluation.resynthesize(config, variables, real)}
        settings = mel_settings(config)
        folders = []
        for index in range(len(real)):
            label = source[index].get("label", b"")
            label = label.decode() if isinstance(label, bytes) else str(label)
            target = Path(folder) / f"{index:03d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', label)}"
            target.mkdir(parents=True, exist_ok=True)
            for name, wave in waves.items():
                write_wav_atomic(target / f"{name}.wav", wave[index], config.audio.sample_rate)
                picture = mel.normalize(mel.log_mel(jnp.asarray(wave[index]), settings),
                                        settings)
                save_png(target / f"{name}.png", spectrogram_picture(np.asarray(picture)))
            folders.append(target)
        return folders

    def describe_model(self, config) -> str:
        m = config.model
        if m.kind == "hifigan":
            return (f"HiFi-GAN generator, upsample {tuple(m.upsample_rates)}, "
                    f"{m.upsample_initial_channel} channels")
        return f"iSTFT vocoder, {m.depth} ConvNeXt blocks of {m.dim}"
