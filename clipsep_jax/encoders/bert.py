"""A frozen BERT-family text encoder: BERTSep's label embeddings.

    bert = BERT.from_pretrained("google/bert_uncased_L-4_H-256_A-4")  # hub id or local folder
    vectors = bert.encode_text(["acoustic guitar", "tuba"])  # [2, 256] float32

BERTSep (the CLIPSep paper's text-only baseline) queries the separator with a fixed embedding of
each label from a language model that never saw images. The reference reads 256-wide label
vectors from a file whose making is not published; a 256-wide BERT (the default above, one of
Google's small BERTs) gives vectors of that size.

Which vector stands for a text is ``pooling``:

- ``mean`` (default): the mean of the last layer's states over the text's tokens ([CLS] and
  [SEP] included, padding excluded): the usual sentence embedding of an encoder not trained for
  one;
- ``cls``: the last layer's state of the [CLS] token;
- ``pooler``: BERT's pooler output, tanh(W h_[CLS] + b) (trained for next-sentence prediction).

Weights are Hugging Face BERT checkpoints (``model.safetensors`` or ``pytorch_model.bin``, keys
of ``BertModel`` with or without the ``bert.`` prefix of the pre-training heads, which are
dropped); the tokenizer is the checkpoint's. The Flax module mirrors transformers' ``BertModel``
(post-norm layers, absolute positions, exact GELU) for inference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from clipsep_jax.encoders.clip_towers import activation
from clipsep_jax.encoders.common import DTYPES, BatchedRunner, check_params, read_weights
from clipsep_jax.errors import UserError

__all__ = ["DEFAULT_BERT", "POOLINGS", "BertConfig", "BertModel", "BERT", "pool",
           "params_from_state_dict"]

DEFAULT_BERT = "google/bert_uncased_L-4_H-256_A-4"
POOLINGS = ("mean", "cls", "pooler")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of transformers' ``BertConfig`` that inference needs."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_transformers(cls, hf_config: Any) -> BertConfig:
        d = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
        position = d.get("position_embedding_type", "absolute")
        if position not in (None, "absolute"):
            raise UserError(f"position_embedding_type={position!r}: only absolute positions "
                            "are supported")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})


class _SelfAttention(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        c = self.config
        heads = c.num_attention_heads
        head_dim = c.hidden_size // heads
        dense = lambda name: nn.Dense(c.hidden_size, dtype=self.dtype, name=name)
        split = lambda t: t.reshape(t.shape[:-1] + (heads, head_dim))
        q = split(dense("query")(x)) * head_dim**-0.5
        k, v = split(dense("key")(x)), split(dense("value")(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) + bias
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return out.reshape(out.shape[:-2] + (c.hidden_size,))


class _Layer(nn.Module):
    """Post-norm block: LN(x + W_o attn(x)), then LN(h + W_2 act(W_1 h))."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        c = self.config
        norm = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name=name)
        attended = _SelfAttention(c, self.dtype, name="attention_self")(x, bias)
        attended = nn.Dense(c.hidden_size, dtype=self.dtype, name="attention_output")(attended)
        x = norm("attention_norm")(x + attended)
        h = nn.Dense(c.intermediate_size, dtype=self.dtype, name="intermediate")(x)
        h = activation(c.hidden_act)(h)
        h = nn.Dense(c.hidden_size, dtype=self.dtype, name="output")(h)
        return norm("output_norm")(x + h)


