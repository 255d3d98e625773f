"""Training targets and losses of CLIPSep, CLIPSep-NIT and PIT, as pure jit-able functions.

All maps are in the log-frequency domain: masks, targets and weights are [B, N, F, T] / [B, F, T].
The binary cross-entropy is computed on probabilities, as PyTorch's ``binary_cross_entropy``
(each logarithm clamped at -100, gradient ``w (p - t) / max(p (1 - p), 1e-12)``), because the NIT
combined mask min(1, sigmoid(z) + sigmoid(n)) has no logit form; losses then equal the reference's
even where masks saturate.

Permutation minima (NIT, PIT) are one tensor expression: a pairwise loss table [B, N, M] (query i
against noise head / target j) is gathered through a static table of all assignments and
minimised, so no loop over permutations is traced.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

_LOG_CLAMP = -100.0
_GRAD_EPS = 1e-12


def mask_targets(
    mag_mix: jax.Array,
    mags: jax.Array,
    *,
    binary: bool = True,
    threshold: float = 0.5,
    weighted: bool = True,
    weight_min: float = 1e-3,
    weight_max: float = 10.0,
) -> tuple[jax.Array, jax.Array]:
    """Ground-truth masks and loss weights from warped magnitudes.

    Args:
      mag_mix: mixture magnitude [B, F, T] (epsilon already added).
      mags: source magnitudes [B, N, F, T].
      binary: True for |S_n| > threshold * |mixture|; False for ratio masks
        |S_n| / sum_m |S_m| clipped to [0, 1].
      weighted: True for clip(log1p(|mixture|), weight_min, weight_max), else ones.
    Returns:
      targets [B, N, F, T] float32 and weight [B, F, T] float32.
    """
    mag_mix = mag_mix.astype(jnp.float32)
    mags = mags.astype(jnp.float32)
    if binary:
        targets = (mags > threshold * mag_mix[:, None]).astype(jnp.float32)
    else:
        total = jnp.sum(mags, axis=1, keepdims=True)
        targets = jnp.clip(mags / jnp.where(total > 0, total, 1.0), 0.0, 1.0)
    if weighted:
        weight = jnp.clip(jnp.log1p(mag_mix), weight_min, weight_max)
    else:
        weight = jnp.ones_like(mag_mix)
    return targets, weight


@jax.custom_vjp
def binary_cross_entropy(prob: jax.Array, target: jax.Array, weight: jax.Array) -> jax.Array:
    """Elementwise weighted BCE of probabilities, as ``torch.nn.functional.binary_cross_entropy``.

    ``-weight * (t * max(log p, -100) + (1 - t) * max(log(1 - p), -100))``; finite for p in {0, 1}.
    Shapes broadcast; returns float32.
    """
    return _bce_value(prob, target, weight)


def _clamped_log(x: jax.Array) -> jax.Array:
    safe = jnp.where(x > 0, x, 1.0)
    return jnp.where(x > 0, jnp.maximum(jnp.log(safe), _LOG_CLAMP), _LOG_CLAMP)


def _bce_value(prob, target, weight):
    log_p = _clamped_log(prob)
    log_1mp = _clamped_log(1.0 - prob)
    return -weight * (target * log_p + (1.0 - target) * log_1mp)


def _bce_forward(prob, target, weight):
    return _bce_value(prob, target, weight), (prob, target, weight)


def _reduce_to(grad: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sums a broadcast gradient back to an operand's shape."""
    extra = grad.ndim - len(shape)
    grad = jnp.sum(grad, axis=tuple(range(extra))) if extra else grad
    axes = tuple(i for i, size in enumerate(shape) if size == 1 and grad.shape[i] != 1)
    return jnp.sum(grad, axis=axes, keepdims=True) if axes else grad


def _bce_backward(residuals, cotangent):
    prob, target, weight = residuals
    grad_prob = weight * (prob - target) / jnp.maximum(prob * (1.0 - prob), _GRAD_EPS)
    grad_target = -weight * (_clamped_log(prob) - _clamped_log(1.0 - prob))
    grad_weight = _bce_value(prob, target, 1.0)
    return (
        _reduce_to(cotangent * grad_prob, prob.shape).astype(prob.dtype),
        _reduce_to(cotangent * grad_target, target.shape).astype(target.dtype),
        _reduce_to(cotangent * grad_weight, weight.shape).astype(weight.dtype),
    )


binary_cross_entropy.defvjp(_bce_forward, _bce_backward)


