"""Convert the reference's (microsoft/BiModalAudioSeparation) PyTorch state dicts into Flax
variables of :class:`~clipsep_jax.families.weaksep.unet.CondAttentionUNet` and
:class:`~clipsep_jax.families.weaksep.unet.QueryHead`.

Two layouts are read; a leading ``module.`` (the DDP wrapper) is dropped from every key:

- the training checkpoint's ``state_dict`` (``NetWrapper``): ``net_sound.bn0.*``,
  ``net_sound.unet_block.`` + ``submodule.`` x level + the level's layer, ``net_clap.fc.*`` and
  ``net_synthesizer.{scale,bias}``. The frozen CLAP copy (``net_clap.model.*``) and the fixed STFT
  weights (``stft.*``, ``istft.*``) are skipped: the CLAP encoder converts its own weights.
- ``net_sound``'s own state dict (``bn0.*``, ``unet_block.*``): the U-Net only.

Every key must be known and every expected key present (the reference loads with
``strict=False`` and would leave a mis-named network random); both are refused by name with
:class:`~clipsep_jax.errors.UserError`, as are tensors whose shapes disagree with the sizes the
checkpoint implies. The number of levels, widths, attention levels, residual layers, conditioning
blocks and ``cond_dim`` are read from the keys and shapes (:func:`unet_settings_from_state_dict`);
the number of heads is not in the weights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipsep_jax.config import default_config
from clipsep_jax.encoders.common import read_weight_file
from clipsep_jax.errors import UserError
from clipsep_jax.families.weaksep.unet import CondAttentionUNet, QueryHead

_SKIPPED_PREFIXES = ("net_clap.model.", "stft.", "istft.")
_IGNORED_SUFFIXES = (".num_batches_tracked",)
_LEVEL_KEY = re.compile(r"^unet_block\.((?:submodule\.)*)(.+)$")

_BATCH_NORM = {"weight": ("params", "scale"), "bias": ("params", "bias"),
               "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_LAYER_NORM = {"weight": "scale", "bias": "bias"}
# Reference names inside one SCA block -> Flax path inside ConditioningBlock.
_BLOCKS = {"sa_block": "self_block", "ca_block": "cross_block"}
_ATTENTION = {"qkv": "qkv", "q": "query", "kv": "key_value", "proj": "out"}
_BLOCK_NORMS = {"norm1": "attention_norm", "norm2": "mlp_norm"}


def _as_numpy(value: Any) -> np.ndarray:
    """A float32 copy: a torch tensor's ``numpy()`` shares its memory, and the module may go on
    updating it (BatchNorm running statistics) after the conversion."""
    if hasattr(value, "detach"):  # a torch tensor; torch itself is not imported here
        value = value.detach().cpu().numpy()
    return np.array(value, np.float32, copy=True)


def _strip(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """Keys without ``module.``, skipped and ignored keys dropped -> (state, wrapper layout)."""
    state = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.endswith(_IGNORED_SUFFIXES) or key.startswith(_SKIPPED_PREFIXES):
            continue
        state[key] = value
    wrapper = any(key.startswith("net_sound.") for key in state)
    return state, wrapper


def _level_keys(unet: Mapping[str, Any]) -> dict[int, set[str]]:
    """U-Net keys (without ``net_sound.``) grouped by level: {level: {key inside the level}}."""
    levels: dict[int, set[str]] = {}
    for key in unet:
        match = _LEVEL_KEY.match(key)
        if match:
            level = match.group(1).count("submodule.")
            levels.setdefault(level, set()).add(match.group(2))
    return levels


def _count(keys: set[str], pattern: str) -> int:
    """1 + the largest index that ``pattern`` (one integer group) matches in ``keys``, else 0."""
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def unet_settings_from_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`CondAttentionUNet` fields the state dict's keys and shapes imply: num_downs,
    base_width, out_channels, attention_levels, cond_dim, num_res_layers, num_cond_blocks."""
    state, wrapper = _strip(state_dict)
    unet = {k.removeprefix("net_sound."): v for k, v in state.items()
            if k.startswith("net_sound.") or not wrapper}
    levels = _level_keys(unet)
    if not levels or 0 not in levels:
        raise UserError(
            "state dict: no U-Net keys found (expected 'net_sound.unet_block.downconv.weight' or "
            "'unet_block.downconv.weight', optionally after 'module.')")
    num_downs = max(levels) + 1
    missing_levels = [d for d in range(num_downs) if d not in levels]
    if missing_levels:
        raise UserError(f"state dict: no keys for U-Net level(s) {missing_levels}")
    outer = "unet_block."
    settings: dict[str, Any] = {"num_downs": num_downs}
    for field, key, axis in (("base_width", outer + "downconv.weight", 0),
                             ("out_channels", outer + "upconv.weight", 0)):
        if key not in unet:
            raise UserError(f"state dict: missing key {_prefixed(key, wrapper)!r}")
        settings[field] = int(np.shape(unet[key])[axis])
    attention_levels = tuple(d for d in range(num_downs)
                             if any(k.startswith("ca_blocks.") for k in levels[d]))
    settings["attention_levels"] = attention_levels
    settings["num_res_layers"] = max(
        _count(levels[0], r"downresblock\.res_layers\.(\d+)\."), 1)
    if attention_levels:
        inner = levels[attention_levels[0]]
        settings["num_cond_blocks"] = _count(inner, r"ca_blocks\.(\d+)\.")
        kv = ("unet_block." + "submodule." * attention_levels[0]
              + "ca_blocks.0.ca_block.attn.kv.weight")
        if kv not in unet:
            raise UserError(f"state dict: missing key {_prefixed(kv, wrapper)!r}")
        settings["cond_dim"] = int(np.shape(unet[kv])[1])
    return settings


