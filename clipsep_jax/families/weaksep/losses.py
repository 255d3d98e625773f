"""The weakly supervised separator's front end, mixtures of mixtures and training losses (the
reference's ``main.py``), as pure jit-able functions.

Notation: B items, N constituent mixtures per item (2), P clause prompts per constituent (2 or 3),
F = 512 frequency bins, T = 512 frames, L = 131,070 samples at 16 kHz, D = 512 (CLAP embeddings).
Magnitudes are linear STFT magnitudes (no log, no normalisation); masks are ratio masks in (0, 1).
The U-Net, the query head and CLAP's audio tower are outside this module: the losses take their
outputs (masks, embeddings) as arrays.

The step's loss is ``total_loss(cnt, url, crl) = 0.5 * CNT + 5 * (URL + CRL)`` with

- URL (:func:`unconditional_reconstruction_loss`): each mixture-prompt mask times |X| against its
  constituent's magnitude, weighted by the mixture's clamped log-magnitude;
- CRL (:func:`clause_reconstruction_loss`): the clause masks' weighted sum times |X| against the
  constituent's magnitude, weighted by the constituent's clamped log-magnitude;
- CNT (:func:`contrastive_loss`): audio-to-text cross-entropy between CLAP embeddings of the
  clause-separated waveforms (:func:`masked_waveform`) and the clause prompts' text embeddings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clipsep_jax import audio

SAMPLE_RATE = 16_000
N_FFT = 1022
HOP_LENGTH = 256
AUDIO_LENGTH = 131_070  # 512 frames of 512 bins
MAGNITUDE_FLOOR = 1e-10  # torchlibrosa's magphase clamp
WEIGHT_RANGE = (1e-3, 10.0)
CNT_WEIGHT = 0.5
RECONSTRUCTION_WEIGHT = 5.0

_HIGHEST = jax.lax.Precision.HIGHEST


def stft_magphase(waveform: jax.Array, *, n_fft: int = N_FFT, hop_length: int = HOP_LENGTH
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """STFT (n_fft 1022, hop 256, periodic Hann of 1022, centred with reflect padding) split as
    torchlibrosa's ``magphase``.

    Args:
      waveform: float [..., L] (L > n_fft // 2); 131,070 samples give 512 frames.
      n_fft, hop_length: the reference's 1022 and 256 (the window is a periodic Hann of n_fft).
    Returns:
      (magnitude, cos, sin), each float32 [..., n_fft // 2 + 1, 1 + L // hop_length] (frequency,
      then time):
      magnitude = sqrt(re^2 + im^2); cos = re / max(magnitude, 1e-10) and sin likewise, so both
      are 0 at zero-magnitude bins. The magnitude's gradient is undefined at exact zeros; the
      reference differentiates through none of these (inputs and targets are detached).
    """
    spectrum = audio.stft(waveform, n_fft=n_fft, hop_length=hop_length, win_length=n_fft)
    real, imag = jnp.real(spectrum), jnp.imag(spectrum)
    magnitude = jnp.sqrt(real * real + imag * imag)
    denominator = jnp.maximum(magnitude, MAGNITUDE_FLOOR)
    return magnitude, real / denominator, imag / denominator


def unet_input(magnitude: jax.Array) -> jax.Array:
    """The U-Net's input: log1p(|X|) with its gradient stopped, [..., F, T] -> [..., F, T, 1].
    No other normalisation than the U-Net's input BatchNorm."""
    return jax.lax.stop_gradient(jnp.log1p(magnitude))[..., None]


def masked_waveform(mask: jax.Array, magnitude: jax.Array, cos: jax.Array, sin: jax.Array,
                    length: int = AUDIO_LENGTH, *, n_fft: int = N_FFT,
                    hop_length: int = HOP_LENGTH) -> jax.Array:
    """The waveform of a masked magnitude with the mixture's phase.

    iSTFT of (mask * |X|) * (cos + i sin), as ``librosa.istft(center=True, length=length)`` with
    the same window and hop (what torchlibrosa's ISTFT computes).

    Args:
      mask: [..., 512, T]; magnitude, cos, sin: [..., 512, T] from :func:`stft_magphase` of the
        mixture (broadcast against ``mask``).
      length: output samples (131,070).
      n_fft, hop_length: those of :func:`stft_magphase`.
    Returns:
      float32 [..., length]; differentiable in ``mask``.
    """
    estimate = mask * magnitude
    spectrum = jax.lax.complex(estimate * cos, estimate * sin)
    return audio.istft(spectrum, hop_length=hop_length, win_length=n_fft, length=length)


def mixtures_of_mixtures(sources: jax.Array, *, reference_target_scaling: bool = True
                         ) -> tuple[jax.Array, jax.Array]:
    """The mixture of mixtures and its N constituents' waveforms (the reconstruction targets).

    Args:
      sources: [B, N, P, L]; constituent n is the sum of sources[:, n]. MUSIC/VGGSound: P solo
        clips of distinct classes, one per clause; AudioCaps: one natural clip each (P = 1).
      reference_target_scaling: True (the reference): every constituent target is
        sum_k s_{n,k} / (N P * P), P times smaller than its share of the mixture, because the
        reference's dataset divides the clips in place twice (spec 1.4). False: the consistent
        sum_k s_{n,k} / (N P). With P = 1 (AudioCaps, and every test mixture) both agree.
    Returns:
      (mixture [B, L] = sum_{n,k} s_{n,k} / (N P), constituents [B, N, L]).
    """
    _, num_mixtures, per_mixture, _ = sources.shape
    shares = jnp.sum(sources / (num_mixtures * per_mixture), axis=2)  # [B, N, L]
    constituents = shares / per_mixture if reference_target_scaling else shares
    return jnp.sum(shares, axis=1), constituents


def l1_weight(magnitude: jax.Array) -> jax.Array:
    """Per-bin weight of the reconstruction losses: clip(log1p(magnitude), 1e-3, 10)."""
    return jnp.clip(jnp.log1p(magnitude), *WEIGHT_RANGE)


def weighted_l1(prediction: jax.Array, target: jax.Array, weight: jax.Array) -> jax.Array:
    """mean(weight * |prediction - target|) over every element (broadcast shape); the weights'
    sum does not normalise it. -> float32 scalar."""
    return jnp.mean(weight * jnp.abs(prediction - target))


def unconditional_reconstruction_loss(masks: jax.Array, mixture_magnitude: jax.Array,
                                      target_magnitudes: jax.Array) -> jax.Array:
    """URL = sum_n mean_{b,f,t} W_mix * |M_n |X| - |Y_n||, W_mix = l1_weight(|X|).

    Args:
      masks: [B, N, F, T], mask of the n-th mixture prompt (the constituent's caption, or
        "The sound mixture of A and B").
      mixture_magnitude: |X| [B, F, T] of the mixture of mixtures.
      target_magnitudes: |Y_n| [B, N, F, T], the constituents' magnitudes.
    Returns:
      float32 scalar, summed (not averaged) over the N mixtures.
    """
    weight = l1_weight(mixture_magnitude)[:, None]
    per_mixture = jnp.mean(weight * jnp.abs(masks * mixture_magnitude[:, None]
                                            - target_magnitudes), axis=(0, 2, 3))
    return jnp.sum(per_mixture)


def clause_reconstruction_loss(clause_masks: jax.Array, clause_weights: jax.Array,
                               mixture_magnitude: jax.Array,
                               target_magnitudes: jax.Array) -> jax.Array:
    """CRL = sum_n mean_{b,f,t} W_n * |sum_k w_{n,k} M_{n,k} |X| - |Y_n||, W_n = l1_weight(|Y_n|).

    The clause masks apply to the mixture of mixtures |X|, not to constituent n.

    Args:
      clause_masks: [B, N, P, F, T], mask of clause prompt k of constituent n.
      clause_weights: [B, N, P]: 1, or 1/count for the reference's padded duplicate clauses
        (:func:`clipsep_jax.families.weaksep.captions.choose_clauses`); 0 drops a padding clause.
      mixture_magnitude: |X| [B, F, T].
      target_magnitudes: |Y_n| [B, N, F, T].
    Returns:
      float32 scalar, summed over the N constituents.
    """
    combined = jnp.einsum("bnk,bnkft->bnft", clause_weights, clause_masks, precision=_HIGHEST)
    weight = l1_weight(target_magnitudes)
    per_mixture = jnp.mean(weight * jnp.abs(combined * mixture_magnitude[:, None]
                                            - target_magnitudes), axis=(0, 2, 3))
    return jnp.sum(per_mixture)


def contrastive_loss(audio_embeddings: jax.Array, text_embeddings: jax.Array,
                     logit_scale: jax.Array | float, *, valid: jax.Array | None = None,
                     clause_ids: jax.Array | None = None, dedup: bool = False) -> jax.Array:
    """Audio-to-text cross-entropy of one softmax group (CLAP's ``contrastive_loss``).

    logits[i, j] = exp(logit_scale) * <a_i, t_j>; the loss of row i is -log softmax_j(logits[i])
    at j = i (its own prompt), averaged over rows. There is no text-to-audio term.

    Args:
      audio_embeddings: [M, D], CLAP embeddings of the separated clause waveforms (L2-normalised
        by CLAP; not renormalised here).
      text_embeddings: [M, D], CLAP embeddings of the same rows' clause prompts.
      logit_scale: CLAP's ``logit_scale_a`` as stored (a log); exp(logit_scale) multiplies the
        cosine similarities (1 / temperature). Its gradient is stopped, as the reference detaches
        it.
      valid: [M] bool, or None for all rows: invalid rows (padding clauses) are neither anchors
        nor negatives.
      clause_ids: [M] int, equal for rows whose prompts are the same text; used when ``dedup``.
      dedup: False (the reference): a prompt occurring twice in the group (padded duplicates,
        repeated clauses, the same class in two items) is a negative of itself with the same
        logit, so those rows cannot go below ln 2. True: for row i, the other rows' columns with
        clause_ids equal to row i's are left out of its softmax.
    Returns:
      float32 scalar, the mean over valid rows (0 if none is valid).
    """
    count = audio_embeddings.shape[0]
    scale = jnp.exp(jax.lax.stop_gradient(jnp.asarray(logit_scale, jnp.float32)))
    logits = scale * jnp.matmul(audio_embeddings.astype(jnp.float32),
                                text_embeddings.astype(jnp.float32).T, precision=_HIGHEST)
    valid = jnp.ones((count,), bool) if valid is None else jnp.asarray(valid, bool)
    keep = jnp.broadcast_to(valid[None, :], (count, count))
    if dedup:
        if clause_ids is None:
            raise ValueError("contrastive_loss: dedup=True needs clause_ids")
        same = clause_ids[:, None] == clause_ids[None, :]
        keep = keep & ~(same & ~jnp.eye(count, dtype=bool))
    # A finite floor: an all-masked (invalid) row then has finite gradients through the where.
    masked = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
    row_losses = jax.nn.logsumexp(masked, axis=-1) - jnp.diagonal(logits)
    row_losses = jnp.where(valid, row_losses, 0.0)
    return jnp.sum(row_losses) / jnp.maximum(jnp.sum(valid), 1)


def cnt_loss(audio_embeddings: jax.Array, text_embeddings: jax.Array,
             logit_scale: jax.Array | float, *, valid: jax.Array | None = None,
             clause_ids: jax.Array | None = None, dedup: bool = False,
             group_size: int | None = None) -> jax.Array:
    """CNT = sum_n CE_n: one :func:`contrastive_loss` per constituent index n.

    CE_n's softmax group is the P clauses of constituent n of every item in a group of
    ``group_size`` items: the reference's per-GPU batch (2 items on 8 GPUs), without a gather
    across GPUs. The reference orders the group's rows clause-major (k * B + b); the loss does not
    depend on the order.

    Args:
      audio_embeddings, text_embeddings: [B, N, P, D].
      logit_scale, dedup: as :func:`contrastive_loss`.
      valid: [B, N, P] bool or None; clause_ids: [B, N, P] int or None (equal ids = same prompt
        text, across items too).
      group_size: items per softmax group, dividing B; None: all B items form one group.
    Returns:
      float32 scalar: sum over n, mean over groups (DDP averages the per-GPU losses' gradients).
    """
    batch, num_mixtures, per_mixture, dim = audio_embeddings.shape
    group_size = batch if group_size is None else group_size
    if batch % group_size:
        raise ValueError(f"cnt_loss: group_size {group_size} does not divide the batch {batch}")
    groups = batch // group_size

    def rows(x: jax.Array) -> jax.Array:
        """[B, N, P, ...] -> [groups, N, group_size * P, ...]."""
        x = x.reshape(groups, group_size, num_mixtures, per_mixture, *x.shape[3:])
        x = jnp.moveaxis(x, 2, 1)
        return x.reshape(groups, num_mixtures, group_size * per_mixture, *x.shape[4:])

    valid = jnp.ones(audio_embeddings.shape[:3], bool) if valid is None else valid
    ids = jnp.zeros(audio_embeddings.shape[:3], jnp.int32) if clause_ids is None else clause_ids
    per_group = jax.vmap(jax.vmap(
        lambda a, t, v, i: contrastive_loss(a, t, logit_scale, valid=v,
                                            clause_ids=i if clause_ids is not None else None,
                                            dedup=dedup)))
    losses = per_group(rows(audio_embeddings), rows(text_embeddings), rows(valid), rows(ids))
    return jnp.mean(jnp.sum(losses, axis=1))


def total_loss(cnt: jax.Array, url: jax.Array, crl: jax.Array, *,
               cnt_weight: float = CNT_WEIGHT,
               reconstruction_weight: float = RECONSTRUCTION_WEIGHT) -> jax.Array:
    """The step's loss: cnt_weight * CNT + reconstruction_weight * (URL + CRL) (0.5 and 5)."""
    return cnt_weight * cnt + reconstruction_weight * (url + crl)