def per_example_bce(prob: jax.Array, target: jax.Array, weight: jax.Array) -> jax.Array:
    """Mean weighted BCE over the last two (frequency, time) axes: [..., F, T] -> [...]."""
    return jnp.mean(binary_cross_entropy(prob, target, weight), axis=(-2, -1))


def separation_loss(query_logits: jax.Array, targets: jax.Array, weight: jax.Array) -> jax.Array:
    """CLIPSep / LabelSep loss: mean weighted BCE of sigmoid(logits), over batch and sources.

    query_logits, targets: [B, N, F, T]; weight: [B, F, T]. Returns a float32 scalar.
    """
    prob = jax.nn.sigmoid(query_logits.astype(jnp.float32))
    return jnp.mean(per_example_bce(prob, targets, weight[:, None]))


@functools.lru_cache(maxsize=32)
def assignment_table(num_queries: int, num_slots: int) -> np.ndarray:
    """All injective assignments of ``num_slots`` slots to ``num_queries`` queries.

    Returns int32 [A, num_queries]: row a gives the slot of each query; with equal counts these are
    the permutations, in lexicographic order (A = N!).
    """
    if num_slots < num_queries:
        raise ValueError(f"{num_slots} slots cannot be assigned to {num_queries} queries")
    rows = list(itertools.permutations(range(num_slots), num_queries))
    return np.asarray(rows, dtype=np.int32).reshape(len(rows), num_queries)


def _assignment_costs(pairwise: jax.Array) -> jax.Array:
    """pairwise [B, N, M] (query i, slot j) -> mean over queries for every assignment, [B, A]."""
    table = assignment_table(pairwise.shape[1], pairwise.shape[2])  # [A, N]
    queries = np.arange(pairwise.shape[1])[None, :]  # [1, N]
    return jnp.mean(pairwise[:, queries, table], axis=-1)  # [B, A, N] -> [B, A]


def combine_with_noise(query_prob: jax.Array, noise_prob: jax.Array) -> jax.Array:
    """NIT's combined mask min(1, q + n) as 1 - relu(1 - (q + n)): PyTorch's gradient at 1."""
    return 1.0 - jax.nn.relu(1.0 - (query_prob + noise_prob))


def nit_loss(
    query_logits: jax.Array,
    noise_logits: jax.Array,
    targets: jax.Array,
    weight: jax.Array,
    *,
    use_noise_heads: bool | jax.Array = True,
    reg_coef: float = 0.0,
    reg_epsilon: float = 0.1,
    activation_reg_coef: float = 0.1,
    activation_reg_epsilon: float = 0.25,
) -> jax.Array:
    """Noise invariant training loss, minimised over assignments of noise heads to queries.

    For each example and each assignment a (noise head a_i for query i), the cost is the mean over
    queries of the weighted BCE of min(1, sigmoid(z_i) + sigmoid(n_{a_i})) against target i (plus
    ``reg_coef`` times the mean of relu(that BCE - BCE(sigmoid(n_{a_i}), t_i) + reg_epsilon)); the
    loss is the batch mean of the minimum over assignments, plus the activation regulariser
    ``activation_reg_coef * relu(mean(sum_j sigmoid(n_j)) - activation_reg_epsilon)``.

    During warm-up (``use_noise_heads`` False; may be a traced boolean) the loss is
    :func:`separation_loss` of the query masks alone, as in the reference.

    Args:
      query_logits: [B, N, F, T]; noise_logits: [B, H, F, T] with H >= N;
      targets: [B, N, F, T]; weight: [B, F, T].
    """
    query_prob = jax.nn.sigmoid(query_logits.astype(jnp.float32))  # [B, N, F, T]
    if use_noise_heads is False:
        return separation_loss(query_logits, targets, weight)
    noise_prob = jax.nn.sigmoid(noise_logits.astype(jnp.float32))  # [B, H, F, T]
    combined = combine_with_noise(query_prob[:, :, None], noise_prob[:, None])  # [B, N, H, F, T]
    pairwise = per_example_bce(combined, targets[:, :, None], weight[:, None, None])  # [B, N, H]
    costs = _assignment_costs(pairwise)
    if reg_coef:
        noise_alone = per_example_bce(
            noise_prob[:, None], targets[:, :, None], weight[:, None, None]
        )  # [B, N, H]
        costs = costs + reg_coef * _assignment_costs(
            jax.nn.relu(pairwise - noise_alone + reg_epsilon)
        )
    loss = jnp.mean(jnp.min(costs, axis=1))
    mean_noise_activation = jnp.mean(jnp.sum(noise_prob, axis=1))
    loss = loss + activation_reg_coef * jax.nn.relu(mean_noise_activation - activation_reg_epsilon)
    if use_noise_heads is True:
        return loss
    return jnp.where(use_noise_heads, loss, separation_loss(query_logits, targets, weight))


