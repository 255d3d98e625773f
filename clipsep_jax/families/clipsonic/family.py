"""The CLIPSonic family behind the family interface: a diffusion model of log-mel spectrograms
conditioned on CLIP embeddings, trained on the clips ``data_prep`` stores.

Training examples: a random crop of ``config.audio.crop_samples`` of a clip's waveform and, as
the condition, the CLIP image embedding of the frames at the crop's centre (the mean of
``query.num_frames`` frames, ``query.mode=image``: CLIPSonic-IQ/ZS) or the clip's label-prompt
text embedding (``query.mode=text``: CLIPSonic-SD). The log-mel is computed on the device in the
loss (:mod:`.mel`). Validation and evaluation score the denoising loss at fixed times and noise
per example (deterministic), overall and per quarter of the time range.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipsep_jax import sharding
from clipsep_jax.errors import UserError
from clipsep_jax.families.base import Family, check_choices
from clipsep_jax.families.clipsonic import evaluation
from clipsep_jax.families.clipsonic.generator import Generator
from clipsep_jax.families.clipsonic.losses import diffusion_loss
from clipsep_jax.families.clipsonic.model import (
    MiddleCrops,
    TrainingCrops,
    build_model,
    clean_mels,
    crop_frames,
    fixed_time_losses,
)
from clipsep_jax.families.clipsonic.pd import PRIOR_KINDS
from clipsep_jax.files import write_wav_atomic
from clipsep_jax.input_pipeline import open_split, sharded_batches
from clipsep_jax.pictures import save_png, spectrogram_picture

__all__ = ["CLIPSonicFamily"]

CHOICES = {"model.compute_dtype": ("float32", "bfloat16"), "model.spatial_dims": (1, 2),
           "query.mode": ("image", "text"), "clipsonic.prior.kind": ("", *PRIOR_KINDS)}


class CLIPSonicFamily(Family):
    """Diffusion models of audio conditioned on CLIP embeddings (CLIPSonic)."""

    name = "clipsonic"
    kinds = ("clipsonic",)
    task = "generation"
    usage_sections = ("eval", "prior")

    def model_config(self, kind: str) -> ml_collections.ConfigDict:
        m = ml_collections.ConfigDict()
        m.kind = kind
        m.spatial_dims = 1  # 1: mel bands as channels (small, CPU-friendly); 2: an image
        m.widths = (128, 256, 256)  # channels per U-Net level
        m.blocks_per_level = 2
        m.embedding_dim = 256  # the time + condition embedding
        m.condition_token = False  # also cross-attend to the condition at the lowest level
        m.condition_dim = 512  # CLIP's embedding size
        m.compute_dtype = "float32"
        return m

    def family_config(self) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.mel = ml_collections.ConfigDict()
        c.mel.n_mels = 80
        c.mel.fmin = 0.0
        c.mel.fmax = 8000.0
        c.mel.clamp = 1e-5
        c.mel.log_max = 2.5
        c.condition_dropout = 0.1  # examples trained without their condition (guidance)
        # CLIPSonic-PD: a text -> image embedding prior ("": none; "ridge" or "retrieval" fitted
        # on another split's image-text pairs, families/prior/baselines.py; "diffusion": a
        # trained diffusion prior); the evaluation gains text (PD) rows and
        # python -m clipsep_jax.generate --prior uses it.
        c.prior = ml_collections.ConfigDict()
        c.prior.kind = ""
        c.prior.split = "held_out"
        c.prior.ridge_l2 = 0.1
        c.prior.top_k = 8
        # kind="diffusion": a prior trained by python -m clipsep_jax.main (model kind
        # diffusion_prior; workdir or model directory) or LAION's DALLE2-pytorch file
        c.prior.checkpoint = ""
        c.prior.steps = 64  # its DDIM steps
        c.prior.best_of = 2
        c.prior.guidance = 1.0
        # Evaluation (python -m clipsep_jax.evaluate): the project's classifier, then
        # generations for every test clip per query mode and guidance scale.
        c.eval = ml_collections.ConfigDict()
        c.eval.guidance = "1,3"  # comma-separated guidance scales
        c.eval.steps = 25  # DDIM steps per generation
        c.eval.classifier_steps = 2000  # the classifier's training steps (batch 32)
        c.eval.classifier_crops = 4  # random crops per training clip for the classifier
        c.eval.classifier_min_accuracy = 0.95  # on real test clips, before it is used
        c.eval.griffin_lim_iterations = 32
        # a trained vocoder (workdir, model directory or pretrained folder; its mel settings
        # must be config.clipsonic.mel's): the table gains its waveforms' columns
        c.eval.vocoder = ""
        return c

    def kind_defaults(self, config: ml_collections.ConfigDict) -> None:
        config.audio.crop_samples = 32767  # 128 mel frames, about 2 s
        config.train.learning_rate = 2e-4
        config.train.ema_decay = 0.999

    def validate_config(self, config: ml_collections.ConfigDict) -> None:
        check_choices(config, CHOICES)
        frames = crop_frames(config)
        multiple = 2 ** (len(config.model.widths) - 1)
        if not config.model.widths:
            raise UserError("config.model.widths is empty: the U-Net needs one level")
        if frames % multiple:
            raise UserError(f"config.audio.crop_samples={config.audio.crop_samples} gives "
                            f"{frames} mel frames, not a multiple of {multiple} (2 ** (levels "
                            "- 1)); e.g. 32767 gives 128")
        if config.model.spatial_dims == 2 and config.clipsonic.mel.n_mels % multiple:
            raise UserError(f"config.clipsonic.mel.n_mels={config.clipsonic.mel.n_mels} is "
                            f"not a multiple of {multiple} (the 2D U-Net halves it)")
        prior = config.clipsonic.prior
        if prior.kind == "diffusion" and not prior.checkpoint:
            raise UserError("config.clipsonic.prior.kind='diffusion' needs "
                            "config.clipsonic.prior.checkpoint (a trained prior's workdir, "
                            "model directory or DALLE2-pytorch file)")
        if prior.kind in ("ridge", "retrieval") and prior.split in (config.data.train_split,
                                                                    config.eval.split):
            raise UserError(f"config.clipsonic.prior.split={prior.split!r} is the generator's "
                            "training split or the evaluation's: fit the prior on other data")
        if prior.ridge_l2 <= 0 or prior.top_k < 1:
            raise UserError(f"config.clipsonic.prior.ridge_l2={prior.ridge_l2} and top_k="
                            f"{prior.top_k}: must be > 0 and >= 1")
        try:
            scales = [float(w) for w in config.clipsonic.eval.guidance.split(",") if w.strip()]
        except ValueError:
            scales = []
        if not scales:
            raise UserError(f"config.clipsonic.eval.guidance={config.clipsonic.eval.guidance!r}"
                            ": expected comma-separated numbers")
        if not 0.0 <= config.clipsonic.condition_dropout < 1.0:
            raise UserError(f"config.clipsonic.condition_dropout="
                            f"{config.clipsonic.condition_dropout}: must be in [0, 1)")

    def init_variables(self, config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
        z = jnp.zeros((1, config.clipsonic.mel.n_mels, crop_frames(config)), jnp.float32)
        condition = jnp.zeros((1, config.model.condition_dim), jnp.float32)
        return dict(build_model(config).init(rng, z, jnp.zeros((1,)), condition,
                                             jnp.zeros((1,), bool)))

    def loss(self, config, params, model_state, batch, rng, step):
        model = build_model(config)

        def denoise(z, logsnr, condition, drop):
            return model.apply({"params": params}, z, logsnr, condition, drop)

        loss, metrics = diffusion_loss(denoise, clean_mels(config, batch["waveform"]),
                                       batch["condition"], rng,
                                       config.clipsonic.condition_dropout)
        return loss, (metrics, {})

    def training_transform(self, config, source, metadata):
        return TrainingCrops(config, source)

    def validation_transform(self, config, source, metadata):
        return MiddleCrops(config, source)

    def validation_step(self, config, variables, batch):
        losses, _ = fixed_time_losses(config, variables, batch)
        return {"per_example": {"loss": losses}, "summary": None}

    def evaluate(self, config, variables, mesh, *, progress=True):
        """The denoising loss on the test split (fixed times and noise per clip), then the
        generation metrics of :mod:`.evaluation` (relevance and Frechet distance from the
        project's classifier, per query mode and guidance scale)."""
        source, _ = open_split(config.data, config.eval.split)
        examples = MiddleCrops(config, source)
        replicated = sharding.replicate(variables, mesh)
        step = jax.jit(lambda v, b: fixed_time_losses(config, v, b))
        losses, times = [], []
        for batch in sharded_batches(lambda i: examples(i), len(source),
                                     -(-config.eval.batch_size // mesh.devices.size)
                                     * mesh.devices.size, mesh):
            loss, t = step(replicated, batch)
            valid = np.asarray(batch["valid"]).astype(bool)
            losses.append(np.asarray(loss)[valid])
            times.append(np.asarray(t)[valid])
        losses, times = np.concatenate(losses), np.concatenate(times)
        rows = [{"range": "all", "count": int(len(losses)), "loss": float(losses.mean())}]
        for k in range(4):
            chosen = (times >= k / 4) & (times < (k + 1) / 4)
            rows.append({"range": f"t in [{k / 4:.2f}, {(k + 1) / 4:.2f})",
                         "count": int(chosen.sum()),
                         "loss": float(losses[chosen].mean()) if chosen.any() else float("nan")})
        report = {"model_kind": config.model.kind, "split": config.eval.split, "rows": rows}
        report.update(evaluation.generation_metrics(config, variables, progress=progress))
        return report

    def format_table(self, report: dict) -> str:
        lines = ["| times | n | v-prediction MSE |", "|---|---|---|"]
        lines += [f"| {r['range']} | {r['count']} | {r['loss']:.4f} |" for r in report["rows"]]
        lines.append(f"\nDenoising loss on the {report['split']} split (fixed times and noise "
                     "per clip; lower is better).\n")
        return "\n".join(lines) + "\n" + evaluation.format_generation(report)

    def generator(self, config, variables, **kwargs):
        return Generator(config, variables, **kwargs)

    def write_examples(self, config: ml_collections.ConfigDict, variables: dict, folder: Path,
                       count: int) -> list[Path]:
        """For the first ``count`` class labels: ``<label>/text_zs.wav`` (the label as a text
        query) and, with a prior configured, ``text_pd.wav`` (through the prior), each with
        its log-mel picture, at the evaluation's largest guidance scale and crop length."""
        _, metadata = open_split(config.data, config.eval.split)
        labels = list(metadata.get("labels", []))[:count]
        if not labels:
            return []
        e = config.clipsonic.eval
        guidance = max(float(w) for w in e.guidance.split(",") if w.strip())
        generator = Generator(config, variables)
        settings = dict(num_samples=1, seconds=config.audio.crop_samples
                        / config.audio.sample_rate, guidance=guidance, steps=e.steps,
                        seed=config.eval.seed, griffin_lim_iterations=e.griffin_lim_iterations)
        outputs = {"text_zs": generator.generate(labels, **settings)}
        if config.query.mode != "text" and generator.use_prior():
            outputs["text_pd"] = generator.generate(labels, **settings)
        folders = []
        for index, label in enumerate(labels):
            target = Path(folder) / f"{index:03d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', label)}"
            target.mkdir(parents=True, exist_ok=True)
            for mode, results in outputs.items():
                write_wav_atomic(target / f"{mode}.wav", results[index]["waveforms"][0],
                                 config.audio.sample_rate)
                save_png(target / f"{mode}.png", spectrogram_picture(results[index]["mels"][0]))
            folders.append(target)
        return folders

    def describe_model(self, config) -> str:
        m = config.model
        return (f"clipsonic {m.spatial_dims}D denoiser, widths {tuple(m.widths)}, "
                f"{m.blocks_per_level} blocks per level")
