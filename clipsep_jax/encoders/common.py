"""What every frozen encoder shares: reading checkpoint weights, and running a jit-compiled
function over a host batch in fixed-size chunks sharded on the local devices."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors import safe_open

from clipsep_jax.errors import UserError

__all__ = ["DTYPES", "read_weights", "read_weight_file", "BatchedRunner", "check_params"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Weight files looked for in a checkpoint folder or hub repository, in order of preference.
_WEIGHT_FILES = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def read_weights(name_or_path: str, **hub_kwargs: Any) -> dict[str, np.ndarray]:
    """A checkpoint's tensors as float32 numpy arrays, by hub id, folder or single file.

    A folder or hub id gives ``model.safetensors`` (preferred) or ``pytorch_model.bin`` (or a
    sharded index of either), found through transformers' ``cached_file`` so that caches,
    revisions and ``HF_HUB_OFFLINE`` behave as they do there; a file (``.safetensors``, or a
    PyTorch state dict ``.pth``/``.pt``/``.bin`` read with ``weights_only``) is read as it is.
    """
    if os.path.isfile(name_or_path):
        return read_weight_file(name_or_path)
    from transformers.utils import cached_file

    for index_name, single_name in _WEIGHT_FILES:
        files = []
        single = cached_file(
            name_or_path, single_name, _raise_exceptions_for_missing_entries=False, **hub_kwargs
        )
        if single:
            files = [single]
        else:
            index = cached_file(
                name_or_path, index_name, _raise_exceptions_for_missing_entries=False, **hub_kwargs
            )
            if index:
                with open(index) as f:
                    shard_names = sorted(set(json.load(f)["weight_map"].values()))
                files = [cached_file(name_or_path, n, **hub_kwargs) for n in shard_names]
        if files:
            tensors = {}
            for file in files:
                tensors.update(read_weight_file(file))
            return tensors
    raise FileNotFoundError(
        f"{name_or_path}: no model.safetensors or pytorch_model.bin (nor a sharded index) found"
    )


def read_weight_file(file: str) -> dict[str, np.ndarray]:
    """One safetensors file or PyTorch state dict -> float32 numpy arrays by key (a leading
    ``module.`` of a DataParallel wrapper is dropped; ``num_batches_tracked`` kept as is)."""
    if file.endswith(".safetensors"):
        out = {}
        with safe_open(file, framework="flax") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                out[key] = np.asarray(f.get_tensor(key).astype(jnp.float32))
        return out
    try:
        import torch  # optional ([convert] extra): only PyTorch pickles need it
    except ImportError as e:
        raise ImportError(
            f"{file} is a PyTorch pickle; reading it needs torch "
            "(pip install 'clipsep-jax[convert]') or a model.safetensors beside it"
        ) from e
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{file}: not a readable PyTorch weights file ({e})") from e
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(
            state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise UserError(f"{file}: expected a state dict (tensors by name), got {type(state)}")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{file}: entry {key!r} is a {type(value).__name__}, not a tensor")
        name = key.removeprefix("module.")
        if name in out:
            raise UserError(f"{file}: key {name!r} appears with and without the 'module.' "
                            "prefix")
        out[name] = value.detach().float().numpy()
    return out


def check_params(params: Mapping, expected: Mapping, what: str, unexpected: list[str],
                 wrong_shape: list[str]) -> None:
    """Raises ValueError naming the missing, unexpected and mis-shaped entries of a converted
    checkpoint (``params`` and ``expected``: flat dicts by path)."""
    missing = [".".join(p) for p in expected if p not in params]
    problems = []
    if missing:
        problems.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if wrong_shape:
        problems.append(f"wrong shape {wrong_shape[:8]}")
    if problems:
        raise ValueError(f"{what} checkpoint does not fit the configured model: "
                         + "; ".join(problems))


def flat_shapes(tree: Mapping) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(dict(tree))


class BatchedRunner:
    """Runs ``fn(*arrays)`` over host arrays in chunks of at most ``batch_size`` rows, each
    padded to a power of two (few compiled shapes) and sharded over ``mesh``'s first axis.

    ``fn`` is jit-compiled with its output sharded like its input; the result is a numpy array
    of the rows asked for.
    """

    def __init__(self, mesh: Mesh | None, batch_size: int):
        self.mesh = mesh or Mesh(np.array(jax.local_devices()), ("data",))
        devices = self.mesh.devices.shape[0]
        self.batch_size = max(devices, -(-batch_size // devices) * devices)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(self.mesh.axis_names[0]))

    def jit(self, fn: Callable) -> Callable:
        return jax.jit(fn, out_shardings=self.batch_sharding)

    def __call__(self, fn: Callable, *arrays: np.ndarray) -> np.ndarray:
        total = len(arrays[0])
        outputs = []
        for start in range(0, total, self.batch_size):
            chunk = [a[start : start + self.batch_size] for a in arrays]
            n = len(chunk[0])
            size = self._bucket(n)
            chunk = [np.concatenate([c, np.repeat(c[-1:], size - n, axis=0)]) for c in chunk]
            chunk = [jax.device_put(c, self.batch_sharding) for c in chunk]
            outputs.append((fn(*chunk), n))
        return np.concatenate([np.asarray(out)[:n] for out, n in outputs])

    def _bucket(self, n: int) -> int:
        devices = self.mesh.devices.shape[0]
        size = max(devices, 1 << max(0, math.ceil(math.log2(n))))
        size = -(-size // devices) * devices
        return min(size, self.batch_size)