def pit_loss(logits: jax.Array, targets: jax.Array, weight: jax.Array) -> jax.Array:
    """Permutation invariant loss: batch mean of the minimum over permutations of the mean BCE.

    logits, targets: [B, N, F, T]; weight: [B, F, T]. Returns a float32 scalar.
    """
    prob = jax.nn.sigmoid(logits.astype(jnp.float32))
    # pairwise[b, i, j]: output i against target j.
    pairwise = per_example_bce(prob[:, :, None], targets[:, None], weight[:, None, None])
    return jnp.mean(jnp.min(_assignment_costs(pairwise), axis=1))


# ---------------------------------------------------------------------------------------------
# drop_closest: training on mixtures whose queries are not alike (the reference's option)


def query_similarity(queries: jax.Array) -> jax.Array:
    """How alike each example's queries are: the largest cosine similarity between two of its N
    query embeddings, [B, N, D] -> [B] float32 (N = 2: the reference's cosine of the pair).
    Treated as a constant (no gradient), as the reference detaches the embeddings."""
    q = jax.lax.stop_gradient(queries).astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(q * q, axis=-1, keepdims=True))
    unit = q / jnp.maximum(norm, 1e-8)  # torch's cosine_similarity clamps the norms at 1e-8
    cosine = jnp.einsum("bnd,bmd->bnm", unit, unit, precision=jax.lax.Precision.HIGHEST)
    n = queries.shape[1]
    off_diagonal = ~jnp.eye(n, dtype=bool)
    return jnp.max(jnp.where(off_diagonal, cosine, -jnp.inf), axis=(1, 2))


def rows_to_keep(similarity: jax.Array, num_keep: int, active: jax.Array | bool) -> jax.Array:
    """Hard drop_closest: indices of the ``num_keep`` rows to train on out of ``B + d``.

    Active: the rows with the smallest similarity, in ascending order of it (the reference
    sorts the batch and drops its last d; ties keep the earlier row). Inactive (before
    ``drop_closest_steps``): the first ``num_keep`` rows, so the step trains on a batch of the
    usual size either way. [B + d] -> int32 [num_keep]."""
    order = jnp.argsort(similarity, stable=True)[:num_keep]
    return jnp.where(active, order, jnp.arange(num_keep)).astype(jnp.int32)


def drop_closest_rows(arrays: tuple[jax.Array, ...], similarity: jax.Array, num_keep: int,
                      active: jax.Array | bool, groups: int = 1) -> tuple[jax.Array, ...]:
    """Hard drop_closest over ``groups`` equal blocks of the batch: each block of
    ``(B + d) / groups`` rows keeps its ``num_keep / groups`` least alike (:func:`rows_to_keep`).

    With the batch split over the devices in contiguous blocks, one group per device makes the
    selection local (no device sees another's rows, and the kept batch stays split as before);
    ``groups=1`` is the reference's selection over the whole batch. Arrays [B + d, ...] ->
    [num_keep, ...]."""
    rows = similarity.shape[0]
    if rows % groups or num_keep % groups:
        raise ValueError(f"{rows} rows and {num_keep} kept rows do not split into {groups} "
                         "groups")
    keep = jax.vmap(rows_to_keep, in_axes=(0, None, None))(
        similarity.reshape(groups, rows // groups), num_keep // groups, active)
    out = []
    for x in arrays:
        blocks = x.reshape(groups, rows // groups, *x.shape[1:])
        index = keep.reshape(groups, num_keep // groups, *([1] * (x.ndim - 1)))
        kept = jnp.take_along_axis(blocks, index, axis=1)
        out.append(kept.reshape(num_keep, *x.shape[1:]))
    return tuple(out)


def soft_drop_weight(similarity: jax.Array) -> jax.Array:
    """Soft drop_closest (the reference's ``drop_closest=-1``): each example's loss weight,
    1 up to similarity 0.5, falling linearly to 0 at similarity 1: relu(1 - 2 relu(s - 0.5)).
    [B] -> [B]; the loss stays a plain mean (not renormalised by the weights)."""
    return jax.nn.relu(1.0 - 2.0 * jax.nn.relu(similarity - 0.5))
