"""Separating recordings with CLIPSep models and text or image queries: :class:`Separator`.

Any length: the model runs on windows of ``window_frames`` STFT frames overlapping by
``overlap_frames``, their mask probabilities blended with linear cross-fades, then thresholded
at 0.5 and applied to the whole recording's STFT, inverted once (no seams). Another sample
rate is resampled to 16 kHz and back; stereo is separated per channel or downmixed.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipsep_jax import audio, checkpoints, inference
from clipsep_jax.encoders import load_query_encoder
from clipsep_jax.encoders.clip import text_prompt
from clipsep_jax.families.clipsep.model import forward
from clipsep_jax.separation import (
    SeparationError,
    blend_windows,
    linear_masks,
    masked_waveforms,
    separate_channels,
    with_residual,
)

__all__ = ["Separator", "Separation", "SeparationError", "QUERY_KINDS"]

QUERY_KINDS = ("clipsep", "clipsep_nit", "sop", "bertsep")


@dataclasses.dataclass
class Separation:
    """What :meth:`Separator.separate_detailed` gives: the outputs, and what to draw.

    outputs: one estimate per query in the queries' order, then the residual, each like the
        input (rate, length, channels).
    masks: [N, F', T] mask probabilities of the first channel (or the downmix), on the model's
        frequency axis (log frequency, F' = ``audio.num_log_freq_bins``) at 16 kHz frames.
    mixture: [F', T] that channel's magnitude on the same axes.
    """

    outputs: list[np.ndarray]
    masks: np.ndarray
    mixture: np.ndarray


class Separator:
    """A separation model with CLIP for its queries.

    Args:
        config: the model's config (``model.kind`` clipsep or clipsep_nit; NIT's noise heads are
            dropped, as at test time in the reference).
        variables: its parameters and BatchNorm statistics.
        clip: a :class:`clipsep_jax.clip.CLIP`, or a hub id / folder to load one from
            (default: ``config.query.encoder_model``).
        window_frames: STFT frames per model window (a multiple of 2**num_downs); memory grows
            with it, compute with window / (window - overlap).
        overlap_frames: frames shared by neighbouring windows, cross-faded.
        batch_size: windows per model call.
    """

    def __init__(self, config: ml_collections.ConfigDict, variables: dict, clip: Any = None,
                 window_frames: int = 4096, overlap_frames: int = 256, batch_size: int = 2):
        if config.model.kind not in QUERY_KINDS:
            raise SeparationError(
                f"model kind {config.model.kind!r} cannot take text or image queries; "
                f"separation needs one of {', '.join(QUERY_KINDS)}")
        multiple = 2**config.model.num_downs
        if window_frames % multiple:
            raise SeparationError(f"window_frames={window_frames} is not a multiple of {multiple}")
        self.config = config
        self.variables = jax.device_put(variables)
        if not 0 < overlap_frames < window_frames:
            raise SeparationError(f"overlap_frames={overlap_frames} must be in (0, window_frames)")
        self.window_frames = window_frames
        self.overlap_frames = overlap_frames
        self.batch_size = batch_size
        self._clip = clip
        self._probabilities = jax.jit(functools.partial(_query_probabilities, config))
        self._reconstruct = jax.jit(functools.partial(_masks_to_waveforms, config),
                                    static_argnums=(2,))

    @classmethod
    def from_checkpoint(cls, path: str, *, model_kind: str | None = None, clip: Any = None,
                        **kwargs) -> Separator:
        """A model directory, a training workdir (its latest checkpoint) or a reference PyTorch
        checkpoint file (``model_kind`` required)."""
        try:
            config, variables = inference.load_for_inference(path, model_kind)
        except (ValueError, OSError) as e:  # the message names the file and the problem
            raise SeparationError(str(e)) from e
        return cls(config, variables, clip, **kwargs)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, clip: Any = None,
                        hub_kwargs: dict | None = None, **kwargs) -> Separator:
        """A pretrained folder (:meth:`save_pretrained`) or a Hugging Face hub id (downloaded
        into the cache, or read from it with ``HF_HUB_OFFLINE=1``; ``hub_kwargs`` such as
        ``revision``, ``cache_dir``, ``token`` go to ``huggingface_hub.snapshot_download``)."""
        try:
            config, variables = checkpoints.load_pretrained(name_or_path, **(hub_kwargs or {}))
        except (ValueError, OSError) as e:  # the message names the file and the problem
            raise SeparationError(str(e)) from e
        return cls(config, variables, clip, **kwargs)

    def save_pretrained(self, folder: str | Path, **card: Any) -> Path:
        """Writes this model as a pretrained folder (``checkpoints.save_pretrained``: config,
        safetensors weights, model card; the query encoder bundled unless it is a hub id).
        ``card``: ``step``, ``evaluation`` (a markdown table), ``dataset`` (facts) for the card."""
        config = self.config
        if isinstance(self._clip, str):  # an encoder given in place of the config's
            config = ml_collections.ConfigDict(config.to_dict())
            config.query.encoder_model = self._clip
        return checkpoints.save_pretrained(folder, config, self.variables, **card)

    def push_to_hub(self, repo_id: str, *, private: bool = False, token: str | None = None,
                    **card: Any) -> str:
        """Uploads this model as a pretrained folder to the hub repository ``repo_id`` (created
        if missing); returns the commit URL."""
        with tempfile.TemporaryDirectory(prefix="clipsep-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "model", **card)
            return checkpoints.push_to_hub(folder, repo_id, private=private, token=token)

    @property
    def clip(self):
        """The query encoder (``config.query.encoder``), loaded on first use."""
        if self._clip is None or isinstance(self._clip, str):
            q = self.config.query
            name = self._clip or q.encoder_model
            try:
                self._clip = load_query_encoder(q, name)
            except OSError as e:  # transformers' "not a folder nor a cached hub id"
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise SeparationError(f"the query encoder {name!r} cannot be loaded ({first}); "
                                      "give a local folder or a hub id in the cache (--clip)"
                                      ) from e
        return self._clip

    def check_queries(self, queries: Sequence[str | np.ndarray]) -> None:
        """Embeds the queries once (loading the encoder): bad queries or a missing encoder are
        found before any recording is read."""
        self.embed_queries(queries)

    def embed_queries(self, queries: Sequence[str | np.ndarray]) -> np.ndarray:
        """Texts ("playing bagpipes" -> "a photo of playing bagpipes"; the template is
        ``config.query.text_template``) or uint8 RGB images -> query embeddings [N, D] from the
        model's query encoder (CLIP; SOP: the ResNet, images only; BERTSep: BERT, text only)."""
        if not queries:
            raise SeparationError("no queries: give at least one text or image")
        embeddings = []
        for q in queries:
            try:
                if isinstance(q, str):
                    if not q.strip():
                        raise SeparationError("empty text query")
                    embeddings.append(self.clip.encode_text(
                        [text_prompt(q, self.config.query.text_template)])[0])
                else:
                    embeddings.append(self.clip.encode_image([np.asarray(q)])[0])
            except SeparationError:
                raise
            except ValueError as e:  # e.g. a text query to SOP's image-only ResNet
                raise SeparationError(f"model kind {self.config.model.kind!r}: {e}") from e
        embeddings = np.stack(embeddings)
        if embeddings.shape[1] != self.config.model.query_dim:
            raise SeparationError(
                f"the query encoder gives {embeddings.shape[1]}-dim embeddings, the model takes "
                f"{self.config.model.query_dim}")
        return embeddings

    def masks(self, mix_stft: np.ndarray, embeddings: np.ndarray, one_pass: bool = False,
              progress: Callable[[float], None] | None = None):
        """Mixture STFT [513, T] -> mask probabilities [N, F', T] on the model's frequency axis,
        from overlapping windows (or one pass over the whole padded recording); ``progress``
        is called with the fraction of windows done."""
        frames = mix_stft.shape[1]
        magnitude = np.abs(mix_stft).astype(np.float32)
        multiple = 2**self.config.model.num_downs
        # A recording that fits one window runs as one window of its length rounded up to a
        # bucket of 256 frames (a few compiled shapes, little padding).
        bucket = -(-max(256, multiple) // multiple) * multiple
        fitted = -(-frames // bucket) * bucket
        window = self.window_frames
        if one_pass or fitted <= self.window_frames:
            window = -(-frames // multiple) * multiple if fitted > self.window_frames else fitted
        queries = jnp.asarray(embeddings[None], jnp.float32)

        def probabilities(windows: np.ndarray) -> np.ndarray:
            return np.asarray(self._probabilities(
                self.variables, jnp.asarray(windows),
                jnp.broadcast_to(queries, (len(windows), *embeddings.shape))))

        return blend_windows(magnitude, window, min(self.overlap_frames, window - 1),
                             probabilities, batch_size=self.batch_size, progress=progress)

    def separate_mono(self, waveform: np.ndarray, embeddings: np.ndarray,
                      one_pass: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """16 kHz mono [S] -> (estimates [N, S], residual [S]): the residual is the recording minus
        the union of the queries' masks applied to it, so with one query the two add up to the
        recording. A recording shorter than one STFT window (``n_fft`` samples) or silent comes
        back as silent estimates and itself as the residual."""
        estimates, taken, _ = self._separate_lane(waveform, embeddings, one_pass, None)
        return estimates, waveform - taken

    def _separate_lane(self, waveform, embeddings, one_pass, progress):
        """16 kHz mono [S] -> (estimates [N, S], what the queries took together [S], (the mask
        probabilities [N, F', T], the mixture's magnitude [F', T]) on the model's frequency
        axis)."""
        a = self.config.audio
        length = len(waveform)
        waveform = waveform.astype(np.float32)
        padded = np.pad(waveform, (0, max(0, a.n_fft - length)))
        mix_stft = audio.stft_numpy(padded, n_fft=a.n_fft, hop_length=a.hop_length,
                                    win_length=a.win_length)
        magnitude = np.abs(mix_stft).astype(np.float32)
        if a.log_freq:
            magnitude = np.asarray(audio.warp_to_log_frequency(magnitude, a.num_log_freq_bins))
        if length < a.n_fft or not np.any(waveform):
            silent = np.zeros((len(embeddings), length), np.float32)
            return silent, np.zeros(length, np.float32), (
                np.zeros((len(embeddings), *magnitude.shape), np.float32), magnitude)
        probabilities = self.masks(mix_stft, embeddings, one_pass, progress)
        waves = np.asarray(self._reconstruct(jnp.asarray(probabilities), jnp.asarray(mix_stft),
                                             len(padded)))[:, :length]
        return waves[:-1], waves[-1], (probabilities, magnitude)

    def separate_in_order(self, waveform: np.ndarray, sample_rate: int,
                          queries: Sequence[str | np.ndarray], *, channels: str = "each",
                          one_pass: bool = False,
                          progress: Callable[[float], None] | None = None) -> list[np.ndarray]:
        """A recording [samples] or [samples, channels] at any rate -> one estimate per query,
        in the queries' order, then the residual: the input minus what the queries took (their
        masks' union), at the input's rate, so that with one query the two add up to the input
        and content the 16 kHz model cannot see stays in the residual. Each output is like the
        input (rate, length, channels). ``channels``: "each" (per channel) or "downmix" (the
        mean separated and written to every channel; the residual is then the mean's).
        ``progress`` is called with the fraction done."""
        return self.separate_detailed(waveform, sample_rate, queries, channels=channels,
                                      one_pass=one_pass, progress=progress).outputs

    def separate_detailed(self, waveform: np.ndarray, sample_rate: int,
                          queries: Sequence[str | np.ndarray], *, channels: str = "each",
                          one_pass: bool = False,
                          progress: Callable[[float], None] | None = None) -> Separation:
        """:meth:`separate_in_order`'s outputs with the first channel's masks and mixture
        spectrogram (:class:`Separation`), for pictures."""
        embeddings = self.embed_queries(queries)
        outputs, (masks, mixture) = separate_channels(
            waveform, sample_rate, self.config.audio.sample_rate,
            lambda lane, lane_progress: self._separate_lane(lane, embeddings, one_pass,
                                                            lane_progress),
            channels=channels, progress=progress)
        return Separation(outputs, masks, mixture)

    def separate(self, waveform: np.ndarray, sample_rate: int,
                 queries: Sequence[str | np.ndarray], *, channels: str = "each",
                 one_pass: bool = False) -> dict[str, np.ndarray]:
        """:meth:`separate_in_order` as {query: estimate, ..., "residual": rest}. Image queries
        are keyed ``image_<i>``; a text query given twice, or named "residual", is refused (its
        key would hide another output; :meth:`separate_in_order` takes any queries)."""
        names = [q if isinstance(q, str) else f"image_{i}" for i, q in enumerate(queries)]
        for i, name in enumerate(names):
            if name == "residual" or name in names[:i]:
                raise SeparationError(
                    f"query {name!r} would share its key with another output; use "
                    "separate_in_order, which keeps every query's estimate in order")
        outputs = self.separate_in_order(waveform, sample_rate, queries, channels=channels,
                                         one_pass=one_pass)
        return dict(zip([*names, "residual"], outputs, strict=True))


def _masks_to_waveforms(config, probabilities, mix_stft, length):
    """Mask probabilities [N, F', T] and the mixture STFT [513, T] -> waveforms [N + 1, length]:
    each query's binary mask applied, then their union's (what the queries took together)."""
    masks = linear_masks(config, probabilities)
    union = 1.0 - with_residual(masks)[-1:]
    return masked_waveforms(config, jnp.concatenate([masks, union]), mix_stft, length)


def _query_probabilities(config, variables, magnitudes, queries):
    """[B, 513, W] magnitudes and [B, N, D] queries -> sigmoid mask probabilities [B, N, F', W]."""
    out = forward(config, variables, magnitudes, queries)
    return jax.nn.sigmoid(out["query_logits"].astype(jnp.float32))
