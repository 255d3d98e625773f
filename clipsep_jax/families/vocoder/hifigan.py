"""A neural vocoder for CLIPSonic's log-mels: the HiFi-GAN generator (Kong et al., 2020) in Flax.

Log-mel [B, n_mels, T] -> waveform [B, T * prod(upsample_rates)] in [-1, 1]:

    x = Conv(n_mels -> C, 7)
    for each level i:  x = ConvTranspose(leaky_relu(x, 0.1), C / 2^i -> C / 2^(i+1),
                                         kernel k_i, stride u_i, padding (k_i - u_i) / 2)
                       x = mean over the multi-receptive-field blocks j of ResBlock_j(x)
    waveform = tanh(Conv(leaky_relu(x, 0.01) -> 1, 7))

Residual blocks (``resblock``): "1" (HiFi-GAN V1/V2): for each dilation d, x += Conv_1(lrelu(
Conv_d(lrelu(x)))); "2" (V3): for each dilation d, x += Conv_d(lrelu(x)); "same" padding
throughout, slope 0.1. Layouts follow the reference's configs (``config_v1.json``: upsample
rates 8, 8, 2, 2 with kernels 16, 16, 4, 4, 512 initial channels, kernels 3, 7, 11 with
dilations 1, 3, 5), so its checkpoints convert (:func:`params_from_hifigan_state_dict`: weight
norm folded into plain weights). Convolutions are channels-last internally; the transposed
convolution is written as the input-dilated convolution PyTorch's ``ConvTranspose1d`` computes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from clipsep_jax.errors import UserError

__all__ = ["HiFiGANGenerator", "params_from_hifigan_state_dict", "fold_weight_norm",
           "hifigan_settings", "hop_length", "load_hifigan"]


def _padding(kernel: int, dilation: int) -> int:
    return (kernel * dilation - dilation) // 2


class TransposedConv1d(nn.Module):
    """PyTorch's ConvTranspose1d(in, out, kernel, stride, padding) on [B, T, in]; the kernel is
    stored as PyTorch's [in, out, kernel]."""

    features: int
    kernel: int
    stride: int
    padding: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("kernel", nn.initializers.lecun_normal(in_axis=0, out_axis=1),
                            (x.shape[-1], self.features, self.kernel))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        # Transposed convolution = the input dilated by the stride, convolved with the flipped
        # kernel, padded by kernel - 1 - padding on both sides.
        rhs = jnp.flip(weight, axis=-1).transpose(2, 0, 1)  # [kernel, in, out]
        edge = self.kernel - 1 - self.padding
        y = jax.lax.conv_general_dilated(
            x, rhs.astype(x.dtype), window_strides=(1,), padding=[(edge, edge)],
            lhs_dilation=(self.stride,), dimension_numbers=("NWC", "WIO", "NWC"))
        return y + bias


class ResBlock(nn.Module):
    """A multi-receptive-field branch: kernel ``kernel``, ``dilations`` (type "1" or "2")."""

    channels: int
    kernel: int
    dilations: tuple[int, ...]
    kind: str = "1"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j, d in enumerate(self.dilations):
            h = nn.Conv(self.channels, (self.kernel,), kernel_dilation=(d,),
                        padding=[(_padding(self.kernel, d),) * 2], name=f"convs1_{j}")(
                nn.leaky_relu(x, 0.1))
            if self.kind == "1":
                h = nn.Conv(self.channels, (self.kernel,),
                            padding=[(_padding(self.kernel, 1),) * 2], name=f"convs2_{j}")(
                    nn.leaky_relu(h, 0.1))
            x = x + h
        return x


