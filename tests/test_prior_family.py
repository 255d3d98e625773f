"""The diffusion prior as a model family: its loss against a direct computation, training
through the generic loop on a dataset's image-text pairs, its evaluation table, and CLIPSonic-PD
using the trained prior (and refusing one trained on the generator's own clips)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipsep_jax import checkpoints, train
from clipsep_jax.config import default_config, validate
from clipsep_jax.errors import UserError
from clipsep_jax.families import get_family
from clipsep_jax.families.prior.model import LoadedPrior, build_network, load_prior, prior_loss
from clipsep_jax.families.prior.network import cosine_schedule


def tiny_prior(data_dir="", **train_overrides):
    config = default_config("diffusion_prior")
    config.data.data_dir = data_dir
    config.data.num_workers = 0
    config.data.train_split = "val"
    config.eval.split = "test"
    config.model.dim = 40  # the tests' tiny CLIP
    config.model.depth = 1
    config.model.heads = 2
    config.model.dim_head = 8
    config.model.num_timesteps = 50
    config.prior.eval.steps = 5
    config.train.batch_size = 8
    config.train.log_every_steps = 1
    config.train.validation_every_steps = 1000
    config.train.ema_decay = 0.0
    config.mesh.fsdp_min_size = 1 << 30
    for key, value in train_overrides.items():
        setattr(config.train, key, value)
    return config


def test_config_is_checked():
    config = tiny_prior()
    validate(config)
    config.prior.condition_dropout = 1.0
    with pytest.raises(UserError, match="config.prior.condition_dropout=1.0"):
        validate(config)
    clipsonic = default_config("clipsonic")
    clipsonic.clipsonic.prior.kind = "diffusion"
    with pytest.raises(UserError, match="needs config.clipsonic.prior.checkpoint"):
        validate(clipsonic)


def test_the_loss_is_the_x0_error_on_the_scaled_image_embedding():
    config = tiny_prior()
    config.prior.condition_dropout = 0.5
    params = get_family(config).init_variables(config, jax.random.key(0))["params"]
    rng = np.random.default_rng(0)
    image = rng.normal(size=(8, 40)).astype(np.float32)
    image /= np.linalg.norm(image, axis=-1, keepdims=True)
    text = rng.normal(size=(8, 40)).astype(np.float32)
    key = jax.random.key(3)
    loss, _ = prior_loss(config, params, {"image": image, "text": text}, key)
    t_key, noise_key, drop_key = jax.random.split(key, 3)  # the loss's documented draws
    t = np.asarray(jax.random.randint(t_key, (8,), 0, 50))
    noise = np.asarray(jax.random.normal(noise_key, (8, 40)))
    drop = np.asarray(jax.random.bernoulli(drop_key, 0.5, (8,)))
    abar = cosine_schedule(50)["alphas_cumprod"][t][:, None]
    x0 = image * np.sqrt(40.0)
    x_t = np.sqrt(abar) * x0 + np.sqrt(1.0 - abar) * noise
    predicted = np.asarray(build_network(config).apply(
        {"params": params}, jnp.asarray(x_t, jnp.float32), jnp.asarray(t), jnp.asarray(text),
        None, jnp.asarray(drop)))
    np.testing.assert_allclose(loss, np.mean((predicted - x0) ** 2), rtol=1e-5)
    assert 0 < drop.sum() < 8  # both branches taken


def test_a_prior_trained_by_the_loop_serves_clipsonic_pd(trained_clipsonic, generated_dataset,
                                                          tmp_path):
    from clipsep_jax.families.clipsonic.generator import Generator

    config = tiny_prior(generated_dataset, num_steps=6, checkpoint_every_steps=6)
    workdir = tmp_path / "prior"
    checkpoints.write_config(workdir, config)
    state = train.train_and_evaluate(config, str(workdir))
    assert int(state.step) == 6
    _, variables, _ = checkpoints.load_workdir(workdir, "latest")
    report = get_family(config).evaluate(config, variables, None, progress=False)
    names = [r["prior"] for r in report["rows"]]
    assert names == ["diffusion prior", "ridge", "retrieval", "text itself"]
    assert all(-1.0 <= r["cosine"] <= 1.0 for r in report["rows"])
    assert "| diffusion prior |" in get_family(config).format_table(report)

    generator = Generator.from_checkpoint(str(trained_clipsonic[1]))
    generator.config.clipsonic.prior.steps = 64  # not fewer than the prior's 50 time steps
    with pytest.raises(UserError, match="64 DDIM steps for a prior of 50 time steps"):
        generator.use_prior("diffusion", checkpoint=str(workdir))
    generator.config.clipsonic.prior.steps = 10
    description = generator.use_prior("diffusion", checkpoint=str(workdir))
    assert description.startswith("diffusion prior")
    text = generator.encoder.encode_text([generator.config.query.text_template.format("tuba")])
    prior, _ = load_prior(str(workdir), steps=10, best_of=2)
    assert isinstance(prior, LoadedPrior)
    expected = prior(text)
    assert np.all(np.isfinite(expected))
    np.testing.assert_allclose(generator.embed_queries(["tuba"]), expected, atol=1e-5)

    # a prior whose training clips are the generator's own is refused
    shutil.copytree(workdir, tmp_path / "leaky")
    saved = json.loads((tmp_path / "leaky" / "config.json").read_text())
    saved["data"]["train_split"] = "train"
    (tmp_path / "leaky" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(UserError, match="trained on the generator's train split"):
        generator.use_prior("diffusion", checkpoint=str(tmp_path / "leaky"))
