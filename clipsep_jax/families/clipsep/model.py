"""CLIPSep's separation models and the one function that runs them: :func:`forward`.

``forward(config, variables, mag_mix, queries, mags, train)`` does what the reference's model
``forward`` does: add the mixture epsilon, warp to log frequency, take the log, run the U-Net and
query head, and (given the sources' magnitudes) build the targets and compute the loss.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipsep_jax import audio, losses
from clipsep_jax.config import validate
from clipsep_jax.families.clipsep.networks import PIT, CLIPSep, CLIPSepNIT, LabelSep

__all__ = ["KINDS", "EMBEDDING_KINDS", "build_model", "init_variables", "network_input",
           "warped_magnitudes", "forward"]

KINDS = ("clipsep", "clipsep_nit", "pit", "labelsep", "sop", "bertsep")
# Kinds whose queries are embedding vectors [B, N, query_dim] (CLIP's, SOP's ResNet vectors,
# BERTSep's label vectors); the rest take label ids (labelsep) or nothing (pit).
EMBEDDING_KINDS = ("clipsep", "clipsep_nit", "sop", "bertsep")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(config: ml_collections.ConfigDict):
    """The Flax module of ``config.model.kind`` at the configured sizes."""
    validate(config)
    m = config.model
    common = dict(
        num_downs=m.num_downs,
        base_width=m.base_width,
        num_mask_channels=m.num_mask_channels,
        dtype=_DTYPES[m.compute_dtype],
        batch_norm_momentum=m.batch_norm_momentum,
        batch_norm_epsilon=m.batch_norm_epsilon,
        up_conv_formulation=m.up_conv_formulation,
    )
    if m.kind in ("clipsep", "sop", "bertsep"):  # the same network; the queries differ
        return CLIPSep(**common)
    if m.kind == "clipsep_nit":
        return CLIPSepNIT(num_noise_heads=m.num_noise_heads, **common)
    if m.kind == "pit":
        return PIT(num_outputs=config.num_sources, **common)
    return LabelSep(num_labels=m.num_labels, query_dim=m.query_dim, **common)


def example_queries(config: ml_collections.ConfigDict, batch_size: int) -> jax.Array | None:
    """Zero queries of the right shape and dtype for ``config.model.kind`` (for initialisation)."""
    n = config.num_sources
    if config.model.kind == "pit":
        return None
    if config.model.kind == "labelsep":
        return jnp.zeros((batch_size, n), jnp.int32)
    return jnp.zeros((batch_size, n, config.model.query_dim), jnp.float32)


def init_variables(config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
    """Fresh variables ({'params', 'batch_stats'}) with the reference's initialisation.

    Parameter shapes do not depend on the spectrogram size, so the model is traced on the smallest
    input it accepts (2**num_downs square).
    """
    side = 2**config.model.num_downs
    log_mag = jnp.zeros((1, side, side), jnp.float32)
    model = build_model(config)
    return dict(model.init(rng, log_mag, example_queries(config, 1), train=False))


def warped_magnitudes(config: ml_collections.ConfigDict, magnitudes: jax.Array) -> jax.Array:
    """Linear-frequency magnitudes [..., 513, T] -> the model's frequency axis (log if set)."""
    if not config.audio.log_freq:
        return magnitudes
    return audio.warp_to_log_frequency(magnitudes, config.audio.num_log_freq_bins)


