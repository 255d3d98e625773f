"""A PyTorch rendition of the reference CLIPSep models, for parity tests and benchmarks.

Written from ../shared/reference-notes.md. Module nesting reproduces the reference's state-dict key
names (``sound_net.unet_block.model.1.model.3. ...``, ``frame_net``, ``synth_net``, ``pit_nets``,
``label_net``) so that its saved weights exercise the checkpoint converter as a real reference
checkpoint would. Inputs follow the reference: ``mag_mix`` [B, 1, 513, T], per-source lists.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def reference_grid(batch: int, out_rows: int, num_frames: int, warp: bool) -> torch.Tensor:
    """The reference's grid_sample grid [B, out_rows, T, 2] (x: time, y: frequency)."""
    x = np.linspace(-1, 1, num_frames)
    y = np.linspace(-1, 1, out_rows)
    xv, yv = np.meshgrid(x, y)
    if warp:
        rows = (np.power(21, (yv + 1) / 2) - 11) / 10
    else:
        rows = np.log(yv * 10 + 11) / np.log(21) * 2 - 1
    grid = np.stack([xv, rows], axis=-1)[None].repeat(batch, axis=0)
    return torch.from_numpy(grid.astype(np.float32))


def warp(mag: torch.Tensor, out_rows: int = 256) -> torch.Tensor:
    """[B, 1, F, T] -> [B, 1, out_rows, T] by the reference's log-frequency grid sampling."""
    grid = reference_grid(mag.shape[0], out_rows, mag.shape[3], warp=True)
    return F.grid_sample(mag, grid, align_corners=True)


def _init(module: nn.Module) -> None:
    name = type(module).__name__
    if "Conv" in name:
        module.weight.data.normal_(0.0, 0.001)
    elif "BatchNorm" in name:
        module.weight.data.normal_(1.0, 0.02)
        module.bias.data.fill_(0)
    elif "Linear" in name:
        module.weight.data.normal_(0.0, 0.0001)


class Level(nn.Module):
    """One U-Net level; ``model`` is a Sequential laid out as the reference's."""

    def __init__(self, outer: int, inner: int, in_channels=None, sub=None, outermost=False,
                 innermost=False):
        super().__init__()
        self.outermost = outermost
        in_channels = outer if in_channels is None else in_channels
        up_in = inner if innermost else 2 * inner
        down_conv = nn.Conv2d(in_channels, inner, 4, stride=2, padding=1, bias=False)
        up = [nn.ReLU(), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)]
        if outermost:
            layers = [down_conv, sub, *up, nn.Conv2d(up_in, outer, 3, padding=1)]
        elif innermost:
            layers = [nn.LeakyReLU(0.2), down_conv, *up,
                      nn.Conv2d(up_in, outer, 3, padding=1, bias=False), nn.BatchNorm2d(outer)]
        else:
            layers = [nn.LeakyReLU(0.2), down_conv, nn.BatchNorm2d(inner), sub, *up,
                      nn.Conv2d(up_in, outer, 3, padding=1, bias=False), nn.BatchNorm2d(outer)]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


class UNet(nn.Module):
    def __init__(self, in_dim=1, out_dim=32, num_downs=7, ngf=64):
        super().__init__()
        block = Level(ngf * 8, ngf * 8, innermost=True)
        for _ in range(num_downs - 5):
            block = Level(ngf * 8, ngf * 8, sub=block)
        block = Level(ngf * 4, ngf * 8, sub=block)
        block = Level(ngf * 2, ngf * 4, sub=block)
        block = Level(ngf, ngf * 2, sub=block)
        self.unet_block = Level(out_dim, ngf, in_channels=in_dim, sub=block, outermost=True)
        self.bn0 = nn.BatchNorm2d(in_dim)

    def forward(self, x):
        return self.unet_block(self.bn0(x))


