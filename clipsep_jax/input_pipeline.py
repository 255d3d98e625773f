"""Input pipeline: the datasets ``data_prep`` writes (TFDS ArrayRecord) read through grain, ending
at the model's input as global arrays on the device mesh.

What a model reads is its family's business (``Family.training_transform`` and
``Family.validation_transform``: element index -> example); this module does the rest, the same
for every family:

- :func:`open_split`: a random-access source of one split, and the dataset's metadata;
  :func:`record_column`: one text feature of every record (labels, clip ids, captions) from the
  record index ``data_prep`` writes beside the dataset, without reading the records;
- :func:`training_batches`: an endless, shuffled, per-host sharded stream of batches with the
  family's transform running inside grain's reader threads (or worker processes), each batch
  placed on the mesh as one global array per key (:class:`GlobalBatches`; its grain iterator is
  what checkpoints save, so a restored run continues the same stream);
- :func:`sharded_batches`: a finite, deterministic pass over a split in which every host reads,
  decodes and feeds only its own rows of each global batch; the last batch is padded with
  ``valid = 0`` rows, so every element counts exactly once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags, logging

from clipsep_jax import sharding
from clipsep_jax.errors import UserError

__all__ = [
    "RECORD_INDEX_FILE",
    "SplitSource",
    "open_split",
    "record_column",
    "as_text",
    "training_dataset",
    "GlobalBatches",
    "training_batches",
    "sharded_batches",
    "every_nth",
]


RECORD_INDEX_FILE = "record_index.json"


class SplitSource:
    """One split's records by index, and its text columns.

    ArrayRecord decompresses a whole record (a clip's waveform, STFT and embeddings: megabytes)
    to read any feature of it, about 6-8 ms per record on one core. ``columns`` ({feature: [text
    per record]}, from the record index ``data_prep`` writes) answers "which label / clip / caption
    is record i" without that. With ``cache_in_memory``, every record read is kept (thread-safe for
    grain's reader threads; worker processes would each hold a copy).
    """

    def __init__(self, records: Any, columns: dict[str, list] | None = None,
                 cache_in_memory: bool = False):
        self.records, self.columns = records, dict(columns or {})
        self.cache: dict[int, dict] | None = {} if cache_in_memory else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        if self.cache is None:
            return self.records[index]
        record = self.cache.get(index)
        if record is None:
            record = self.cache[index] = self.records[index]
        return record

    def column(self, name: str) -> list | None:
        """Feature ``name`` of every record from the index, or None when it has none."""
        return self.columns.get(name)


def as_text(value: Any) -> Any:
    """A Text feature's value (bytes, str) as str; a Sequence of them as a list of str."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return value
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return as_text(value.item())
    if isinstance(value, (list, tuple, np.ndarray)):
        return [as_text(v) for v in value]
    return str(value)


def record_column(source: Any, name: str) -> list:
    """Text feature ``name`` of every record of ``source``, in order (str, or a list of str for
    a Sequence of Text): from the dataset's record index when ``source`` (from
    :func:`open_split`, possibly through :func:`every_nth`) has that column, else read record by
    record (datasets prepared before the index, plain lists of dicts)."""
    column = getattr(source, "column", None)
    values = column(name) if column is not None else None
    if values is None:
        values = [as_text(source[i][name]) for i in range(len(source))]
    return list(values)


def _read_record_index(version_dir: str, split: str, size: int) -> dict[str, list]:
    """The columns of ``split`` in ``version_dir/record_index.json``; {} (with a warning: every
    record is then read where a column is needed) when the file is missing or does not fit."""
    path = os.path.join(version_dir, RECORD_INDEX_FILE)
    if not os.path.isfile(path):
        logging.warning("%s: no %s (prepared before it); labels and captions are read record "
                        "by record. Re-run data_prep to write it.", version_dir,
                        RECORD_INDEX_FILE)
        return {}
    with open(path) as f:
        columns = json.load(f).get(split, {})
    stale = sorted(name for name, values in columns.items() if len(values) != size)
    if stale:
        logging.warning("%s: columns %s of split %s do not have its %d records; ignored", path,
                        stale, split, size)
    return {name: values for name, values in columns.items() if name not in stale}


def open_split(data: ml_collections.ConfigDict, split: str) -> tuple[Any, dict]:
    """(:class:`SplitSource` of ``split``, the dataset's metadata) for ``config.data``; records
    stay in memory once read when ``data.cache_in_memory``."""
    if not data.data_dir:
        raise UserError("config.data.data_dir is empty: point it at data_prep's --data_dir")
    if not os.path.isdir(os.path.join(data.data_dir, data.name)):
        raise FileNotFoundError(
            f"config.data.data_dir={data.data_dir}: no dataset {data.name!r} there (no folder "
            f"{os.path.join(data.data_dir, data.name)}); prepare it with python -m data_prep.build "
            "--data_dir=... or point config.data.data_dir at data_prep's output")
    version_dir = _newest_version(data)
    builder = tfds.builder_from_directory(version_dir)
    sources = builder.as_data_source()
    if split not in sources:
        raise UserError(
            f"{data.name} in {data.data_dir} has no split {split!r} (it has {sorted(sources)})"
        )
    records = sources[split]
    columns = _read_record_index(version_dir, split, len(records))
    return (SplitSource(records, columns, bool(data.cache_in_memory)),
            dict(builder.info.metadata or {}))



class EveryNth:
    """Records ``offset``, ``offset + stride``, ... of a random-access source."""

    def __init__(self, source: Any, stride: int, offset: int):
        self.source, self.stride, self.offset = source, stride, offset
        self.size = max(0, -(-(len(source) - offset) // stride))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"record {index} of {self.size}")
        return self.source[self.offset + index * self.stride]

    def column(self, name: str) -> list | None:
        column = getattr(self.source, "column", None)
        values = column(name) if column is not None else None
        return None if values is None else values[self.offset::self.stride]


def every_nth(source: Any, stride: int, offset: int) -> Any:
    """``source`` itself for stride 1, else every ``stride``-th record from ``offset``
    (``config.data.train_stride`` / ``train_offset``: disjoint parts of one training split, e.g.
    one for a frozen encoder and one for the model that uses it)."""
    if stride < 1 or not 0 <= offset < stride:
        raise UserError(f"config.data.train_stride={stride}, train_offset={offset}: need stride "
                        ">= 1 and 0 <= offset < stride")
    return source if stride == 1 else EveryNth(source, stride, offset)


def _newest_version(data: ml_collections.ConfigDict) -> str:
    """The folder of the dataset's newest prepared version. Read from its files, the dataset has
    the features it was written with (e.g. the SOP baseline's optional ResNet vectors)."""
    folder = os.path.join(data.data_dir, data.name)
    versions = []
    for name in os.listdir(folder):
        parts = name.split(".")
        if (len(parts) == 3 and all(p.isdigit() for p in parts)
                and os.path.isfile(os.path.join(folder, name, "dataset_info.json"))):
            versions.append((tuple(map(int, parts)), name))
    if not versions:
        raise FileNotFoundError(
            f"{folder}: no prepared version (a folder such as 1.0.0 with dataset_info.json); "
            "prepare the dataset with python -m data_prep.build")
    return os.path.join(folder, max(versions)[1])


class _RandomTransform(grain.transforms.RandomMap):
    def __init__(self, transform: Callable[[int, np.random.Generator], dict]):
        self.transform = transform

    def random_map(self, index: int, rng: np.random.Generator) -> dict:
        return self.transform(index, rng)


def training_dataset(
    transform: Callable[[int, np.random.Generator], dict],
    size: int,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
) -> grain.IterDataset:
    """Endless batches of this host's share of the global batch, reshuffled every epoch.

    Element k of the global stream is ``transform(permutation(k), rng(seed + 1, k))``, so it
    depends on (seed, k) only and a restored iterator state continues the same batches. Host
    ``process_index`` takes its block of every global batch (the rows its devices hold).
    """
    if batch_size % process_count:
        raise UserError(
            f"config.train.batch_size={batch_size} is not divisible by {process_count} hosts"
        )
    if size == 0:
        raise UserError("the training split is empty")
    stream = (
        grain.MapDataset.range(size)
        .shuffle(seed=seed)
        .repeat()
        .random_map(_RandomTransform(transform), seed=seed + 1)
    )
    share = batch_size // process_count
    if process_count == 1:
        dataset = stream
    else:
        # Host p takes rows p * share ... (p + 1) * share - 1 of every global batch: the rows
        # its devices hold, so each example meets the same device whatever the host count.
        def global_element(j: int) -> dict:
            return stream[(j // share) * batch_size + process_index * share + j % share]

        dataset = grain.MapDataset.range(len(stream) // process_count).map(global_element)
    dataset = dataset.batch(share, drop_remainder=True)
    iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=8))
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults suffice)
            flags.FLAGS.mark_as_parsed()
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iterable


class GlobalBatches:
    """Iterator of global batches: this host's numpy batches from a grain iterator, placed on
    ``mesh`` with the batch axis split over every device (:func:`sharding.global_batch`).

    ``grain_iterator`` is the state to checkpoint (``grain.checkpoint.CheckpointSave``)."""

    def __init__(self, grain_iterator: Any, mesh: jax.sharding.Mesh):
        self.grain_iterator = grain_iterator
        self.mesh = mesh

    def __iter__(self) -> GlobalBatches:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        return sharding.global_batch(next(self.grain_iterator), self.mesh)


def training_batches(
    config: ml_collections.ConfigDict,
    transform: Callable[[int, np.random.Generator], dict],
    size: int,
    mesh: jax.sharding.Mesh,
    batch_size: int | None = None,
) -> GlobalBatches:
    """The training stream of ``config.train`` / ``config.data`` over a split of ``size``
    elements, as global arrays on ``mesh``, in global batches of ``batch_size`` (default
    ``config.train.batch_size``; more when the family drops rows in its loss)."""
    dataset = training_dataset(
        transform, size, batch_size=batch_size or config.train.batch_size,
        seed=config.train.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_workers=config.data.num_workers)
    return GlobalBatches(iter(dataset), mesh)


def sharded_batches(
    transform: Callable[[int], dict],
    size: int,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    *,
    num_threads: int = 4,
) -> Iterator[dict[str, jax.Array]]:
    """One pass over elements ``0 .. size - 1`` in global batches of ``batch_size`` on ``mesh``.

    Each host builds only its own rows: of global batch j, host p holds elements
    ``j * batch_size + p * share + r`` (``share = batch_size / process count``). Every batch adds
    ``index`` [B] int32 (the element) and ``valid`` [B] float32 (0 for the padding that fills the
    last batch; padding rows repeat real elements, so they are well-formed inputs). Elements are
    built ahead in ``num_threads`` threads.
    """
    processes = jax.process_count()
    if batch_size % processes or batch_size % mesh.devices.size:
        raise UserError(f"batch size {batch_size} must be divisible by the {processes} hosts "
                         f"and the {mesh.devices.size} devices")
    if size == 0:
        return
    share = batch_size // processes
    host = jax.process_index()
    num_batches = -(-size // batch_size)

    def element(k: int) -> dict:
        index = (k // share) * batch_size + host * share + k % share
        example = dict(transform(index % size))
        example["index"] = np.int32(index)
        example["valid"] = np.float32(index < size)
        return example

    dataset = grain.MapDataset.range(num_batches * share).map(element).batch(share)
    iterator = iter(dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * share)))
    for local in iterator:
        yield sharding.global_batch(local, mesh)
