"""The interface a model family implements; the generic machinery calls nothing else.

A family owns its networks, losses, the examples its training and evaluation read, its
evaluation table and its inference entry points. The generic parts own the rest:

- ``clipsep_jax.train``: the train state (step, parameters, model state such as BatchNorm
  statistics, optimizer state, an rng key folded with the step, optional EMA parameters), the
  optimizer and learning-rate schedule, the sharded train step built around :meth:`Family.loss`,
  the loop with logging, validation, checkpoints, pre-emption and the non-finite-loss stop;
- ``clipsep_jax.input_pipeline``: reading the prepared datasets, shuffling, per-host sharding,
  batching, prefetching and placing batches on the mesh as global arrays, around the family's
  per-example transforms;
- ``clipsep_jax.checkpoints`` and ``clipsep_jax.inference``: what is on disk and loading it;
- ``clipsep_jax.evaluate``, ``clipsep_jax.separate``, ``clipsep_jax.convert``: the commands.

Numbers flow as pytrees of arrays: ``variables`` is ``{"params": ..., <state collections>}``
(Flax's layout), ``model_state`` the state collections alone (e.g. ``{"batch_stats": ...}``,
``{}`` for a stateless model); batches are dicts of arrays with the batch on axis 0.
"""

from __future__ import annotations

import abc
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import jax
import ml_collections
import numpy as np

from clipsep_jax.errors import UserError

__all__ = ["Family", "check_choices"]


def check_choices(config: ml_collections.ConfigDict, choices: dict[str, tuple]) -> None:
    """Raises ValueError naming the field when ``config.<dotted name>`` is not one of its
    choices (``choices``: dotted field name -> allowed values)."""
    for name, allowed in choices.items():
        node = config
        for part in name.split("."):
            node = node[part]
        if node not in allowed:
            raise UserError(f"config.{name}={node!r}: expected one of "
                             f"{', '.join(map(str, allowed))}")


