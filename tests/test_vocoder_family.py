"""The vocoder family: the GAN loss's routing of each term to its own networks, the inverse-STFT
generator's starting point, and a vocoder trained through the generic loop serving CLIPSonic."""

import json
import shutil

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest

from clipsep_jax import checkpoints, train
from clipsep_jax.config import default_config, validate
from clipsep_jax.errors import UserError
from clipsep_jax.families import get_family
from clipsep_jax.families.clipsonic import mel
from clipsep_jax.families.vocoder.discriminators import (
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
)
from clipsep_jax.families.vocoder.evaluation import format_resynthesis, resynthesis_metrics
from clipsep_jax.families.vocoder.model import (
    build_discriminators,
    build_generator,
    gan_loss,
    mel_settings,
    vocode,
)


def tiny_vocoder(data_dir="", n_mels=32, **train_overrides):
    config = default_config("istft")
    config.data.data_dir = data_dir
    config.data.num_workers = 0
    config.vocoder.mel.n_mels = n_mels
    config.model.dim = 16
    config.model.depth = 1
    config.model.mpd_periods = (2, 3)
    config.model.msd_scales = 2
    config.model.discriminator_width_divisor = 32
    config.audio.crop_samples = 2048
    config.train.batch_size = 8  # the tests run on 8 emulated devices
    config.train.log_every_steps = 1
    config.train.validation_every_steps = 1000
    config.mesh.fsdp_min_size = 1 << 30
    for key, value in train_overrides.items():
        setattr(config.train, key, value)
    return config


def test_config_is_checked():
    config = tiny_vocoder()
    validate(config)
    config.audio.crop_samples = 2000
    with pytest.raises(UserError, match="crop_samples=2000 is not a multiple"):
        validate(config)
    hifigan = default_config("hifigan")
    hifigan.model.upsample_rates = (8, 8, 2)
    with pytest.raises(UserError, match="multiply to 128"):
        validate(hifigan)


def test_the_gan_loss_sends_each_term_to_its_own_networks():
    config = tiny_vocoder()
    config.vocoder.loss.adversarial_start_step = 5
    family = get_family(config)
    params = family.init_variables(config, jax.random.key(0))["params"]
    wave = 0.3 * jax.random.normal(jax.random.key(1), (2, 2048))
    settings, weights = mel_settings(config), config.vocoder.loss
    mpd, msd = build_discriminators(config)

    def generator_objective(g):  # the discriminators are constants here
        real_mel = mel.log_mel(wave, settings)
        fake = vocode(config, g, real_mel, 2048)
        total = weights.mel_weight * jnp.mean(jnp.abs(mel.log_mel(fake, settings) - real_mel))
        for module, d in ((mpd, params["mpd"]), (msd, params["msd"])):
            _, real_features = module.apply({"params": d}, wave)
            fake_logits, fake_features = module.apply({"params": d}, fake)
            total += generator_adversarial_loss(fake_logits)
            total += feature_matching_loss(real_features, fake_features)
        return total

    fake = vocode(config, params["generator"], mel.log_mel(wave, settings), 2048)

    def discriminator_objective(d, module):  # the generated waveform is a constant here
        return discriminator_loss(module.apply({"params": d}, wave)[0],
                                  module.apply({"params": d}, fake)[0])

    # Compiled once each (eager, these passes took most of a minute); the step is traced, so the
    # warm-up's step 4 reuses them.
    loss_and_terms = jax.jit(lambda p, step: gan_loss(config, p, wave, step))
    gradients = jax.jit(jax.jacrev(lambda p, step: gan_loss(config, p, wave, step)))
    grads, term_grads = gradients(params, jnp.asarray(5))
    expected = jax.jit(lambda p: {
        "generator": jax.grad(generator_objective)(p["generator"]),
        "mpd": jax.grad(discriminator_objective)(p["mpd"], mpd),
        "msd": jax.grad(discriminator_objective)(p["msd"], msd)})(params)
    for name in expected:
        for got, want in zip(jax.tree.leaves(grads[name]), jax.tree.leaves(expected[name]),
                             strict=True):
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6 * np.abs(want).max())
    # each term reaches only its own networks: exact zeros elsewhere
    leaks = [term_grads["discriminator"]["generator"]]
    for name in ("generator_adversarial", "feature_matching"):
        leaks += [term_grads[name][d] for d in ("mpd", "msd")]
    assert all(float(jnp.abs(x).max()) == 0.0 for tree in leaks for x in jax.tree.leaves(tree))
    # the warm-up: the mel term alone, the discriminators untouched
    loss, metrics = loss_and_terms(params, jnp.asarray(4))
    np.testing.assert_allclose(loss, 45.0 * metrics["mel_l1"], rtol=1e-6)
    warm, _ = gradients(params, jnp.asarray(4))
    assert all(float(jnp.abs(x).max()) == 0.0 for d in ("mpd", "msd")
               for x in jax.tree.leaves(warm[d]))
    assert float(jnp.abs(jax.tree.leaves(warm["generator"])[0]).max()) > 0.0


