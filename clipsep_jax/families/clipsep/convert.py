"""Convert PyTorch checkpoints of the reference (sony/CLIPSep) into Flax variables.

The reference's training script saves ``model.state_dict()`` of a ``DataParallel`` wrapper, so keys
usually start with ``module.``; both forms are accepted. Files are read with
``torch.load(..., weights_only=True)``, which never unpickles arbitrary objects.

One table (:func:`key_table`) pairs every reference key with a Flax variable path and a layout
change; it drives both the validation (missing, unexpected and mis-shaped keys are refused by name)
and the conversion.

The command ``python -m clipsep_jax.convert`` (:mod:`clipsep_jax.convert`) reaches this through
the family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import jax
import ml_collections
import numpy as np

from clipsep_jax.config import default_config
from clipsep_jax.encoders.common import read_weight_file
from clipsep_jax.errors import UserError
from clipsep_jax.families.clipsep.model import KINDS as MODEL_KINDS
from clipsep_jax.families.clipsep.model import init_variables

_UNET = "sound_net.unet_block.model."
_IGNORED_SUFFIXES = (".num_batches_tracked",)


@dataclasses.dataclass(frozen=True)
class KeyMapping:
    """One reference tensor and where it goes.

    layout: 'copy'; 'linear' (PyTorch [out, in] -> [in, out]); 'conv' (OIHW -> HWIO).
    index: for stacked Flax parameters (noise heads), the slot along the first axis.
    """

    torch_key: str
    flax_path: tuple[str, ...]  # ('params' | 'batch_stats', module, ..., leaf)
    layout: str = "copy"
    index: int | None = None


def _to_flax_layout(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return array.T
    if layout == "conv":
        return np.transpose(array, (2, 3, 1, 0))
    return array


def _level_prefix(level: int) -> str:
    """State-dict prefix of U-Net level ``level`` (0 = outermost) in the reference's nesting."""
    if level == 0:
        return _UNET
    return _UNET + "1." + "model.3." * (level - 1) + "model."


def _batch_norm(torch_prefix: str, flax_module: tuple[str, ...]) -> list[KeyMapping]:
    return [
        KeyMapping(torch_prefix + "weight", ("params", *flax_module, "scale")),
        KeyMapping(torch_prefix + "bias", ("params", *flax_module, "bias")),
        KeyMapping(torch_prefix + "running_mean", ("batch_stats", *flax_module, "mean")),
        KeyMapping(torch_prefix + "running_var", ("batch_stats", *flax_module, "var")),
    ]


