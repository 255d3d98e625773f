"""Weakly supervised text-queried separation with a frozen CLAP (Mahmud et al., ICLR 2024) behind
the family interface: model kind ``weaksep``, trained by ``python -m clipsep_jax.main``.

Training (``weaksep.mode``): ``unsupervised``, mixtures of N natural mixtures with captions and
no clean source, the loss 0.5 CNT + 5 (URL + CRL) (``weaksep.loss.terms`` picks terms);
``supervised``, URL on mixtures of two single sources with their "The sound of {label}" prompts;
``semi_supervised``, supervised_weight x the supervised URL + unsupervised_weight x the weak loss
(the paper's lambda_s, lambda_u; the reference's code has no such path). Examples:
:mod:`.data`; the network, the frozen CLAP's use and the losses of a batch: :mod:`.model`.

The frozen CLAP (``weaksep.clap``): a Hugging Face CLAP (hub id or folder; LAION's
``laion/larger_clap_music`` is HTSAT-base + RoBERTa like the paper's
``music_audioset_epoch_15_esc_90.14.pt``), or a CLAP trained here by the ``clap`` family (its
workdir or model directory). Its parameters are the family's frozen variables: placed by the
training loop, never checkpointed; a trained separator loads the same CLAP again from its config
to be queried.

Validation: mixtures of two validation clips (distinct labels), each queried with its prompt;
``loss`` (the supervised URL; the best checkpoint has the lowest: model selection on the
validation split, not on the test set as the reference does) and ``sdr``. Evaluation: the same
on ``eval.split`` with BSSEval SDR / SIR / SAR averaged over both sources (:mod:`.evaluation`).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from clipsep_jax import checkpoints
from clipsep_jax.encoders.clap import CLAP
from clipsep_jax.errors import UserError
from clipsep_jax.families.base import Family, check_choices
from clipsep_jax.families.clap.trained import save_trained_clap
from clipsep_jax.families.clipsep.unet import level_widths
from clipsep_jax.families.weaksep import evaluation
from clipsep_jax.families.weaksep.data import Clips, PairExamples, Prompts, TrainingExamples
from clipsep_jax.families.weaksep.frozen_clap import load_frozen_clap
from clipsep_jax.families.weaksep.model import (
    DTYPES,
    TERMS,
    init_variables,
    loss_terms,
    training_loss,
    validation_values,
)
from clipsep_jax.families.weaksep.separator import Separator
from clipsep_jax.input_pipeline import open_split

__all__ = ["WeakSepFamily", "load_frozen_clap"]

MODES = ("unsupervised", "supervised", "semi_supervised")


def _prompts(config: ml_collections.ConfigDict, clap: CLAP) -> Prompts:
    return Prompts(clap.tokenizer, clap.text_length)


class WeakSepFamily(Family):
    """The conditional attention U-Net trained with a frozen CLAP on captioned mixtures."""

    name = "weaksep"
    kinds = ("weaksep",)

    def model_config(self, kind: str) -> ml_collections.ConfigDict:
        """The reference's full size (87,681,250 U-Net parameters)."""
        m = ml_collections.ConfigDict()
        m.kind = kind
        m.num_downs = 7  # levels: 512 x 512 -> 4 x 4
        m.base_width = 64  # the outermost level's width; level d has base_width * min(2^d, 8)
        m.out_channels = 32  # U-Net output channels, combined by the query head
        m.attention_levels = (4, 5, 6)  # levels with self- + cross-attention (0 = outermost)
        m.num_heads = 8
        m.cond_dim = 768  # CLAP's text token states (RoBERTa-base)
        m.embedding_dim = 512  # CLAP's joint space (the query head's input)
        m.mlp_ratio = 2.0
        m.num_res_layers = 1
        m.num_cond_blocks = 1
        m.mask_padding = False  # True: cross-attention ignores padding tokens (the reference not)
        m.dtype = "float32"  # computation dtype: float32 | bfloat16
        m.batch_norm_momentum = 0.1  # PyTorch's convention
        return m

    def family_config(self) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        # The frozen CLAP: a Hugging Face CLAP (hub id or folder) or a clap-family run
        c.clap = "laion/larger_clap_music"
        c.clap_step = "best"  # a clap-family run's checkpoint: best | latest | a step
        c.mode = "unsupervised"  # unsupervised | supervised | semi_supervised
        c.num_mixtures = 2  # N natural mixtures per mixture of mixtures
        c.clauses_per_mixture = 2  # P clause prompts per mixture (AudioCaps: 3)
        c.supervised_split = ""  # single-source clips of the supervised term ("": the train split)
        c.data = ml_collections.ConfigDict()
        c.data.mixture_template = "The sound mixture of {labels}"  # labelled clips' captions
        c.data.source_template = "The sound of {label}"  # their clauses, and test queries
        c.data.min_sources_per_mixture = 2  # labelled clips: 2..P instruments per mixture
        c.loss = ml_collections.ConfigDict()
        c.loss.terms = "url,crl,cnt"
        c.loss.cnt_weight = 0.5
        c.loss.reconstruction_weight = 5.0
        c.loss.supervised_weight = 1.0  # lambda_s (semi_supervised)
        c.loss.unsupervised_weight = 1.0  # lambda_u (semi_supervised)
        # Items per CNT softmax group (0: the whole global batch; the reference: 2 per GPU)
        c.loss.cnt_group_size = 0
        c.loss.dedup_clauses = False  # True: a repeated prompt is not its own negative
        c.loss.clause_padding = "duplicate"  # fewer clauses than P: duplicate (ref.) | mask
        c.loss.reference_target_scaling = True  # labelled mixtures' targets p_n times too small
        c.eval = ml_collections.ConfigDict()
        c.eval.template = "The sound of {label}"  # the test queries of labelled clips
        return c

    def kind_defaults(self, config: ml_collections.ConfigDict) -> None:
        a = config.audio
        a.n_fft, a.win_length, a.hop_length = 1022, 1022, 256
        a.crop_samples = 131070  # 512 frames of 512 bins
        a.log_freq = False
        config.train.batch_size = 16
        config.train.learning_rate = 1e-4
        config.train.lr_schedule = "constant"
        config.train.lr_warmup_steps = 0
        # The reference clips nothing; at norm 1 every step of the demo was clipped (norms 8-14)
        # and the full loss fell behind URL only (2.85 against 3.16 dB SDR).
        config.train.grad_norm_clip = 1e6
        config.eval.binary_masks = False  # the reference scores its ratio masks
        config.eval.query_modes = "text"

    # -- configuration ----------------------------------------------------------------------

    def validate_config(self, config: ml_collections.ConfigDict) -> None:
        w, m, a = config.weaksep, config.model, config.audio
        check_choices(config, {"model.kind": self.kinds, "weaksep.mode": MODES,
                               "model.dtype": tuple(DTYPES),
                               "weaksep.loss.clause_padding": ("duplicate", "mask")})
        terms = loss_terms(config)
        if not terms or any(t not in TERMS for t in terms) or len(set(terms)) != len(terms):
            raise UserError(f"config.weaksep.loss.terms={w.loss.terms!r}: expected distinct "
                            f"terms among {', '.join(TERMS)}")
        for name in ("num_mixtures", "clauses_per_mixture"):
            if w[name] < 1:
                raise UserError(f"config.weaksep.{name}={w[name]}: must be >= 1")
        if not 1 <= w.data.min_sources_per_mixture <= w.clauses_per_mixture:
            raise UserError(f"config.weaksep.data.min_sources_per_mixture="
                            f"{w.data.min_sources_per_mixture}: must be in 1..clauses_per_mixture")
        for name in ("mixture_template", "source_template"):
            if "{label" not in w.data[name]:
                raise UserError(f"config.weaksep.data.{name}={w.data[name]!r} has no {{label}} "
                                "or {labels}")
        if "{label}" not in w.eval.template:
            raise UserError(f"config.weaksep.eval.template={w.eval.template!r} has no {{label}}")
        group = w.loss.cnt_group_size
        if group < 0 or (group and config.train.batch_size % group):
            raise UserError(f"config.weaksep.loss.cnt_group_size={group}: must be 0 or divide "
                            f"config.train.batch_size={config.train.batch_size}")
        if a.win_length != a.n_fft:
            raise UserError(f"config.audio.win_length={a.win_length}: the weaksep front end's "
                            f"window is n_fft={a.n_fft} long")
        multiple = 2**m.num_downs
        bins, frames = a.n_fft // 2 + 1, 1 + a.crop_samples // a.hop_length
        if bins % multiple or frames % multiple:
            raise UserError(f"config.audio: {bins} bins (n_fft // 2 + 1) x {frames} frames "
                            f"(1 + crop_samples // hop_length) must both be multiples of "
                            f"2**config.model.num_downs = {multiple}")
        bad = [d for d in m.attention_levels if not 0 <= d < m.num_downs]
        if bad:
            raise UserError(f"config.model.attention_levels={tuple(m.attention_levels)}: "
                            f"levels {bad} outside 0..num_downs-1")
        widths = level_widths(m.num_downs, m.base_width)
        if any(widths[d] % m.num_heads for d in m.attention_levels):
            raise UserError(f"config.model.num_heads={m.num_heads} must divide the attention "
                            f"levels' widths {[widths[d] for d in m.attention_levels]}")

    # -- model and loss ---------------------------------------------------------------------

    def frozen_variables(self, config):
        return {"clap": jax.device_get(load_frozen_clap(config).params)}

    # -- what travels with a packaged model ---------------------------------------------------

    def companions(self, config):
        return {"weaksep.clap": "clap"}  # the queries' CLAP; no query encoder

    def save_companion(self, config, field, source, target):
        if (source / checkpoints.CHECKPOINTS_DIR).is_dir():  # a clap-family run: its checkpoint
            return save_trained_clap(source, target, step=config.weaksep.clap_step)
        return super().save_companion(config, field, source, target)

    def init_variables(self, config, rng):
        return init_variables(config, rng)

    def loss(self, config, params, model_state, batch, rng, step):
        return training_loss(config, load_frozen_clap(config), params, model_state, batch)

    # -- data -------------------------------------------------------------------------------

    def _supervised(self, config, prompts: Prompts, train_source: Any) -> PairExamples | None:
        w = config.weaksep
        if w.mode == "unsupervised":
            return None
        split = w.supervised_split or config.data.train_split
        if split == config.data.train_split:
            source = train_source
        else:
            source, _ = open_split(config.data, split)
        clips = Clips(config, source, split)
        if clips.captioned:
            raise UserError(f"config.weaksep.mode={w.mode!r}: the supervised term needs "
                            f"single-source clips with labels; split {split!r} has captions")
        return PairExamples(clips, prompts, w.data.source_template)

    def training_transform(self, config, source, metadata):
        clap = load_frozen_clap(config)
        prompts = _prompts(config, clap)
        clips = Clips(config, source, config.data.train_split)
        return TrainingExamples(config, clips, prompts,
                                self._supervised(config, prompts, source))

    def validation_transform(self, config, source, metadata):
        clap = load_frozen_clap(config)
        examples = PairExamples(Clips(config, source, config.data.val_split),
                                _prompts(config, clap), config.weaksep.eval.template,
                                seed=config.eval.seed)
        return lambda index: examples(index)

    def validation_step(self, config, variables, batch):
        values = validation_values(config, load_frozen_clap(config), variables, batch)
        return {"per_example": values, "summary": None}

    # -- evaluation and inference -----------------------------------------------------------

    def evaluate(self, config, variables, mesh, *, progress=True):
        return evaluation.evaluate(config, variables, load_frozen_clap(config), mesh,
                                   progress=progress)

    def format_table(self, report: dict) -> str:
        return evaluation.format_table(report)

    def write_examples(self, config, variables, folder, count):
        return evaluation.write_examples(config, variables, load_frozen_clap(config), folder,
                                         count)

    def describe_model(self, config) -> str:
        m, w = config.model, config.weaksep
        return (f"weaksep: conditional attention U-Net, {m.num_downs} levels from width "
                f"{m.base_width}, attention at {tuple(m.attention_levels)}, {m.out_channels} "
                f"channels; frozen CLAP {w.clap!r}; {w.mode}, loss {w.loss.terms}")

    def load_reference_checkpoint(self, path, kind):
        from clipsep_jax.families.weaksep.convert import load_reference_checkpoint

        return load_reference_checkpoint(path)

    def separator(self, config, variables, **kwargs):
        return Separator(config, variables, clap=kwargs.get("clip"),
                         window_frames=kwargs.get("window_frames"),
                         overlap_frames=kwargs.get("overlap_frames"))


FAMILY = WeakSepFamily()