class HiFiGANGenerator(nn.Module):
    """HiFi-GAN's generator; ``__call__(log_mel [B, n_mels, T]) -> waveform [B, T * hop]``."""

    upsample_rates: tuple[int, ...] = (8, 8, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16, 4, 4)
    upsample_initial_channel: int = 512
    resblock: str = "1"
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))

    @nn.compact
    def __call__(self, log_mel: jax.Array) -> jax.Array:
        if self.resblock not in ("1", "2"):
            raise ValueError(f"resblock={self.resblock!r}: expected '1' or '2'")
        x = jnp.swapaxes(log_mel.astype(jnp.float32), 1, 2)  # [B, T, n_mels]
        x = nn.Conv(self.upsample_initial_channel, (7,), padding=[(3, 3)], name="conv_pre")(x)
        for i, (rate, kernel) in enumerate(zip(self.upsample_rates, self.upsample_kernel_sizes,
                                               strict=True)):
            channels = self.upsample_initial_channel // 2 ** (i + 1)
            x = TransposedConv1d(channels, kernel, rate, (kernel - rate) // 2,
                                 name=f"ups_{i}")(nn.leaky_relu(x, 0.1))
            branches = [ResBlock(channels, k, tuple(d), self.resblock,
                                 name=f"resblocks_{i * len(self.resblock_kernel_sizes) + j}")(x)
                        for j, (k, d) in enumerate(zip(self.resblock_kernel_sizes,
                                                       self.resblock_dilation_sizes,
                                                       strict=True))]
            x = sum(branches) / len(branches)
        x = nn.Conv(1, (7,), padding=[(3, 3)], name="conv_post")(nn.leaky_relu(x, 0.01))
        return jnp.tanh(x[..., 0])


def fold_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """PyTorch's weight_norm (dim 0): w = g * v / |v|, the norm over every axis but the first."""
    norm = np.sqrt(np.sum(np.square(v, dtype=np.float64), axis=tuple(range(1, v.ndim)),
                          keepdims=True))
    return (g * v / norm).astype(np.float32)


_WEIGHT_NORM = (("weight_g", "weight_v"),
                ("parametrizations.weight.original0", "parametrizations.weight.original1"))


def params_from_hifigan_state_dict(state: Mapping[str, np.ndarray],
                                   generator: HiFiGANGenerator,
                                   source: str = "the checkpoint") -> dict[str, Any]:
    """The reference generator's state dict (``conv_pre``, ``ups.i``, ``resblocks.k.convs1.j``
    / ``convs2.j`` (type "1") or ``resblocks.k.convs.j`` (type "2"), ``conv_post``; weight
    norm as ``weight_g``/``weight_v`` or the parametrization keys, or plain ``weight``) -> Flax
    params for ``generator``. Unknown or missing keys, and shapes that are not the generator's,
    are refused by name."""
    weights: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for key in state:
        for g_name, v_name in _WEIGHT_NORM:
            if key.endswith("." + g_name):
                prefix = key[: -len(g_name) - 1]
                weights[prefix] = fold_weight_norm(np.asarray(state[key]),
                                                   np.asarray(state[f"{prefix}.{v_name}"]))
                used.update({key, f"{prefix}.{v_name}"})
        if key.endswith(".weight") and key not in used and not any(
                key.endswith(v) for _, v in _WEIGHT_NORM):
            weights[key[: -len(".weight")]] = np.asarray(state[key], np.float32)
            used.add(key)
    biases = {k[: -len(".bias")]: np.asarray(v, np.float32) for k, v in state.items()
              if k.endswith(".bias")}
    used.update(f"{k}.bias" for k in biases)
    unknown = sorted(set(state) - used)
    if unknown:
        raise UserError(f"{source}: unexpected keys {unknown[:5]}")

    def conv(prefix: str) -> dict[str, np.ndarray]:
        if prefix not in weights or prefix not in biases:
            raise UserError(f"{source}: missing {prefix}.weight or {prefix}.bias")
        kernel = weights.pop(prefix)  # PyTorch Conv1d: [out, in, k] -> Flax [k, in, out]
        return {"kernel": kernel.transpose(2, 1, 0), "bias": biases.pop(prefix)}

    params: dict[str, Any] = {"conv_pre": conv("conv_pre"), "conv_post": conv("conv_post")}
    for i in range(len(generator.upsample_rates)):
        name = f"ups.{i}"
        if name not in weights or name not in biases:
            raise UserError(f"{source}: missing {name}.weight or {name}.bias")
        params[f"ups_{i}"] = {"kernel": weights.pop(name), "bias": biases.pop(name)}
    blocks = len(generator.upsample_rates) * len(generator.resblock_kernel_sizes)
    # ResBlock1 keeps convs1 / convs2; ResBlock2 (V3) keeps one stack named convs.
    pattern = re.compile(r"resblocks\.(\d+)\.(convs[12]?)\.(\d+)")
    for prefix in sorted(p for p in list(weights) if pattern.fullmatch(p)):
        block, stack, j = pattern.fullmatch(prefix).groups()
        if int(block) >= blocks:
            raise UserError(f"{source}: {prefix} is beyond the {blocks} residual blocks")
        stack = "convs1" if stack == "convs" else stack
        params.setdefault(f"resblocks_{block}", {})[f"{stack}_{j}"] = conv(prefix)
    if weights:
        raise UserError(f"{source}: unexpected keys {sorted(weights)[:5]}")
    n_mels = params["conv_pre"]["kernel"].shape[1]
    shapes = jax.eval_shape(lambda: generator.init(jax.random.key(0),
                                                   jnp.zeros((1, n_mels, 4))))["params"]
    expected = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(shapes).items()}
    got = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(params).items()}
    wrong = {k: (got.get(k), v) for k, v in expected.items() if got.get(k) != v}
    if wrong:
        raise UserError(f"{source}: weights (found, expected for the config) differ: "
                        f"{dict(list(wrong.items())[:5])}")
    return params


