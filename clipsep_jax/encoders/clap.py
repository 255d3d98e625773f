"""CLAP (LAION's Contrastive Language-Audio Pretraining), frozen: Hugging Face checkpoints in,
L2-normalised text and audio embeddings out, and a differentiable audio path for losses.

    clap = CLAP.from_pretrained("laion/clap-htsat-unfused")  # hub id or local folder
    text = clap.encode_text(["the sound of a dog"])  # [1, 512] float32 numpy, unit norm
    audio = clap.encode_audio(waveforms, sample_rate=16000)  # float [B, S] -> [B, 512]
    states, mask = clap.text_token_states(["a dog"])  # RoBERTa states [1, 77, 768], mask [1, 77]

    # Differentiable (pure, jit-able): a waveform at 16 kHz to its embedding, and back.
    wave48 = resample(wave16, 16000, 48000)  # [B, 3 S]
    grad = jax.grad(lambda w: loss(clap.audio_embedding(clap.params, w)))(wave48)

Embeddings are what transformers 5's ``ClapModel.get_text_features`` / ``get_audio_features``
return: the projected vector divided by its L2 norm (transformers 5 normalises there; the
contrastive logits are ``exp(logit_scale) * text @ audio.T``, see :attr:`CLAP.logit_scale_text`).

Loading goes through transformers for the config, the tokenizer and the download
(``cached_file``): hub ids, revisions, caches and ``HF_HUB_OFFLINE`` behave as they do there.
Weights come from ``model.safetensors`` (preferred) or ``pytorch_model.bin`` (``weights_only``).
Only checkpoints without feature fusion (``enable_fusion=False``: laion/clap-htsat-unfused,
laion/larger_clap_music, laion/larger_clap_general) are supported.

Audio front end (:class:`FrontEnd`, the checkpoint's ``preprocessor_config.json``): the log-mel
spectrogram of ``ClapFeatureExtractor`` — the clip fitted to ``max_length_s`` (10 s at 48 kHz),
a centred STFT (periodic Hann window of ``fft_window_size`` = 1024 samples, hop 480, reflect
padding), power, a mel filter bank (64 bins, 50-14,000 Hz; Slaney scale and area normalisation
for ``truncation="rand_trunc"``, HTK without normalisation for ``"fusion"``, as the extractor
picks them), ``10 log10(max(mel, 1e-10))``. Clips shorter than the maximum are padded as
``padding`` says (``repeatpad``: whole repeats, then zeros; ``repeat``; ``pad``), which is
deterministic and equal to the extractor. Longer clips are where the extractor draws at
random (``rand_trunc``: a random crop; ``fusion``: random crops for fusion models); here they are
cropped deterministically at ``offset`` samples (0, the start, unless given), which equals the
extractor run on that crop.

Resampling (:func:`resample`) is a Kaiser-windowed sinc interpolator applied as a polyphase
strided convolution: linear in the waveform, so gradients flow through it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from clipsep_jax.audio import stft
from clipsep_jax.encoders.clap_towers import ClapConfig, ClapModel
from clipsep_jax.encoders.common import DTYPES, BatchedRunner, check_params, read_weights
from clipsep_jax.errors import UserError

__all__ = [
    "DEFAULT_CLAP",
    "TEXT_LENGTH",
    "FrontEnd",
    "mel_filter_bank",
    "resample",
    "fit_length",
    "log_mel",
    "audio_embedding",
    "params_from_state_dict",
    "checkpoint_keys",
    "abstract_params",
    "CLAP",
]

DEFAULT_CLAP = "laion/clap-htsat-unfused"
# LAION-CLAP pads and truncates captions to 77 tokens; the separator's cross-attention takes
# token states of this fixed length.
TEXT_LENGTH = 77
_HIGHEST = jax.lax.Precision.HIGHEST
_TRUNCATIONS = ("rand_trunc", "fusion")
_PADDINGS = ("repeatpad", "repeat", "pad")


# ---------------------------------------------------------------------------------------------
# Front end


def _hz_to_mel(hz: np.ndarray, scale: str) -> np.ndarray:
    hz = np.asarray(hz, np.float64)
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + hz / 700.0)
    # Slaney: linear (3 mels per 200 Hz) below 1 kHz, logarithmic (27 mels per 6.4x) above.
    log_part = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * 27.0 / np.log(6.4)
    return np.where(hz >= 1000.0, log_part, 3.0 * hz / 200.0)


def _mel_to_hz(mel: np.ndarray, scale: str) -> np.ndarray:
    mel = np.asarray(mel, np.float64)
    if scale == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    log_part = 1000.0 * np.exp((mel - 15.0) * np.log(6.4) / 27.0)
    return np.where(mel >= 15.0, log_part, 200.0 * mel / 3.0)


def mel_filter_bank(num_frequency_bins: int, num_mel_filters: int, min_frequency: float,
                    max_frequency: float, sampling_rate: int, scale: str = "slaney",
                    normalize: bool = True) -> np.ndarray:
    """Triangular mel filters, float64 [num_frequency_bins, num_mel_filters].

    Filter m rises linearly (in Hz) from edge m to edge m + 1 and falls to edge m + 2, the
    ``num_mel_filters + 2`` edges equally spaced on the mel ``scale`` ("slaney" or "htk")
    between ``min_frequency`` and ``max_frequency``; bins are the FFT frequencies 0 ..
    ``sampling_rate / 2``. ``normalize`` divides each filter by its width in Hz over 2 (Slaney's
    equal-area normalisation).
    """
    if scale not in ("slaney", "htk"):
        raise ValueError(f"mel scale {scale!r}: expected 'slaney' or 'htk'")
    edges_mel = np.linspace(_hz_to_mel(min_frequency, scale), _hz_to_mel(max_frequency, scale),
                            num_mel_filters + 2)
    edges = _mel_to_hz(edges_mel, scale)
    bins = np.linspace(0.0, sampling_rate / 2, num_frequency_bins)[:, None]
    lower, centre, upper = edges[None, :-2], edges[None, 1:-1], edges[None, 2:]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    filters = np.maximum(0.0, np.minimum(rising, falling))
    if normalize:
        filters = filters * (2.0 / (upper - lower))
    return filters


@dataclasses.dataclass(frozen=True)
class FrontEnd:
    """``ClapFeatureExtractor``'s settings (the defaults: laion/clap-htsat-unfused's) and the
    log-mel front end they define. Sizes in samples, frequencies in Hz."""

    sampling_rate: int = 48000
    feature_size: int = 64  # mel bins
    fft_window_size: int = 1024
    hop_length: int = 480
    max_length: int = 480000  # max_length_s * sampling_rate
    frequency_min: float = 50.0
    frequency_max: float = 14000.0
    truncation: str = "rand_trunc"
    padding: str = "repeatpad"

    def __post_init__(self):
        if self.truncation not in _TRUNCATIONS:
            raise UserError(f"feature extractor truncation={self.truncation!r}: expected one of "
                            f"{', '.join(_TRUNCATIONS)}")
        if self.padding not in _PADDINGS:
            raise UserError(f"feature extractor padding={self.padding!r}: expected one of "
                            f"{', '.join(_PADDINGS)}")
        if not 0 <= self.frequency_min < self.frequency_max <= self.sampling_rate / 2:
            raise UserError(f"feature extractor frequencies {self.frequency_min}-"
                            f"{self.frequency_max} Hz do not fit in 0-{self.sampling_rate / 2} "
                            "Hz")
        if self.max_length <= self.fft_window_size // 2:
            raise UserError(f"feature extractor max length {self.max_length} samples is shorter "
                            "than half an FFT window")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FrontEnd:
        """From a ``preprocessor_config.json`` (``ClapFeatureExtractor.to_dict()``); missing
        fields take the extractor's defaults."""
        rate = int(d.get("sampling_rate", 48000))
        return cls(
            sampling_rate=rate,
            feature_size=int(d.get("feature_size", 64)),
            fft_window_size=int(d.get("fft_window_size", 1024)),
            hop_length=int(d.get("hop_length", 480)),
            # The extractor recomputes this from max_length_s, whatever nb_max_samples says.
            max_length=int(d.get("max_length_s", 10) * rate),
            frequency_min=float(d.get("frequency_min", 0.0)),
            frequency_max=float(d.get("frequency_max", 14000.0)),
            truncation=str(d.get("truncation", "fusion")),
            padding=str(d.get("padding", "repeatpad")),
        )

    @property
    def num_frames(self) -> int:
        """Frames of the log-mel spectrogram (1001 for 10 s, hop 480)."""
        return 1 + self.max_length // self.hop_length

    def mel_filters(self) -> np.ndarray:
        """The extractor's filter bank for this truncation mode, float64 [n_fft / 2 + 1, F]."""
        slaney = self.truncation != "fusion"
        return mel_filter_bank(self.fft_window_size // 2 + 1, self.feature_size,
                               self.frequency_min, self.frequency_max, self.sampling_rate,
                               scale="slaney" if slaney else "htk", normalize=slaney)

    def __call__(self, waveform: jax.Array, offset: int | jax.Array = 0) -> jax.Array:
        """:func:`log_mel` with these settings."""
        return log_mel(waveform, self, offset)