class BertModel(nn.Module):
    """Token ids and attention mask [B, L] -> (last hidden states [B, L, H], pooler output
    [B, H]), both float32; token types are all 0 (single texts)."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array):
        c = self.config
        length = input_ids.shape[1]
        if length > c.max_position_embeddings:
            raise ValueError(f"{length} tokens exceed this BERT's {c.max_position_embeddings} "
                             "positions")
        embed = lambda n, name: nn.Embed(n, c.hidden_size, dtype=self.dtype, name=name)
        x = (embed(c.vocab_size, "word_embeddings")(input_ids)
             + embed(c.max_position_embeddings, "position_embeddings")(jnp.arange(length))[None]
             + embed(c.type_vocab_size, "token_type_embeddings")(jnp.zeros_like(input_ids)))
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="embeddings_norm")(x)
        bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0,
                         jnp.finfo(jnp.float32).min)
        for i in range(c.num_hidden_layers):
            x = _Layer(c, self.dtype, name=f"layer_{i}")(x, bias)
        pooled = jnp.tanh(nn.Dense(c.hidden_size, dtype=self.dtype, name="pooler")(x[:, 0]))
        return x.astype(jnp.float32), pooled.astype(jnp.float32)


def pool(hidden: jax.Array, pooled: jax.Array, attention_mask: jax.Array,
         pooling: str) -> jax.Array:
    """The text vector [B, H] of ``pooling`` (see the module docs) from BertModel's outputs."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "pooler":
        return pooled
    mask = attention_mask.astype(jnp.float32)[..., None]
    return jnp.sum(hidden * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


# ---------------------------------------------------------------------------------------------
# transformers state dict -> Flax parameters

_LAYER_MODULES = {
    "attention.self.query": ("attention_self", "query"),
    "attention.self.key": ("attention_self", "key"),
    "attention.self.value": ("attention_self", "value"),
    "attention.output.dense": ("attention_output",),
    "attention.output.LayerNorm": ("attention_norm",),
    "intermediate.dense": ("intermediate",),
    "output.dense": ("output",),
    "output.LayerNorm": ("output_norm",),
}


def _flax_path(key: str) -> tuple[tuple[str, ...], str] | None:
    """A transformers BERT key -> (Flax path, 'copy' | 'transpose'), None for what inference
    does not keep (pre-training heads, position-id buffers); KeyError otherwise."""
    key = key.removeprefix("module.")
    if key.startswith("cls.") or key.endswith(("position_ids", "token_type_ids")):
        return None
    key = key.removeprefix("bert.")
    parts = key.split(".")
    leaf = parts[-1]
    if parts[0] == "embeddings":
        if parts[1] == "LayerNorm":
            return ("embeddings_norm", {"weight": "scale", "gamma": "scale", "bias": "bias",
                                        "beta": "bias"}[leaf]), "copy"
        if leaf != "weight":
            raise KeyError(key)
        return (parts[1], "embedding"), "copy"
    if parts[0] == "pooler" and parts[1] == "dense":
        return ("pooler", "kernel" if leaf == "weight" else "bias"), (
            "transpose" if leaf == "weight" else "copy")
    if parts[:2] == ["encoder", "layer"]:
        module = _LAYER_MODULES[".".join(parts[3:-1])]
        path = (f"layer_{int(parts[2])}", *module)
        if module[-1].endswith("norm"):
            return (*path, {"weight": "scale", "gamma": "scale", "bias": "bias",
                            "beta": "bias"}[leaf]), "copy"
        return (*path, "kernel" if leaf == "weight" else "bias"), (
            "transpose" if leaf == "weight" else "copy")
    raise KeyError(key)


def params_from_state_dict(state: Mapping[str, np.ndarray], config: BertConfig,
                           dtype: Any = jnp.float32, need_pooler: bool = True) -> dict:
    """transformers ``BertModel`` tensors -> Flax parameters of :class:`BertModel` in
    ``dtype``; missing, unexpected and mis-shaped entries refused by name. A checkpoint saved
    without a pooler (``add_pooling_layer=False``) loads when ``need_pooler`` is False: its
    pooler is zeros (the ``pooler`` pooling then cannot be used)."""
    expected = traverse_util.flatten_dict(jax.eval_shape(lambda: BertModel(config).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32))
    )["params"])
    params, unexpected, wrong_shape = {}, [], []
    for key, value in state.items():
        try:
            mapped = _flax_path(key)
        except (KeyError, IndexError, ValueError):
            unexpected.append(key)
            continue
        if mapped is None:
            continue
        path, how = mapped
        value = np.asarray(value, np.float32)
        value = value.T if how == "transpose" else value
        if path not in expected:
            unexpected.append(key)
        elif value.shape != expected[path].shape:
            wrong_shape.append(f"{key}: {value.shape} vs {expected[path].shape}")
        else:
            params[path] = jnp.asarray(value, dtype)
    if not need_pooler and not any(p[0] == "pooler" for p in params):
        for path, leaf in expected.items():
            if path[0] == "pooler":
                params[path] = jnp.zeros(leaf.shape, dtype)
    check_params(params, expected, "BERT", unexpected, wrong_shape)
    return traverse_util.unflatten_dict(params)