def hifigan_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The generator's fields from a reference ``config.json`` (upsample rates and kernels,
    initial channels, resblock type, kernels and dilations)."""
    def ints(name: str) -> tuple[int, ...]:
        return tuple(int(v) for v in config[name])

    try:
        return {"upsample_rates": ints("upsample_rates"),
                "upsample_kernel_sizes": ints("upsample_kernel_sizes"),
                "upsample_initial_channel": int(config["upsample_initial_channel"]),
                "resblock": str(config["resblock"]),
                "resblock_kernel_sizes": ints("resblock_kernel_sizes"),
                "resblock_dilation_sizes": tuple(tuple(int(d) for d in ds) for ds in
                                                 config["resblock_dilation_sizes"])}
    except KeyError as e:
        raise UserError(f"the vocoder config lacks {e.args[0]!r}") from e


def hop_length(generator: HiFiGANGenerator) -> int:
    """Waveform samples per mel frame: the product of the upsample rates."""
    return int(np.prod(generator.upsample_rates))



def load_hifigan(checkpoint: str, config_file: str | None = None
                 ) -> tuple[HiFiGANGenerator, dict[str, Any], dict[str, Any]]:
    """A reference HiFi-GAN generator checkpoint (``torch.save({"generator": state_dict})``,
    read with ``weights_only``; a bare state dict too) and its ``config.json`` (default: beside
    the checkpoint) -> (generator, Flax params, the config: ``sampling_rate``, ``num_mels``,
    ``hop_size``, ``fmin``, ``fmax``, ... as the reference names them)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise UserError(f"{path}: no such vocoder checkpoint")
    config_path = Path(config_file) if config_file else path.parent / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError as e:
        raise UserError(f"{config_path}: no vocoder config (the reference's config.json); "
                        "pass its path") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{config_path}: not valid JSON ({e})") from e
    try:
        import torch  # optional ([convert] extra): only PyTorch pickles need it
    except ImportError as e:
        raise UserError(f"{path} is a PyTorch pickle; reading it needs torch "
                        "(pip install 'clipsep-jax[convert]')") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise UserError(f"{path}: no such vocoder checkpoint") from e
    except Exception as e:
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    if isinstance(state, Mapping) and isinstance(state.get("generator"), Mapping):
        state = state["generator"]
    if not isinstance(state, Mapping):
        raise UserError(f"{path}: expected a state dict, got {type(state).__name__}")
    arrays = {k: v.detach().to(torch.float32).numpy() for k, v in state.items()
              if isinstance(v, torch.Tensor)}
    generator = HiFiGANGenerator(**hifigan_settings(config))
    return generator, params_from_hifigan_state_dict(arrays, generator, str(path)), config
