"""DALLE2-pytorch prior checkpoints (LAION's published priors) -> :class:`PriorNetwork` params.

A checkpoint is read with ``torch.load(weights_only=True)`` (the packaging ``Version`` object
that DALLE2-pytorch's trainer stores beside the weights is allowed by name, nothing else that is
not a tensor or a container). It may be a trainer checkpoint (``ema_model`` is used when present,
then ``model``) or a bare state dict. Keys under ``net.`` are the network; ``noise_scheduler.*``
buffers are checked against :func:`~.prior.cosine_schedule` and ``clip.*`` (an attached CLIP) is
ignored. The network's sizes come from the shapes (LAION's configs disagree on depth and heads);
the variant from the null tokens: ``null_text_embed`` alone is the 1.1.0 code (``"laion"``),
``null_text_encodings`` with ``null_text_embeds`` and ``null_image_embed`` the current code.
Any other key is refused by name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from clipsep_jax.errors import UserError
from clipsep_jax.families.prior.network import ROTARY_MAX_DIM, PriorNetwork, cosine_schedule

__all__ = ["read_prior_state_dict", "prior_from_state_dict", "load_prior_checkpoint"]


def _packaging_globals() -> list[Any]:
    try:
        from packaging import _structures, version
    except ImportError:
        return []
    return [version.Version, version._Version, _structures.InfinityType,
            _structures.NegativeInfinityType]


def read_prior_state_dict(path: str) -> dict[str, np.ndarray]:
    """The network's tensors (``net.`` stripped) and the schedule's (``noise_scheduler.``
    kept) of a DALLE2-pytorch prior checkpoint, as float32 numpy arrays."""
    try:
        import torch  # optional ([convert] extra): only PyTorch pickles need it
    except ImportError as e:
        raise UserError(f"{path} is a PyTorch pickle; reading it needs torch "
                        "(pip install 'clipsep-jax[convert]')") from e
    try:
        with torch.serialization.safe_globals(_packaging_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise UserError(f"{path}: no such prior checkpoint") from e
    except Exception as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UserError(
                f"{path}: holds pickled Python objects besides tensors (a trainer checkpoint's "
                "optimizer or warmup scheduler, say), which are not loaded unchecked; save its "
                "EMA model's state dict alone where you trust the file: torch.save(torch.load("
                "f, weights_only=False)['ema_model'], 'prior.pth')") from e
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    if not isinstance(checkpoint, Mapping):
        raise UserError(f"{path}: expected a dict, got {type(checkpoint).__name__}")
    for name in ("ema_model", "model"):
        if isinstance(checkpoint.get(name), Mapping):
            checkpoint = checkpoint[name]
            break
    out = {}
    for key, value in checkpoint.items():
        if key.startswith("clip.") or not isinstance(value, torch.Tensor):
            continue
        name = key.removeprefix("module.")
        name = name.removeprefix("net.") if name.startswith("net.") else name
        out[name] = value.detach().to(torch.float32).numpy()
    if "learned_query" not in out:
        raise UserError(f"{path}: no net.learned_query: not a DALLE2-pytorch diffusion prior")
    return out


_LAYER = re.compile(r"causal_transformer\.layers\.(\d+)\.([01])\.(.+)")
_ATTENTION = {"null_kv": ("null_kv", False), "norm.g": ("norm/g", False),
              "to_q.weight": ("to_q/kernel", True), "to_kv.weight": ("to_kv/kernel", True),
              "to_out.0.weight": ("to_out/kernel", True), "to_out.1.g": ("out_norm/g", False)}
_FEED_FORWARD = {"0.g": ("norm/g", False), "1.weight": ("proj_in/kernel", True),
                 "3.g": ("inner_norm/g", False), "5.weight": ("proj_out/kernel", True)}
_TOP = {"learned_query": ("learned_query", False),
        "to_time_embeds.0.weight": ("time_embedding/embedding", False),
        "causal_transformer.rel_pos_bias.relative_attention_bias.weight":
            ("relative_attention_bias", False),
        "causal_transformer.init_norm.g": ("init_norm/g", False),
        "causal_transformer.norm.g": ("final_norm/g", False),
        "causal_transformer.project_out.weight": ("project_out/kernel", True)}
for _i in range(3):
    _source = f"to_time_embeds.0.1.net.{_i}" + (".0" if _i < 2 else "")
    _TOP[f"{_source}.weight"] = (f"time_mlp_{_i}/kernel", True)
    _TOP[f"{_source}.bias"] = (f"time_mlp_{_i}/bias", False)


def prior_from_state_dict(state: Mapping[str, np.ndarray], source: str = "the checkpoint"
                          ) -> tuple[PriorNetwork, dict]:
    """(the network its shapes describe, its Flax params) from a state dict as
    :func:`read_prior_state_dict` returns it; a key the network does not have is refused."""
    state = dict(state)
    dim = int(state["learned_query"].shape[0])
    if "null_text_embeds" in state or "null_image_embed" in state:
        variant, null_key = "head", "null_text_encodings"
    else:
        variant, null_key = "laion", "null_text_embed"
    if null_key not in state:
        raise UserError(f"{source}: no {null_key} (the null text tokens)")
    layers = sorted({int(m.group(1)) for k in state if (m := _LAYER.match(k))})
    if not layers or layers != list(range(len(layers))):
        raise UserError(f"{source}: transformer layers {layers}: expected 0..depth-1")
    null_kv = state["causal_transformer.layers.0.0.null_kv"]
    dim_head = int(null_kv.shape[1])
    heads = int(state["causal_transformer.layers.0.0.to_q.weight"].shape[0]) // dim_head
    inner = int(state["causal_transformer.layers.0.1.1.weight"].shape[0]) // 2
    time_table = state.get("to_time_embeds.0.weight")
    network = PriorNetwork(
        dim=dim, depth=len(layers), dim_head=dim_head, heads=heads, ff_mult=inner / dim,
        num_timesteps=0 if time_table is None else int(time_table.shape[0]),
        max_text_len=int(state[null_key].shape[-2]),
        normformer="causal_transformer.layers.0.1.3.g" in state,
        norm_in="causal_transformer.init_norm.g" in state,
        final_proj="causal_transformer.project_out.weight" in state, variant=variant)

    params: dict[str, Any] = {}

    def put(path: str, value: np.ndarray, transpose: bool) -> None:
        node = params
        *parents, leaf = path.split("/")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = np.ascontiguousarray(value.T if transpose else value)

    schedule = cosine_schedule(network.num_timesteps or 1000)
    rot_dim = min(ROTARY_MAX_DIM, dim_head)
    freqs = 1.0 / (10000.0 ** (np.arange(0, rot_dim, 2, dtype=np.float32) / rot_dim))
    for key, value in state.items():
        if key == null_key:
            put("null_text_encodings", value.reshape(-1, dim), False)
        elif variant == "head" and key == "null_text_embeds":
            put("null_text_embed", value.reshape(dim), False)
        elif variant == "head" and key == "null_image_embed":
            put("null_image_embed", value.reshape(dim), False)
        elif key in _TOP:
            put(_TOP[key][0], value, _TOP[key][1])
        elif key.startswith("noise_scheduler."):
            name = key.removeprefix("noise_scheduler.")
            if name == "alphas_cumprod" and (value.shape != schedule[name].shape or
                                             not np.allclose(value, schedule[name], atol=1e-5)):
                raise UserError(f"{source}: its noise schedule is not the cosine schedule "
                                "this prior samples with")
        elif m := _LAYER.match(key):
            layer, block, rest = int(m.group(1)), m.group(2), m.group(3)
            if block == "0" and rest == "rotary_emb.freqs":
                if not np.allclose(value, freqs, rtol=1e-6):
                    raise UserError(f"{source}: {key} are not the rotary frequencies "
                                    f"of {rot_dim} dimensions")
                continue
            table = _ATTENTION if block == "0" else _FEED_FORWARD
            if rest not in table:
                raise UserError(f"{source}: unexpected key {key!r}")
            module = f"attention_{layer}" if block == "0" else f"feed_forward_{layer}"
            target, transpose = table[rest]
            put(f"{module}/{target}", value, transpose)
        else:
            raise UserError(f"{source}: unexpected key {key!r}")
    _check_against_network(network, params, source)
    return network, params


def _check_against_network(network: PriorNetwork, params: dict, source: str) -> None:
    """Every parameter the network has, with its shape, and nothing else."""
    batch = 1
    shapes = jax.eval_shape(lambda: network.init(
        jax.random.key(0), jnp.zeros((batch, network.dim)), jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch, network.dim))))["params"]
    expected = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(shapes).items()}
    got = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(params).items()}
    missing = sorted(set(expected) - set(got))
    if missing:
        raise UserError(f"{source}: missing weights for {missing}")
    wrong = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    if wrong:
        raise UserError(f"{source}: shapes (found, expected) differ: {wrong}")


def load_prior_checkpoint(path: str) -> tuple[PriorNetwork, dict]:
    """A DALLE2-pytorch prior checkpoint file -> (:class:`PriorNetwork`, Flax params)."""
    return prior_from_state_dict(read_prior_state_dict(path), path)
