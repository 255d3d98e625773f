"""The weakly supervised separator's front end and losses against brute-force numpy loops."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_error

from clipsep_jax import bss_eval
from clipsep_jax.families.weaksep import ablation, losses

RNG = np.random.default_rng(0)


def numpy_stft(waveform):
    """Frame by frame: reflect padding of 511, periodic Hann of 1022, rfft."""
    n_fft, hop = 1022, 256
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    padded = np.pad(waveform.astype(np.float64), n_fft // 2, mode="reflect")
    frames = [np.fft.rfft(padded[t * hop: t * hop + n_fft] * window)
              for t in range(1 + len(waveform) // hop)]
    return np.stack(frames, axis=-1)  # [512, T]


def test_stft_magphase_matches_a_frame_loop():
    waveform = RNG.normal(0, 0.3, 3000).astype(np.float32)
    magnitude, cos, sin = jax.jit(losses.stft_magphase)(waveform)
    expected = numpy_stft(waveform)
    assert magnitude.shape == (512, 12)
    assert relative_error(magnitude, np.abs(expected)) < 1e-5
    phase = np.angle(expected)
    assert relative_error(cos, np.cos(phase)) < 1e-4
    assert relative_error(sin, np.sin(phase)) < 1e-4
    # Zero bins: the 1e-10 clamp gives cos = sin = 0, not NaN.
    magnitude, cos, sin = losses.stft_magphase(np.zeros(3000, np.float32))
    assert not np.any(magnitude) and not np.any(cos) and not np.any(sin)
    full = jax.eval_shape(losses.stft_magphase, jnp.zeros((2, losses.AUDIO_LENGTH)))
    assert full[0].shape == (2, 512, 512)
    np.testing.assert_allclose(losses.unet_input(np.array([[0.0, np.e - 1]]))[..., 0],
                               [[0.0, 1.0]], rtol=1e-6)


def numpy_istft(spectrum, length):
    """librosa.istft(center=True) frame by frame: irfft, Hann synthesis window, overlap-add,
    division by the overlap-added squared window where it is not tiny, 511 samples dropped."""
    n_fft, hop = 1022, 256
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    frames = spectrum.shape[-1]
    signal = np.zeros(n_fft + hop * (frames - 1))
    window_sum = np.zeros_like(signal)
    for t in range(frames):
        signal[t * hop: t * hop + n_fft] += np.fft.irfft(spectrum[:, t], n_fft) * window
        window_sum[t * hop: t * hop + n_fft] += window**2
    nonzero = window_sum > np.finfo(np.float64).tiny
    signal[nonzero] /= window_sum[nonzero]
    return signal[n_fft // 2: n_fft // 2 + length]


def test_masked_waveform_is_the_istft_with_the_mixture_phase():
    length = 4000
    waveform = RNG.normal(0, 0.3, length).astype(np.float32)
    magnitude, cos, sin = losses.stft_magphase(waveform)
    mask = RNG.uniform(0, 1, magnitude.shape).astype(np.float32)
    masked = jax.jit(losses.masked_waveform, static_argnums=4)
    got = masked(mask, magnitude, cos, sin, length)
    expected = numpy_istft(mask * numpy_stft(waveform), length)
    assert relative_error(got, expected) < 1e-4
    identity = masked(np.ones_like(mask), magnitude, cos, sin, length)
    assert relative_error(identity, waveform) < 1e-4


@pytest.mark.parametrize("reference_target_scaling", [True, False])
def test_mixtures_of_mixtures(reference_target_scaling):
    sources = RNG.normal(0, 1, (2, 2, 3, 50)).astype(np.float32)
    mixture, constituents = losses.mixtures_of_mixtures(
        sources, reference_target_scaling=reference_target_scaling)
    batch, n_mix, per_mix, _ = sources.shape
    for b in range(batch):
        # The reference's in-place division: all clips by N P, then each constituent's by P.
        clips = [sources[b, n, k] / (n_mix * per_mix) for n in range(n_mix)
                 for k in range(per_mix)]
        np.testing.assert_allclose(mixture[b], sum(clips), rtol=1e-5, atol=1e-6)
        for n in range(n_mix):
            share = sum(clips[n * per_mix: (n + 1) * per_mix])
            want = share / per_mix if reference_target_scaling else share
            np.testing.assert_allclose(constituents[b, n], want, rtol=1e-5, atol=1e-6)
    if not reference_target_scaling:  # consistent targets add up to the mixture
        np.testing.assert_allclose(constituents.sum(1), mixture, rtol=1e-5, atol=1e-6)


def loop_weighted_l1(prediction, target, weight):
    total, count = 0.0, 0
    for index in np.ndindex(prediction.shape):
        total += weight[index] * abs(prediction[index] - target[index])
        count += 1
    return total / count


def reconstruction_inputs(batch=2, n_mix=2, per_mix=3, bins=5, frames=4):
    mixture = RNG.gamma(0.5, 2.0, (batch, bins, frames)).astype(np.float32)
    mixture[0, 0, 0] = 0.0  # the 1e-3 floor of the weights
    mixture[1, 1, 1] = 3e4  # the 10 ceiling
    targets = RNG.gamma(0.5, 1.0, (batch, n_mix, bins, frames)).astype(np.float32)
    masks = RNG.uniform(0, 1, (batch, n_mix, bins, frames)).astype(np.float32)
    clause_masks = RNG.uniform(0, 1, (batch, n_mix, per_mix, bins, frames)).astype(np.float32)
    weights = np.array([[[1, 1, 1], [0.5, 1, 0.5]], [[1, 1, 0], [1 / 3] * 3]], np.float32)
    return mixture, targets, masks, clause_masks, weights


def test_reconstruction_losses_match_loops():
    mixture, targets, masks, clause_masks, weights = reconstruction_inputs()
    batch, n_mix, per_mix = weights.shape
    clamp = lambda m: min(max(math.log1p(m), 1e-3), 10.0)
    url = crl = 0.0
    for n in range(n_mix):
        predicted = masks[:, n] * mixture
        w_mix = np.vectorize(clamp)(mixture)
        url += loop_weighted_l1(predicted, targets[:, n], w_mix)
        combined = np.zeros_like(mixture)
        for b in range(batch):
            for k in range(per_mix):
                combined[b] += weights[b, n, k] * clause_masks[b, n, k] * mixture[b]
        crl += loop_weighted_l1(combined, targets[:, n], np.vectorize(clamp)(targets[:, n]))
    got_url = jax.jit(losses.unconditional_reconstruction_loss)(masks, mixture, targets)
    got_crl = jax.jit(losses.clause_reconstruction_loss)(clause_masks, weights, mixture, targets)
    np.testing.assert_allclose(got_url, url, rtol=1e-5)
    np.testing.assert_allclose(got_crl, crl, rtol=1e-5)
    np.testing.assert_allclose(losses.l1_weight(np.array([0.0, 1.0, 1e9])),
                               [1e-3, math.log(2.0), 10.0], rtol=1e-6)
    np.testing.assert_allclose(losses.total_loss(1.5, got_url, got_crl),
                               0.5 * 1.5 + 5 * (url + crl), rtol=1e-5)


def loop_cross_entropy(audio, text, logit_scale, valid, ids, dedup):
    """Mean over valid rows of -log softmax over the row's admissible columns at its own one."""
    scale = math.exp(logit_scale)
    total, rows = 0.0, 0
    for i in range(len(audio)):
        if not valid[i]:
            continue
        logits = []
        for j in range(len(text)):
            if not valid[j] or (dedup and j != i and ids[j] == ids[i]):
                continue
            logits.append(scale * float(np.dot(audio[i], text[j])))
        own = scale * float(np.dot(audio[i], text[i]))
        peak = max(logits)
        total += peak + math.log(sum(math.exp(x - peak) for x in logits)) - own
        rows += 1
    return total / max(rows, 1)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("dedup", [False, True])