def _prefixed(key: str, wrapper: bool) -> str:
    return "net_sound." + key if wrapper else key


def _batch_norm(prefix: str, path: tuple[str, ...]) -> dict[str, tuple[tuple[str, ...], str]]:
    return {prefix + name: ((kind, *path, leaf), "copy")
            for name, (kind, leaf) in _BATCH_NORM.items()}


def _res_block(prefix: str, path: tuple[str, ...], layers: int) -> dict:
    table = {}
    for i in range(layers):
        table[f"{prefix}res_layers.{i}.0.weight"] = (("params", *path, f"conv_{i}", "kernel"),
                                                     "conv")
        table[f"{prefix}res_layers.{i}.0.bias"] = (("params", *path, f"conv_{i}", "bias"), "copy")
        table.update(_batch_norm(f"{prefix}res_layers.{i}.1.", (*path, f"norm_{i}")))
    return table


def _cond_block(prefix: str, path: tuple[str, ...]) -> dict:
    table = {f"{prefix}norm1.{n}": (("params", *path, "unused_norm", leaf), "copy")
             for n, leaf in _LAYER_NORM.items()}
    for block, flax_block in _BLOCKS.items():
        linears = ("qkv",) if block == "sa_block" else ("q", "kv")
        for name in (*linears, "proj"):
            target = ("params", *path, flax_block, "attention", _ATTENTION[name])
            table[f"{prefix}{block}.attn.{name}.weight"] = ((*target, "kernel"), "linear")
            table[f"{prefix}{block}.attn.{name}.bias"] = ((*target, "bias"), "copy")
        for name in ("fc1", "fc2"):
            target = ("params", *path, flax_block, "mlp", name)
            table[f"{prefix}{block}.mlp.{name}.weight"] = ((*target, "kernel"), "linear")
            table[f"{prefix}{block}.mlp.{name}.bias"] = ((*target, "bias"), "copy")
        for name, flax_norm in _BLOCK_NORMS.items():
            for n, leaf in _LAYER_NORM.items():
                table[f"{prefix}{block}.{name}.{n}"] = (
                    ("params", *path, flax_block, flax_norm, leaf), "copy")
    return table


def key_table(settings: Mapping[str, Any], wrapper: bool) -> dict:
    """{reference key: ((collection, 'unet' | 'query_head', ..., leaf), layout)} for a model of
    ``settings`` (:func:`unet_settings_from_state_dict`); layout is 'copy', 'linear' ([out, in] ->
    [in, out]) or 'conv' (OIHW -> HWIO)."""
    sound = "net_sound." if wrapper else ""
    table = _batch_norm(sound + "bn0.", ("unet", "input_norm"))
    layers = settings["num_res_layers"]
    for level in range(settings["num_downs"]):
        prefix = sound + "unet_block." + "submodule." * level
        unet = lambda name, level=level: ("unet", f"{name}_{level}")
        table[prefix + "downconv.weight"] = (("params", *unet("down_conv"), "kernel"), "conv")
        table.update(_batch_norm(prefix + "downnorm.", unet("down_norm")))
        table.update(_res_block(prefix + "downresblock.", unet("down_res"), layers))
        if level in settings["attention_levels"]:
            for block in range(settings["num_cond_blocks"]):
                table.update(_cond_block(f"{prefix}ca_blocks.{block}.",
                                         ("unet", f"cond_block_{level}_{block}")))
        table.update(_res_block(prefix + "upresblock.", unet("up_res"), layers))
        table[prefix + "upconv.weight"] = (("params", *unet("up_conv"), "kernel"), "conv")
        if level == 0:
            table[prefix + "upconv.bias"] = (("params", *unet("up_conv"), "bias"), "copy")
        else:
            table.update(_batch_norm(prefix + "upnorm.", unet("up_norm")))
    if wrapper:
        projection = ("params", "query_head", "query_projection", "dense")
        synthesis = ("params", "query_head", "mask_synthesis")
        table["net_clap.fc.weight"] = ((*projection, "kernel"), "linear")
        table["net_clap.fc.bias"] = ((*projection, "bias"), "copy")
        table["net_synthesizer.scale"] = ((*synthesis, "scale"), "copy")
        table["net_synthesizer.bias"] = ((*synthesis, "bias"), "copy")
    return table


