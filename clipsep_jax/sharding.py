"""The device mesh and every sharding rule of training, in one place.

The mesh has two named axes:

- ``data``: data parallelism. The global batch is split over ``data`` x ``fsdp`` (every device
  holds a different slice of the batch).
- ``fsdp``: additionally shards parameters and optimizer state (fully sharded data parallelism):
  each large array is split along one dimension over ``fsdp`` and gathered where it is used;
  XLA inserts the collectives. With ``fsdp = 1`` (the default) parameters are replicated.

BatchNorm statistics are replicated; because the model runs on the global batch array, its batch
means are over the global batch.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "AXES",
    "make_mesh",
    "batch_sharding",
    "replicated",
    "parameter_spec",
    "state_shardings",
    "global_batch",
]

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def make_mesh(
    config: ml_collections.ConfigDict, devices: list[jax.Device] | None = None
) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: every device of every host).

    ``config.mesh.data = -1`` takes whatever ``fsdp`` leaves.
    """
    devices = list(devices if devices is not None else jax.devices())
    fsdp = int(config.mesh.fsdp)
    data = int(config.mesh.data)
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"config.mesh.fsdp={fsdp} does not divide the {len(devices)} devices")
    if data == -1:
        data = len(devices) // fsdp
    if data * fsdp != len(devices):
        raise ValueError(
            f"config.mesh: data={data} x fsdp={fsdp} != {len(devices)} devices; "
            "set data=-1 to use all"
        )
    try:
        grid = mesh_utils.create_device_mesh((data, fsdp), devices)
    except (ValueError, AssertionError, NotImplementedError):
        grid = np.array(devices).reshape(data, fsdp)
    return Mesh(grid, AXES)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis split over every device; the other axes whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def parameter_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> PartitionSpec:
    """FSDP rule: split the largest dimension divisible by ``fsdp`` of arrays with at least
    ``min_size`` elements over ``fsdp``; replicate the rest (small arrays, scalars)."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def state_shardings(state: Any, mesh: Mesh, config: ml_collections.ConfigDict) -> Any:
    """NamedShardings for a train state (or its ``jax.eval_shape``): parameters and Adam moments
    by :func:`parameter_spec`, BatchNorm statistics and counters replicated."""
    fsdp = mesh.shape["fsdp"]
    min_size = int(config.mesh.fsdp_min_size)

    def rule(path, leaf):
        names = {getattr(k, "name", getattr(k, "key", None)) for k in path}
        if "batch_stats" in names or not hasattr(leaf, "shape"):
            return replicated(mesh)
        return NamedSharding(mesh, parameter_spec(tuple(leaf.shape), fsdp, min_size))

    return jax.tree_util.tree_map_with_path(rule, state)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-host batches -> global arrays sharded over the batch axes.

    Each host passes its own share (global batch / process count examples, the rows its devices
    hold); on one host this is the whole batch.
    """
    return {
        key: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(value)), value)
        for key, value in local_batch.items()
    }