class BERT:
    """A frozen BERT with the checkpoint's tokenizer; ``encode_text`` gives one vector per text.

    Args:
        config, params: the architecture and its Flax parameters.
        tokenizer: a transformers tokenizer.
        pooling: ``mean``, ``cls`` or ``pooler`` (see the module docs).
        max_length: tokens per text (longer texts are truncated; labels are short).
        dtype, mesh, batch_size: compute dtype; texts per compiled call, sharded on the mesh.
    """

    def __init__(self, config: BertConfig, params: Mapping, tokenizer: Any,
                 pooling: str = "mean", max_length: int = 32, dtype: Any = jnp.float32,
                 mesh: Mesh | None = None, batch_size: int = 64):
        if pooling not in POOLINGS:
            raise UserError(f"pooling={pooling!r}: expected one of {', '.join(POOLINGS)}")
        self.config = config
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = min(max_length, config.max_position_embeddings)
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self._runner = BatchedRunner(mesh, batch_size)
        self.params = jax.device_put(
            jax.tree_util.tree_map(lambda p: jnp.asarray(p, self.dtype), dict(params)),
            self._runner.replicated)
        self.model = BertModel(config, self.dtype)

        def text_fn(params, ids, mask):
            hidden, pooled = self.model.apply({"params": params}, ids, mask)
            return pool(hidden, pooled, mask, pooling)

        self._text_fn = self._runner.jit(text_fn)

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_BERT, *, pooling: str = "mean",
                        max_length: int = 32, dtype: Any = jnp.float32,
                        mesh: Mesh | None = None, batch_size: int = 64,
                        **hub_kwargs: Any) -> BERT:
        """Loads a Hugging Face BERT checkpoint (hub id or folder) with its tokenizer;
        ``hub_kwargs`` go to transformers (revision, cache_dir, local_files_only, token)."""
        from transformers import AutoConfig, AutoTokenizer

        hf_config = AutoConfig.from_pretrained(name_or_path, **hub_kwargs)
        if getattr(hf_config, "model_type", None) != "bert":
            raise UserError(f"{name_or_path}: model_type is "
                            f"{getattr(hf_config, 'model_type', None)!r}, not a BERT checkpoint")
        config = BertConfig.from_transformers(hf_config)
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        try:
            params = params_from_state_dict(read_weights(name_or_path, **hub_kwargs), config,
                                            dtype, need_pooler=pooling == "pooler")
        except ValueError as e:
            raise UserError(f"{name_or_path}: {e}") from e
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **hub_kwargs)
        return cls(config, params, tokenizer, pooling, max_length, dtype, mesh, batch_size)

    @property
    def embedding_dim(self) -> int:
        return self.config.hidden_size

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, int32 [B, L] (L: the longest text, at most
        ``max_length``)."""
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings, not one string")
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"text queries must be non-empty strings, got {t!r}")
        tokens = self.tokenizer(texts, padding="max_length", max_length=self.max_length,
                                truncation=True, return_tensors="np")
        return tokens["input_ids"].astype(np.int32), tokens["attention_mask"].astype(np.int32)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> their pooled vectors, float32 numpy [B, hidden_size]."""
        ids, mask = self.tokenize(texts)
        if len(ids) == 0:
            return np.zeros((0, self.embedding_dim), np.float32)
        return self._runner(lambda i, m: self._text_fn(self.params, i, m), ids, mask)

    def encode_image(self, images: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
        raise ValueError("BERT encodes text only: query this model with text (labels)")
