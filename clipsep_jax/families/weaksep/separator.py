"""Separating recordings with a weakly supervised separator and text queries.

Queries are CLAP prompts used as written ("The sound of cello", or a caption-like phrase as the
model was trained with). A recording of any length is resampled to the model's rate; its STFT
(the training front end) is cut into windows of ``window_frames`` frames overlapping by
``overlap_frames`` (or taken in one pass), each window's ratio masks (one pass per query) blended
with linear cross-fades, applied to the whole STFT with the mixture's phase and inverted once.
The residual is the recording minus what the queries took together (min(1, sum of masks) |X|).
Stereo is separated per channel or downmixed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipsep_jax.encoders.clap import CLAP
from clipsep_jax.errors import UserError
from clipsep_jax.families.weaksep import losses
from clipsep_jax.families.weaksep.frozen_clap import load_frozen_clap
from clipsep_jax.families.weaksep.model import prompt_masks, text_conditions
from clipsep_jax.separation import SeparationError, blend_windows, separate_channels

__all__ = ["Separator"]


def _window_masks(config, variables, magnitudes, states, token_mask, embeddings):
    """[W, F, T] window magnitudes, prompts [Q, ...] -> masks [W, Q, F, T]."""
    def tile(x):
        return jnp.broadcast_to(x[None], (magnitudes.shape[0], *x.shape))

    masks, _ = prompt_masks(config, variables["params"], variables["batch_stats"],
                            losses.unet_input(magnitudes),
                            tile(states), tile(token_mask), tile(embeddings), train=False)
    return masks


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
        window = window_frames or 1 + a.crop_samples // a.hop_length
        if window % multiple:
            raise SeparationError(f"window_frames={window} is not a multiple of {multiple}")
        overlap = window // 4 if overlap_frames is None else overlap_frames
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

    def masks(self, magnitude: np.ndarray, queries: Sequence[str], one_pass: bool = False,
              progress: Callable[[float], None] | None = None) -> np.ndarray:
        """|STFT| [F, T] -> ratio masks [Q, F, T] blended over overlapping windows (or from one
        pass over the recording, padded to a multiple of 2**num_downs frames)."""
        states, token_mask, embeddings = self.prompts(queries)
        window = self.window
        if one_pass:
            multiple = 2**self.config.model.num_downs
            window = -(-magnitude.shape[1] // multiple) * multiple

        def masks_of(windows: np.ndarray) -> np.ndarray:
            return np.asarray(self._masks(self.variables, jnp.asarray(windows), states,
                                          token_mask, embeddings))

        return blend_windows(magnitude, window, min(self.overlap, window - 1), masks_of,
                             batch_size=self.batch_size, progress=progress)

    def _separate_lane(self, waveform: np.ndarray, queries: Sequence[str], one_pass: bool,
                       progress: Callable[[float], None] | None
                       ) -> tuple[np.ndarray, np.ndarray, None]:
        """Mono [S] at the model's rate -> (estimates [Q, S], what the queries took together
        [S], None)."""
        a = self.config.audio
        length = len(waveform)
        padded = np.pad(waveform.astype(np.float32), (0, max(0, a.n_fft - length)))
        if not np.any(waveform):
            return np.zeros((len(queries), length), np.float32), np.zeros(length, np.float32), \
                None
        magnitude, cos, sin = (np.asarray(x) for x in losses.stft_magphase(
            jnp.asarray(padded), n_fft=a.n_fft, hop_length=a.hop_length))
        masks = self.masks(magnitude, queries, one_pass, progress)
        if self.config.eval.binary_masks:
            masks = (masks > self.config.eval.threshold).astype(np.float32)
        taken = np.minimum(1.0, masks.sum(0, keepdims=True))
        waves = np.asarray(losses.masked_waveform(
            jnp.asarray(np.concatenate([masks, taken])), jnp.asarray(magnitude),
            jnp.asarray(cos), jnp.asarray(sin), len(padded), n_fft=a.n_fft,
            hop_length=a.hop_length))[:, :length]
        return waves[:-1], waves[-1], None

    def separate_mono(self, waveform: np.ndarray, queries: Sequence[str],
                      one_pass: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Mono [S] at the model's rate -> (estimates [Q, S], residual [S]: the recording minus
        what the queries took together)."""
        self.check_queries(queries)
        estimates, taken, _ = self._separate_lane(waveform, queries, one_pass, None)
        return estimates, waveform - taken

    def separate_in_order(self, waveform: np.ndarray, sample_rate: int, queries: Sequence[str],
                          *, channels: str = "each", one_pass: bool = False,
                          progress: Callable[[float], None] | None = None) -> list[np.ndarray]:
        """A recording [samples] or [samples, channels] at any rate -> one estimate per query in
        order, then the residual (the input minus what the queries took together), each like
        the input (rate, length, channels); see
        :func:`clipsep_jax.separation.separate_channels`. ``progress`` is called with the
        fraction done."""
        self.check_queries(queries)
        outputs, _ = separate_channels(
            waveform, sample_rate, self.config.audio.sample_rate,
            lambda lane, lane_progress: self._separate_lane(lane, queries, one_pass,
                                                            lane_progress),
            channels=channels, progress=progress)
        return outputs

    def separate(self, waveform: np.ndarray, sample_rate: int, queries: Sequence[str], *,
                 channels: str = "each", one_pass: bool = False) -> dict[str, np.ndarray]:
        """:meth:`separate_in_order` as {query: estimate, ..., "residual": rest}."""
        for i, q in enumerate(queries):
            if q == "residual" or q in queries[:i]:
                raise SeparationError(f"query {q!r} would share its key with another output; "
                                      "use separate_in_order")
        outputs = self.separate_in_order(waveform, sample_rate, queries, channels=channels,
                                         one_pass=one_pass)
        return dict(zip([*queries, "residual"], outputs, strict=True))