def test_an_untrained_istft_head_gives_the_pseudo_inverse_with_zero_phase():
    config = tiny_vocoder()
    settings = mel_settings(config)
    generator = build_generator(config)
    rng = np.random.default_rng(0)
    log_mel = jnp.asarray(rng.normal(-4.0, 1.5, (1, 32, 12)), jnp.float32)
    params = generator.init(jax.random.key(0), log_mel)["params"]
    params["head"] = jax.tree.map(jnp.zeros_like, params["head"])
    wave = np.asarray(generator.apply({"params": params}, log_mel))[0]
    inverse = np.linalg.pinv(mel.mel_filterbank(settings).astype(np.float64))
    magnitude = np.maximum(inverse @ np.exp(np.asarray(log_mel[0], np.float64)), 1e-5)
    expected = librosa.istft(magnitude.astype(np.complex128), hop_length=256, win_length=1024,
                             n_fft=1024, center=True, length=256 * 11)
    assert wave.shape == (256 * 11,)
    np.testing.assert_allclose(wave, expected, atol=1e-4 * np.abs(expected).max())


def test_a_vocoder_trained_by_the_loop_serves_clipsonic(trained_clipsonic, generated_dataset,
                                                        tmp_path):
    from clipsep_jax.families.clipsonic.generator import Generator

    config = tiny_vocoder(generated_dataset, num_steps=4, checkpoint_every_steps=4)
    config.vocoder.loss.adversarial_start_step = 2  # two mel-only steps, then the GAN
    workdir = tmp_path / "vocoder"
    checkpoints.write_config(workdir, config)
    state = train.train_and_evaluate(config, str(workdir))
    assert int(state.step) == 4
    _, clipsonic_workdir = trained_clipsonic
    generator = Generator.from_checkpoint(str(clipsonic_workdir))
    assert generator.use_vocoder(str(workdir)).startswith("vocoder")
    result = generator.generate(["tuba"], num_samples=1, seconds=0.5, steps=4, seed=3)[0]
    _, variables, _ = checkpoints.load_workdir(workdir, "latest")
    expected = vocode(config, variables["params"]["generator"], jnp.asarray(result["mels"]),
                      8000)
    np.testing.assert_allclose(result["waveforms"], expected, atol=1e-5 * np.abs(expected).max())

    shutil.copytree(workdir, tmp_path / "other")  # the same run, saying its bands end at 7 kHz
    saved = json.loads((tmp_path / "other" / "config.json").read_text())
    saved["vocoder"]["mel"]["fmax"] = 7000.0
    (tmp_path / "other" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(UserError, match="'fmax': \\(7000.0, 8000.0\\)"):
        generator.use_vocoder(str(tmp_path / "other"))

    config.eval.num_examples = 3
    config.vocoder.eval.classifier_steps = 20
    config.vocoder.eval.classifier_min_accuracy = 0.0
    config.vocoder.eval.crop_samples = 16383
    config.vocoder.eval.griffin_lim_iterations = 4
    report = resynthesis_metrics(config, variables, progress=False)
    rows = {r["waveform"]: r for r in report["resynthesis"]}
    assert set(rows) == {"vocoder", "griffin_lim"} and report["count"] == 3
    assert all(np.isfinite(r["frechet_distance"]) and r["log_mel_distance"] > 0
               for r in rows.values())
    assert "| Griffin-Lim |" in format_resynthesis(report)