class InnerProd(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, vec, feat):  # vec [B, C], feat [B, C, H, W] -> [B, 1, H, W]
        return torch.einsum("bc,bchw->bhw", vec * self.scale, feat)[:, None] + self.bias


def weighted_bce(pred, gt, weight, per_example=False):
    if per_example:
        return F.binary_cross_entropy(pred, gt, weight, reduction="none").mean((1, 2, 3))
    return F.binary_cross_entropy(pred, gt, weight)


class _Base(nn.Module):
    def __init__(self, n_mix, layers, channels, ngf):
        super().__init__()
        self.n_mix = n_mix
        self.sound_net = UNet(out_dim=channels, num_downs=layers, ngf=ngf)

    def prepare(self, mag_mix, mags):
        """Returns warped mixture, warped sources, targets, weight and the network input."""
        mag_mix = warp(mag_mix + 1e-10)
        mags = [warp(m) for m in mags]
        weight = torch.clamp(torch.log1p(mag_mix), 1e-3, 10)
        gts = [(m > 0.5 * mag_mix).float() for m in mags]
        return mag_mix, mags, gts, weight, torch.log(mag_mix).detach()


class CLIPSep(_Base):
    def __init__(self, n_mix=2, layers=7, channels=32, ngf=64, query_dim=512):
        super().__init__(n_mix, layers, channels, ngf)
        self.frame_net = nn.Linear(query_dim, channels)
        self.synth_net = InnerProd(channels)
        for m in (self.sound_net, self.frame_net, self.synth_net):
            m.apply(_init)

    def forward(self, mag_mix, mags, embs):
        mag_mix, mags, gts, weight, log_mag = self.prepare(mag_mix, mags)
        feat = self.sound_net(log_mag)
        logits = [self.synth_net(torch.sigmoid(self.frame_net(e)), feat) for e in embs]
        loss = torch.stack(
            [weighted_bce(torch.sigmoid(z), g, weight) for z, g in zip(logits, gts, strict=True)]
        ).mean()
        return loss, {"query_logits": logits}


class LabelSep(CLIPSep):
    def __init__(self, n_labels=11, **kwargs):
        super().__init__(**kwargs)
        self.label_net = nn.Embedding(n_labels, 512)

    def forward(self, mag_mix, mags, labels):
        return super().forward(mag_mix, mags, [self.label_net(lab) for lab in labels])


class CLIPSepNIT(_Base):
    def __init__(self, n_mix=2, layers=7, channels=32, ngf=64, reg2_coef=0.1, reg2_eps=0.25,
                 query_dim=512):
        super().__init__(n_mix, layers, channels, ngf)
        self.frame_net = nn.Linear(query_dim, channels)
        self.pit_nets = nn.ModuleList([nn.Linear(channels, channels) for _ in range(2)])
        self.synth_net = InnerProd(channels)
        self.reg2_coef, self.reg2_eps = reg2_coef, reg2_eps
        for m in (self.sound_net, self.frame_net, self.pit_nets, self.synth_net):
            m.apply(_init)

    def forward(self, mag_mix, mags, embs, use_noise_heads=True):
        mag_mix, mags, gts, weight, log_mag = self.prepare(mag_mix, mags)
        feat = self.sound_net(log_mag)
        pre = [self.frame_net(e) for e in embs]
        logits = [self.synth_net(torch.sigmoid(p), feat) for p in pre]
        mean_pre = sum(pre) / len(pre)
        noise = [self.synth_net(torch.sigmoid(net(mean_pre)), feat) for net in self.pit_nets]

        def cost(z, n, g):
            pred = 1 - F.relu(1 - (torch.sigmoid(z) + torch.sigmoid(n)))
            return weighted_bce(pred, g, weight, per_example=True)

        if use_noise_heads:
            keep = (cost(logits[0], noise[0], gts[0]) + cost(logits[1], noise[1], gts[1])) / 2
            swap = (cost(logits[0], noise[1], gts[0]) + cost(logits[1], noise[0], gts[1])) / 2
            loss = torch.minimum(keep, swap).mean()
            activation = torch.mean(torch.sigmoid(noise[0]) + torch.sigmoid(noise[1]))
            loss = loss + self.reg2_coef * F.relu(activation - self.reg2_eps)
        else:
            loss = torch.stack(
                [weighted_bce(torch.sigmoid(z), g, weight, per_example=True)
                 for z, g in zip(logits, gts, strict=True)]
            ).mean(0).mean()
        return loss, {"query_logits": logits, "noise_logits": noise}


