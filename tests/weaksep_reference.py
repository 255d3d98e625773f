"""A PyTorch rendition of the weakly supervised separator's network (Mahmud et al., ICLR 2024), for
parity tests of ``clipsep_jax.families.weaksep``.

Written from /work/weak_sep_spec.md section 2, not from the reference code. Module nesting
reproduces the reference's state-dict keys (``net_sound.bn0``, ``net_sound.unet_block.`` +
``submodule.`` per level + ``downconv``, ``downnorm``, ``downresblock.res_layers.i.{0,1}``,
``ca_blocks.j.{norm1, sa_block, ca_block}``, ``upresblock``, ``upconv``, ``upnorm``;
``net_clap.fc``; ``net_synthesizer.{scale,bias}``) so that its state dict exercises the converter.
Tensors are NCHW with frequency on H. ``mask_padding`` is an addition for the tests: the reference
always attends to padding tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, channels: int, layers: int = 1):
        super().__init__()
        stages = []
        for i in range(layers):
            stage = [nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)]
            if i < layers - 1:
                stage.append(nn.LeakyReLU(0.2))
            stages.append(nn.Sequential(*stage))
        self.res_layers = nn.Sequential(*stages)

    def forward(self, x):
        return F.leaky_relu(self.res_layers(x) + x, 0.2)


def _attention(q, k, v, heads, key_mask):
    """q: [B, Lq, C], k, v: [B, Lk, C] -> [B, Lq, C]; key_mask [B, Lk] bool or None."""
    b, lq, c = q.shape
    d = c // heads
    q = q.view(b, lq, heads, d).transpose(1, 2) * d**-0.5
    k = k.view(b, -1, heads, d).transpose(1, 2)
    v = v.view(b, -1, heads, d).transpose(1, 2)
    scores = q @ k.transpose(-1, -2)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, lq, c)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(_attention(q, k, v, self.heads, None))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, cond_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(cond_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cond, key_mask):
        k, v = self.kv(cond).chunk(2, dim=-1)
        return self.proj(_attention(self.q(x), k, v, self.heads, key_mask))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, cond_dim: int | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads) if cond_dim is None else CrossAttention(
            dim, cond_dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 2 * dim)

    def forward(self, x, cond=None, key_mask=None):
        h = self.norm1(x)
        x = x + (self.attn(h) if cond is None else self.attn(h, cond, key_mask))
        return x + self.mlp(self.norm2(x))


class SCA(nn.Module):
    def __init__(self, dim: int, cond_dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)  # never used, as in the reference
        self.sa_block = Block(dim, heads, None)
        self.ca_block = Block(dim, heads, cond_dim)

    def forward(self, x, cond, key_mask):
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # [B, H*W, C], frequency-major
        tokens = self.ca_block(self.sa_block(tokens), cond, key_mask)
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class Level(nn.Module):
    """Level ``d``: input ``in_ch`` -> down width ``width``; returns ``out_ch`` channels (before
    the skip concatenation, which doubles the input channels)."""

    def __init__(self, in_ch, width, out_ch, inner, outermost, attention, cond_dim, heads,
                 res_layers, cond_blocks):
        super().__init__()
        self.outermost = outermost
        self.downconv = nn.Conv2d(in_ch, width, 4, stride=2, padding=1, bias=False)
        self.downnorm = nn.BatchNorm2d(width)
        self.downresblock = ResBlock(width, res_layers)
        if attention:
            self.ca_blocks = nn.Sequential(
                *[SCA(width, cond_dim, heads) for _ in range(cond_blocks)])
        else:
            self.ca_blocks = None
        self.submodule = inner
        up_ch = width if inner is None else 2 * width
        self.upresblock = ResBlock(up_ch, res_layers)
        self.upconv = nn.Conv2d(up_ch, out_ch, 3, padding=1, bias=outermost)
        if not outermost:
            self.upnorm = nn.BatchNorm2d(out_ch)

    def forward(self, x, cond, key_mask):
        y = self.downresblock(F.leaky_relu(self.downnorm(self.downconv(x)), 0.2))
        if self.ca_blocks is not None:
            for block in self.ca_blocks:
                y = block(y, cond, key_mask)
        if self.submodule is not None:
            y = self.submodule(y, cond, key_mask)
        y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=True)
        y = self.upconv(self.upresblock(y))
        if self.outermost:
            return y
        return torch.cat([x, F.relu(self.upnorm(y))], 1)


class CondAttUNet(nn.Module):
    def __init__(self, num_downs=7, ngf=64, out_dim=32, cond_dim=768, heads=8,
                 attention_levels=(4, 5, 6), res_layers=1, cond_blocks=1):
        super().__init__()
        widths = [ngf * min(2**d, 8) for d in range(num_downs)]
        level = None
        for d in reversed(range(num_downs)):
            level = Level(1 if d == 0 else widths[d - 1], widths[d],
                          out_dim if d == 0 else widths[d - 1], level, d == 0,
                          d in attention_levels, cond_dim, heads, res_layers, cond_blocks)
        self.bn0 = nn.BatchNorm2d(1)
        self.unet_block = level

    def forward(self, x, cond, key_mask=None):
        """x: log1p|X| [B, 1, F, T]; cond [B, S, cond_dim] -> [B, out_dim, F, T]."""
        return self.unet_block(self.bn0(x), cond, key_mask)


class ClapHead(nn.Module):
    def __init__(self, embedding_dim: int, channels: int):
        super().__init__()
        self.fc = nn.Linear(embedding_dim, channels)


class Synthesizer(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, query, features):
        """query [B, k] (after the sigmoid), features [B, k, F, T] -> logits [B, 1, F, T]."""
        weights = query * self.scale
        return torch.einsum("bc,bcft->bft", weights, features)[:, None] + self.bias


class NetWrapper(nn.Module):
    """U-Net, CLAP's trainable ``fc`` and the synthesizer; forward gives the mask."""

    def __init__(self, embedding_dim=512, **unet_sizes):
        super().__init__()
        self.net_sound = CondAttUNet(**unet_sizes)
        channels = self.net_sound.unet_block.upconv.out_channels
        self.net_clap = ClapHead(embedding_dim, channels)
        self.net_synthesizer = Synthesizer(channels)

    def forward(self, log_mag, cond, embedding, key_mask=None):
        """log_mag [B, 1, F, T]; cond [B, S, D]; embedding [B, E] -> (features, mask [B, 1, F, T]).
        """
        features = self.net_sound(log_mag, cond, key_mask)
        query = torch.sigmoid(self.net_clap.fc(embedding))
        return features, torch.sigmoid(self.net_synthesizer(query, features))
