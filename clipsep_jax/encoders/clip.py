"""CLIP, frozen, as CLIPSep uses it: Hugging Face checkpoints in, unnormalised embeddings out.

    clip = CLIP.from_pretrained("openai/clip-vit-base-patch32")  # hub id or local folder
    text = clip.encode_text(["a photo of accordion"])  # [1, 512] float32 numpy
    image = clip.encode_image(frames)  # uint8 [B, H, W, 3] -> [B, 512]

Loading goes through transformers for the config, the tokenizer and the download
(``cached_file``), so hub ids, revisions, caches and ``HF_HUB_OFFLINE`` behave as they do there.
Weights come from ``model.safetensors`` (preferred) or ``pytorch_model.bin`` (read with
``weights_only``). Image preprocessing is the checkpoint's ``preprocessor_config.json``: PIL resize
of the shortest edge, centre crop, rescale and normalise, matching transformers' CLIP image
processor. The towers run jit-compiled in fixed-size batches sharded over a one-axis device mesh.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh
from PIL import Image
from safetensors.numpy import save_file

from clipsep_jax.encoders.clip_towers import CLIPConfig, CLIPModel, TowerConfig
from clipsep_jax.encoders.common import DTYPES, BatchedRunner, check_params, read_weights
from clipsep_jax.files import staging_folder

__all__ = [
    "DEFAULT_CLIP",
    "TEXT_TEMPLATE",
    "PROMPT_ENSEMBLE",
    "text_prompt",
    "ensemble_prompts",
    "ImagePreprocessing",
    "CLIP",
    "byte_level_tokenizer",
]

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
TEXT_TEMPLATE = "a photo of {}"
# The reference's evaluation ensemble; the doubled template is deliberate (it weighs twice).
PROMPT_ENSEMBLE = (
    "a photo of {}.",
    "a photo of the small {}.",
    "a photo of the small {}.",
    "a low resolution photo of a {}.",
    "a photo of many {}.",
)
# transformers is imported where a checkpoint is read or written, not at the top: importing its
# tokenizer and config classes takes about 2 s, and every config (through the model families)
# reaches this module.
_DTYPES = DTYPES


def text_prompt(label: str, template: str = TEXT_TEMPLATE) -> str:
    """The query text for a label, e.g. ``"a photo of acoustic guitar"``.

    Underscores in dataset labels (folder names such as ``acoustic_guitar``) become spaces.
    """
    return template.format(label.replace("_", " "))


def ensemble_prompts(label: str) -> list[str]:
    """The reference's prompt ensemble for a label; average the embeddings of these."""
    return [text_prompt(label, t) for t in PROMPT_ENSEMBLE]


