"""Separating recordings with a weakly supervised separator and text queries.

Queries are CLAP prompts used as written ("The sound of cello", or a caption-like phrase as the
model was trained with). A recording of any length is resampled to the model's rate; its STFT
(the training front end) is cut into windows of ``window_frames`` frames overlapping by
``overlap_frames``, each window's ratio masks (one pass per query) blended with linear
cross-fades, applied to the whole STFT with the mixture's phase and inverted once. The residual
is what the queries leave: (1 - min(1, sum of masks)) |X|. Stereo is separated per channel or
downmixed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipsep_jax import audio
from clipsep_jax.encoders.clap import CLAP
from clipsep_jax.errors import UserError
from clipsep_jax.families.weaksep import losses
from clipsep_jax.families.weaksep.frozen_clap import load_frozen_clap
from clipsep_jax.families.weaksep.model import prompt_masks, text_conditions
from clipsep_jax.separation import SeparationError

__all__ = ["Separator"]


def _window_masks(config, variables, magnitudes, states, token_mask, embeddings):
    """[W, F, T] window magnitudes, prompts [Q, ...] -> masks [W, Q, F, T]."""
    count = magnitudes.shape[0]

    def tile(x):
        return jnp.broadcast_to(x[:, None], (x.shape[0], count, *x.shape[1:]))

    masks, _ = prompt_masks(config, variables["params"], variables["batch_stats"],
                            losses.unet_input(magnitudes),
                            tile(states), tile(token_mask), tile(embeddings), train=False)
    return jnp.swapaxes(masks, 0, 1)


class Separator:
    """A weaksep model with its frozen CLAP for text queries.

    Args:
      config, variables: the trained model (``model.kind`` weaksep).
      clap: a :class:`~clipsep_jax.encoders.clap.CLAP`, or where to load one (default:
        ``config.weaksep.clap``; it must be the CLAP the model was trained with).
      window_frames: STFT frames per window (default: the training crop's); a multiple of
        2**num_downs.
      overlap_frames: frames shared by neighbouring windows (default: a quarter window).
      batch_size: windows per model call.
    """

    def __init__(self, config: ml_collections.ConfigDict, variables: dict,
                 clap: CLAP | str | None = None, window_frames: int | None = None,
                 overlap_frames: int | None = None, batch_size: int = 2):
        if config.model.kind != "weaksep":
            raise SeparationError(f"model kind {config.model.kind!r} is not a weaksep model")
        a = config.audio
        multiple = 2**config.model.num_downs
        crop_frames = 1 + a.crop_samples // a.hop_length
        # The shared separate command's defaults are sized for CLIPSep: the training crop here.
        window = window_frames or crop_frames
        if window > 4 * crop_frames:
            window = crop_frames
        if window % multiple:
            raise SeparationError(f"window_frames={window} is not a multiple of {multiple}")
        overlap = overlap_frames if overlap_frames is not None and overlap_frames < window \
            else window // 4
        if not 0 < overlap < window:
            raise SeparationError(f"overlap_frames={overlap} must be in (0, window_frames)")
        self.config, self.window, self.overlap, self.batch_size = config, window, overlap, \
            batch_size
        self.variables = jax.device_put(jax.device_get(variables), jax.devices()[0])
        self._clap = clap
        self._masks = None

    @property
    def clap(self) -> CLAP:
        """The frozen CLAP, loaded on first use."""
        if not isinstance(self._clap, CLAP):
            config = self.config
            if isinstance(self._clap, str):
                config = ml_collections.ConfigDict(config.to_dict())
                config.weaksep.clap = self._clap
            try:
                self._clap = load_frozen_clap(config)
            except (UserError, OSError) as e:
                raise SeparationError(str(e)) from e
            self._masks = jax.jit(functools.partial(_window_masks, self.config))
        return self._clap

    def check_queries(self, queries: Sequence[str]) -> None:
        """Refuses empty or non-text queries before any recording is read (loads CLAP)."""
        self.prompts(queries)

    def prompts(self, queries: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Text queries -> CLAP (token states [Q, S, H], token mask [Q, S], embeddings [Q, D])."""
        if not queries:
            raise SeparationError("no queries: give at least one text")
        for q in queries:
            if not isinstance(q, str):
                raise SeparationError("a weaksep model takes text queries only, not images")
            if not q.strip():
                raise SeparationError("empty text query")
        clap = self.clap
        ids, mask = clap.tokenize(list(queries))
        states, embeddings = text_conditions(clap, clap.params, jnp.asarray(ids),
                                             jnp.asarray(mask))
        return np.asarray(states), mask, np.asarray(embeddings)

    def masks(self, magnitude: np.ndarray, queries: Sequence[str],
              progress: Callable[[float], None] | None = None) -> np.ndarray:
        """|STFT| [F, T] -> ratio masks [Q, F, T] blended over overlapping windows."""
        states, token_mask, embeddings = self.prompts(queries)
        frames, window = magnitude.shape[1], self.window
        hop = window - self.overlap
        starts = list(range(0, max(frames - window, 0) + 1, hop))
        if starts[-1] + window < frames:
            starts.append(frames - window)
        extra = max(frames, starts[-1] + window) - frames
        padded = np.pad(magnitude, ((0, 0), (0, extra)), mode="symmetric") if extra <= frames \
            else np.pad(magnitude, ((0, 0), (0, extra)), mode="wrap")
        ramp = np.ones(window, np.float32)
        if len(starts) > 1:
            fade = np.linspace(0.0, 1.0, self.overlap + 2)[1:-1]
            ramp[:self.overlap], ramp[window - self.overlap:] = fade, fade[::-1]
        total = np.zeros((len(queries), padded.shape[0], padded.shape[1]), np.float32)
        weight = np.zeros(padded.shape[1], np.float32)
        for i in range(0, len(starts), self.batch_size):
            chunk = starts[i:i + self.batch_size]
            windows = np.stack([padded[:, s:s + window] for s in chunk])
            out = np.asarray(self._masks(self.variables, jnp.asarray(windows), states,
                                         token_mask, embeddings))
            for s, m in zip(chunk, out, strict=True):
                total[:, :, s:s + window] += m * ramp
                weight[s:s + window] += ramp
            if progress is not None:
                progress(min(1.0, (i + len(chunk)) / len(starts)))
        return total[:, :, :frames] / weight[:frames]

    def separate_mono(self, waveform: np.ndarray, queries: Sequence[str]
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Mono [S] at the model's rate -> (estimates [Q, S], residual [S])."""
        a = self.config.audio
        length = len(waveform)
        padded = np.pad(waveform.astype(np.float32), (0, max(0, a.n_fft - length)))
        magnitude, cos, sin = (np.asarray(x) for x in losses.stft_magphase(
            jnp.asarray(padded), n_fft=a.n_fft, hop_length=a.hop_length))
        if not np.any(waveform):
            return np.zeros((len(queries), length), np.float32), waveform.copy()
        masks = self.masks(magnitude, queries)
        if self.config.eval.binary_masks:
            masks = (masks > self.config.eval.threshold).astype(np.float32)
        rest = 1.0 - np.minimum(1.0, masks.sum(0, keepdims=True))
        waves = np.asarray(losses.masked_waveform(
            jnp.asarray(np.concatenate([masks, rest])), jnp.asarray(magnitude),
            jnp.asarray(cos), jnp.asarray(sin), len(padded), n_fft=a.n_fft,
            hop_length=a.hop_length))[:, :length]
        return waves[:-1], waves[-1]

    def separate_in_order(self, waveform: np.ndarray, sample_rate: int, queries: Sequence[str],
                          *, channels: str = "each", **_: object) -> list[np.ndarray]:
        """A recording [samples] or [samples, channels] at any rate -> one estimate per query in
        order, then the residual, each like the input (rate, length, channels)."""
        data = np.asarray(waveform, np.float32)
        mono = data.ndim == 1
        data = data[:, None] if mono else data
        if data.ndim != 2 or data.shape[0] == 0:
            raise SeparationError(f"expected audio [samples] or [samples, channels], got "
                                  f"{np.shape(waveform)}")
        if not np.isfinite(data).all():
            raise SeparationError("the recording contains NaN or infinite samples")
        if channels not in ("each", "downmix"):
            raise SeparationError(f"channels must be 'each' or 'downmix', got {channels!r}")
        self.check_queries(queries)
        rate = self.config.audio.sample_rate
        lanes = [data.mean(axis=1)] if channels == "downmix" else list(data.T)
        per_lane = []
        for lane in lanes:
            estimates, residual = self.separate_mono(audio.resample(lane, sample_rate, rate),
                                                     queries)
            per_lane.append([_fit(audio.resample(x, rate, sample_rate), len(data))
                             for x in [*estimates, residual]])
        outputs = []
        for index in range(len(queries) + 1):
            stacked = np.stack([lane[index] for lane in per_lane], axis=1)
            if channels == "downmix" and not mono:
                stacked = np.repeat(stacked, data.shape[1], axis=1)
            outputs.append(stacked[:, 0] if mono else stacked)
        return outputs

    def separate(self, waveform: np.ndarray, sample_rate: int, queries: Sequence[str], *,
                 channels: str = "each") -> dict[str, np.ndarray]:
        """:meth:`separate_in_order` as {query: estimate, ..., "residual": rest}."""
        for i, q in enumerate(queries):
            if q == "residual" or q in queries[:i]:
                raise SeparationError(f"query {q!r} would share its key with another output; "
                                      "use separate_in_order")
        outputs = self.separate_in_order(waveform, sample_rate, queries, channels=channels)
        return dict(zip([*queries, "residual"], outputs, strict=True))


def _fit(x: np.ndarray, length: int) -> np.ndarray:
    return x[:length] if len(x) >= length else np.pad(x, (0, length - len(x)))
