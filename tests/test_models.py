"""Model construction: initialisation, bf16 compute, input checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipsep_jax import config as config_lib
from clipsep_jax.models import forward, init_variables


def small_config(kind="clipsep", **model):
    config = config_lib.default_config()
    config.model.kind = kind
    config.model.num_downs = 5
    config.model.base_width = 8
    config.model.num_mask_channels = 4
    config.model.update(model)
    return config


def test_initialisation_follows_the_reference():
    variables = init_variables(config_lib.default_config(), jax.random.key(0))
    params = variables["params"]
    down = np.asarray(params["unet"]["down_conv_3"]["kernel"])
    assert down.shape == (4, 4, 256, 512)
    assert abs(down.std() - 1e-3) < 1e-5 and abs(down.mean()) < 1e-5
    norm = np.asarray(params["unet"]["up_norm_3"]["scale"])
    assert abs(norm.mean() - 1.0) < 0.01 and 0.015 < norm.std() < 0.025
    np.testing.assert_array_equal(params["unet"]["up_norm_3"]["bias"], 0.0)
    projection = params["query_projection"]["dense"]
    assert abs(np.asarray(projection["kernel"]).std() - 1e-4) < 1e-5
    bound = 1 / np.sqrt(512)
    bias = np.asarray(projection["bias"])
    assert np.abs(bias).max() <= bound and np.abs(bias).max() > bound / 4
    out_bias = np.asarray(params["unet"]["up_conv_0"]["bias"])
    assert np.abs(out_bias).max() <= 1 / np.sqrt(128 * 9)
    np.testing.assert_array_equal(params["mask_synthesis"]["scale"], 1.0)
    np.testing.assert_array_equal(params["mask_synthesis"]["bias"], 0.0)
    stats = variables["batch_stats"]["unet"]["input_norm"]
    np.testing.assert_array_equal(stats["mean"], 0.0)
    np.testing.assert_array_equal(stats["var"], 1.0)


@pytest.mark.parametrize("kind", ["clipsep", "clipsep_nit"])
def test_bfloat16_compute_keeps_float32_parameters_and_tracks_float32(kind):
    rng = np.random.default_rng(0)
    mag_mix = rng.gamma(0.5, 1.0, (2, 513, 32)).astype(np.float32)
    mags = np.stack([mag_mix * 0.3, mag_mix * 0.7], axis=1)
    queries = rng.normal(size=(2, 2, 512)).astype(np.float32)
    config32 = small_config(kind)
    config16 = small_config(kind, compute_dtype="bfloat16")
    variables = init_variables(config32, jax.random.key(1))
    # Larger weights than the reference's tiny init so that the U-Net's output is not ~0.
    variables = jax.tree_util.tree_map(lambda x: x * 30 if x.ndim == 4 else x, variables)
    assert init_variables(config16, jax.random.key(1))["params"]["unet"]["down_conv_0"][
        "kernel"].dtype == jnp.float32
    out32 = forward(config32, variables, mag_mix, queries, mags, train=True)
    out16 = jax.jit(functools.partial(forward, config16), static_argnames="train")(
        variables, mag_mix, queries, mags, train=True)
    assert out16["query_logits"].dtype == jnp.float32
    scale = np.abs(np.asarray(out32["query_logits"])).max()
    assert scale > 1e-3
    error = np.abs(np.asarray(out16["query_logits"]) - np.asarray(out32["query_logits"])).max()
    assert error < 0.05 * scale
    assert float(out16["loss"]) == pytest.approx(float(out32["loss"]), rel=0.05)
    assert jax.tree_util.tree_all(
        jax.tree_util.tree_map(lambda x: x.dtype == jnp.float32, out16["batch_stats"]))


def test_forward_outputs_per_kind():
    rng = np.random.default_rng(1)
    mag_mix = rng.gamma(0.5, 1.0, (2, 513, 32)).astype(np.float32)
    for kind, queries in [
        ("clipsep", rng.normal(size=(2, 3, 512)).astype(np.float32)),
        ("clipsep_nit", rng.normal(size=(2, 2, 512)).astype(np.float32)),
        ("labelsep", np.array([[0, 3], [5, 10]], np.int32)),
        ("pit", None),
    ]:
        config = small_config(kind)
        out = forward(config, init_variables(config, jax.random.key(0)), mag_mix, queries)
        n = 2 if queries is None else queries.shape[1]
        assert out["query_logits"].shape == (2, n, 256, 32), kind
        assert ("noise_logits" in out) == (kind == "clipsep_nit")
        assert "loss" not in out and "batch_stats" not in out


def test_bad_inputs_are_refused_with_clear_messages():
    config = small_config()
    variables = init_variables(config, jax.random.key(0))
    mag_mix = np.ones((2, 513, 32), np.float32)
    queries = np.zeros((2, 2, 512), np.float32)
    with pytest.raises(ValueError, match=r"queries must be \[B, N, 512\]"):
        forward(config, variables, mag_mix, np.zeros((2, 2, 100), np.float32))
    with pytest.raises(ValueError, match="needs queries"):
        forward(config, variables, mag_mix)
    with pytest.raises(ValueError, match=r"mags must be \[B=2, N=2"):
        forward(config, variables, mag_mix, queries, np.ones((2, 3, 513, 32), np.float32))
    with pytest.raises(ValueError, match="divisible by 2\\*\\*num_downs = 32"):
        forward(config, variables, np.ones((2, 513, 40), np.float32), queries)
    with pytest.raises(ValueError, match="mag_mix must be"):
        forward(config, variables, np.ones((513, 32), np.float32), queries)
    labelsep = small_config("labelsep")
    with pytest.raises(ValueError, match="integer label ids"):
        forward(labelsep, init_variables(labelsep, jax.random.key(0)), mag_mix, queries)


def test_config_validation_names_the_field():
    config = config_lib.default_config()
    config.model.kind = "sepformer"
    with pytest.raises(ValueError, match="config.model.kind='sepformer'"):
        config_lib.validate(config)
    config = config_lib.default_config()
    config.model.kind = "clipsep_nit"
    config.num_sources = 3
    with pytest.raises(ValueError, match="num_noise_heads=2"):
        config_lib.validate(config)
    with pytest.raises(AttributeError):
        config_lib.default_config().model.no_such_field  # noqa: B018


@pytest.mark.parametrize("height,width", [(1, 3), (2, 2), (4, 8), (64, 32)])
def test_upsampling_matches_torch_align_corners(height, width):
    import torch

    from clipsep_jax.families.clipsep.layers import upsample_bilinear_2x

    x = np.random.default_rng(height).normal(size=(2, height, width, 3)).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), scale_factor=2, mode="bilinear",
        align_corners=True,
    ).permute(0, 2, 3, 1).numpy()
    got = jax.jit(upsample_bilinear_2x)(x)
    assert got.shape == (2, 2 * height, 2 * width, 3)
    np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("height,width", [(1, 1), (1, 3), (2, 5), (8, 4)])
def test_taps_first_upsample_conv_matches_torch_and_upsample_first(height, width):
    import torch

    from clipsep_jax.families.clipsep.layers import upsample_conv3x3

    rng = np.random.default_rng(height * 10 + width)
    x = rng.normal(size=(2, height, width, 5)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 5, 3)).astype(np.float32)
    upsampled = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), scale_factor=2, mode="bilinear",
        align_corners=True,
    )
    expected = torch.nn.functional.conv2d(
        upsampled, torch.from_numpy(kernel).permute(3, 2, 0, 1), padding=1
    ).permute(0, 2, 3, 1).numpy()
    outputs, gradients = {}, {}
    cotangent = rng.normal(size=expected.shape).astype(np.float32)
    for formulation in ("taps_first", "upsample_first"):
        fn = functools.partial(upsample_conv3x3, formulation=formulation)
        outputs[formulation], pullback = jax.vjp(jax.jit(fn), x, kernel)
        gradients[formulation] = pullback(cotangent)
        np.testing.assert_allclose(outputs[formulation], expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(gradients["taps_first"], gradients["upsample_first"], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


def test_up_conv_formulations_give_the_same_model():
    config = small_config()
    variables = init_variables(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    mag_mix = jnp.asarray(rng.uniform(0, 2, (2, 513, 32)), jnp.float32)
    queries = jnp.asarray(rng.normal(size=(2, 2, 512)), jnp.float32)
    outputs = {}
    for formulation in ("taps_first", "upsample_first"):
        config.model.up_conv_formulation = formulation
        outputs[formulation] = forward(config, variables, mag_mix, queries)
    for key, value in outputs["taps_first"].items():
        np.testing.assert_allclose(value, outputs["upsample_first"][key], atol=1e-5, rtol=1e-4)
    config.model.up_conv_formulation = "transposed"
    with pytest.raises(ValueError, match="up_conv_formulation='transposed'"):
        config_lib.validate(config)


@pytest.mark.parametrize("height,width", [(2, 2), (4, 6), (8, 8), (16, 4)])
def test_down_conv_matches_torch(height, width):
    import torch

    from clipsep_jax.families.clipsep.layers import down_conv4x4

    rng = np.random.default_rng(height * 10 + width)
    x = rng.normal(size=(2, height, width, 5)).astype(np.float32)
    kernel = rng.normal(size=(4, 4, 5, 3)).astype(np.float32)
    x_torch = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    kernel_torch = torch.from_numpy(kernel).permute(3, 2, 0, 1).requires_grad_()
    expected = torch.nn.functional.conv2d(x_torch, kernel_torch, stride=2, padding=1)
    cotangent = rng.normal(size=expected.shape).astype(np.float32)
    expected.backward(torch.from_numpy(cotangent))
    got, pullback = jax.vjp(jax.jit(down_conv4x4), x, kernel)
    np.testing.assert_allclose(got, expected.detach().permute(0, 2, 3, 1).numpy(), atol=1e-5)
    grad_x, grad_kernel = pullback(cotangent.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(grad_x, x_torch.grad.permute(0, 2, 3, 1).numpy(), atol=1e-4)
    np.testing.assert_allclose(grad_kernel, kernel_torch.grad.permute(2, 3, 1, 0).numpy(),
                               atol=1e-4)