def test_contrastive_loss_matches_a_loop(dedup):
    rows, dim, logit_scale = 8, 6, math.log(1 / 0.07)
    audio = unit(RNG.normal(0, 1, (rows, dim))).astype(np.float32)
    text = unit(RNG.normal(0, 1, (rows, dim))).astype(np.float32)
    ids = np.array([0, 1, 2, 0, 3, 4, 2, 5])
    text[3], text[6] = text[0], text[2]  # repeated prompts: identical text embeddings
    valid = np.array([True] * 7 + [False])
    got = losses.contrastive_loss(audio, text, logit_scale, valid=valid, clause_ids=ids,
                                  dedup=dedup)
    np.testing.assert_allclose(
        got, loop_cross_entropy(audio, text, logit_scale, valid, ids, dedup), rtol=1e-5)
    everything = losses.contrastive_loss(audio, text, logit_scale)
    np.testing.assert_allclose(
        everything, loop_cross_entropy(audio, text, logit_scale, [True] * rows, ids, False),
        rtol=1e-5)


def test_duplicate_positives_bound_the_reference_loss_and_dedup_removes_it():
    audio = unit(np.eye(3, 4, dtype=np.float32))
    text = audio.copy()
    audio[2], text[2] = audio[1], text[1]  # clause 1 padded with a copy of itself
    ids = np.array([0, 1, 1])
    reference = losses.contrastive_loss(audio, text, 5.0)
    deduplicated = losses.contrastive_loss(audio, text, 5.0, clause_ids=ids, dedup=True)
    assert reference > 2 / 3 * math.log(2) - 1e-6  # two of the three rows stay at ln 2 or more
    assert deduplicated < 0.01
    with pytest.raises(ValueError, match="clause_ids"):
        losses.contrastive_loss(audio, text, 5.0, dedup=True)


