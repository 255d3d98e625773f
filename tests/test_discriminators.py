"""HiFi-GAN's discriminators and losses against a PyTorch rendition written from the paper's
description (plain convolutions: the effective weights of the reference's normalised ones)."""

import jax
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from clipsep_jax.families.vocoder.discriminators import (
    MultiPeriodDiscriminator,
    MultiScaleDiscriminator,
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    mel_reconstruction_loss,
)


class ReferencePeriod(nn.Module):
    def __init__(self, period):
        super().__init__()
        self.period = period
        chans = [1, 32, 128, 512, 1024, 1024]
        self.convs = nn.ModuleList(
            nn.Conv2d(chans[i], chans[i + 1], (5, 1), (3 if i < 4 else 1, 1), (2, 0))
            for i in range(5))
        self.conv_post = nn.Conv2d(1024, 1, (3, 1), 1, (1, 0))

    def forward(self, x):
        b, t = x.shape
        if t % self.period:
            x = F.pad(x[:, None], (0, self.period - t % self.period), "reflect")[:, 0]
        x = x.view(b, 1, -1, self.period)
        maps = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
            maps.append(x)
        x = self.conv_post(x)
        maps.append(x)
        return torch.flatten(x, 1, -1), maps


class ReferenceScale(nn.Module):
    LAYERS = ((1, 128, 15, 1, 1), (128, 128, 41, 2, 4), (128, 256, 41, 2, 16),
              (256, 512, 41, 4, 16), (512, 1024, 41, 4, 16), (1024, 1024, 41, 1, 16),
              (1024, 1024, 5, 1, 1))

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(i, o, k, s, (k - 1) // 2, groups=g)
                                   for i, o, k, s, g in self.LAYERS)
        self.conv_post = nn.Conv1d(1024, 1, 3, 1, 1)

    def forward(self, x):
        x = x[:, None]
        maps = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
            maps.append(x)
        x = self.conv_post(x)
        maps.append(x)
        return torch.flatten(x, 1, -1), maps


def flax_params(module, prefix=""):
    """PyTorch conv weights -> the Flax layout ([k..., in / groups, out])."""
    params = {}
    for name, p in module.named_parameters():
        parts = name.split(".")
        layer = parts[-2] if parts[-2] == "conv_post" else f"convs_{parts[-2]}"
        value = p.detach().numpy()
        if parts[-1] == "weight":
            value = value.transpose(*range(2, value.ndim), 1, 0)
        params.setdefault(layer, {})["kernel" if parts[-1] == "weight" else "bias"] = value
    return params


def seeded(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=generator) / np.sqrt(fan_in))
    return module.eval()


@pytest.mark.parametrize("kind", ["period", "scale"])
def test_discriminators_match_pytorch(kind):
    rng = np.random.default_rng(0)
    real = rng.uniform(-0.5, 0.5, (2, 1003)).astype(np.float32)  # 1003: padded for each period
    fake = rng.uniform(-0.5, 0.5, (2, 1003)).astype(np.float32)
    if kind == "period":
        periods = (2, 3, 5)
        references = [seeded(ReferencePeriod(p), i) for i, p in enumerate(periods)]
        model = MultiPeriodDiscriminator(periods)
        pooled = lambda x, i: x  # noqa: E731
    else:
        references = [seeded(ReferenceScale(), i) for i in range(3)]
        model = MultiScaleDiscriminator()
        pool = nn.AvgPool1d(4, 2, padding=2)
        pooled = lambda x, i: x if i == 0 else pooled(pool(x[:, None])[:, 0], i - 1)  # noqa
    params = {f"discriminators_{i}": flax_params(r) for i, r in enumerate(references)}
    outputs = {}
    for name, wave in (("real", real), ("fake", fake)):
        with torch.no_grad():
            outputs[name] = [r(pooled(torch.from_numpy(wave), i))
                             for i, r in enumerate(references)]
        logits, maps = model.apply({"params": params}, wave)
        for (want_logits, want_maps), got_logits, got_maps in zip(
                outputs[name], logits, maps, strict=True):
            np.testing.assert_allclose(got_logits, want_logits.numpy(), rtol=1e-4, atol=1e-4)
            for want, got in zip(want_maps, got_maps, strict=True):
                want = np.moveaxis(want.numpy(), 1, -1)  # channels last
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        outputs[name + "_flax"] = (logits, maps)

    real_logits, real_maps = outputs["real_flax"]
    fake_logits, fake_maps = outputs["fake_flax"]
    torch_real = [o[0] for o in outputs["real"]]
    torch_fake = [o[0] for o in outputs["fake"]]
    want_d = sum(torch.mean((1 - r) ** 2) + torch.mean(g ** 2)
                 for r, g in zip(torch_real, torch_fake, strict=True))
    want_g = sum(torch.mean((1 - g) ** 2) for g in torch_fake)
    want_fm = 2 * sum(torch.mean(torch.abs(r - g))
                      for rs, gs in zip([o[1] for o in outputs["real"]],
                                        [o[1] for o in outputs["fake"]], strict=True)
                      for r, g in zip(rs, gs, strict=True))
    np.testing.assert_allclose(discriminator_loss(real_logits, fake_logits), want_d, rtol=1e-4)
    np.testing.assert_allclose(generator_adversarial_loss(fake_logits), want_g, rtol=1e-4)
    np.testing.assert_allclose(feature_matching_loss(real_maps, fake_maps), want_fm, rtol=1e-4)


def test_mel_reconstruction_loss_and_gradients_flow():
    a = np.random.default_rng(1).normal(size=(2, 8, 5)).astype(np.float32)
    b = a + 0.5
    assert float(mel_reconstruction_loss(a, b)) == pytest.approx(45 * 0.5, rel=1e-6)
    grad = jax.grad(lambda w: generator_adversarial_loss(
        MultiScaleDiscriminator(scales=1).apply(
            {"params": w}, np.zeros((1, 64), np.float32) + 0.1)[0]))(
        MultiScaleDiscriminator(scales=1).init(jax.random.key(0), np.zeros((1, 64)))["params"])
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grad))
