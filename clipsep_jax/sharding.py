"""The device mesh and every sharding rule of training, in one place.

The mesh has two named axes:

- ``data``: data parallelism. The global batch is split over ``data`` x ``fsdp`` (every device
  holds a different slice of the batch).
- ``fsdp``: additionally shards parameters and optimizer state (fully sharded data parallelism):
  each large array is split along one dimension over ``fsdp`` and gathered where it is used;
  XLA inserts the collectives. With ``fsdp = 1`` (the default) parameters are replicated.

Model state (e.g. BatchNorm statistics) is replicated; because the model runs on the global
batch array, its batch means are over the global batch.

Several hosts: :func:`initialize_distributed` joins them (TPU pod slices, SLURM jobs, or an
explicit coordinator); :func:`host_rows` and :func:`gather_objects` move per-example results
to where they are reduced.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clipsep_jax.errors import UserError

__all__ = [
    "AXES",
    "make_mesh",
    "batch_sharding",
    "replicated",
    "parameter_spec",
    "state_shardings",
    "global_batch",
    "replicate",
    "host_rows",
    "gather_objects",
    "wants_distributed",
    "initialize_distributed",
    "slurm_local_device_ids",
]

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def make_mesh(
    config: ml_collections.ConfigDict, devices: list[jax.Device] | None = None
) -> Mesh:
    """A ``(data, fsdp)`` mesh of ``config.mesh`` over ``devices`` (default: every device of every
    host). ``config`` may be the whole config or its ``mesh`` section.

    ``mesh.data = -1`` takes whatever ``fsdp`` leaves.
    """
    mesh_config = config.mesh if "mesh" in config else config
    devices = list(devices if devices is not None else jax.devices())
    fsdp = int(mesh_config.fsdp)
    data = int(mesh_config.data)
    if fsdp < 1 or len(devices) % fsdp:
        raise UserError(f"config.mesh.fsdp={fsdp} does not divide the {len(devices)} devices")
    if data == -1:
        data = len(devices) // fsdp
    if data * fsdp != len(devices):
        raise UserError(
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
    """NamedShardings for a train state (or its ``jax.eval_shape``): parameters, their EMA and
    the optimizer's moments by :func:`parameter_spec`; the model state (``model_state``, e.g.
    BatchNorm statistics), the rng key and counters replicated. ``config`` may be the whole
    config or its ``mesh`` section."""
    mesh_config = config.mesh if "mesh" in config else config
    fsdp = mesh.shape["fsdp"]
    min_size = int(mesh_config.fsdp_min_size)

    def rule(path, leaf):
        names = {getattr(k, "name", getattr(k, "key", None)) for k in path}
        if names & {"model_state", "batch_stats", "rng"} or not hasattr(leaf, "shape"):
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


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host arrays (the same on every host) -> global arrays replicated over ``mesh``."""
    spec = replicated(mesh)

    def place(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, spec, lambda index: x[index])

    return jax.tree_util.tree_map(place, tree)


def host_rows(array: jax.Array) -> np.ndarray:
    """The rows (leading axis) of a batch-sharded global array that this host's devices hold,
    in global order, as numpy; rows held twice (replication over fsdp) are taken once."""
    shards = {}
    for shard in array.addressable_shards:
        start = shard.index[0].start or 0
        shards.setdefault(start, shard.data)
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def gather_objects(value: Any) -> list[Any]:
    """Every host's ``value`` (any picklable object), in process order, on every host."""
    if jax.process_count() == 1:
        return [value]
    payload = np.frombuffer(pickle.dumps(value), np.uint8)
    sizes = multihost_utils.process_allgather(np.int64(payload.size))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[: payload.size] = payload
    gathered = multihost_utils.process_allgather(padded)
    return [pickle.loads(gathered[i, : int(sizes[i])].tobytes())
            for i in range(jax.process_count())]


def wants_distributed(mode: str = "auto") -> bool:
    """Whether to call ``jax.distributed.initialize()``: ``on``/``off``, or ``auto``: on TPU pod
    slices (several TPU worker hostnames), under SLURM with several tasks, or when
    ``JAX_COORDINATOR_ADDRESS`` is set."""
    if mode not in ("auto", "on", "off"):
        raise UserError(f"--distributed={mode!r}: expected auto, on or off")
    if mode != "auto":
        return mode == "on"
    return bool(
        os.environ.get("JAX_COORDINATOR_ADDRESS")
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
    )


def initialize_distributed(mode: str = "auto") -> None:
    """Joins the hosts of a multi-host run (see :func:`wants_distributed`); a no-op otherwise.
    ``JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo`` gives CPU hosts their collectives."""
    if not wants_distributed(mode):
        return
    collectives = os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION")
    if collectives:
        jax.config.update("jax_cpu_collectives_implementation", collectives)
    jax.distributed.initialize(local_device_ids=slurm_local_device_ids())


def slurm_local_device_ids() -> list[int] | None:
    """Every GPU of the node for a SLURM job with one task per node (launch/slurm_gpu.sbatch).

    jax's SLURM detection otherwise gives each process only the GPU numbered by its
    ``SLURM_LOCALID``, which suits one task per GPU; with one task per node, the other GPUs
    would sit idle. None (jax's choice) in every other case."""
    gpus = os.environ.get("SLURM_GPUS_ON_NODE", "")
    tasks = os.environ.get("SLURM_NTASKS_PER_NODE", os.environ.get("SLURM_TASKS_PER_NODE", ""))
    if "SLURM_JOB_ID" not in os.environ or not gpus.isdigit() or tasks.split("(")[0] != "1":
        return None
    return list(range(int(gpus)))
