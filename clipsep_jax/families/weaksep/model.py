"""The weakly supervised separator as a model: the text-queried network, its variables, the
frozen CLAP it reads, and the training and validation losses of a batch.

The network (:class:`TextQueriedSeparator`) is the conditional attention U-Net reading log1p|X|
with cross-attention to CLAP's text token states, then the CLIPSep-style query head driven by
CLAP's text embedding: one ratio mask [F, T] per (mixture, prompt). Every prompt of a mixture is
a separate pass over the same input, as in the reference; the passes of a step run in turn with
the BatchNorm state threaded through, so each pass normalises with its own batch's statistics
and moves the running ones in turn (the reference's sequential forward calls).

CLAP is frozen and outside the trained parameters: its parameters come in the model state under
``"frozen"`` (``{"clap": ...}``, placed by the training loop, never checkpointed; see
:meth:`clipsep_jax.families.base.Family.frozen_variables`) and the text tower runs on the batch's
token ids inside the step (the reference's on-the-fly RoBERTa), its outputs with gradients
stopped. Gradients of CNT flow through CLAP's audio tower, the resampler and the iSTFT back to the
clause masks.

Batch fields (B items, N mixtures, P clauses, S tokens, L samples), numpy from :mod:`.data`:

- weak part (``weaksep.mode`` unsupervised or semi_supervised): ``constituents`` [B, N, L]
  (the natural mixtures as shares of the mixture of mixtures, which is their sum),
  ``target_scale`` [B, N] (1, or 1/p_n for the reference's too-small targets),
  ``mixture_ids`` / ``mixture_mask`` [B, N, S],
  ``clause_ids`` / ``clause_mask`` [B, N, P, S], ``clause_weights`` [B, N, P] float32,
  ``clause_valid`` [B, N, P] float32 (0: a padding slot), ``clause_keys`` [B, N, P] int32 (equal
  for the same clause text);
- supervised part (supervised or semi_supervised), also the validation examples: ``sources``
  [B, 2, L] (single sources as shares of their mixture), ``source_ids`` / ``source_mask``
  [B, 2, S].
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from clipsep_jax.encoders.clap import CLAP, resample
from clipsep_jax.encoders.clap_towers import ClapModel
from clipsep_jax.families.weaksep import losses
from clipsep_jax.families.weaksep.unet import CondAttentionUNet, QueryHead
from clipsep_jax.separation import signal_to_distortion

__all__ = ["TextQueriedSeparator", "build_model", "init_variables", "loss_terms",
           "text_conditions", "prompt_masks", "pair_masks", "training_loss", "validation_values",
           "DTYPES"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TERMS = ("url", "crl", "cnt")


class TextQueriedSeparator(nn.Module):
    """log1p|X| and one text prompt per row -> ratio mask: ``unet`` (its parameters under
    "unet"), then the query head over its ``out_channels`` features (under "query_head")."""

    unet: CondAttentionUNet
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, log_magnitude: jax.Array, token_states: jax.Array, token_mask: jax.Array,
                 text_embedding: jax.Array, train: bool = False) -> jax.Array:
        """log_magnitude [B, F, T, 1]; token_states [B, S, cond_dim]; token_mask [B, S];
        text_embedding [B, D] (unit norm) -> mask in (0, 1), float32 [B, F, T]."""
        features = self.unet(log_magnitude, token_states, token_mask, train)
        return QueryHead(self.unet.out_channels, self.dtype, name="query_head")(
            features, text_embedding)


def build_model(config: ml_collections.ConfigDict) -> TextQueriedSeparator:
    """The network of ``config.model``."""
    m = config.model
    dtype = DTYPES[m.dtype]
    unet = CondAttentionUNet(
        num_downs=m.num_downs, base_width=m.base_width, out_channels=m.out_channels,
        attention_levels=tuple(m.attention_levels), num_heads=m.num_heads, cond_dim=m.cond_dim,
        mlp_ratio=m.mlp_ratio, num_res_layers=m.num_res_layers,
        num_cond_blocks=m.num_cond_blocks, mask_padding=m.mask_padding, dtype=dtype,
        batch_norm_momentum=m.batch_norm_momentum)
    return TextQueriedSeparator(unet, dtype)


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(frequency bins, frames) of a training crop."""
    a = config.audio
    return a.n_fft // 2 + 1, 1 + a.crop_samples // a.hop_length