def network_input(
    config: ml_collections.ConfigDict, mag_mix: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Mixture magnitude [B, 513, T] -> (warped magnitude + epsilon, its log), both [B, F, T]."""
    mag_mix = jnp.asarray(mag_mix, jnp.float32) + config.audio.mixture_epsilon
    warped = warped_magnitudes(config, mag_mix)
    return warped, jnp.log(warped)


def _check_inputs(config, mag_mix, queries, mags) -> None:
    kind = config.model.kind
    if mag_mix.ndim != 3:
        raise ValueError(f"mag_mix must be [B, F, T], got shape {tuple(mag_mix.shape)}")
    batch = mag_mix.shape[0]
    if kind == "pit":
        if queries is not None:
            raise ValueError("model kind 'pit' takes no queries; pass queries=None")
    elif queries is None:
        raise ValueError(f"model kind {kind!r} needs queries")
    elif kind == "labelsep":
        if queries.ndim != 2 or not jnp.issubdtype(queries.dtype, jnp.integer):
            raise ValueError(
                f"labelsep queries must be integer label ids [B, N], got {queries.dtype} "
                f"{tuple(queries.shape)}"
            )
    elif queries.ndim != 3 or queries.shape[-1] != config.model.query_dim:
        raise ValueError(
            f"queries must be [B, N, {config.model.query_dim}] embeddings, got "
            f"{tuple(queries.shape)}"
        )
    if queries is not None and queries.shape[0] != batch:
        raise ValueError(f"queries batch {queries.shape[0]} != mag_mix batch {batch}")
    if mags is not None:
        expected_n = config.num_sources if kind == "pit" else queries.shape[1]
        if mags.ndim != 4 or mags.shape[0] != batch or mags.shape[1] != expected_n:
            raise ValueError(
                f"mags must be [B={batch}, N={expected_n}, F, T], got {tuple(mags.shape)}"
            )
        if mags.shape[2:] != mag_mix.shape[1:]:
            raise ValueError(
                f"mags' spectrogram shape {tuple(mags.shape[2:])} != mag_mix's "
                f"{tuple(mag_mix.shape[1:])}"
            )


def model_loss(
    config: ml_collections.ConfigDict,
    outputs: dict,
    warped_mix: jax.Array,
    warped_sources: jax.Array,
    step: int | jax.Array | None = None,
    example_weight: jax.Array | None = None,
) -> jax.Array:
    """The reference's loss of ``config.model.kind`` from model outputs and warped magnitudes.

    ``example_weight`` [B] multiplies each example's loss weights (soft drop_closest)."""
    targets, weight = losses.mask_targets(
        warped_mix,
        warped_sources,
        binary=config.clipsep.loss.binary_mask,
        threshold=config.clipsep.loss.binary_mask_threshold,
        weighted=config.clipsep.loss.weighted,
        weight_min=config.clipsep.loss.weight_min,
        weight_max=config.clipsep.loss.weight_max,
    )
    if example_weight is not None:
        weight = weight * example_weight.astype(jnp.float32)[:, None, None]
    kind = config.model.kind
    if kind == "pit":
        return losses.pit_loss(outputs["query_logits"], targets, weight)
    if kind == "clipsep_nit":
        use_noise_heads: Any = True
        if step is not None:
            use_noise_heads = jnp.asarray(step) >= config.clipsep.nit.warmup_steps
        return losses.nit_loss(
            outputs["query_logits"],
            outputs["noise_logits"],
            targets,
            weight,
            use_noise_heads=use_noise_heads,
            reg_coef=config.clipsep.nit.reg_coef,
            reg_epsilon=config.clipsep.nit.reg_epsilon,
            activation_reg_coef=config.clipsep.nit.activation_reg_coef,
            activation_reg_epsilon=config.clipsep.nit.activation_reg_epsilon,
        )
    return losses.separation_loss(outputs["query_logits"], targets, weight)


def forward(
    config: ml_collections.ConfigDict,
    variables: dict,
    mag_mix: jax.Array | np.ndarray,
    queries: jax.Array | np.ndarray | None = None,
    mags: jax.Array | np.ndarray | None = None,
    train: bool = False,
    step: int | jax.Array | None = None,
    example_weight: jax.Array | None = None,
) -> dict:
    """Runs the separation model of ``config.model.kind``.

    jit-able with the config closed over: ``jax.jit(functools.partial(forward, config))`` (or a
    hashable ``ml_collections.FrozenConfigDict`` as a static argument).

    Args:
      config: the model's configuration (``clipsep_jax.config`` schema).
      variables: {'params', 'batch_stats'}.
      mag_mix: linear-frequency mixture magnitude [B, 513, T] (T divisible by 2**num_downs).
      queries: [B, N, query_dim] embeddings (CLIPSep, CLIPSep-NIT, SOP, BERTSep), [B, N] int
        label ids (LabelSep), or None (PIT).
      mags: the sources' linear-frequency magnitudes [B, N, 513, T], when a loss is wanted.
      train: batch statistics instead of running statistics, and updated running statistics.
      step: training step, for CLIPSep-NIT's warm-up (None: after warm-up).
      example_weight: [B] factors of each example's loss weights (soft drop_closest).
    Returns:
      dict with ``query_logits`` [B, N, F, T] (pre-sigmoid, model frequency axis; PIT: its N
      output channels), ``noise_logits`` [B, H, F, T] (CLIPSep-NIT), ``loss`` (float32 scalar,
      when ``mags`` is given) and ``batch_stats`` (when ``train``).
    """
    mag_mix = jnp.asarray(mag_mix)
    queries = None if queries is None else jnp.asarray(queries)
    mags = None if mags is None else jnp.asarray(mags)
    _check_inputs(config, mag_mix, queries, mags)
    model = build_model(config)
    warped_mix, log_mag_mix = network_input(config, mag_mix)
    if train:
        outputs, updates = model.apply(
            variables, log_mag_mix, queries, train=True, mutable=["batch_stats"]
        )
        outputs = dict(outputs, batch_stats=updates["batch_stats"])
    else:
        outputs = dict(model.apply(variables, log_mag_mix, queries, train=False))
    if mags is not None:
        warped_sources = warped_magnitudes(config, mags.astype(jnp.float32))
        outputs["loss"] = model_loss(config, outputs, warped_mix, warped_sources, step,
                                     example_weight)
    return outputs