class Family(abc.ABC):
    """A model family: the model kinds it builds and everything specific to them."""

    name: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]]
    # "separation" (``separator``), "generation" (``generator``), "vocoding" (log-mel to
    # waveform; used through a generator's ``use_vocoder``), "prior" (text to image embedding;
    # through ``use_prior``) or "encoding" (a trained encoder, e.g. CLAP): what its models do,
    # for the commands and the web page
    task: ClassVar[str] = "separation"
    # Subsections of ``config.<name>`` that say how a model is evaluated or queried, not what
    # it is: an evaluation takes them from its own config, the rest from the checkpoint's.
    usage_sections: ClassVar[tuple[str, ...]] = ("eval",)

    # -- configuration ----------------------------------------------------------------------

    @abc.abstractmethod
    def model_config(self, kind: str) -> ml_collections.ConfigDict:
        """Defaults of ``config.model`` for ``kind`` (``kind`` included)."""

    def family_config(self) -> ml_collections.ConfigDict | None:
        """Defaults of the family's own section ``config.<name>``, or None."""
        return None

    def kind_defaults(self, config: ml_collections.ConfigDict) -> None:
        """Sets the shared fields whose default depends on ``config.model.kind`` (e.g. the query
        encoder); called by ``default_config`` once every section exists."""
        return None

    @abc.abstractmethod
    def validate_config(self, config: ml_collections.ConfigDict) -> None:
        """Raises ValueError naming the field when ``config`` cannot describe a model."""

    def migrate_config(self, saved: dict) -> dict:
        """A config.json written by an older version (a dict) -> today's layout."""
        return saved

    # -- model and loss ---------------------------------------------------------------------

    @abc.abstractmethod
    def init_variables(self, config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
        """Fresh variables ``{"params": ..., <state collections>}``; pure (jit-able)."""

    @abc.abstractmethod
    def loss(self, config: ml_collections.ConfigDict, params: Any, model_state: dict,
             batch: dict, rng: jax.Array, step: jax.Array) -> tuple[jax.Array, tuple[dict, dict]]:
        """Training loss of one global batch -> (scalar loss, (metrics, new model state)).

        Pure and jit-able; ``rng`` is already folded with ``step``; ``metrics`` are scalars
        logged beside the loss."""

    def frozen_variables(self, config: ml_collections.ConfigDict) -> dict:
        """Arrays the loss and validation read but never train (e.g. a frozen encoder's
        parameters), as host arrays by name; ``{}`` for none. The training loop places them
        replicated on the mesh and hands them to :meth:`loss` and :meth:`validation_step` in the
        model state under ``"frozen"``; they are not checkpointed (the family loads them again
        from where its config says)."""
        return {}

    # -- what travels with a packaged model ---------------------------------------------------

    def companions(self, config: ml_collections.ConfigDict) -> dict[str, str]:
        """The models this one needs beside its weights at inference, as config fields (dotted
        names) -> the folder each gets in a pretrained folder. ``save_pretrained`` carries each
        that names a local folder or file (:meth:`save_companion`) and points the field at the
        copy; a hub id stays as it is. Default: the query encoder."""
        return {"query.encoder_model": "query_encoder"}

    def save_companion(self, config: ml_collections.ConfigDict, field: str, source: Path,
                       target: Path) -> Path:
        """Writes companion ``field``, found at ``source``, to the new path ``target``; returns
        the path the field names from now on (``target`` or a file in it). Default: a copy."""
        if source.is_dir():
            shutil.copytree(source, target)
            return target
        target.mkdir()
        shutil.copy2(source, target / source.name)
        return target / source.name

    # -- data -------------------------------------------------------------------------------

    def rows_per_step(self, config: ml_collections.ConfigDict) -> int:
        """Examples the input pipeline delivers per training step (global); :meth:`loss` may
        train on fewer of them (default: ``config.train.batch_size``)."""
        return config.train.batch_size

    @abc.abstractmethod
    def training_transform(self, config: ml_collections.ConfigDict, source: Any,
                           metadata: dict) -> Callable[[int, np.random.Generator], dict]:
        """``(index, rng) -> example``: one training example (numpy arrays, the model's input)
        built from the random-access ``source`` of the training split; run inside grain's
        workers, deterministic for the rng."""

    @abc.abstractmethod
    def validation_transform(self, config: ml_collections.ConfigDict, source: Any,
                             metadata: dict) -> Callable[[int], dict]:
        """``index -> example``: the deterministic validation example of element ``index``."""

    @abc.abstractmethod
    def validation_step(self, config: ml_collections.ConfigDict, variables: dict,
                        batch: dict) -> dict:
        """Jit-able: a validation batch -> ``{"per_example": {name: [B] float32},
        "summary": pytree}``. NaN marks an example without a value for that name (it is left
        out of the mean); ``batch["index"]`` holds the examples' indices. ``summary`` covers the
        first rows of the batch and is gathered to every host."""

    def validation_summaries(self, config: ml_collections.ConfigDict,
                             summary: Any) -> dict[str, dict[str, np.ndarray]]:
        """The gathered ``summary`` of the first validation batch -> ``{"images": {name: HxWx3
        uint8}, "audios": {name: [1, samples, 1]}}`` for TensorBoard."""
        return {}

    # -- evaluation and inference -----------------------------------------------------------

    @abc.abstractmethod
    def evaluate(self, config: ml_collections.ConfigDict, variables: dict, mesh: Any, *,
                 progress: bool = True) -> dict:
        """The evaluation report of ``variables`` on ``config.eval``'s test set, computed on every
        host (each scores its own rows; every host returns the whole report)."""

    @abc.abstractmethod
    def format_table(self, report: dict) -> str:
        """The report as a markdown table with notes."""

    def write_examples(self, config: ml_collections.ConfigDict, variables: dict, folder: Path,
                       count: int) -> list[Path]:
        """Writes ``count`` example outputs (audio and pictures) into ``folder``."""
        return []

    def describe_model(self, config: ml_collections.ConfigDict) -> str:
        """A short description of the model's sizes for messages."""
        return config.model.kind

    def load_reference_checkpoint(self, path: str | Path,
                                  kind: str) -> tuple[ml_collections.ConfigDict, dict]:
        """A checkpoint of the original implementation -> (config, variables)."""
        raise UserError(f"model kind {kind!r} has no reference-checkpoint converter")

    def generator(self, config: ml_collections.ConfigDict, variables: dict, **kwargs: Any):
        """An object with ``generate(queries, num_samples=, seconds=, guidance=, steps=,
        seed=)`` -> per query {"mels", "waveforms"}, ``use_prior(kind, split, checkpoint)`` (text
        queries through a prior; returns its description or None) and ``use_vocoder(checkpoint,
        config_file)`` (waveforms from a vocoder; returns its description), raising UserError
        for what the model cannot do (see
        :class:`clipsep_jax.families.clipsonic.generator.Generator`)."""
        raise UserError(f"model kind {config.model.kind!r} does not generate audio")

    def separator(self, config: ml_collections.ConfigDict, variables: dict, **kwargs: Any):
        """An object with ``check_queries(queries)``, ``separate_in_order(waveform,
        sample_rate, queries, channels=...)`` (estimates in the queries' order, then the
        residual) and ``separate(...)`` (the same as a dict), raising
        ``clipsep_jax.separation.SeparationError`` for bad input (see
        :class:`clipsep_jax.families.clipsep.separator.Separator`)."""
        raise UserError(f"model kind {config.model.kind!r} does not separate recordings")