def fit_length(waveform: jax.Array, frontend: FrontEnd, offset: int | jax.Array = 0) -> jax.Array:
    """[..., S] -> [..., max_length]: shorter clips padded as ``frontend.padding`` says (as the
    extractor does), longer ones cropped to ``max_length`` samples from ``offset`` (an int or a
    traced scalar; clamped to the clip)."""
    length, target = waveform.shape[-1], frontend.max_length
    if length == 0:
        raise ValueError("empty waveform")
    if length > target:
        return jax.lax.dynamic_slice_in_dim(waveform, offset, target, axis=-1)
    if length == target:
        return waveform
    reps = {"repeatpad": target // length, "repeat": target // length + 1, "pad": 1}
    tiles = (1,) * (waveform.ndim - 1) + (reps[frontend.padding],)
    x = jnp.tile(waveform, tiles)[..., :target]
    pad = [(0, 0)] * (waveform.ndim - 1) + [(0, target - x.shape[-1])]
    return jnp.pad(x, pad)


def log_mel(waveform: jax.Array, frontend: FrontEnd, offset: int | jax.Array = 0) -> jax.Array:
    """``ClapFeatureExtractor``'s log-mel spectrogram, differentiable in the waveform.

    Args:
      waveform: float [B, S] (or [S]) at ``frontend.sampling_rate``, any length (see
        :func:`fit_length` for shorter and longer clips).
      offset: where longer clips are cropped (samples).
    Returns:
      float32 [B, num_frames, feature_size] in dB (power, 1.0 reference, floor -100 dB): the
      extractor's ``input_features[:, 0]``.
    """
    x = fit_length(jnp.asarray(waveform, jnp.float32), frontend, offset)
    n_fft = frontend.fft_window_size
    spectrum = stft(x, n_fft=n_fft, hop_length=frontend.hop_length, win_length=n_fft)
    power = jnp.square(spectrum.real) + jnp.square(spectrum.imag)  # [..., bins, frames]
    filters = jnp.asarray(frontend.mel_filters(), jnp.float32)
    mel = jnp.einsum("...kt,km->...tm", power, filters, precision=_HIGHEST)
    return 10.0 * jnp.log10(jnp.maximum(mel, 1e-10))


# ---------------------------------------------------------------------------------------------
# Resampling


@functools.lru_cache(maxsize=16)
def _resample_kernel(up: int, down: int, zeros: int, rolloff: float,
                     beta: float) -> tuple[np.ndarray, int]:
    """Polyphase kernels [up, K] and the left padding J of :func:`resample`."""
    cutoff = rolloff * min(1.0, up / down)  # of the input's Nyquist frequency
    half_width = zeros / cutoff  # input samples each side of the output instant
    pad = math.ceil(half_width)
    taps = down + 2 * pad + 1
    kernels = np.zeros((up, taps))
    for phase in range(up):
        # Output up q + phase sits at input time down q + base + frac.
        base, remainder = divmod(phase * down, up)
        frac = remainder / up
        tap = np.arange(taps)
        distance = frac - (tap - pad - base)  # output instant minus input sample, in samples
        inside = np.abs(distance) <= half_width
        window = np.i0(beta * np.sqrt(np.clip(1 - (distance / half_width) ** 2, 0, 1)))
        kernels[phase] = np.where(inside, cutoff * np.sinc(cutoff * distance)
                                  * window / np.i0(beta), 0.0)
    return kernels.astype(np.float32), pad


def resample(waveform: jax.Array, rate_in: int, rate_out: int, *, zeros: int = 16,
             rolloff: float = 0.945, beta: float = 14.769656459379492) -> jax.Array:
    """Band-limited resampling along the last axis, differentiable (a linear map).

    Each output sample is the input convolved with a Kaiser-windowed sinc (``zeros`` zero
    crossings each side, cut off at ``rolloff`` times the lower Nyquist frequency; the defaults
    are resampy's "kaiser_best"), evaluated at its instant; the ``rate_out / g`` phases
    (g = gcd of the rates) are one strided convolution. Outside the clip the signal is zero.

    Args:
      waveform: float [..., S] at ``rate_in`` Hz.
    Returns:
      float32 [..., ceil(S rate_out / rate_in)] at ``rate_out`` Hz.
    """
    rate_in, rate_out = int(rate_in), int(rate_out)
    if rate_in <= 0 or rate_out <= 0:
        raise ValueError(f"sample rates must be positive, got {rate_in} -> {rate_out}")
    waveform = jnp.asarray(waveform, jnp.float32)
    if rate_in == rate_out:
        return waveform
    g = math.gcd(rate_in, rate_out)
    up, down = rate_out // g, rate_in // g
    kernels, pad = _resample_kernel(up, down, zeros, rolloff, beta)
    lead, length = waveform.shape[:-1], waveform.shape[-1]
    out_length = -(-length * up // down)
    blocks = -(-out_length // up)
    right = max(0, (blocks - 1) * down + kernels.shape[1] - pad - length)
    x = jnp.pad(waveform.reshape(-1, 1, length), ((0, 0), (0, 0), (pad, right)))
    y = jax.lax.conv_general_dilated(x, jnp.asarray(kernels)[:, None, :], (down,), "VALID",
                                     dimension_numbers=("NCH", "OIH", "NCH"),
                                     precision=_HIGHEST)  # [N, up, blocks']
    y = y[:, :, :blocks].transpose(0, 2, 1).reshape(-1, blocks * up)[:, :out_length]
    return y.reshape(lead + (out_length,))


def audio_embedding(params: Mapping, waveform: jax.Array, *, model: ClapModel,
                    frontend: FrontEnd, offset: int | jax.Array = 0) -> jax.Array:
    """Waveforms [B, S] at ``frontend.sampling_rate`` -> L2-normalised audio embeddings
    [B, projection_dim] float32: :func:`log_mel` then the audio tower and projection. Pure
    and differentiable in ``waveform`` (and ``params``)."""
    features = log_mel(waveform, frontend, offset)
    return model.apply({"params": params}, features.astype(model.dtype),
                       method=ClapModel.encode_audio)


# ---------------------------------------------------------------------------------------------
# transformers state dict -> Flax parameters

_BUFFERS = ("position_ids", "token_type_ids", "relative_position_index", "num_batches_tracked")
_TEXT_LAYER = {
    "attention.self.query": (("attention_self", "query"), "linear"),
    "attention.self.key": (("attention_self", "key"), "linear"),
    "attention.self.value": (("attention_self", "value"), "linear"),
    "attention.output.dense": (("attention_output",), "linear"),
    "attention.output.LayerNorm": (("attention_norm",), "norm"),
    "intermediate.dense": (("intermediate",), "linear"),
    "output.dense": (("output",), "linear"),
    "output.LayerNorm": (("output_norm",), "norm"),
}
_SWIN_BLOCK = {
    "layernorm_before": (("layernorm_before",), "norm"),
    "attention.self": (("attention",), "table"),
    "attention.self.query": (("attention", "query"), "linear"),
    "attention.self.key": (("attention", "key"), "linear"),
    "attention.self.value": (("attention", "value"), "linear"),
    "attention.output.dense": (("attention", "output"), "linear"),
    "layernorm_after": (("layernorm_after",), "norm"),
    "intermediate.dense": (("intermediate",), "linear"),
    "output.dense": (("output",), "linear"),
}
_LEAVES = {
    "linear": {"weight": ("kernel", "transpose"), "bias": ("bias", "copy")},
    "conv": {"weight": ("kernel", "conv"), "bias": ("bias", "copy")},
    "norm": {"weight": ("scale", "copy"), "bias": ("bias", "copy")},
    "embed": {"weight": ("embedding", "copy")},
    "table": {"relative_position_bias_table": ("relative_position_bias_table", "copy")},
    "batch_norm": {"weight": ("scale", "copy"), "bias": ("bias", "copy"),
                   "running_mean": ("mean", "copy"), "running_var": ("var", "copy")},
}


def _leaf(prefix: tuple[str, ...], leaf: str, kind: str) -> tuple[tuple[str, ...], str]:
    name, how = _LEAVES[kind][leaf]
    return prefix + (name,), how


def _flax_path(key: str) -> tuple[tuple[str, ...], str] | None:
    """A transformers ``ClapModel`` key -> (Flax path, 'copy' | 'transpose' | 'conv'); None for
    buffers that carry no parameter; KeyError (or ValueError) for keys of no supported model."""
    parts = key.split(".")
    leaf, modules = parts[-1], parts[:-1]
    if leaf in _BUFFERS:
        return None
    if key in ("logit_scale_a", "logit_scale_t"):
        return (key,), "copy"
    if len(modules) == 2 and modules[0] in ("text_projection", "audio_projection") and (
            modules[1] in ("linear1", "linear2")):
        return _leaf(tuple(modules), leaf, "linear")
    if modules[:1] == ["text_model"]:
        rest = modules[1:]
        if rest == ["embeddings", "LayerNorm"]:
            return _leaf(("text_model", "embeddings_norm"), leaf, "norm")
        if len(rest) == 2 and rest[0] == "embeddings" and rest[1] in (
                "word_embeddings", "position_embeddings", "token_type_embeddings"):
            return _leaf(("text_model", rest[1]), leaf, "embed")
        if rest[:2] == ["encoder", "layer"]:
            names, kind = _TEXT_LAYER[".".join(rest[3:])]
            return _leaf(("text_model", f"layer_{int(rest[2])}", *names), leaf, kind)
        if rest == ["pooler", "dense"]:
            return _leaf(("text_model", "pooler"), leaf, "linear")
    if modules[:2] == ["audio_model", "audio_encoder"]:
        rest, root = modules[2:], "audio_encoder"
        if rest == ["batch_norm"]:
            return _leaf((root, "batch_norm"), leaf, "batch_norm")
        if rest == ["patch_embed", "proj"]:
            return _leaf((root, "patch_embed_proj"), leaf, "conv")
        if rest == ["patch_embed", "norm"]:
            return _leaf((root, "patch_embed_norm"), leaf, "norm")
        if rest == ["norm"]:
            return _leaf((root, "norm"), leaf, "norm")
        if rest[:1] == ["layers"] and rest[2:3] == ["blocks"]:
            names, kind = _SWIN_BLOCK[".".join(rest[4:])]
            block = f"layers_{int(rest[1])}_blocks_{int(rest[3])}"
            return _leaf((root, block, *names), leaf, kind)
        if rest[:1] == ["layers"] and len(rest) == 4 and rest[2] == "downsample":
            kind = {"reduction": "linear", "norm": "norm"}[rest[3]]
            return _leaf((root, f"layers_{int(rest[1])}_downsample", rest[3]), leaf, kind)
    raise KeyError(key)


def checkpoint_keys(config: ClapConfig) -> list[str]:
    """The parameter keys (buffers left out) of a transformers ``ClapModel`` of ``config``."""
    wb = ("weight", "bias")
    keys = ["logit_scale_a", "logit_scale_t"]
    keys += [f"{p}.{m}.{w}" for p in ("text_projection", "audio_projection")
             for m in ("linear1", "linear2") for w in wb]
    keys += [f"text_model.embeddings.{e}.weight"
             for e in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
    keys += [f"text_model.embeddings.LayerNorm.{w}" for w in wb]
    for i in range(config.text.num_hidden_layers):
        keys += [f"text_model.encoder.layer.{i}.{m}.{w}" for m in _TEXT_LAYER for w in wb]
    keys += [f"text_model.pooler.dense.{w}" for w in wb]
    a, root = config.audio, "audio_model.audio_encoder"
    keys += [f"{root}.batch_norm.{w}" for w in (*wb, "running_mean", "running_var")]
    keys += [f"{root}.patch_embed.proj.{w}" for w in wb]
    if a.enable_patch_layer_norm:
        keys += [f"{root}.patch_embed.norm.{w}" for w in wb]
    for i, depth in enumerate(a.depths):
        for j in range(depth):
            block = f"{root}.layers.{i}.blocks.{j}"
            keys.append(f"{block}.attention.self.relative_position_bias_table")
            for module, (_, kind) in _SWIN_BLOCK.items():
                if kind == "table":
                    continue
                qkv = module.startswith("attention.self.")
                for w in wb if (a.qkv_bias or not qkv) else ("weight",):
                    keys.append(f"{block}.{module}.{w}")
        if i < len(a.depths) - 1:
            keys += [f"{root}.layers.{i}.downsample.reduction.weight"]
            keys += [f"{root}.layers.{i}.downsample.norm.{w}" for w in wb]
    keys += [f"{root}.norm.{w}" for w in wb]
    return keys


def abstract_params(config: ClapConfig) -> dict:
    """Shapes and dtypes of :class:`ClapModel`'s parameters (``jax.eval_shape``; nothing is
    allocated)."""
    model = ClapModel(config)
    a = config.audio
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32),
        jnp.zeros((1, a.spec_frames, a.num_mel_bins))))
    return shapes["params"]


def params_from_state_dict(state: Mapping[str, np.ndarray], config: ClapConfig,
                           dtype: Any = jnp.float32) -> dict:
    """A transformers ``ClapModel`` state dict -> Flax parameters of :class:`ClapModel` in
    ``dtype`` (the logit scales stay float32). Missing, unexpected and mis-shaped entries are
    refused (ValueError) by their checkpoint key."""
    expected = traverse_util.flatten_dict(abstract_params(config))
    by_key, unexpected, wrong_shape = {}, [], []
    for key, value in state.items():
        key = key.removeprefix("module.")
        try:
            mapped = _flax_path(key)
        except (KeyError, IndexError, ValueError):
            unexpected.append(key)
            continue
        if mapped is None:
            continue
        path, how = mapped
        if path not in expected:
            unexpected.append(key)
            continue
        value = np.asarray(value, np.float32)
        if how == "transpose":
            value = value.T
        elif how == "conv":
            value = value.transpose(2, 3, 1, 0)
        if value.shape != expected[path].shape:
            wrong_shape.append(f"{key}: {value.shape} vs {expected[path].shape}")
            continue
        by_key[tuple(key.split("."))] = (path, value)
    check_params(by_key, {tuple(k.split(".")): None for k in checkpoint_keys(config)}, "CLAP",
                 unexpected, wrong_shape)
    params = {}
    for path, value in by_key.values():
        params[path] = jnp.asarray(value, jnp.float32 if path[0].startswith("logit") else dtype)
    return traverse_util.unflatten_dict(params)


# ---------------------------------------------------------------------------------------------


class CLAP:
    """Frozen CLAP towers with the checkpoint's tokenizer and audio front end.

    Args:
        config: tower sizes.
        params: Flax parameters of :class:`clipsep_jax.encoders.clap_towers.ClapModel`.
        tokenizer: a transformers RoBERTa tokenizer.
        frontend: the feature extractor's settings.
        dtype: compute (and parameter) dtype; embeddings are returned in float32.
        mesh: a mesh whose first axis shards the batch; default: all local devices on ``"data"``.
        batch_size: clips or texts per compiled call (rounded up to a multiple of the devices).
    """

    def __init__(self, config: ClapConfig, params: Mapping, tokenizer: Any, frontend: FrontEnd,
                 dtype: Any = jnp.float32, mesh: Mesh | None = None, batch_size: int = 32):
        if frontend.feature_size != config.audio.num_mel_bins:
            raise UserError(f"the feature extractor makes {frontend.feature_size} mel bins; the "
                            f"audio tower takes {config.audio.num_mel_bins}")
        if frontend.num_frames > config.audio.spec_frames:
            raise UserError(f"the feature extractor makes {frontend.num_frames} frames; the "
                            f"audio tower takes at most {config.audio.spec_frames}")
        self.config = config
        self.tokenizer = tokenizer
        self.frontend = frontend
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self._runner = BatchedRunner(mesh, batch_size)
        self.mesh = self._runner.mesh
        self.batch_size = self._runner.batch_size
        self.model = ClapModel(config, dtype=self.dtype, param_dtype=self.dtype)
        cast = jax.tree_util.tree_map(
            lambda p: jnp.asarray(p, p.dtype if p.ndim == 0 else self.dtype), dict(params))
        self.params = jax.device_put(cast, self._runner.replicated)
        self.text_length = min(TEXT_LENGTH, config.text.max_position_embeddings
                               - config.text.pad_token_id - 1)

        def text_fn(params, ids, mask):
            return self.model.apply({"params": params}, ids, mask, method=ClapModel.encode_text)

        def states_fn(params, ids, mask):
            hidden, _ = self.model.apply({"params": params}, ids, mask,
                                         method=ClapModel.text_states)
            return hidden

        self._text_fn = self._runner.jit(text_fn)
        self._states_fn = self._runner.jit(states_fn)
        self._audio_fns: dict[int, Any] = {}

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_CLAP, dtype: Any = jnp.float32,
                        mesh: Mesh | None = None, batch_size: int = 32,
                        **hub_kwargs: Any) -> CLAP:
        """Load a Hugging Face CLAP checkpoint (without feature fusion) by hub id or folder.

        ``hub_kwargs`` go to transformers' ``cached_file`` and ``from_pretrained`` (``revision``,
        ``cache_dir``, ``local_files_only``, ``token``).
        """
        from transformers import AutoConfig, AutoTokenizer
        from transformers.utils import cached_file

        if os.path.exists(name_or_path) and not os.path.isdir(name_or_path):
            raise UserError(f"{name_or_path}: expected a CLAP checkpoint folder or a hub id")
        hf_config = AutoConfig.from_pretrained(name_or_path, **hub_kwargs)
        if getattr(hf_config, "model_type", None) != "clap":
            raise UserError(f"{name_or_path}: model_type is "
                            f"{getattr(hf_config, 'model_type', None)!r}, not a CLAP checkpoint")
        try:
            config = ClapConfig.from_transformers(hf_config)
        except UserError as e:
            raise UserError(f"{name_or_path}: {e}") from e
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        try:
            params = params_from_state_dict(read_weights(name_or_path, **hub_kwargs), config,
                                            dtype)
        except ValueError as e:
            raise UserError(f"{name_or_path}: {e}") from e
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **hub_kwargs)
        processor_file = cached_file(name_or_path, "preprocessor_config.json",
                                     _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if processor_file:
            with open(processor_file) as f:
                frontend = FrontEnd.from_dict(json.load(f))
        else:
            frontend = FrontEnd(feature_size=config.audio.num_mel_bins)
        return cls(config, params, tokenizer, frontend, dtype, mesh, batch_size)

    @property
    def embedding_dim(self) -> int:
        return self.config.projection_dim

    @property
    def sample_rate(self) -> int:
        """The rate (Hz) the audio tower's front end takes (48 kHz for LAION's checkpoints)."""
        return self.frontend.sampling_rate

    @property
    def logit_scale_text(self) -> float:
        """exp(``logit_scale_t``): the multiplier of text-to-audio cosine logits."""
        return float(np.exp(np.asarray(self.params["logit_scale_t"], np.float64)))

    @property
    def logit_scale_audio(self) -> float:
        """exp(``logit_scale_a``): the multiplier of audio-to-text cosine logits."""
        return float(np.exp(np.asarray(self.params["logit_scale_a"], np.float64)))

    # -- text --------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, int32 [B, 77] (padded and truncated to 77 tokens)."""
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings, not one string")
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"text queries must be non-empty strings, got {t!r}")
        if not texts:
            empty = np.zeros((0, self.text_length), np.int32)
            return empty, empty
        tokens = self.tokenizer(texts, padding="max_length", max_length=self.text_length,
                                truncation=True, return_tensors="np")
        return tokens["input_ids"].astype(np.int32), tokens["attention_mask"].astype(np.int32)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> L2-normalised text embeddings, float32 numpy [B, projection_dim]."""
        ids, mask = self.tokenize(texts)
        if len(ids) == 0:
            return np.zeros((0, self.embedding_dim), np.float32)
        return self._runner(lambda i, m: self._text_fn(self.params, i, m), ids, mask)

    def text_token_states(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (RoBERTa's last hidden states, float32 [B, 77, hidden]; attention mask,
        int32 [B, 77], 1 for tokens, 0 for the padding whose states are to be ignored)."""
        ids, mask = self.tokenize(texts)
        if len(ids) == 0:
            return np.zeros((0, self.text_length, self.config.text.hidden_size), np.float32), mask
        return self._runner(lambda i, m: self._states_fn(self.params, i, m), ids, mask), mask

    # -- audio -------------------------------------------------------------------------------

    def log_mel(self, waveform: jax.Array, offset: int | jax.Array = 0) -> jax.Array:
        """Waveforms [B, S] at :attr:`sample_rate` -> log-mel features [B, frames, mel bins]
        (:func:`log_mel`); pure and differentiable."""
        return log_mel(waveform, self.frontend, offset)

    def audio_embedding(self, params: Mapping, waveform: jax.Array,
                        offset: int | jax.Array = 0) -> jax.Array:
        """Waveforms [B, S] at :attr:`sample_rate` (48 kHz) -> L2-normalised embeddings
        [B, projection_dim] float32; pure in (params, waveform), jit-able, and differentiable
        in the waveform (compose with :func:`resample` for other rates)."""
        return audio_embedding(params, waveform, model=self.model, frontend=self.frontend,
                               offset=offset)

    def encode_audio(self, waveforms: np.ndarray | Iterable[np.ndarray],
                     sample_rate: int) -> np.ndarray:
        """Float waveforms at ``sample_rate`` Hz -> L2-normalised audio embeddings, float32
        numpy [B, projection_dim].

        ``waveforms``: [B, S], or a list of 1-D clips of any lengths. Clips are resampled to
        :attr:`sample_rate` (:func:`resample`), padded or cropped at the start to the
        extractor's maximum length, and embedded.
        """
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer) or (
                sample_rate <= 0):
            raise UserError(f"sample_rate={sample_rate!r}: expected a positive integer (Hz)")
        if isinstance(waveforms, np.ndarray | jax.Array):
            batch = np.asarray(waveforms)
            if batch.ndim != 2:
                raise UserError(f"waveforms of shape {batch.shape}: expected [B, samples] (or a "
                                "list of 1-D clips)")
            clips = list(batch)
        else:
            clips = [np.asarray(c) for c in waveforms]
        for i, clip in enumerate(clips):
            if clip.ndim != 1 or clip.size == 0:
                raise UserError(f"waveform {i} has shape {clip.shape}: expected a non-empty "
                                "mono clip")
            if not np.issubdtype(clip.dtype, np.floating) or not np.isfinite(clip).all():
                raise UserError(f"waveform {i}: expected finite float samples, got "
                                f"{clip.dtype}{'' if np.isfinite(clip).all() else ' with NaN/inf'}")
        out = np.zeros((len(clips), self.embedding_dim), np.float32)
        by_length: dict[int, list[int]] = {}
        for i, clip in enumerate(clips):
            by_length.setdefault(len(clip), []).append(i)
        fn = self._audio_fn(int(sample_rate))
        for rows in by_length.values():
            batch = np.stack([clips[i] for i in rows]).astype(np.float32)
            out[rows] = self._runner(lambda x: fn(self.params, x), batch)
        return out

    def _audio_fn(self, rate: int):
        if rate not in self._audio_fns:
            def fn(params, x):
                return self.audio_embedding(params, resample(x, rate, self.sample_rate))

            self._audio_fns[rate] = self._runner.jit(fn)
        return self._audio_fns[rate]

    def encode_image(self, images: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
        raise ValueError("CLAP encodes text and audio only: query this model with text or audio")