def _expected_shapes(settings: Mapping[str, Any], embedding_dim: int | None) -> dict:
    """Flax variable shapes {'params': {'unet', 'query_head' (with an embedding_dim)},
    'batch_stats': {'unet'}}, traced without allocating."""
    size = 2 ** settings["num_downs"]
    cond_dim = settings.get("cond_dim", CondAttentionUNet.cond_dim)
    unet = jax.eval_shape(lambda: CondAttentionUNet(num_heads=1, **settings).init(
        jax.random.key(0), jnp.zeros((1, size, size, 1)), jnp.zeros((1, 1, cond_dim))))
    shapes = {"params": {"unet": unet["params"]}, "batch_stats": {"unet": unet["batch_stats"]}}
    if embedding_dim is not None:
        channels = settings["out_channels"]
        head = jax.eval_shape(lambda: QueryHead(channels).init(
            jax.random.key(0), jnp.zeros((1, 1, 1, channels)), jnp.zeros((1, embedding_dim))))
        shapes["params"]["query_head"] = head["params"]
    return shapes


def _layout(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return array.T
    if layout == "conv":
        return np.transpose(array, (2, 3, 1, 0))
    return array


def params_from_reference_state_dict(state_dict: Mapping[str, Any]) -> tuple[dict, dict]:
    """Flax variables from a reference state dict (numpy arrays or torch tensors by key).

    Returns:
      (params, batch_stats): params = {'unet': ..., 'query_head': ...} ('query_head' only from a
      training checkpoint's layout), batch_stats = {'unet': ...}; every array float32 numpy, for
      ``CondAttentionUNet(**unet_settings_from_state_dict(sd), num_heads=8)`` and
      ``QueryHead(out_channels)``.
    Raises:
      UserError: naming every unexpected key, the missing keys, or a key of the wrong shape.
    """
    state, wrapper = _strip(state_dict)
    settings = unet_settings_from_state_dict(state)
    table = key_table(settings, wrapper)
    unexpected = sorted(set(state) - set(table))
    missing = sorted(set(table) - set(state))
    if unexpected or missing:
        problems = [f"{what} key(s) {', '.join(map(repr, keys))}"
                    for what, keys in (("unexpected", unexpected), ("missing", missing)) if keys]
        raise UserError(f"state dict of a U-Net of {settings}: {'; '.join(problems)}")
    embedding_dim = int(np.shape(state["net_clap.fc.weight"])[-1]) if wrapper else None
    expected = _expected_shapes(settings, embedding_dim)
    variables: dict = {"params": {}, "batch_stats": {}}
    for key, (path, layout) in table.items():
        value = _layout(_as_numpy(state[key]), layout)
        target = expected
        for part in path:
            target = target[part]
        if value.shape != tuple(target.shape):
            raise UserError(
                f"state dict: key {key!r} has shape {_as_numpy(state[key]).shape}, expected "
                f"{tuple(target.shape)} in Flax layout ({'/'.join(path)}) for a U-Net of "
                f"{settings}")
        node = variables
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return variables["params"], variables["batch_stats"]


def load_reference_checkpoint(path: str | Path) -> tuple[ml_collections.ConfigDict, dict]:
    """The reference's training checkpoint (``model_best.pth.tar``, ``model_latest.pth.tar``:
    its ``state_dict``, read with ``weights_only``) -> (a ``weaksep`` config at the checkpoint's
    sizes, Flax variables ``{"params": {"unet", "query_head"}, "batch_stats": {"unet"}}``).

    The number of attention heads is not in the weights: the released scripts' 8 is kept. The
    frozen CLAP is not converted from the checkpoint's copy: ``weaksep.clap`` names LAION's
    ``laion/larger_clap_music`` (the architecture of the paper's
    ``music_audioset_epoch_15_esc_90.14.pt``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    state = read_weight_file(str(path))
    try:
        settings = unet_settings_from_state_dict(state)
        params, batch_stats = params_from_reference_state_dict(state)
    except UserError as e:
        raise UserError(f"{path}: {e}") from e
    if "query_head" not in params:
        raise UserError(f"{path}: a U-Net state dict without the query head (net_clap.fc, "
                        "net_synthesizer); give the training checkpoint")
    config = default_config("weaksep")
    for field, value in settings.items():
        config.model[field] = value
    kernel = params["query_head"]["query_projection"]["dense"]["kernel"]
    config.model.embedding_dim = int(kernel.shape[0])
    return config, {"params": params, "batch_stats": batch_stats}