@dataclasses.dataclass(frozen=True)
class ImagePreprocessing:
    """CLIP image preprocessing read from a ``preprocessor_config.json``.

    Resizing and cropping run on the host with PIL (uint8 in, uint8 out, exactly as transformers'
    PIL image processor); rescaling and normalising run on the device in :meth:`normalize`.
    """

    shortest_edge: int | None = 224
    resize_to: tuple[int, int] | None = None  # (height, width) when the config gives both
    crop_size: tuple[int, int] | None = (224, 224)
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    do_normalize: bool = True

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImagePreprocessing:
        size = d.get("size", {"shortest_edge": 224})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        crop = d.get("crop_size", {"height": 224, "width": 224})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        defaults = cls()
        return cls(
            shortest_edge=size.get("shortest_edge") if d.get("do_resize", True) else None,
            resize_to=(size["height"], size["width"])
            if d.get("do_resize", True) and "height" in size
            else None,
            crop_size=(crop["height"], crop["width"]) if d.get("do_center_crop", True) else None,
            resample=int(d.get("resample", Image.Resampling.BICUBIC)),
            rescale_factor=float(d.get("rescale_factor", 1 / 255))
            if d.get("do_rescale", True)
            else 1.0,
            image_mean=tuple(d.get("image_mean", defaults.image_mean)),
            image_std=tuple(d.get("image_std", defaults.image_std)),
            do_normalize=bool(d.get("do_normalize", True)),
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``preprocessor_config.json`` that transformers' CLIP image processor reads."""
        size = (
            {"height": self.resize_to[0], "width": self.resize_to[1]}
            if self.resize_to
            else {"shortest_edge": self.shortest_edge}
        )
        crop = self.crop_size or (0, 0)
        return {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": bool(self.resize_to or self.shortest_edge),
            "size": size,
            "resample": int(self.resample),
            "do_center_crop": self.crop_size is not None,
            "crop_size": {"height": crop[0], "width": crop[1]},
            "do_rescale": True,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": True,
        }

    def resize_and_crop(self, image: np.ndarray) -> np.ndarray:
        """One uint8 RGB image [H, W, 3] (or [H, W], grey) -> uint8 [crop_h, crop_w, 3]."""
        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise ValueError(f"images must be uint8 RGB, got dtype {image.dtype}")
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] not in (3, 4) or min(image.shape[:2]) < 1:
            raise ValueError(f"images must be [H, W, 3] uint8 RGB, got shape {image.shape}")
        image = image[..., :3]
        height, width = image.shape[:2]
        if self.resize_to:
            new_h, new_w = self.resize_to
        elif self.shortest_edge:
            short, long = sorted((height, width))
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            new_h, new_w = (new_long, new_short) if width <= height else (new_short, new_long)
        else:
            new_h, new_w = height, width
        if (new_h, new_w) != (height, width):
            pil = Image.fromarray(image).resize((new_w, new_h), resample=self.resample)
            image = np.asarray(pil)
        if self.crop_size:
            image = _centre_crop(image, *self.crop_size)
        return np.ascontiguousarray(image)

    def normalize(self, images: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
        """uint8 [B, h, w, 3] -> normalised float pixels in ``dtype`` (jit-able)."""
        x = images.astype(jnp.float32) * self.rescale_factor
        if self.do_normalize:
            x = (x - jnp.asarray(self.image_mean)) / jnp.asarray(self.image_std)
        return x.astype(dtype)


def _centre_crop(image: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """Centre crop, zero-padding (as transformers does) where the image is smaller."""
    height, width = image.shape[:2]
    if height < crop_h or width < crop_w:
        padded = np.zeros((max(height, crop_h), max(width, crop_w), 3), image.dtype)
        top, left = (
            math.ceil((padded.shape[0] - height) / 2),
            math.ceil((padded.shape[1] - width) / 2),
        )
        padded[top : top + height, left : left + width] = image
        image, (height, width) = padded, padded.shape[:2]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return image[top : top + crop_h, left : left + crop_w]


# ---------------------------------------------------------------------------------------------
# Checkpoint <-> Flax parameters


def config_from_transformers(hf_config: Any) -> CLIPConfig:
    """Our :class:`CLIPConfig` from a transformers ``CLIPConfig`` (object or dict)."""
    d = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
    fields = {f.name for f in dataclasses.fields(TowerConfig)}

    def tower(sub: Mapping[str, Any]) -> TowerConfig:
        return TowerConfig(**{k: v for k, v in sub.items() if k in fields and v is not None})

    return CLIPConfig(
        vision=tower(d["vision_config"]),
        text=tower(d["text_config"]),
        projection_dim=int(d.get("projection_dim", 512)),
    )


def _flax_path(key: str) -> tuple[tuple[str, ...], str] | None:
    """A transformers CLIP state-dict key -> (Flax parameter path, how to transform), or None
    for buffers that carry no parameter (``position_ids``)."""
    parts = key.split(".")
    if parts[-1] == "position_ids":
        return None
    if key == "logit_scale":
        return ("logit_scale",), "same"
    if parts[0] in ("visual_projection", "text_projection"):
        return (parts[0], "kernel"), "transpose"
    tower, rest = parts[0], parts[1:]
    if rest[0] == "embeddings":
        rest = rest[1:]
        if rest == ["class_embedding"]:
            return (tower, "class_embedding"), "same"
        if rest[0] in ("position_embedding", "token_embedding"):
            return (tower, rest[0], "embedding"), "same"
        if rest[0] == "patch_embedding":
            return (tower, "patch_embedding", "kernel"), "conv"
    if rest[0] == "encoder":
        layer, sub = f"layers_{rest[2]}", rest[3:]
        module = sub[1] if sub[0] in ("self_attn", "mlp") else sub[0]
        prefix = (tower, "encoder", layer) + (("self_attn",) if sub[0] == "self_attn" else ())
        return _linear_or_norm(prefix + (module,), sub[-1], module.startswith("layer_norm"))
    return _linear_or_norm((tower, rest[0]), rest[-1], norm=True)


def _linear_or_norm(prefix: tuple[str, ...], leaf: str, norm: bool):
    if norm:
        return prefix + ({"weight": "scale", "bias": "bias"}[leaf],), "same"
    return prefix + ({"weight": "kernel", "bias": "bias"}[leaf],), (
        "transpose" if leaf == "weight" else "same"
    )


def params_from_state_dict(
    state_dict: Mapping[str, np.ndarray], config: CLIPConfig, dtype: Any = jnp.float32
) -> dict:
    """A transformers CLIPModel state dict -> Flax parameters of :class:`CLIPModel` in ``dtype``.

    Refuses missing, unexpected and wrongly shaped entries, naming them.
    """
    expected = traverse_util.flatten_dict(_abstract_params(config))
    params, unexpected, wrong_shape = {}, [], []
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        try:
            mapped = _flax_path(key)
        except (KeyError, IndexError):
            unexpected.append(key)
            continue
        if mapped is None:
            continue
        path, how = mapped
        if path not in expected:
            unexpected.append(key)
            continue
        value = np.asarray(value)
        if how == "transpose":
            value = value.T
        elif how == "conv":
            value = value.transpose(2, 3, 1, 0)
        if value.shape != expected[path].shape:
            wrong_shape.append(f"{key}: {value.shape} vs {expected[path].shape}")
            continue
        params[path] = jnp.asarray(value, dtype)
    check_params(params, expected, "CLIP", unexpected, wrong_shape)
    return traverse_util.unflatten_dict(params)


def state_dict_from_params(params: Mapping, config: CLIPConfig) -> dict[str, np.ndarray]:
    """Inverse of :func:`params_from_state_dict`: Flax parameters -> transformers key names."""
    out = {}
    flat = traverse_util.flatten_dict(params)
    for key in _transformers_keys(config):
        path, how = _flax_path(key)
        value = np.asarray(flat[path], np.float32)
        if how == "transpose":
            value = value.T
        elif how == "conv":
            value = value.transpose(3, 2, 0, 1)
        out[key] = np.array(value, order="C")  # keeps 0-d arrays 0-d
    return out


def _transformers_keys(config: CLIPConfig) -> list[str]:
    keys = ["logit_scale", "visual_projection.weight", "text_projection.weight"]
    for tower, cfg in (("vision_model", config.vision), ("text_model", config.text)):
        if tower == "vision_model":
            keys += [
                f"{tower}.embeddings.{k}"
                for k in ("class_embedding", "patch_embedding.weight", "position_embedding.weight")
            ]
            norms = ["pre_layrnorm", "post_layernorm"]
        else:
            keys += [
                f"{tower}.embeddings.{k}.weight" for k in ("token_embedding", "position_embedding")
            ]
            norms = ["final_layer_norm"]
        keys += [f"{tower}.{n}.{w}" for n in norms for w in ("weight", "bias")]
        for i in range(cfg.num_hidden_layers):
            prefix = f"{tower}.encoder.layers.{i}"
            modules = [f"self_attn.{p}_proj" for p in "qkv"] + [
                "self_attn.out_proj",
                "mlp.fc1",
                "mlp.fc2",
                "layer_norm1",
                "layer_norm2",
            ]
            keys += [f"{prefix}.{m}.{w}" for m in modules for w in ("weight", "bias")]
    return keys


def _abstract_params(config: CLIPConfig) -> dict:
    model = CLIPModel(config)
    size = config.vision.image_size
    shapes = jax.eval_shape(
        lambda: model.init(
            jax.random.PRNGKey(0),
            jnp.zeros((1, size, size, config.vision.num_channels)),
            jnp.zeros((1, 2), jnp.int32),
            jnp.ones((1, 2), jnp.int32),
        )
    )
    return shapes["params"]


# ---------------------------------------------------------------------------------------------


class CLIP:
    """Frozen CLIP towers with the checkpoint's tokenizer and image preprocessing.

    Args:
        config: tower sizes.
        params: Flax parameters of :class:`clipsep_jax.models.clip.CLIPModel`.
        tokenizer: a transformers tokenizer (called with padding to the text tower's length).
        preprocessing: the image preprocessing.
        dtype: compute (and parameter) dtype; embeddings are returned in float32.
        mesh: a mesh whose first axis shards the batch; default: all local devices on ``"data"``.
        batch_size: images or texts per compiled call (rounded up to a multiple of the devices).
    """

    def __init__(
        self,
        config: CLIPConfig,
        params: Mapping,
        tokenizer: Any,
        preprocessing: ImagePreprocessing,
        dtype: Any = jnp.float32,
        mesh: Mesh | None = None,
        batch_size: int = 64,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.preprocessing = preprocessing
        self.dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
        self._runner = BatchedRunner(mesh, batch_size)
        self.mesh = self._runner.mesh
        self.batch_size = self._runner.batch_size
        self.model = CLIPModel(config, dtype=self.dtype, param_dtype=self.dtype)
        cast = jax.tree_util.tree_map(lambda p: jnp.asarray(p, self.dtype), dict(params))
        self.params = jax.device_put(cast, self._runner.replicated)

        def image_fn(params, images):
            pixels = preprocessing.normalize(images, self.dtype)
            return self.model.apply({"params": params}, pixels, method=CLIPModel.encode_image)

        def text_fn(params, ids, mask):
            return self.model.apply({"params": params}, ids, mask, method=CLIPModel.encode_text)

        self._image_fn = self._runner.jit(image_fn)
        self._text_fn = self._runner.jit(text_fn)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = DEFAULT_CLIP,
        dtype: Any = jnp.float32,
        mesh: Mesh | None = None,
        batch_size: int = 64,
        **hub_kwargs,
    ) -> CLIP:
        """Load a Hugging Face CLIP checkpoint by hub id or local folder.

        ``hub_kwargs`` go to transformers' ``cached_file`` and ``from_pretrained`` (``revision``,
        ``cache_dir``, ``local_files_only``, ``token``).
        """
        from transformers import AutoConfig, AutoTokenizer
        from transformers.utils import cached_file

        if os.path.exists(name_or_path) and not os.path.isdir(name_or_path):
            raise ValueError(f"{name_or_path}: expected a CLIP checkpoint folder or a hub id")
        hf_config = AutoConfig.from_pretrained(name_or_path, **hub_kwargs)
        if getattr(hf_config, "model_type", None) != "clip":
            raise ValueError(
                f"{name_or_path}: model_type is {getattr(hf_config, 'model_type', None)!r}, "
                "not a CLIP checkpoint"
            )
        config = config_from_transformers(hf_config)
        dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
        params = params_from_state_dict(read_weights(name_or_path, **hub_kwargs), config, dtype)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **hub_kwargs)
        processor_file = cached_file(
            name_or_path,
            "preprocessor_config.json",
            _raise_exceptions_for_missing_entries=False,
            **hub_kwargs,
        )
        if processor_file:
            with open(processor_file) as f:
                preprocessing = ImagePreprocessing.from_dict(json.load(f))
        else:
            size = config.vision.image_size
            preprocessing = ImagePreprocessing(shortest_edge=size, crop_size=(size, size))
        return cls(config, params, tokenizer, preprocessing, dtype, mesh, batch_size)

    @classmethod
    def random(
        cls,
        config: CLIPConfig,
        seed: int = 0,
        tokenizer: Any = None,
        dtype: Any = jnp.float32,
        mesh: Mesh | None = None,
        batch_size: int = 64,
    ) -> CLIP:
        """A randomly initialised CLIP (transformers' init scales), with a byte-level tokenizer
        unless one is given. For tests and demos where no real weights are at hand."""
        tokenizer = tokenizer or byte_level_tokenizer()
        if len(tokenizer) > config.text.vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens, "
                f"the text tower only {config.text.vocab_size}"
            )
        text = dataclasses.replace(config.text, eos_token_id=tokenizer.eos_token_id)
        config = dataclasses.replace(config, text=text)
        params = _random_params(config, seed)
        size = config.vision.image_size
        preprocessing = ImagePreprocessing(shortest_edge=size, crop_size=(size, size))
        return cls(config, params, tokenizer, preprocessing, dtype, mesh, batch_size)

    def save_pretrained(self, path: str) -> None:
        """Write a transformers-loadable checkpoint folder (config, safetensors, tokenizer,
        preprocessor config), through a temporary folder renamed into place."""
        from transformers import CLIPConfig as HFCLIPConfig

        path = os.path.abspath(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = str(staging_folder(path, prefix=".tmp-clip-"))
        try:
            c = self.config
            text_config = _tower_dict(c.text, drop=_VISION_ONLY)
            for key in ("bos_token_id", "pad_token_id"):  # transformers' defaults are
                value = getattr(self.tokenizer, key, None)  # OpenAI's ids, past a small vocab
                if value is not None:
                    text_config[key] = value
            hf = HFCLIPConfig(
                text_config=text_config,
                vision_config=_tower_dict(c.vision, drop=_TEXT_ONLY),
                projection_dim=c.projection_dim,
            )
            hf.save_pretrained(tmp)
            save_file(
                state_dict_from_params(self.params, c),
                os.path.join(tmp, "model.safetensors"),
                metadata={"format": "pt"},
            )
            self.tokenizer.save_pretrained(tmp)
            with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
                json.dump(self.preprocessing.to_dict(), f, indent=2)
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @property
    def embedding_dim(self) -> int:
        return self.config.projection_dim

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the preprocessed images the vision tower takes."""
        size = self.config.vision.image_size
        return self.preprocessing.crop_size or self.preprocessing.resize_to or (size, size)

    # -- text --------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, both int32 [B, max_position_embeddings]."""
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings, not one string")
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"text queries must be non-empty strings, got {t!r}")
        length = self.config.text.max_position_embeddings
        tokens = self.tokenizer(
            texts, padding="max_length", max_length=length, truncation=True, return_tensors="np"
        )
        return tokens["input_ids"].astype(np.int32), tokens["attention_mask"].astype(np.int32)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> unnormalised text embeddings, float32 numpy [B, projection_dim]."""
        ids, mask = self.tokenize(texts)
        if len(ids) == 0:
            return np.zeros((0, self.embedding_dim), np.float32)
        return self._batched(lambda i, m: self._text_fn(self.params, i, m), ids, mask)

    def encode_prompt_ensemble(self, labels: Sequence[str]) -> np.ndarray:
        """Per label, the mean of the prompt ensemble's unnormalised embeddings [B, D]."""
        prompts = [p for label in labels for p in ensemble_prompts(label)]
        embeddings = self.encode_text(prompts)
        return embeddings.reshape(len(labels), len(PROMPT_ENSEMBLE), -1).mean(axis=1)

    # -- images ------------------------------------------------------------------------------

    def preprocess(self, images: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
        """Images of any size (uint8 [B, H, W, 3], or a list of [H, W, 3]) -> uint8
        [B, h, w, 3] resized and cropped for the vision tower (host side, PIL)."""
        h, w = self.image_size
        out = [self.preprocessing.resize_and_crop(im) for im in images]
        if not out:
            return np.zeros((0, h, w, 3), np.uint8)
        return np.stack(out)

    def encode_image(self, images: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
        """uint8 RGB images of any size -> unnormalised image embeddings, float32 [B, D]."""
        return self.encode_preprocessed(self.preprocess(images))

    def encode_preprocessed(self, images: np.ndarray) -> np.ndarray:
        """Images already resized and cropped (uint8 [B, h, w, 3], from :meth:`preprocess`)."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:3] != tuple(self.image_size):
            raise ValueError(
                f"expected preprocessed uint8 images [B, {self.image_size[0]}, "
                f"{self.image_size[1]}, 3], got {images.shape}"
            )
        if len(images) == 0:
            return np.zeros((0, self.embedding_dim), np.float32)
        return self._batched(lambda x: self._image_fn(self.params, x), images)

    def _batched(self, fn, *arrays: np.ndarray) -> np.ndarray:
        return self._runner(fn, *arrays)


_TEXT_ONLY = {"vocab_size", "max_position_embeddings", "eos_token_id"}
_VISION_ONLY = {"image_size", "patch_size", "num_channels"}


def _tower_dict(tower: TowerConfig, drop: set[str]) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(tower).items() if k not in drop}


def _random_params(config: CLIPConfig, seed: int) -> dict:
    """Random parameters at transformers' CLIP init scales (normal 0.02 embeddings and
    projections, scaled attention and MLP weights, unit LayerNorms), so activations stay sane."""
    abstract = traverse_util.flatten_dict(_abstract_params(config))
    rng = np.random.default_rng(seed)
    params = {}
    for path, leaf in abstract.items():
        name, shape = path[-1], leaf.shape
        if name == "scale":
            value = np.ones(shape)
        elif name == "bias":
            value = np.zeros(shape)
        elif name == "logit_scale":
            value = np.full(shape, 2.6592)
        else:
            tower = config.vision if path[0] == "vision_model" else config.text
            std = 0.02
            if "encoder" in path:
                std = (tower.hidden_size**-0.5) * ((2 * tower.num_hidden_layers) ** -0.5)
            elif name == "class_embedding":
                std = tower.hidden_size**-0.5
            value = rng.normal(0.0, std, shape)
        params[path] = value.astype(np.float32)
    return traverse_util.unflatten_dict(params)


def byte_level_tokenizer() -> Any:
    """A CLIP tokenizer with only the 512 byte-level symbols (no merges) and the start and end
    tokens: 514 ids, for random-weight CLIPs that must run with nothing downloaded."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])
