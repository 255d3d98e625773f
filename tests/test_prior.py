"""CLIPSonic-PD's diffusion prior: the Flax network against a PyTorch rendition of
DALLE2-pytorch's (tests/prior_reference.py, random weights), the checkpoint converter on saved
trainer-style checkpoints, and the sampler's schedule and DDIM loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from packaging.version import Version
from prior_reference import PriorNetworkReference, prior_state_dict_with_prefix

from clipsep_jax.errors import UserError
from clipsep_jax.families.prior.convert import load_prior_checkpoint
from clipsep_jax.families.prior.network import (
    cosine_schedule,
    ddim_time_pairs,
    relative_position_buckets,
    sample_prior,
)

DIM = 64


def inputs(seed=1, batch=3, length=10):
    rng = np.random.default_rng(seed)
    x_t = rng.normal(size=(batch, DIM)).astype(np.float32)
    text = rng.normal(size=(batch, DIM)).astype(np.float32)
    encodings = rng.normal(size=(batch, length, DIM)).astype(np.float32)
    encodings[0, 6:] = 0  # padding after the end token
    encodings[1, 2:] = 0
    return x_t, text, encodings


def save_checkpoint(reference, path, seed=5):
    """A trainer checkpoint as DALLE2-pytorch writes it: the online and EMA models, the
    version object and the step."""
    online = PriorNetworkReference(**reference.settings, seed=seed)
    torch.save({"model": prior_state_dict_with_prefix(online),
                "ema_model": prior_state_dict_with_prefix(reference),
                "version": Version("1.1.0"), "step": torch.tensor([1234])}, path)


class Stand_in:  # noqa: N801 (a pickled object of a class not on the allow list)
    """Stands in for the warmup scheduler a DALLE2-pytorch trainer checkpoint pickles."""


def make_reference(variant, num_timesteps=1000, **sizes):
    settings = dict(dim=DIM, depth=2, dim_head=16, heads=4, num_timesteps=num_timesteps,
                    variant=variant, **sizes)
    reference = PriorNetworkReference(**settings, seed=0).eval()
    reference.settings = settings
    return reference


@pytest.mark.parametrize("variant,num_timesteps,sizes", [
    ("laion", 1000, {"normformer": True}),
    ("head", 1000, {}),
    ("head", None, {"norm_in": True, "max_text_len": 12}),
], ids=["laion-normformer", "head", "head-continuous-time"])
def test_network_and_converter_match_pytorch(variant, num_timesteps, sizes, tmp_path):
    reference = make_reference(variant, num_timesteps, **sizes)
    path = tmp_path / "prior.pth"
    save_checkpoint(reference, path)
    network, params = load_prior_checkpoint(str(path))
    assert (network.variant, network.depth, network.heads, network.dim_head) == (
        variant, 2, 4, 16)
    assert network.normformer == sizes.get("normformer", False)
    assert network.max_text_len == sizes.get("max_text_len", 77)
    x_t, text, encodings = inputs()
    times = np.array([0, 417, 999], np.int64)
    with torch.no_grad():
        t = torch.from_numpy(times if num_timesteps else times.astype(np.float32))
        expected = reference(torch.from_numpy(x_t), t, torch.from_numpy(text),
                             torch.from_numpy(encodings)).numpy()
        expected_without = reference(torch.from_numpy(x_t), t, torch.from_numpy(text)).numpy()
    got = network.apply({"params": params}, x_t, jnp.asarray(times), text, encodings)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4 * scale, rtol=0)
    got_without = network.apply({"params": params}, x_t, jnp.asarray(times), text)
    np.testing.assert_allclose(np.asarray(got_without), expected_without, atol=1e-4 * scale)
    if variant == "head":  # the unconditional pass of classifier-free guidance
        with torch.no_grad():
            dropped = reference(torch.from_numpy(x_t), t, torch.from_numpy(text),
                                torch.from_numpy(encodings), 1.0, 1.0).numpy()
        every = jnp.ones((3,), bool)
        got = network.apply({"params": params}, x_t, jnp.asarray(times), text, encodings,
                            drop_text=every, drop_image=every)
        np.testing.assert_allclose(np.asarray(got), dropped, atol=1e-4 * scale)
        assert np.abs(dropped - expected).max() > 100 * 1e-4 * scale
    else:
        with pytest.raises(ValueError, match="no null condition"):
            network.apply({"params": params}, x_t, jnp.asarray(times), text,
                          drop_text=jnp.ones((3,), bool))


def test_converter_refuses_foreign_keys_and_schedules(tmp_path):
    reference = make_reference("laion")
    state = prior_state_dict_with_prefix(reference)
    torch.save({**state, "net.extra.weight": torch.zeros(3)}, tmp_path / "extra.pth")
    with pytest.raises(UserError, match="unexpected key 'extra.weight'"):
        load_prior_checkpoint(str(tmp_path / "extra.pth"))
    other = dict(state)
    other["noise_scheduler.alphas_cumprod"] = torch.linspace(1, 0.01, 1000)
    torch.save(other, tmp_path / "linear.pth")
    with pytest.raises(UserError, match="not the cosine schedule"):
        load_prior_checkpoint(str(tmp_path / "linear.pth"))
    missing = {k: v for k, v in state.items() if not k.endswith("project_out.weight")}
    missing = {k: v for k, v in missing.items() if not k.endswith("layers.1.1.0.g")}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(UserError, match="feed_forward_1/norm/g"):
        load_prior_checkpoint(str(tmp_path / "missing.pth"))
    torch.save({"ema_model": state, "warmup_scheduler": Stand_in()}, tmp_path / "objects.pth")
    with pytest.raises(UserError, match="pickled Python objects besides tensors"):
        load_prior_checkpoint(str(tmp_path / "objects.pth"))
    torch.save({"model": {"weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not a DALLE2-pytorch diffusion prior"):
        load_prior_checkpoint(str(tmp_path / "other.pth"))


def test_buckets_schedule_and_time_grid():
    buckets = relative_position_buckets(6, 7)
    for i in range(6):  # the null slot is i away; self and the previous token share bucket 0
        np.testing.assert_array_equal(buckets[i], [*range(i, -1, -1), *[0] * (6 - i)])
    far = relative_position_buckets(200, 1)[:, 0]
    assert far[15] == 15 and far[16] == 16 and far[199] == 31 and np.all(np.diff(far) >= 0)
    schedule = cosine_schedule(1000)
    np.testing.assert_allclose(schedule["betas"][0], 4.1284e-5, rtol=1e-3)
    assert schedule["betas"][-1] == 0.999
    np.testing.assert_allclose(schedule["alphas_cumprod"], np.cumprod(1 - schedule["betas"]))
    pairs = ddim_time_pairs(1000, 64)
    assert len(pairs) == 64 and pairs[0] == (984, 969) and pairs[-1][1] == 0
    assert all(t > t_next for t, t_next in pairs)


def test_ddim_with_an_exact_denoiser_returns_its_target_and_picks_the_best_of_k():
    """A denoiser that always predicts x0 = target (scaled by sqrt(D)) must end at the target;
    with two candidate targets per text, the one closer to the text is kept."""
    rng = np.random.default_rng(0)
    text = rng.normal(size=(4, DIM)).astype(np.float32)
    target = rng.normal(size=(4, DIM)).astype(np.float32)
    scale = np.sqrt(DIM)

    def exact(x, t, texts, encodings, drop):
        return jnp.repeat(jnp.asarray(target), 2, axis=0) * scale

    out = sample_prior(exact, jnp.asarray(text), None, jax.random.key(0), steps=16)
    np.testing.assert_allclose(np.asarray(out), target, atol=1e-5)  # the last step is x0

    near, far = text * 2.0, -text

    def two_targets(x, t, texts, encodings, drop):
        both = jnp.stack([jnp.asarray(far), jnp.asarray(near)], axis=1).reshape(8, DIM)
        return both * scale

    out = sample_prior(two_targets, jnp.asarray(text), None, jax.random.key(1), steps=16)
    np.testing.assert_allclose(np.asarray(out), near, atol=1e-5)