def test_cnt_groups_and_sums_like_the_reference():
    batch, n_mix, per_mix, dim, logit_scale = 4, 2, 3, 5, 2.0
    audio = unit(RNG.normal(0, 1, (batch, n_mix, per_mix, dim))).astype(np.float32)
    text = unit(RNG.normal(0, 1, (batch, n_mix, per_mix, dim))).astype(np.float32)
    valid = RNG.uniform(size=(batch, n_mix, per_mix)) > 0.2
    ids = RNG.integers(0, 4, (batch, n_mix, per_mix))
    cnt = jax.jit(losses.cnt_loss, static_argnames=("dedup", "group_size"))
    for group_size in (2, 4):
        for dedup in (False, True):
            expected = 0.0
            groups = batch // group_size
            for g in range(groups):
                for n in range(n_mix):
                    # Rows clause-major, as the reference stacks them.
                    order = [(g * group_size + b, k) for k in range(per_mix)
                             for b in range(group_size)]
                    pick = lambda x, order=order, n=n: np.array([x[b, n, k] for b, k in order])
                    expected += loop_cross_entropy(pick(audio), pick(text), logit_scale,
                                                   pick(valid), pick(ids), dedup) / groups
            got = cnt(audio, text, logit_scale, valid=valid, clause_ids=ids, dedup=dedup,
                      group_size=group_size)
            np.testing.assert_allclose(got, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="does not divide"):
        losses.cnt_loss(audio, text, logit_scale, group_size=3)


def test_cnt_gradients_are_finite_with_padding_rows():
    audio = unit(RNG.normal(0, 1, (2, 2, 2, 4))).astype(np.float32)
    text = unit(RNG.normal(0, 1, (2, 2, 2, 4))).astype(np.float32)
    valid = np.ones((2, 2, 2), bool)
    valid[:, 1] = False  # a whole group of invalid rows
    grad = jax.jit(jax.grad(lambda a: losses.cnt_loss(a, text, 3.0, valid=valid)))(audio)
    assert np.all(np.isfinite(grad)) and not np.any(grad[:, 1])


def test_ablation_table_pools_seeds_and_pairs_each_mixture():
    """The ablation's SDR - URL only is per mixture and seed, pooled; SDR by seed per run."""
    rng = np.random.default_rng(0)
    hard = rng.normal(0, 5, 40)  # each mixture's own difficulty, shared by every loss

    def report(offset, seed):
        noise = np.random.default_rng(seed).normal(0, 0.1, 40)
        rows = [{"index": i, "sdr": float(hard[i] + offset + noise[i]), "sir": 1.0, "sar": 9.0}
                for i in range(40)]
        summary = {m: bss_eval.summarise([r[m] for r in rows]) for m in ("sdr", "sir", "sar")}
        zero = {m: bss_eval.summarise([0.0] * 40) for m in ("sdr", "sir", "sar")}
        return {"rows": [{"query": "mixture", **zero}, {"query": "text", **summary}],
                "per_example": {"text": rows}, "num_examples": 40, "split": "test",
                "template": "The sound of {label}"}

    results = [{"variant": name, "seed": seed, "seconds": 60.0,
                "report": report(offset, seed * 10 + k)}
               for seed in (1, 2)
               for k, (name, offset) in enumerate([("URL only", 0.0), ("full", 0.5)])]
    table = ablation.format_comparison(results)
    full = next(line for line in table.splitlines() if line.startswith("| full"))
    cells = [c.strip() for c in full.strip("|").split("|")]
    assert cells[1] == "80"  # two seeds' mixtures pooled
    difference, spread = (float(x) for x in cells[6].split(" ± "))
    assert abs(difference - 0.5) < 0.05 and spread < 0.1  # the mixtures' spread cancels
    sdr_spread = float(cells[2].split(" ± ")[1])
    assert sdr_spread > 0.5  # unpaired, it does not
    assert len(cells[7].split(" / ")) == 2 and "training seeds 1, 2" in table
