"""The HiFi-GAN generator against a PyTorch rendition of the reference's (written from its
description: weight-normalised convolutions, transposed-convolution upsampling, multi-receptive-
field residual blocks), through its state dict in both weight-norm layouts."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from clipsep_jax.errors import UserError
from clipsep_jax.families.vocoder.hifigan import (
    HiFiGANGenerator,
    hifigan_settings,
    hop_length,
    load_hifigan,
    params_from_hifigan_state_dict,
)


def same(kernel, dilation=1):
    return (kernel * dilation - dilation) // 2


class ReferenceResBlock(nn.Module):
    def __init__(self, channels, kernel, dilations, kind, norm):
        super().__init__()
        self.kind = kind
        dilated = nn.ModuleList(norm(nn.Conv1d(channels, channels, kernel, 1, same(kernel, d),
                                               dilation=d)) for d in dilations)
        if kind == "2":  # the reference's ResBlock2 names its one stack "convs"
            self.convs = dilated
            return
        self.convs1 = dilated
        if kind == "1":
            self.convs2 = nn.ModuleList(norm(nn.Conv1d(channels, channels, kernel, 1,
                                                       same(kernel))) for _ in dilations)

    def forward(self, x):
        for j, conv in enumerate(self.convs if self.kind == "2" else self.convs1):
            h = conv(nn.functional.leaky_relu(x, 0.1))
            if self.kind == "1":
                h = self.convs2[j](nn.functional.leaky_relu(h, 0.1))
            x = x + h
        return x


class ReferenceGenerator(nn.Module):
    def __init__(self, h, n_mels, norm):
        super().__init__()
        ch = h["upsample_initial_channel"]
        self.conv_pre = norm(nn.Conv1d(n_mels, ch, 7, 1, 3))
        self.ups = nn.ModuleList(
            norm(nn.ConvTranspose1d(ch // 2**i, ch // 2 ** (i + 1), k, u, (k - u) // 2))
            for i, (u, k) in enumerate(zip(h["upsample_rates"], h["upsample_kernel_sizes"],
                                           strict=True)))
        self.kernels = len(h["resblock_kernel_sizes"])
        self.resblocks = nn.ModuleList(
            ReferenceResBlock(ch // 2 ** (i + 1), k, d, h["resblock"], norm)
            for i in range(len(self.ups))
            for k, d in zip(h["resblock_kernel_sizes"], h["resblock_dilation_sizes"], strict=True))
        self.conv_post = norm(nn.Conv1d(ch // 2 ** len(self.ups), 1, 7, 1, 3))

    def forward(self, x):
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            x = up(nn.functional.leaky_relu(x, 0.1))
            x = sum(self.resblocks[i * self.kernels + j](x)
                    for j in range(self.kernels)) / self.kernels
        return torch.tanh(self.conv_post(nn.functional.leaky_relu(x)))


def randomise(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3
                    + (1.0 if p.ndim == 3 and p.shape[1:] == (1, 1) else 0.0))


SMALL_V1 = {"resblock": "1", "upsample_rates": [4, 4, 2], "upsample_kernel_sizes": [8, 8, 4],
            "upsample_initial_channel": 32, "resblock_kernel_sizes": [3, 7, 11],
            "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]]}
SMALL_V3 = {"resblock": "2", "upsample_rates": [8, 4, 2], "upsample_kernel_sizes": [16, 8, 4],
            "upsample_initial_channel": 32, "resblock_kernel_sizes": [3, 5, 7],
            "resblock_dilation_sizes": [[1, 2], [2, 6], [3, 12]]}
OLD_NORM = nn.utils.weight_norm
NEW_NORM = nn.utils.parametrizations.weight_norm


@pytest.mark.parametrize("h,norm", [(SMALL_V1, OLD_NORM), (SMALL_V3, NEW_NORM)],
                         ids=["v1-weight_g", "v3-parametrizations"])
def test_generator_matches_pytorch(h, norm):
    reference = ReferenceGenerator(h, 20, norm).eval()
    randomise(reference, 0)
    state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    generator = HiFiGANGenerator(**hifigan_settings(h))
    params = params_from_hifigan_state_dict(state, generator)
    log_mel = np.random.default_rng(1).normal(-4.0, 2.0, (2, 20, 13)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(log_mel)).numpy()[:, 0]
    got = np.asarray(generator.apply({"params": params}, log_mel))
    assert got.shape == expected.shape == (2, 13 * hop_length(generator))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.abs(expected).max() > 0.1  # not a trivially small output


def test_converter_refuses_unknown_and_missing_keys():
    reference = ReferenceGenerator(SMALL_V1, 20, OLD_NORM)
    state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    generator = HiFiGANGenerator(**hifigan_settings(SMALL_V1))
    with pytest.raises(UserError, match="unexpected keys"):
        params_from_hifigan_state_dict({**state, "mpd.weight": np.zeros(3)}, generator)
    missing = {k: v for k, v in state.items() if not k.startswith("conv_post")}
    with pytest.raises(UserError, match="missing conv_post"):
        params_from_hifigan_state_dict(missing, generator)
    with pytest.raises(UserError, match="lacks 'resblock'"):
        hifigan_settings({k: v for k, v in SMALL_V1.items() if k != "resblock"})


@pytest.mark.parametrize("settings,count", [
    ({}, 13_926_017),  # V1: 13.92 M in the paper
    ({"upsample_initial_channel": 128}, 925_985),  # V2: 0.92 M
    ({"resblock": "2", "upsample_initial_channel": 256, "upsample_rates": (8, 8, 4),
      "upsample_kernel_sizes": (16, 16, 8), "resblock_kernel_sizes": (3, 5, 7),
      "resblock_dilation_sizes": ((1, 2), (2, 6), (3, 12))}, 1_462_273),  # V3: 1.46 M
], ids=["v1", "v2", "v3"])
def test_full_size_parameter_counts_are_the_papers(settings, count):
    generator = HiFiGANGenerator(**settings)
    shapes = jax.eval_shape(lambda: generator.init(jax.random.key(0), jnp.zeros((1, 80, 8))))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == count


def test_a_saved_reference_checkpoint_loads(tmp_path):
    """As the reference's training saves it: {"generator": state_dict} beside config.json."""
    reference = ReferenceGenerator(SMALL_V1, 20, OLD_NORM).eval()
    randomise(reference, 3)
    (tmp_path / "config.json").write_text(json.dumps({**SMALL_V1, "sampling_rate": 16000,
                                                      "num_mels": 20, "hop_size": 32}))
    torch.save({"generator": reference.state_dict()}, tmp_path / "g_00100000")
    generator, params, config = load_hifigan(str(tmp_path / "g_00100000"))
    assert config["sampling_rate"] == 16000 and hop_length(generator) == 32
    log_mel = np.random.default_rng(2).normal(-4.0, 2.0, (1, 20, 5)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(log_mel)).numpy()[:, 0]
    np.testing.assert_allclose(np.asarray(generator.apply({"params": params}, log_mel)),
                               expected, atol=1e-4)
    with pytest.raises(UserError, match="no vocoder config"):
        load_hifigan(str(tmp_path / "g_00100000"), str(tmp_path / "missing.json"))


def test_weights_of_another_layout_are_named():
    reference = ReferenceGenerator(SMALL_V1, 20, OLD_NORM)
    state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    wider = HiFiGANGenerator(**hifigan_settings({**SMALL_V1, "upsample_initial_channel": 64}))
    with pytest.raises(UserError, match="conv_pre/kernel"):
        params_from_hifigan_state_dict(state, wider)
