"""CLIPSonic's building blocks: the mel front end against librosa, the diffusion schedule's
identities, classifier-free guidance and the DDIM sampler against closed forms."""

import functools

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest
from conftest import relative_error

from clipsep_jax.families.clipsonic import diffusion, mel


def test_mel_front_end_matches_librosa():
    settings = mel.MelSettings()
    np.testing.assert_allclose(
        mel.mel_filterbank(settings),
        librosa.filters.mel(sr=16000, n_fft=1024, n_mels=80, fmin=0.0, fmax=8000.0),
        rtol=1e-5, atol=1e-8)
    rng = np.random.default_rng(0)
    t = np.arange(40000) / 16000
    waveform = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.normal(size=t.size)
                ).astype(np.float32)
    waveform[:4000] = 0.0  # a silent stretch: the clamp matters there
    expected_mel = librosa.feature.melspectrogram(
        y=waveform, sr=16000, n_fft=1024, hop_length=256, power=1.0, n_mels=80, fmin=0.0,
        fmax=8000.0, pad_mode="reflect")
    got_mel = np.asarray(mel.mel_spectrogram(jnp.asarray(waveform)))
    assert got_mel.shape == expected_mel.shape == (80, 1 + 40000 // 256)
    assert relative_error(got_mel, expected_mel) <= 1e-5
    expected_log = np.log(np.maximum(expected_mel, 1e-5))
    got_log = np.asarray(mel.log_mel(jnp.asarray(waveform)))
    # float32 logs of equal magnitudes: 1e-5 relative to the range of the log-mel
    assert np.abs(got_log - expected_log).max() <= 1e-5 * np.ptp(expected_log) + 1e-5
    normalized = mel.normalize(got_log)
    assert float(normalized.min()) == pytest.approx(-1.0, abs=1e-5)  # the silent stretch
    np.testing.assert_allclose(mel.denormalize(normalized), got_log, atol=1e-5)
    batched = mel.log_mel(jnp.stack([waveform, waveform[::-1].copy()]))
    np.testing.assert_allclose(batched[0], got_log, atol=1e-6)


def test_schedule_identities_and_conversions():
    t = jnp.linspace(0.0, 1.0, 101)
    logsnr = diffusion.logsnr_schedule(t)
    assert float(logsnr[0]) == pytest.approx(diffusion.LOGSNR_MAX, abs=1e-3)
    assert float(logsnr[-1]) == pytest.approx(diffusion.LOGSNR_MIN, abs=1e-3)
    assert bool(jnp.all(jnp.diff(logsnr) < 0))
    alpha, sigma = diffusion.alpha_sigma(logsnr)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.normal(size=(5, 3, 7)), jnp.float32)
    eps = jnp.asarray(rng.normal(size=(5, 3, 7)), jnp.float32)
    times = jnp.asarray([0.02, 0.3, 0.5, 0.7, 0.98])
    z = diffusion.noisy(x0, eps, times)
    v = diffusion.v_target(x0, eps, times)
    x0_back, eps_back = diffusion.x0_eps_from_v(z, v, times)
    np.testing.assert_allclose(x0_back, x0, atol=1e-5)
    np.testing.assert_allclose(eps_back, eps, atol=1e-5)
    np.testing.assert_allclose(diffusion.v_from_x0(z, x0, times), v, atol=1e-4)


def _conditioned_denoiser(z, t, condition):
    """A toy v-predictor that depends on the condition (a per-example offset)."""
    return 0.5 * z + condition[:, None] * (1.0 + t[:, None])


def test_guidance_one_is_conditional_and_zero_unconditional():
    rng = np.random.default_rng(2)
    v_cond, v_uncond = rng.normal(size=(2, 4, 6))
    np.testing.assert_allclose(diffusion.guided(v_cond, v_uncond, 1.0), v_cond)
    np.testing.assert_allclose(diffusion.guided(v_cond, v_uncond, 0.0), v_uncond)
    noise = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
    condition = jnp.asarray([1.0, -2.0, 0.5])
    null = jnp.zeros(3)
    sample = jax.jit(functools.partial(diffusion.ddim_sample, _conditioned_denoiser),
                     static_argnames="steps")
    with_condition = sample(condition, null, noise, steps=10, guidance=1.0)
    only_condition = sample(condition, condition, noise, steps=10, guidance=1.0)
    without = sample(condition, null, noise, steps=10, guidance=0.0)
    only_null = sample(null, null, noise, steps=10, guidance=1.0)
    np.testing.assert_allclose(with_condition, only_condition, atol=1e-6)
    np.testing.assert_allclose(without, only_null, atol=1e-6)
    assert not np.allclose(with_condition, without)
    stronger = sample(condition, null, noise, steps=10, guidance=3.0)
    assert not np.allclose(stronger, with_condition)