def init_variables(config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
    """Fresh ``{"params": {"unet", "query_head"}, "batch_stats": {"unet"}}``; pure."""
    bins, frames = input_shape(config)
    m = config.model
    return dict(build_model(config).init(
        rng, jnp.zeros((1, bins, frames, 1)), jnp.zeros((1, 4, m.cond_dim)),
        jnp.ones((1, 4), jnp.int32), jnp.zeros((1, m.embedding_dim))))


def loss_terms(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The weak loss's terms of ``weaksep.loss.terms`` ("url,crl,cnt")."""
    return tuple(t.strip() for t in config.weaksep.loss.terms.split(",") if t.strip())


def text_conditions(clap: CLAP, clap_params: dict, ids: jax.Array, mask: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """Frozen CLAP text tower: token ids and mask [..., S] -> (token states [..., S, H],
    embeddings [..., D]), float32, gradients stopped."""
    lead, length = ids.shape[:-1], ids.shape[-1]
    states, embedding = clap.model.apply(
        {"params": clap_params}, ids.reshape(-1, length), mask.reshape(-1, length),
        method=ClapModel.text_states_and_embedding)
    return (jax.lax.stop_gradient(states).reshape(*lead, length, states.shape[-1]),
            jax.lax.stop_gradient(embedding).reshape(*lead, embedding.shape[-1]))


def prompt_masks(config: ml_collections.ConfigDict, params: dict, batch_stats: dict,
                 log_magnitude: jax.Array, states: jax.Array, token_mask: jax.Array,
                 embeddings: jax.Array, train: bool) -> tuple[jax.Array, dict]:
    """One pass per prompt over the same mixtures.

    Args:
      log_magnitude: [B, F, T, 1]; states [B, C, S, H], token_mask [B, C, S], embeddings
        [B, C, D]: C prompts per mixture.
      train: batch statistics, each pass updating the running ones in turn.
    Returns:
      (masks [B, C, F, T] float32, the BatchNorm state after the C passes).
    """
    model = build_model(config)
    stats, masks = batch_stats, []
    # Unrolled, not a lax.scan: XLA's CPU backend runs these convolutions inside a while loop
    # about 60 times slower (measured: 17.7 s against 0.26 s for two passes' gradients).
    for prompt in range(states.shape[1]):
        variables = {"params": params, "batch_stats": stats}
        inputs = (log_magnitude, states[:, prompt], token_mask[:, prompt], embeddings[:, prompt])
        if train:
            out, updates = model.apply(variables, *inputs, train=True, mutable=["batch_stats"])
            stats = updates["batch_stats"]
        else:
            out = model.apply(variables, *inputs, train=False)
        masks.append(out)
    return jnp.stack(masks, axis=1), stats


def _frozen_clap_params(model_state: dict) -> dict:
    return model_state["frozen"]["clap"]


def pair_masks(config: ml_collections.ConfigDict, clap: CLAP, params: dict, model_state: dict,
               sources: jax.Array, ids: jax.Array, token_mask: jax.Array, train: bool
               ) -> tuple[dict, dict]:
    """Masks of mixtures of single sources, one prompt per source (supervised training,
    validation, evaluation).

    Args:
      sources: [B, K, L] the sources as shares of their mixture (their sum); ids, token_mask
        [B, K, S] the prompt of each.
    Returns:
      ({"masks" [B, K, F, T], "magnitude", "cos", "sin" [B, F, T] of the mixture,
      "targets" [B, K, F, T] the sources' magnitudes}, the BatchNorm state).
    """
    a = config.audio
    stft = dict(n_fft=a.n_fft, hop_length=a.hop_length)
    magnitude, cos, sin = losses.stft_magphase(jnp.sum(sources, axis=1), **stft)
    targets, _, _ = losses.stft_magphase(sources, **stft)
    states, embeddings = text_conditions(clap, _frozen_clap_params(model_state), ids, token_mask)
    masks, stats = prompt_masks(config, params, model_state["batch_stats"],
                                losses.unet_input(magnitude), states, token_mask, embeddings,
                                train)
    return ({"masks": masks, "magnitude": magnitude, "cos": cos, "sin": sin,
             "targets": targets}, stats)


def weak_loss(config: ml_collections.ConfigDict, clap: CLAP, params: dict, model_state: dict,
              batch: dict) -> tuple[jax.Array, dict, dict]:
    """The weakly supervised loss of a batch of mixtures of mixtures (see
    :mod:`clipsep_jax.families.weaksep.losses`): the terms of ``weaksep.loss.terms`` weighted as
    cnt_weight * CNT + reconstruction_weight * (URL + CRL). -> (loss, metrics, BatchNorm state)."""
    a, w = config.audio, config.weaksep
    terms = loss_terms(config)
    stft = dict(n_fft=a.n_fft, hop_length=a.hop_length)
    constituents = batch["constituents"]
    batch_size, num_mixtures, length = constituents.shape
    magnitude, cos, sin = losses.stft_magphase(jnp.sum(constituents, axis=1), **stft)
    targets, _, _ = losses.stft_magphase(constituents * batch["target_scale"][..., None],
                                         **stft)
    ids, token_mask = batch["mixture_ids"], batch["mixture_mask"]
    per_mixture = (batch["clause_ids"].shape[2]
                   if "crl" in terms or "cnt" in terms else 0)
    if per_mixture:
        tokens = batch["clause_ids"].shape[-1]
        ids = jnp.concatenate([ids, batch["clause_ids"].reshape(batch_size, -1, tokens)], 1)
        token_mask = jnp.concatenate(
            [token_mask, batch["clause_mask"].reshape(batch_size, -1, tokens)], 1)
    clap_params = _frozen_clap_params(model_state)
    states, embeddings = text_conditions(clap, clap_params, ids, token_mask)
    masks, stats = prompt_masks(config, params, model_state["batch_stats"],
                                losses.unet_input(magnitude), states, token_mask, embeddings,
                                train=True)  # masks [B, C, F, T]
    metrics = {}
    total = jnp.zeros((), jnp.float32)
    if "url" in terms:
        metrics["url"] = losses.unconditional_reconstruction_loss(
            masks[:, :num_mixtures], magnitude, targets)
        total += w.loss.reconstruction_weight * metrics["url"]
    if per_mixture:
        clause_masks = masks[:, num_mixtures:].reshape(batch_size, num_mixtures, per_mixture,
                                                       *masks.shape[2:])
        if "crl" in terms:
            weights = batch["clause_weights"] * batch["clause_valid"]
            metrics["crl"] = losses.clause_reconstruction_loss(clause_masks, weights, magnitude,
                                                               targets)
            total += w.loss.reconstruction_weight * metrics["crl"]
        if "cnt" in terms:
            waveforms = losses.masked_waveform(
                clause_masks, magnitude[:, None, None], cos[:, None, None], sin[:, None, None],
                length, **stft)
            at_clap_rate = resample(waveforms.reshape(-1, length), a.sample_rate,
                                    clap.sample_rate)
            audio = clap.audio_embedding(clap_params, at_clap_rate).reshape(
                batch_size, num_mixtures, per_mixture, -1)
            text = embeddings[:, num_mixtures:].reshape(audio.shape)
            metrics["cnt"] = losses.cnt_loss(
                audio, text, clap_params["logit_scale_a"],
                valid=batch["clause_valid"] > 0, clause_ids=batch["clause_keys"],
                dedup=w.loss.dedup_clauses, group_size=w.loss.cnt_group_size or None)
            total += w.loss.cnt_weight * metrics["cnt"]
    return total, metrics, stats


def supervised_loss(config: ml_collections.ConfigDict, clap: CLAP, params: dict,
                    model_state: dict, batch: dict) -> tuple[jax.Array, dict]:
    """URL on mixtures of two single sources with their own prompts ("The sound of {label}"):
    sum over sources of mean W_mix |M_k |X| - |S_k||. -> (loss, BatchNorm state)."""
    out, stats = pair_masks(config, clap, params, model_state, batch["sources"],
                            batch["source_ids"], batch["source_mask"], train=True)
    loss = losses.unconditional_reconstruction_loss(out["masks"], out["magnitude"],
                                                    out["targets"])
    return loss, stats


def training_loss(config: ml_collections.ConfigDict, clap: CLAP, params: dict,
                  model_state: dict, batch: dict) -> tuple[jax.Array, tuple[dict, dict]]:
    """The step's loss by ``weaksep.mode``: unsupervised, the weak loss; supervised, the
    supervised URL; semi_supervised, supervised_weight * that + unsupervised_weight * the weak
    loss. -> (loss, (metrics, new model state without the frozen CLAP))."""
    w = config.weaksep
    metrics: dict = {}
    state = dict(model_state)
    total = jnp.zeros((), jnp.float32)
    if w.mode != "supervised":
        weak, weak_metrics, state["batch_stats"] = weak_loss(config, clap, params, state, batch)
        metrics.update(weak_metrics)
        metrics["weak_loss"] = weak
        total += (w.loss.unsupervised_weight if w.mode == "semi_supervised" else 1.0) * weak
    if w.mode != "unsupervised":
        supervised, state["batch_stats"] = supervised_loss(config, clap, params, state, batch)
        metrics["supervised_url"] = supervised
        total += (w.loss.supervised_weight if w.mode == "semi_supervised" else 1.0) * supervised
    state.pop("frozen", None)
    return total, (metrics, state)


def validation_values(config: ml_collections.ConfigDict, clap: CLAP, variables: dict,
                      batch: dict) -> dict:
    """Per validation mixture (two single sources, each queried with its prompt; ratio masks,
    eval mode): ``loss``, the supervised URL (lower is better: the best checkpoint), and ``sdr``,
    the plain SDR of the two estimates with the mixture's phase, averaged, in dB."""
    a = config.audio
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    out, _ = pair_masks(config, clap, params, state, batch["sources"], batch["source_ids"],
                        batch["source_mask"], train=False)
    weight = losses.l1_weight(out["magnitude"])[:, None]
    loss = jnp.sum(jnp.mean(weight * jnp.abs(out["masks"] * out["magnitude"][:, None]
                                             - out["targets"]), axis=(2, 3)), axis=1)
    length = batch["sources"].shape[-1]
    estimates = losses.masked_waveform(out["masks"], out["magnitude"][:, None],
                                       out["cos"][:, None], out["sin"][:, None], length,
                                       n_fft=a.n_fft, hop_length=a.hop_length)
    sdr = jnp.mean(signal_to_distortion(batch["sources"], estimates), axis=1)
    return {"loss": loss, "sdr": sdr}