class PITSep(_Base):
    def __init__(self, n_mix=2, layers=7, channels=32, ngf=64):
        super().__init__(n_mix, layers, channels, ngf)
        self.synth_net = nn.Conv2d(channels, n_mix, 1)
        for m in (self.sound_net, self.synth_net):
            m.apply(_init)

    def forward(self, mag_mix, mags, embs=None):
        mag_mix, mags, gts, weight, log_mag = self.prepare(mag_mix, mags)
        out = self.synth_net(self.sound_net(log_mag))
        logits = [out[:, i : i + 1] for i in range(self.n_mix)]
        preds = [torch.sigmoid(z) for z in logits]
        keep = (weighted_bce(preds[0], gts[0], weight, True)
                + weighted_bce(preds[1], gts[1], weight, True)) / 2
        swap = (weighted_bce(preds[0], gts[1], weight, True)
                + weighted_bce(preds[1], gts[0], weight, True)) / 2
        return torch.minimum(keep, swap).mean(), {"query_logits": logits}


# ---------------------------------------------------------------------------------------------
# SOP's frozen image encoder: torchvision's ResNet-18 layout (key names conv1, bn1,
# layer{1..4}.{i}.conv1/bn1/conv2/bn2/downsample.{0,1}, fc), written from its description, with
# the reference's ResnetDilated modification (strides removed, dilations set) and max pooling.


class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision's ResNet of basic blocks (ResNet-18 by default) with its classifier."""

    def __init__(self, blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512), num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = widths[0]
        for stage, (count, width) in enumerate(zip(blocks, widths, strict=True)):
            layers = []
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(BasicBlock(inplanes, width, stride))
                inplanes = width
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
        self.fc = nn.Linear(widths[-1], num_classes)
        # torchvision's initialisation (the signal keeps its scale through the stages), then
        # BatchNorm parameters and running statistics away from identity, so that eval mode
        # exercises them.
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.8, 1.2)
                    m.bias.uniform_(-0.1, 0.1)
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.8, 1.25)

    def features(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def nostride_dilate(module, dilate):
    """The reference's rule: a strided conv loses its stride (a 3x3 one takes dilation and
    padding dilate // 2); every other 3x3 conv takes dilation and padding dilate."""
    if isinstance(module, nn.Conv2d):
        if module.stride == (2, 2):
            module.stride = (1, 1)
            if module.kernel_size == (3, 3):
                module.dilation = (dilate // 2, dilate // 2)
                module.padding = (dilate // 2, dilate // 2)
        elif module.kernel_size == (3, 3):
            module.dilation = (dilate, dilate)
            module.padding = (dilate, dilate)


def frame_vectors(resnet, pixels, dilate_scale=16):
    """SOP's frame vectors: a (deep-copied) ResNet dilated to ``dilate_scale`` (16: layer4 by 2;
    8: layer3 by 2 and layer4 by 4; 32: unchanged), eval mode, spatial max: [B, 3, H, W] ->
    [B, C]."""
    import copy

    net = copy.deepcopy(resnet).eval()
    if dilate_scale == 8:
        net.layer3.apply(lambda m: nostride_dilate(m, 2))
        net.layer4.apply(lambda m: nostride_dilate(m, 4))
    elif dilate_scale == 16:
        net.layer4.apply(lambda m: nostride_dilate(m, 2))
    with torch.no_grad():
        return torch.amax(net.features(pixels), dim=(2, 3))
