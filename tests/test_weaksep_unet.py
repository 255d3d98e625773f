"""The weakly supervised separator's conditional attention U-Net and query head against a PyTorch
rendition written from the spec (tests/weaksep_reference.py), through the checkpoint converter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import weaksep_reference as wr
from conftest import relative_error

from clipsep_jax.errors import UserError
from clipsep_jax.families.weaksep import convert
from clipsep_jax.families.weaksep.unet import CondAttentionUNet, DownConv, QueryHead, ResBlock

SMALL = dict(num_downs=5, ngf=8, out_dim=6, cond_dim=24, heads=4, attention_levels=(2, 3, 4))
EMBEDDING_DIM = 16


def small_flax_unet(**overrides):
    fields = dict(num_downs=5, base_width=8, out_channels=6, cond_dim=24, num_heads=4,
                  attention_levels=(2, 3, 4))
    return CondAttentionUNet(**{**fields, **overrides})


def torch_net(seed=0, **overrides):
    torch.manual_seed(seed)
    net = wr.NetWrapper(EMBEDDING_DIM, **{**SMALL, **overrides})
    # Away from the default init (BatchNorm and LayerNorm at 1 and 0, a near-zero fc), so that
    # every converted tensor matters; running statistics too, for evaluation mode.
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d | torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
        net.net_clap.fc.weight.normal_(0.0, 0.5)
        net.net_synthesizer.scale.uniform_(0.5, 1.5)
        net.net_synthesizer.bias.fill_(-0.3)
    return net


def reference_state_dict(net):
    """The training checkpoint's layout: DDP's ``module.`` and keys the converter skips."""
    state = {"module." + k: v for k, v in net.state_dict().items()}
    state["module.net_clap.model.logit_scale_a"] = torch.tensor(2.5)
    state["module.stft.conv_real.weight"] = torch.zeros(3, 1, 4)
    return state


def make_inputs(batch=2, size=64, tokens=12, seed=0):
    rng = np.random.default_rng(seed)
    log_mag = np.log1p(rng.gamma(0.5, 1.0, (batch, size, size))).astype(np.float32)
    cond = rng.normal(0.0, 1.0, (batch, tokens, SMALL["cond_dim"])).astype(np.float32)
    token_mask = np.arange(tokens)[None, :] < np.array([5, tokens])[:batch, None]
    embedding = rng.normal(0.0, 1.0, (batch, EMBEDDING_DIM)).astype(np.float32)
    embedding /= np.linalg.norm(embedding, axis=-1, keepdims=True)
    return log_mag, cond, token_mask, embedding


def test_full_size_parameter_count_matches_the_reference():
    unet_shapes = jax.eval_shape(lambda: CondAttentionUNet().init(
        jax.random.key(0), jnp.zeros((1, 128, 128, 1)), jnp.zeros((1, 77, 768))))
    head_shapes = jax.eval_shape(lambda: QueryHead().init(
        jax.random.key(0), jnp.zeros((1, 4, 4, 32)), jnp.zeros((1, 512))))
    count = lambda tree: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))
    assert count(unet_shapes["params"]) == 87_681_250
    assert count(head_shapes["params"]) == 16_416 + 33
    # 28 BatchNorms' statistics: with their num_batches_tracked the state dict has 267 entries.
    assert len(jax.tree.leaves(unet_shapes["params"])) + len(
        jax.tree.leaves(unet_shapes["batch_stats"])) + 28 == 267


def flax_forward(unet, params, batch_stats, log_mag, cond, token_mask, embedding):
    """(eval features, eval mask, train features, train mask, updated batch_stats), one jit."""
    head = QueryHead(unet.out_channels)

    def run(params, batch_stats, inputs, train):
        log_mag, cond, token_mask, embedding = inputs
        variables = {"params": params["unet"], "batch_stats": batch_stats["unet"]}
        features, updates = unet.apply(variables, log_mag[..., None], cond, token_mask,
                                       train=train, mutable=["batch_stats"])
        mask = head.apply({"params": params["query_head"]}, features, embedding)
        return features, mask, updates["batch_stats"]

    @jax.jit
    def both(params, batch_stats, inputs):
        eval_features, eval_mask, _ = run(params, batch_stats, inputs, False)
        return (eval_features, eval_mask, *run(params, batch_stats, inputs, True))

    return both(params, batch_stats, (log_mag, cond, token_mask, embedding))


def torch_forward(net, train, log_mag, cond, embedding, token_mask=None):
    net.train(train)
    with torch.no_grad():
        features, mask = net(torch.from_numpy(log_mag)[:, None], torch.from_numpy(cond),
                             torch.from_numpy(embedding),
                             None if token_mask is None else torch.from_numpy(token_mask))
    return features.numpy().transpose(0, 2, 3, 1), mask.numpy()[:, 0]


@pytest.mark.parametrize("mask_padding", [False, True])
def test_matches_the_torch_rendition_in_eval_and_train_mode(mask_padding):
    net = torch_net()
    params, batch_stats = convert.params_from_reference_state_dict(reference_state_dict(net))
    settings = convert.unet_settings_from_state_dict(reference_state_dict(net))
    assert settings == dict(num_downs=5, base_width=8, out_channels=6, attention_levels=(2, 3, 4),
                            num_res_layers=1, num_cond_blocks=1, cond_dim=24)
    log_mag, cond, token_mask, embedding = make_inputs()
    eval_features, eval_mask, train_features, train_mask, updates = flax_forward(
        small_flax_unet(mask_padding=mask_padding), params, batch_stats, log_mag, cond,
        token_mask, embedding)
    torch_mask_arg = token_mask if mask_padding else None

    features, mask = torch_forward(net, False, log_mag, cond, embedding, torch_mask_arg)
    assert relative_error(eval_features, features) < 1e-4
    assert relative_error(eval_mask, mask) < 1e-4
    if mask_padding:  # the first item's 7 padding tokens do matter without the mask
        unmasked, _ = torch_forward(net, False, log_mag, cond, embedding)
        assert relative_error(unmasked[0], features[0]) > 1e-3
        assert relative_error(unmasked[1], features[1]) < 1e-6

    features, mask = torch_forward(net, True, log_mag, cond, embedding, torch_mask_arg)
    assert relative_error(train_features, features) < 1e-4
    assert relative_error(train_mask, mask) < 1e-4
    # Running statistics updated as PyTorch's (unbiased variance, momentum 0.1).
    _, updated = convert.params_from_reference_state_dict(reference_state_dict(net))
    for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(updated["unet"]),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_more_residual_layers_and_conditioning_blocks_convert():
    sizes = dict(num_downs=3, attention_levels=(2,), res_layers=2, cond_blocks=2)
    net = torch_net(**sizes)
    state = reference_state_dict(net)
    settings = convert.unet_settings_from_state_dict(state)
    assert settings["num_res_layers"] == 2 and settings["num_cond_blocks"] == 2
    params, batch_stats = convert.params_from_reference_state_dict(state)
    unet = small_flax_unet(num_downs=3, attention_levels=(2,), num_res_layers=2,
                           num_cond_blocks=2)
    log_mag, cond, _, embedding = make_inputs(size=16)
    features = jax.jit(unet.apply)({"params": params["unet"], "batch_stats": batch_stats["unet"]},
                                   log_mag[..., None], cond)
    torch_features, _ = torch_forward(net, False, log_mag, cond, embedding)
    assert relative_error(features, torch_features) < 1e-4


def test_converter_refuses_unknown_missing_and_misshaped_keys_by_name():
    net = torch_net()
    _, batch_stats = convert.params_from_reference_state_dict(net.state_dict())
    before = batch_stats["unet"]["input_norm"]["mean"].copy()
    with torch.no_grad():  # the converted arrays are copies, not views of the module's buffers
        net.net_sound.bn0.running_mean.add_(1.0)
    np.testing.assert_array_equal(batch_stats["unet"]["input_norm"]["mean"], before)

    state = {k: v.numpy() for k, v in torch_net().state_dict().items()}
    bare = {k.removeprefix("net_sound."): v for k, v in state.items()
            if k.startswith("net_sound.")}
    params, _ = convert.params_from_reference_state_dict(bare)
    assert set(params) == {"unet"}

    extra = dict(state, **{"net_sound.unet_block.submodule.extra.weight": np.zeros(3)})
    with pytest.raises(UserError, match="unexpected.*'net_sound.unet_block.submodule.extra"):
        convert.params_from_reference_state_dict(extra)
    missing_key = "net_sound.unet_block.submodule.submodule.ca_blocks.0.ca_block.attn.kv.bias"
    with pytest.raises(UserError, match=f"missing.*'{missing_key}'"):
        convert.params_from_reference_state_dict(
            {k: v for k, v in state.items() if k != missing_key})
    with pytest.raises(UserError, match="missing.*'net_synthesizer.scale'"):
        convert.params_from_reference_state_dict(
            {k: v for k, v in state.items() if k != "net_synthesizer.scale"})
    bad = dict(state)
    bad["net_sound.unet_block.submodule.upnorm.weight"] = np.zeros(5, np.float32)
    with pytest.raises(UserError, match="'net_sound.unet_block.submodule.upnorm.weight' has shape"):
        convert.params_from_reference_state_dict(bad)
    with pytest.raises(UserError, match="no U-Net keys"):
        convert.params_from_reference_state_dict({"net_clap.fc.weight": np.zeros((6, 16))})


def test_initialisation_follows_pytorchs_defaults():
    # BatchNorm at 1 and 0; conv weights and biases U(+-1/sqrt(fan_in)). Checked on the
    # building blocks, in one program: a whole U-Net's init compiles for seconds.
    @jax.jit
    def init(key):
        return (ResBlock().init(key, jnp.zeros((1, 4, 4, 16)), False)["params"],
                DownConv(8).init(key, jnp.zeros((1, 4, 4, 16)))["params"]["kernel"],
                QueryHead(6).init(key, jnp.zeros((1, 2, 2, 6)), jnp.ones((1, 16)))["params"])

    res, down, head = init(jax.random.key(0))
    assert np.all(res["norm_0"]["scale"] == 1) and not np.any(res["norm_0"]["bias"])
    for leaf in (res["conv_0"]["kernel"], res["conv_0"]["bias"]):
        assert 0.5 / 12 < np.abs(leaf).max() <= 1 / 12  # fan_in 9 * 16
    assert down.shape == (4, 4, 16, 8) and 0.5 / 16 < np.abs(down).max() <= 1 / 16
    assert np.abs(head["query_projection"]["dense"]["kernel"]).max() < 1e-3
    assert np.all(head["mask_synthesis"]["scale"] == 1)
    assert float(head["mask_synthesis"]["bias"][0]) == 0.0


def test_input_checks():
    unet = small_flax_unet(num_downs=2, attention_levels=(1,))
    log_mag, cond, _, _ = make_inputs(batch=1, size=8)
    init = lambda module, *args: jax.eval_shape(module.init, jax.random.key(0), *args)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*num_downs = 4"):
        init(unet, np.zeros((1, 6, 8, 1), np.float32), cond)
    with pytest.raises(ValueError, match="cond_dim=24"):
        init(unet, log_mag[..., None], cond[..., :20])
    with pytest.raises(ValueError, match="mask_padding=True needs token_mask"):
        init(small_flax_unet(num_downs=2, attention_levels=(1,), mask_padding=True),
             log_mag[..., None], cond)
    with pytest.raises(ValueError, match="attention_levels \\[2\\]"):
        init(small_flax_unet(num_downs=2, attention_levels=(2,)), log_mag[..., None], cond)
    with pytest.raises(ValueError, match="num_heads=3 must divide"):
        init(small_flax_unet(num_downs=2, attention_levels=(1,), num_heads=3), log_mag[..., None],
             cond)


def test_bfloat16_compute_keeps_float32_parameters():
    unet = small_flax_unet(dtype=jnp.bfloat16)
    log_mag, cond, _, _ = make_inputs(batch=1, size=32)
    shapes = jax.eval_shape(lambda: unet.init(jax.random.key(0), log_mag[..., None], cond))
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    out = jax.eval_shape(lambda v: unet.apply(v, log_mag[..., None], cond), shapes)
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 32, 32, 6)
