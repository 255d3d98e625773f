"""The CLIPSep family behind the family interface: CLIPSep and CLIPSep-NIT (CLIP queries), and
the paper's baselines PIT (no queries), LabelSep (learned label table), SOP (frozen ImageNet
ResNet-18 frame vectors) and BERTSep (BERT label vectors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipsep_jax import audio
from clipsep_jax.encoders.bert import DEFAULT_BERT
from clipsep_jax.encoders.resnet import DEFAULT_RESNET
from clipsep_jax.errors import UserError
from clipsep_jax.families.base import Family, check_choices
from clipsep_jax.families.clipsep import convert, evaluation, losses, model
from clipsep_jax.families.clipsep.data import TrainingMixer, ValidationMixer, model_inputs
from clipsep_jax.families.clipsep.separator import Separator
from clipsep_jax.pictures import spectrogram_picture
from clipsep_jax.separation import binary_masks, linear_masks, masked_waveforms
from clipsep_jax.separation import signal_to_distortion as plain_sdr

__all__ = ["CLIPSepFamily", "training_queries"]

# Fields with a fixed set of values, checked by validate_config.
CHOICES = {
    "model.compute_dtype": ("float32", "bfloat16"),
    "model.up_conv_formulation": ("taps_first", "upsample_first"),
    "model.fusion": ("late",),
}
# Kinds queried through a frozen encoder other than CLIP: (query encoder, query mode).
_ENCODER_KINDS = {"sop": ("resnet", "image"), "bertsep": ("bert", "text")}


def training_queries(config: ml_collections.ConfigDict, batch: dict, step: jax.Array):
    """The queries of this step: ``batch["queries"]``, or for hybrid training image queries on
    even steps and text queries on odd steps (the reference's alternation)."""
    if "queries" in batch or config.model.kind == "pit":
        return batch.get("queries")
    if config.query.mode == "hybrid":
        return jnp.where(step % 2 == 0, batch["image_queries"], batch["text_queries"])
    return batch[f"{config.query.mode}_queries"]


def per_example_loss(config: ml_collections.ConfigDict, outputs: dict, mag_mix: jax.Array,
                     mags: jax.Array) -> jax.Array:
    """The model's loss of each example on its own ([B]; evaluation mode, after NIT's warm-up).
    Its mean is the batch loss, except for NIT's activation regulariser, which is then taken
    per example."""
    warped_mix, _ = model.network_input(config, mag_mix)
    warped_sources = model.warped_magnitudes(config, mags.astype(jnp.float32))
    logits = {k: v for k, v in outputs.items() if k.endswith("_logits")}

    def one(example_outputs, mix, sources):
        expand = jax.tree_util.tree_map(lambda x: x[None], example_outputs)
        return model.model_loss(config, expand, mix[None], sources[None], None)

    return jax.vmap(one)(logits, warped_mix, warped_sources)


def _validation_modes(config: ml_collections.ConfigDict) -> tuple[list[str], str]:
    """(query modes scored, the one whose loss is reported)."""
    kind = config.model.kind
    if kind in _ENCODER_KINDS:
        modes = [_ENCODER_KINDS[kind][1]]
    else:
        modes = ["image"] if kind in ("pit", "labelsep") else ["image", "text"]
    loss_mode = "image" if config.query.mode == "hybrid" else config.query.mode
    return modes, loss_mode if loss_mode in modes else modes[0]


class CLIPSepFamily(Family):
    """Mix-and-separate U-Net models queried by CLIP embeddings (CLIPSep, CLIPSep-NIT), by
    labels (LabelSep), or not at all (PIT)."""

    name = "clipsep"
    kinds = model.KINDS

    # -- configuration ----------------------------------------------------------------------

    def model_config(self, kind: str) -> ml_collections.ConfigDict:
        m = ml_collections.ConfigDict()
        m.kind = kind  # clipsep | clipsep_nit | pit | labelsep | sop | bertsep
        m.num_downs = 7  # U-Net levels (the reference's `layers`; at least 5)
        m.base_width = 64  # channels of the outermost level (the reference's ngf)
        m.num_mask_channels = 32  # k: intermediate masks (the reference's `channels`)
        # Query embedding size: CLIP's (512), SOP's ResNet-18 vectors (512), BERTSep's label
        # vectors (256: the reference's Linear(256, k)).
        m.query_dim = 256 if kind == "bertsep" else 512
        m.num_labels = 11  # LabelSep: rows of the label-embedding table
        m.num_noise_heads = 2  # CLIPSep-NIT
        # Computation dtype of convolutions and matmuls; parameters and BatchNorm stay float32.
        m.compute_dtype = "float32"
        m.batch_norm_momentum = 0.1  # PyTorch convention: weight of the new batch
        m.batch_norm_epsilon = 1e-5
        # How each up level's upsampling + 3x3 convolution is computed (the same function):
        # "taps_first" mixes channels at the lower resolution (a quarter of the multiply-adds),
        # "upsample_first" is the reference's order.
        m.up_conv_formulation = "taps_first"
        m.fusion = "late"  # query head: the reference's late fusion (the only one used)
        return m

    def family_config(self) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.loss = ml_collections.ConfigDict()
        c.loss.binary_mask = True  # False: ratio masks |S_n| / sum_m |S_m| as soft targets
        c.loss.binary_mask_threshold = 0.5  # target = |S_n| > threshold * |mixture|
        c.loss.weighted = True  # weight = clip(log1p(|mixture|), weight_min, weight_max)
        c.loss.weight_min = 1e-3
        c.loss.weight_max = 10.0
        # Noise invariant training (CLIPSep-NIT). Names follow the reference's flags.
        c.nit = ml_collections.ConfigDict()
        c.nit.warmup_steps = 0  # steps trained on query masks alone (pit_warmup_steps)
        c.nit.reg_coef = 0.0  # noise-head-must-help regulariser (off in the reference)
        c.nit.reg_epsilon = 0.1
        c.nit.activation_reg_coef = 0.1  # reg2_coef: penalises busy noise heads
        c.nit.activation_reg_epsilon = 0.25  # reg2_epsilon
        # The reference's drop_closest, for kinds queried by embeddings: from step
        # drop_closest_steps on, d > 0 trains each step on the batch_size least alike of
        # batch_size + d mixtures (the input pipeline delivers batch_size + d rows from the
        # start; before that step the first batch_size are kept); -1 (soft) weighs each
        # mixture's loss by relu(1 - 2 relu(similarity - 0.5)). Similarity: the largest cosine
        # between two of the mixture's query embeddings. 0: off (the reference's default).
        # With several devices each drops d / devices of its own rows (batch_size and d must
        # then divide by the device count); NIT and BERTSep take it too (the reference's
        # refuse it).
        c.drop_closest = 0
        c.drop_closest_steps = 10_000  # counted from 0: step k trains after k updates
        return c

    def kind_defaults(self, config: ml_collections.ConfigDict) -> None:
        """SOP queries with the frozen ResNet's frame vectors, BERTSep with BERT's label
        vectors (the label itself as the text, mean-pooled)."""
        kind = config.model.kind
        if kind == "sop":
            config.query.encoder, config.query.encoder_model = "resnet", DEFAULT_RESNET
        elif kind == "bertsep":
            config.query.encoder, config.query.encoder_model = "bert", DEFAULT_BERT
            config.query.mode = "text"
            config.query.text_template = "{}"

    def validate_config(self, config: ml_collections.ConfigDict) -> None:
        check_choices(config, CHOICES)
        m = config.model
        if m.num_downs < 5:
            raise UserError(f"config.model.num_downs={m.num_downs}: the U-Net needs >= 5")
        kind, q = m.kind, config.query
        if kind in _ENCODER_KINDS:
            encoder, mode = _ENCODER_KINDS[kind]
            if q.encoder != encoder:
                raise UserError(f"config.query.encoder={q.encoder!r}: model kind {kind!r} is "
                                f"queried through {encoder!r}")
            if q.mode != mode:
                raise UserError(f"config.query.mode={q.mode!r}: model kind {kind!r} takes "
                                f"{mode} queries only")
        elif kind in model.EMBEDDING_KINDS and q.encoder != "clip":
            raise UserError(f"config.query.encoder={q.encoder!r}: model kind {kind!r} is "
                            "queried through 'clip'")
        d = config.clipsep.drop_closest
        if d:
            if d < -1:
                raise UserError(f"config.clipsep.drop_closest={d}: expected 0 (off), a count "
                                "of mixtures to drop, or -1 (soft)")
            if kind not in model.EMBEDDING_KINDS:
                raise UserError(f"config.clipsep.drop_closest={d}: model kind {kind!r} has no "
                                "query embeddings to compare")
            if config.num_sources < 2:
                raise UserError(f"config.clipsep.drop_closest={d} needs config.num_sources "
                                ">= 2")
        if m.kind == "clipsep_nit" and m.num_noise_heads < config.num_sources:
            raise UserError(
                f"config.model.num_noise_heads={m.num_noise_heads} is smaller than "
                f"config.num_sources={config.num_sources}: every query needs its own noise head"
            )

    def migrate_config(self, saved: dict) -> dict:
        """Before the model-family redesign, ``loss`` and ``nit`` were top-level sections and
        ``drop_closest`` (then refused) lived in ``train``."""
        section = dict(saved.get(self.name, {}))
        for key in ("loss", "nit"):
            if key in saved:
                section.setdefault(key, saved.pop(key))
        train = saved.get("train", {})
        for key in ("drop_closest", "drop_closest_steps"):
            if key in train:
                section.setdefault(key, train.pop(key))
        if section:
            saved[self.name] = section
        return saved

    # -- model and loss ---------------------------------------------------------------------

    def init_variables(self, config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
        return model.init_variables(config, rng)

    def loss(self, config, params, model_state, batch, rng, step):
        queries = training_queries(config, batch, step)
        mag_mix, mags, example_weight = batch["mag_mix"], batch["mags"], None
        metrics = {}
        d = config.clipsep.drop_closest
        if d:
            active = step >= config.clipsep.drop_closest_steps
            similarity = losses.query_similarity(queries)
            if d > 0:
                # One group per device: each device drops its share of the closest pairs among
                # its own rows (on one device: the reference's selection over the batch).
                groups = jax.device_count()
                b = config.train.batch_size
                if b % groups or d % groups:
                    groups = 1
                mag_mix, mags, queries, kept = losses.drop_closest_rows(
                    (mag_mix, mags, queries, similarity), similarity, b, active, groups)
                metrics["kept_similarity"] = jnp.mean(kept)
            else:
                example_weight = jnp.where(active, losses.soft_drop_weight(similarity), 1.0)
                metrics["mean_example_weight"] = jnp.mean(example_weight)
        out = model.forward(config, {"params": params, **model_state}, mag_mix, queries, mags,
                            train=True, step=step, example_weight=example_weight)
        return out["loss"], (metrics, {"batch_stats": out["batch_stats"]})

    # -- data -------------------------------------------------------------------------------

    def rows_per_step(self, config):
        """``batch_size + drop_closest`` rows with hard drop_closest, else ``batch_size``."""
        return config.train.batch_size + max(0, config.clipsep.drop_closest)

    def training_transform(self, config, source, metadata):
        return TrainingMixer(config, source, metadata)

    def validation_transform(self, config, source, metadata):
        return ValidationMixer(config, source, metadata, seed=config.train.seed)

    def validation_step(self, config, variables, batch):
        """Per example: the loss of the trained query mode, the plain SDR of the separated
        queried source with image and text queries, and of the unprocessed mixture (the
        baseline); SDR only for the first ``train.validation_sdr_examples`` examples with an
        audible queried source."""
        modes, loss_mode = _validation_modes(config)
        sources = batch["waveforms"]  # [B, N, crop]
        mix_stft = batch["mix_stft"][..., 0] + 1j * batch["mix_stft"][..., 1]
        audible = jnp.sum(jnp.abs(sources[:, 0]), axis=-1) > 1e-5
        scored = audible & (batch["index"] < config.train.validation_sdr_examples)
        mixture = jnp.broadcast_to(jnp.sum(sources, axis=1, keepdims=True), sources.shape)
        per_example = {"sdr_mixture": jnp.where(scored, plain_sdr(sources, mixture)[:, 0],
                                                jnp.nan)}
        summary = None
        count = config.train.num_summary_examples
        for mode in modes:
            inputs = model_inputs(config, batch, mode)
            outputs = model.forward(config, variables, inputs["mag_mix"], inputs.get("queries"))
            if mode == loss_mode:
                per_example["loss"] = per_example_loss(config, outputs, inputs["mag_mix"],
                                                       inputs["mags"])
            probabilities = jax.nn.sigmoid(outputs["query_logits"].astype(jnp.float32))
            waves = masked_waveforms(config, linear_masks(config, probabilities), mix_stft,
                                     config.audio.crop_samples)
            per_example[f"sdr_{mode}"] = jnp.where(scored, plain_sdr(sources, waves)[:, 0],
                                                   jnp.nan)
            if summary is None and count > 0:
                summary = {
                    "mixture": audio.warp_to_log_frequency(batch["mag_mix"][:count]),
                    "mask": binary_masks(outputs["query_logits"][:count, 0]),
                    "mixture_audio": jnp.sum(sources[:count], axis=1),
                    "separated": waves[:count, 0],
                    "source": sources[:count, 0],
                }
        return {"per_example": per_example, "summary": summary}

    def validation_summaries(self, config, summary):
        images, audios = {}, {}
        for i in range(len(summary["mask"])):
            images[f"example_{i}/mixture"] = spectrogram_picture(np.log1p(summary["mixture"][i]))
            images[f"example_{i}/mask"] = spectrogram_picture(summary["mask"][i])
            for name, key in (("mixture", "mixture_audio"), ("separated", "separated"),
                              ("source", "source")):
                audios[f"example_{i}/{name}"] = np.asarray(summary[key][i])[None, :, None]
        return {"images": images, "audios": audios}

    # -- evaluation and inference -----------------------------------------------------------

    def evaluate(self, config, variables, mesh, *, progress=True):
        examples, _ = evaluation.open_test_mixtures(config)
        return evaluation.evaluate(config, variables, examples, mesh, progress=progress)

    def format_table(self, report: dict) -> str:
        return evaluation.format_table(report)

    def write_examples(self, config, variables, folder: Path, count: int) -> list[Path]:
        examples, metadata = evaluation.open_test_mixtures(config)
        return evaluation.write_examples(config, variables, examples, folder, count,
                                         tuple(metadata.get("labels", ())))

    def describe_model(self, config) -> str:
        m = config.model
        return (f"{m.kind}, {m.num_downs} levels, width {m.base_width}, "
                f"k {m.num_mask_channels}")

    def load_reference_checkpoint(self, path, kind):
        return convert.load_reference_checkpoint(path, kind)

    def separator(self, config, variables, **kwargs: Any) -> Separator:
        return Separator(config, variables, **kwargs)
