"""Flax models against the PyTorch rendition of the reference, through the checkpoint converter."""

import functools

import jax
import numpy as np
import pytest
import torch
import torch_reference as tr
from conftest import relative_error

from clipsep_jax import convert, models
from clipsep_jax.models import forward

TORCH_MODELS = {
    "clipsep": tr.CLIPSep,
    "clipsep_nit": tr.CLIPSepNIT,
    "pit": tr.PITSep,
    "labelsep": tr.LabelSep,
}
FULL_SIZE = dict(layers=7, ngf=64, channels=32)


def make_batch(batch, num_frames, seed=0):
    rng = np.random.default_rng(seed)
    sources = rng.gamma(0.5, 1.0, (batch, 2, 513, num_frames)).astype(np.float32) / 2
    noise = rng.normal(0, 0.05, (batch, 513, num_frames))
    mag_mix = np.abs(sources.sum(1) + noise).astype(np.float32)
    embeddings = rng.normal(0, 1, (batch, 2, 512)).astype(np.float32)
    labels = rng.integers(0, 11, (batch, 2))
    return mag_mix, sources, embeddings, labels


def torch_model(kind, seed=0, **sizes):
    torch.manual_seed(seed)
    net = TORCH_MODELS[kind](**sizes)
    # Running statistics away from their initial values, so evaluation mode tests their use.
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return net


def convert_through_file(net, kind, tmp_path, prefix="module."):
    path = tmp_path / f"{kind}.pt"
    torch.save({prefix + k: v.clone() for k, v in net.state_dict().items()}, path)
    return convert.load_reference_checkpoint(path, kind)


def run_torch(net, kind, mag_mix, sources, embeddings, labels, train):
    net.train(train)
    mix = torch.from_numpy(mag_mix)[:, None]
    mags = [torch.from_numpy(sources[:, i])[:, None] for i in range(2)]
    if kind == "labelsep":
        queries = [torch.from_numpy(labels[:, i]) for i in range(2)]
    elif kind == "pit":
        queries = None
    else:
        queries = [torch.from_numpy(embeddings[:, i]) for i in range(2)]
    loss, outputs = net(mix, mags, queries)
    return loss, outputs


def flax_queries(kind, embeddings, labels):
    return {"pit": None, "labelsep": labels.astype(np.int32)}.get(kind, embeddings)


@pytest.mark.parametrize("kind", list(TORCH_MODELS))
def test_full_size_parity_eval_and_train(kind, tmp_path):
    net = torch_model(kind, **FULL_SIZE)
    config, variables = convert_through_file(net, kind, tmp_path)
    assert (config.model.num_downs, config.model.base_width, config.model.num_mask_channels) == (
        7, 64, 32)
    mag_mix, sources, embeddings, labels = make_batch(2, 256)
    initial_state = {k: v.clone() for k, v in net.state_dict().items()}
    fn = jax.jit(functools.partial(forward, config), static_argnames="train")
    for train in (False, True):
        net.load_state_dict(initial_state)
        expected_loss, expected = run_torch(net, kind, mag_mix, sources, embeddings, labels, train)
        got = fn(variables, mag_mix, flax_queries(kind, embeddings, labels), sources,
                 train=train)
        expected_logits = torch.cat(expected["query_logits"], 1).detach().numpy()
        assert got["query_logits"].shape == (2, 2, 256, 256)
        assert relative_error(got["query_logits"], expected_logits) <= 1e-4, train
        assert abs(float(got["loss"]) - expected_loss.item()) <= 1e-4 * abs(expected_loss.item())
        if kind == "clipsep_nit":
            expected_noise = torch.cat(expected["noise_logits"], 1).detach().numpy()
            assert got["noise_logits"].shape == (2, 2, 256, 256)
            assert relative_error(got["noise_logits"], expected_noise) <= 1e-4
        if train:
            updated = net.state_dict()
            checked = 0
            for entry in convert.key_table(config):
                if entry.flax_path[0] != "batch_stats":
                    continue
                node = got["batch_stats"]
                for part in entry.flax_path[1:]:
                    node = node[part]
                new = updated[entry.torch_key].numpy()
                assert not np.allclose(new, initial_state[entry.torch_key].numpy())
                assert relative_error(node, new) <= 1e-4, entry.torch_key
                checked += 1
            assert checked == 2 * (1 + 2 * (7 - 2) + 1)  # bn0, down+up norms, innermost up norm
        else:
            assert "batch_stats" not in got


@pytest.mark.parametrize("kind", ["clipsep", "clipsep_nit", "pit"])
def test_training_gradients_match_torch(kind, tmp_path):
    sizes = dict(layers=5, ngf=8, channels=4)
    net = torch_model(kind, seed=1, **sizes)
    config, variables = convert_through_file(net, kind, tmp_path, prefix="")
    mag_mix, sources, embeddings, labels = make_batch(3, 64, seed=1)
    loss, _ = run_torch(net, kind, mag_mix, sources, embeddings, labels, train=True)
    loss.backward()
    queries = flax_queries(kind, embeddings, labels)

    def loss_fn(params):
        return forward(config, {**variables, "params": params}, mag_mix, queries, sources,
                       train=True)["loss"]

    grads = jax.grad(loss_fn)(variables["params"])
    for entry in convert.key_table(config):
        if entry.flax_path[0] != "params":
            continue
        node = grads
        for part in entry.flax_path[1:]:
            node = node[part]
        if entry.index is not None:
            node = node[entry.index]
        expected = convert._to_flax_layout(
            dict(net.named_parameters())[entry.torch_key].grad.numpy(), entry.layout)
        assert relative_error(node, expected) <= 1e-3, entry.torch_key


def test_parameter_count_matches_the_reference():
    config = convert.default_config()
    shapes = jax.eval_shape(lambda: models.init_variables(config, jax.random.key(0)))
    count = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes["params"]))
    assert count == 30_290_659
    torch_count = sum(p.numel() for p in tr.CLIPSep(**FULL_SIZE).parameters())
    assert torch_count == count