def key_table(config: ml_collections.ConfigDict) -> list[KeyMapping]:
    """Every tensor of a reference checkpoint of ``config``'s kind and sizes, with its Flax home."""
    depth = config.model.num_downs
    unet = ("unet",)
    table = _batch_norm("sound_net.bn0.", (*unet, "input_norm"))
    for level in range(depth):
        prefix = _level_prefix(level)
        conv = lambda name: ("params", *unet, name, "kernel")
        if level == 0:
            table.append(KeyMapping(prefix + "0.weight", conv("down_conv_0"), "conv"))
            table.append(KeyMapping(prefix + "4.weight", conv("up_conv_0"), "conv"))
            table.append(KeyMapping(prefix + "4.bias", ("params", *unet, "up_conv_0", "bias")))
        elif level == depth - 1:
            table.append(KeyMapping(prefix + "1.weight", conv(f"down_conv_{level}"), "conv"))
            table.append(KeyMapping(prefix + "4.weight", conv(f"up_conv_{level}"), "conv"))
            table += _batch_norm(prefix + "5.", (*unet, f"up_norm_{level}"))
        else:
            table.append(KeyMapping(prefix + "1.weight", conv(f"down_conv_{level}"), "conv"))
            table += _batch_norm(prefix + "2.", (*unet, f"down_norm_{level}"))
            table.append(KeyMapping(prefix + "6.weight", conv(f"up_conv_{level}"), "conv"))
            table += _batch_norm(prefix + "7.", (*unet, f"up_norm_{level}"))

    kind = config.model.kind
    if kind == "pit":
        table.append(
            KeyMapping("synth_net.weight", ("params", "output_conv", "kernel"), "conv")
        )
        table.append(KeyMapping("synth_net.bias", ("params", "output_conv", "bias")))
        return table
    projection = ("params", "query_projection", "dense")
    table += [
        KeyMapping("frame_net.weight", (*projection, "kernel"), "linear"),
        KeyMapping("frame_net.bias", (*projection, "bias")),
        KeyMapping("synth_net.scale", ("params", "mask_synthesis", "scale")),
        KeyMapping("synth_net.bias", ("params", "mask_synthesis", "bias")),
    ]
    if kind == "clipsep_nit":
        for head in range(config.model.num_noise_heads):
            table.append(
                KeyMapping(f"pit_nets.{head}.weight", ("params", "noise_heads_kernel"),
                           "linear", head)
            )
            table.append(
                KeyMapping(f"pit_nets.{head}.bias", ("params", "noise_heads_bias"), index=head)
            )
    if kind == "labelsep":
        table.append(
            KeyMapping("label_net.weight", ("params", "label_embedding", "embedding"))
        )
    return table


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict (weights only) as numpy arrays, ``module.`` prefixes stripped
    (:func:`clipsep_jax.encoders.common.read_weight_file`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    return read_weight_file(str(path))


def _require(state: Mapping[str, np.ndarray], key: str, source: str) -> np.ndarray:
    if key not in state:
        raise UserError(f"{source}: missing key {key!r}")
    return state[key]


def infer_config(
    state: Mapping[str, np.ndarray], model_kind: str, source: str = "checkpoint"
) -> ml_collections.ConfigDict:
    """The configuration of ``model_kind`` at the sizes the state dict's tensors imply."""
    if model_kind not in MODEL_KINDS:
        raise UserError(f"model_kind={model_kind!r}: expected one of {', '.join(MODEL_KINDS)}")
    config = default_config(model_kind)
    outer_down = _require(state, _UNET + "0.weight", source)
    if outer_down.ndim != 4 or outer_down.shape[1] != 1:
        raise UserError(
            f"{source}: key {_UNET + '0.weight'!r} has shape {outer_down.shape}, expected "
            "[base_width, 1, 4, 4]"
        )
    config.model.base_width = int(outer_down.shape[0])
    config.model.num_mask_channels = int(_require(state, _UNET + "4.weight", source).shape[0])
    depth = 1
    while _level_prefix(depth) + "1.weight" in state:
        depth += 1
    config.model.num_downs = depth
    if model_kind == "pit":
        config.num_sources = int(_require(state, "synth_net.weight", source).shape[0])
    else:
        config.model.query_dim = int(_require(state, "frame_net.weight", source).shape[-1])
    if model_kind == "clipsep_nit":
        heads = 0
        while f"pit_nets.{heads}.weight" in state:
            heads += 1
        if heads == 0:
            raise UserError(f"{source}: missing key 'pit_nets.0.weight' (a NIT noise head)")
        config.model.num_noise_heads = heads
        config.num_sources = min(config.num_sources, heads)
    if model_kind == "labelsep":
        config.model.num_labels = int(_require(state, "label_net.weight", source).shape[0])
    return config


def convert_state_dict(
    state: Mapping[str, np.ndarray], config: ml_collections.ConfigDict, source: str = "checkpoint"
) -> dict:
    """Flax variables {'params', 'batch_stats'} from a reference state dict of ``config``'s model.

    Raises ValueError naming the first missing key, every unexpected key, or a key whose shape
    differs from what ``config`` implies.
    """
    shapes = jax.eval_shape(lambda: init_variables(config, jax.random.key(0)))
    table = key_table(config)
    known = {entry.torch_key for entry in table}
    unexpected = sorted(
        key for key in state if key not in known and not key.endswith(_IGNORED_SUFFIXES)
    )
    if unexpected:
        raise UserError(
            f"{source}: unexpected key(s) for a {config.model.kind} model: {', '.join(unexpected)}"
        )
    leaves: dict[tuple[str, ...], np.ndarray] = {}
    for entry in table:
        tensor = _require(state, entry.torch_key, source)
        target = shapes
        for part in entry.flax_path:
            target = target[part]
        expected = tuple(target.shape[1:] if entry.index is not None else target.shape)
        value = _to_flax_layout(np.asarray(tensor, np.float32), entry.layout)
        if value.shape != expected:
            torch_shape = tuple(tensor.shape)
            raise UserError(
                f"{source}: key {entry.torch_key!r} has shape {torch_shape}, but the "
                f"{config.model.kind} model at these sizes needs {expected} (Flax layout of "
                f"{'/'.join(entry.flax_path)})"
            )
        if entry.index is None:
            leaves[entry.flax_path] = value
        else:
            stacked = leaves.setdefault(entry.flax_path, np.zeros(target.shape, np.float32))
            stacked[entry.index] = value
    variables: dict = {}
    for path, value in leaves.items():
        node = variables
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return variables


def load_reference_checkpoint(
    path: str | Path, model_kind: str
) -> tuple[ml_collections.ConfigDict, dict]:
    """Reads a reference PyTorch checkpoint -> (config at the checkpoint's sizes, Flax variables).

    Args:
      path: a ``.pt``/``.pth`` state dict saved by the reference's training script.
      model_kind: one of ``clipsep``, ``clipsep_nit``, ``pit``, ``labelsep``, ``sop`` (the
        reference's ``--image_model sop``: CLIPSep's layout on ResNet vectors; the frozen
        ResNet is not in the checkpoint) or ``bertsep`` (``--image_model bert``: a
        ``frame_net`` of 256 inputs; the label vectors are not in the checkpoint either).
    """
    state = read_state_dict(path)
    config = infer_config(state, model_kind, source=str(path))
    return config, convert_state_dict(state, config, source=str(path))