def test_ddim_with_the_exact_denoiser_reproduces_gaussian_data():
    """Data x0 ~ N(mu, s^2) per dimension has the closed-form posterior mean
    E[x0 | z_t] = mu + alpha s^2 (z - alpha mu) / (alpha^2 s^2 + sigma^2); DDIM with it maps
    standard normal noise to samples of mean mu and standard deviation s."""
    mu = jnp.asarray([2.0, -1.0, 0.0, 0.5])
    s = jnp.asarray([0.5, 1.5, 1.0, 0.1])

    def exact(z, t, condition):
        alpha, sigma = diffusion.alpha_sigma(diffusion.logsnr_schedule(t))
        alpha, sigma = alpha[:, None], sigma[:, None]
        x0 = mu + alpha * s**2 * (z - alpha * mu) / (alpha**2 * s**2 + sigma**2)
        return diffusion.v_from_x0(z, x0, t)

    noise = jax.random.normal(jax.random.key(0), (20000, 4))
    condition = jnp.zeros(20000)
    samples = jax.jit(functools.partial(diffusion.ddim_sample, exact),
                      static_argnames="steps")(condition, condition, noise, steps=500)
    np.testing.assert_allclose(samples.mean(0), mu, atol=0.03)
    np.testing.assert_allclose(samples.std(0), s, rtol=0.03)


def test_a_tiny_denoiser_overfits_two_examples():
    """Two log-mels with two conditions: training drives the loss down, and DDIM sampling from
    the trained model with each condition gives back (roughly) that condition's example."""
    import optax

    from clipsep_jax.families.clipsonic.losses import diffusion_loss
    from clipsep_jax.families.clipsonic.networks import Denoiser

    rng = np.random.default_rng(3)
    x0 = jnp.asarray(np.clip(rng.normal(0, 0.5, (2, 16, 16)), -1, 1), jnp.float32)
    conditions = jnp.asarray(np.eye(2, 8) * 3, jnp.float32)
    model = Denoiser(spatial_dims=1, widths=(32, 32), blocks_per_level=1, embedding_dim=32)
    params = model.init(jax.random.key(0), x0, jnp.zeros(2), conditions)["params"]
    optimizer = optax.adam(3e-3)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, key):
        def loss_fn(p):
            denoise = lambda z, logsnr, c, drop: model.apply({"params": p}, z, logsnr, c, drop)
            return diffusion_loss(denoise, jnp.tile(x0, (8, 1, 1)),
                                  jnp.tile(conditions, (8, 1)), key, condition_dropout=0.0)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for i in range(600):
        params, state, loss = step(params, state, jax.random.key(i))
        losses.append(float(loss))
    assert np.mean(losses[-50:]) < 0.2 * np.mean(losses[:20])

    def denoise(z, t, c):
        logsnr = diffusion.logsnr_schedule(t)
        return model.apply({"params": params}, z, logsnr, c, jnp.zeros(z.shape[0], bool))

    samples = diffusion.ddim_sample(denoise, conditions, conditions,
                                    jax.random.normal(jax.random.key(7), x0.shape), steps=50)
    errors = np.abs(np.asarray(samples)[:, None] - np.asarray(x0)[None]).mean((2, 3))
    assert errors[0, 0] < errors[0, 1] and errors[1, 1] < errors[1, 0]  # each its own example
    assert errors[0, 0] < 0.15 and errors[1, 1] < 0.15


def test_frechet_distance_against_the_closed_form():
    from clipsep_jax.families.clipsonic.classifier import frechet_distance

    rng = np.random.default_rng(4)
    a = rng.normal(size=(20000, 3))
    b = rng.normal(size=(20000, 3)) * np.array([1.0, 2.0, 0.5]) + np.array([1.0, 0.0, -2.0])
    # |mu|^2 + sum (s_a - s_b)^2 for diagonal covariances: 5 + 0 + 1 + 0.25
    assert frechet_distance(a, b) == pytest.approx(6.25, rel=0.03)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_ridge_prior_learns_a_linear_map_and_retrieval_averages_the_nearest():
    from clipsep_jax.families.clipsonic.pd import RetrievalPrior, RidgePrior

    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.normal(size=(16, 16)))  # unit texts -> unit images
    text = rng.normal(size=(400, 16))
    image = (text / np.linalg.norm(text, axis=1, keepdims=True)) @ rotation
    prior = RidgePrior.fit(text, image * 3.0, l2=1e-6)  # the targets' scale does not matter
    new = rng.normal(size=(20, 16))
    want = (new / np.linalg.norm(new, axis=1, keepdims=True)) @ rotation
    np.testing.assert_allclose(prior(new), want, atol=1e-4)
    assert np.allclose(np.linalg.norm(prior(new), axis=1), 1.0, atol=1e-6)

    bank = np.eye(4, dtype=np.float32)
    retrieval = RetrievalPrior(bank, top_k=2)
    out = retrieval(np.array([[3.0, 2.0, 0.1, 0.0]]))  # nearest: rows 0 and 1
    np.testing.assert_allclose(out, [[2 ** -0.5, 2 ** -0.5, 0, 0]], atol=1e-6)
