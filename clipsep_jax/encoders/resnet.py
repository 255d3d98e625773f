"""A frozen ImageNet ResNet (18 or 34 layers), plain or dilated: Sound of Pixels' image encoder.

    resnet = ResNet.from_pretrained("timm/resnet18.tv_in1k")  # hub id, folder or .pth file
    vectors = resnet.encode_image(frames)  # uint8 [B, H, W, 3] -> [B, 512] float32

The SOP baseline of the CLIPSep paper queries the separator with a frame vector from an
ImageNet ResNet-18 whose last stage is dilated (its stride removed, the reference's
``ResnetDilated(resnet18, dilate_scale=16)``: output stride 16, 14 x 14 features for 224 px
frames), max-pooled over space to 512 values per frame; the network stays frozen in eval mode
(BatchNorm with its running statistics), so its vectors are computed once, offline, like CLIP's.

Weights come in torchvision's state-dict layout (``conv1.weight``, ``bn1.running_mean``,
``layer4.1.conv2.weight``, ``layer2.0.downsample.0.weight``, ``fc.weight``; the classifier is
dropped) from any of:

- a file: torchvision's ``resnet18-f37072fd.pth`` (``torch.load(weights_only=True)``) or a
  ``.safetensors`` file;
- a folder or Hugging Face hub id holding ``model.safetensors`` or ``pytorch_model.bin``
  (timm's ``timm/resnet18.tv_in1k`` is torchvision's weights in the same key layout);
- ``torchvision:resnet18`` (or ``resnet34``): torchvision's published file, from the torch hub
  cache (``$TORCH_HOME/hub/checkpoints``) or downloaded into it.

The depth and widths are read from the weights, so tiny random ResNets load the same way.
Frames are preprocessed as for CLIP (the reference feeds both the same frames: bicubic resize of
the shortest edge to 224, centre crop, CLIP's mean and standard deviation); pass
``preprocessing="imagenet"`` for torchvision's ImageNet normalisation instead.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh
from PIL import Image

from clipsep_jax.encoders.clip import ImagePreprocessing
from clipsep_jax.encoders.common import DTYPES, BatchedRunner, check_params, read_weights
from clipsep_jax.errors import UserError
from clipsep_jax.files import FILE_MODE

__all__ = ["DEFAULT_RESNET", "ResNetConfig", "ResNetFeatures", "ResNet", "TORCHVISION_URLS",
           "params_from_state_dict", "state_dict_from_params"]

DEFAULT_RESNET = "timm/resnet18.tv_in1k"
TORCHVISION_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
}
IMAGENET_PREPROCESSING = ImagePreprocessing(
    shortest_edge=256, crop_size=(224, 224), resample=Image.Resampling.BILINEAR,
    image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225))
POOLINGS = ("max", "mean")


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """A ResNet of basic blocks (ResNet-18: (2, 2, 2, 2) blocks of widths 64..512).

    ``output_stride``: 32 (plain), 16 (the last stage dilated by 2: the reference's
    ``dilate_scale=16``) or 8 (the last two stages dilated by 2 and 4).
    """

    blocks: tuple[int, ...] = (2, 2, 2, 2)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    output_stride: int = 16
    batch_norm_epsilon: float = 1e-5

    def __post_init__(self):
        if len(self.blocks) != 4 or len(self.widths) != 4:
            raise ValueError(f"a ResNet has 4 stages, got blocks {self.blocks}, "
                             f"widths {self.widths}")
        if self.output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride={self.output_stride}: expected 8, 16 or 32")

    def stage_dilation(self, stage: int) -> int:
        """The reference's ``dilate`` of stage ``stage`` (0-based; 1: unchanged)."""
        dilated = {32: 0, 16: 1, 8: 2}[self.output_stride]
        first_dilated = 4 - dilated
        return 2 ** (stage - first_dilated + 1) if stage >= first_dilated else 1


class _FrozenBatchNorm(nn.Module):
    """BatchNorm with running statistics (eval mode): parameters scale, bias; statistics in
    the ``batch_stats`` collection (mean, var), as Flax's BatchNorm lays them out."""

    epsilon: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,)).value
        var = self.variable("batch_stats", "var", jnp.ones, (channels,)).value
        factor = scale * jax.lax.rsqrt(var + self.epsilon)
        return (x * factor.astype(x.dtype) + (bias - mean * factor).astype(x.dtype))


def _conv(features: int, kernel: int, stride: int, dilation: int, dtype: Any, name: str):
    """A bias-free convolution padded as torchvision's (``dilation * (kernel // 2)``)."""
    pad = dilation * (kernel // 2)
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), kernel_dilation=(dilation, dilation),
                   use_bias=False, dtype=dtype, name=name)


class _BasicBlock(nn.Module):
    features: int
    stride: int  # the block's original stride (2: first block of stages 2-4)
    dilation: int  # the reference's ``dilate`` of the stage (1: a plain block)
    downsample: bool
    epsilon: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # The reference's _nostride_dilate: a strided 3x3 loses its stride and takes dilation
        # d // 2; the other 3x3 convolutions take dilation d; the 1x1 shortcut loses its stride.
        if self.dilation > 1:
            stride = 1
            first_dilation = self.dilation // 2 if self.stride == 2 else self.dilation
        else:
            stride, first_dilation = self.stride, 1
        norm = lambda name: _FrozenBatchNorm(self.epsilon, self.dtype, name=name)
        h = _conv(self.features, 3, stride, first_dilation, self.dtype, "conv1")(x)
        h = nn.relu(norm("bn1")(h))
        h = _conv(self.features, 3, 1, self.dilation, self.dtype, "conv2")(h)
        h = norm("bn2")(h)
        if self.downsample:
            x = _conv(self.features, 1, stride, 1, self.dtype, "downsample_conv")(x)
            x = norm("downsample_bn")(x)
        return nn.relu(h + x)


class ResNetFeatures(nn.Module):
    """Normalised pixels [B, H, W, 3] -> the last stage's features [B, H/s, W/s, width]
    (s: ``config.output_stride``); torchvision's ResNet without its pooling and classifier."""

    config: ResNetConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        c = self.config
        x = _conv(c.widths[0], 7, 2, 1, self.dtype, "conv1")(pixels.astype(self.dtype))
        x = nn.relu(_FrozenBatchNorm(c.batch_norm_epsilon, self.dtype, name="bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        in_width = c.widths[0]
        for stage, (count, width) in enumerate(zip(c.blocks, c.widths, strict=True)):
            dilation = c.stage_dilation(stage)
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                x = _BasicBlock(
                    width, stride, dilation,
                    downsample=index == 0 and (stride != 1 or in_width != width),
                    epsilon=c.batch_norm_epsilon, dtype=self.dtype,
                    name=f"layer{stage + 1}_{index}")(x)
                in_width = width
        return x


def pool_features(features: jax.Array, pooling: str) -> jax.Array:
    """[B, h, w, C] -> [B, C] float32: the maximum (the reference's) or the mean over space."""
    features = features.astype(jnp.float32)
    if pooling == "max":
        return jnp.max(features, axis=(1, 2))
    return jnp.mean(features, axis=(1, 2))


# ---------------------------------------------------------------------------------------------
# torchvision state dict <-> Flax variables

_BLOCK_KEY = re.compile(r"layer(\d)\.(\d+)\.(conv1|conv2|bn1|bn2|downsample\.0|downsample\.1)\."
                        r"(weight|bias|running_mean|running_var|num_batches_tracked)$")
_STEM_KEY = re.compile(r"(conv1|bn1)\.(weight|bias|running_mean|running_var|num_batches_tracked)$")
_BN_LEAF = {"weight": ("params", "scale"), "bias": ("params", "bias"),
            "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def _flax_path(key: str) -> tuple[tuple[str, ...], bool] | None:
    """torchvision key -> (Flax variable path, is a conv kernel), or None for what is not kept
    (the classifier, BatchNorm's step counter); KeyError for anything else."""
    if key.startswith("fc.") or key.endswith("num_batches_tracked"):
        return None
    if m := _STEM_KEY.match(key):
        module, leaf = m.groups()
        if module == "conv1":
            if leaf != "weight":
                raise KeyError(key)
            return ("params", "conv1", "kernel"), True
        collection, name = _BN_LEAF[leaf]
        return (collection, "bn1", name), False
    if m := _BLOCK_KEY.match(key):
        stage, index, module, leaf = m.groups()
        block = f"layer{stage}_{index}"
        module = {"downsample.0": "downsample_conv", "downsample.1": "downsample_bn"}.get(
            module, module)
        if "conv" in module:
            if leaf != "weight":
                raise KeyError(key)
            return ("params", block, module, "kernel"), True
        collection, name = _BN_LEAF[leaf]
        return (collection, block, module, name), False
    raise KeyError(key)


def config_from_state_dict(state: Mapping[str, np.ndarray], output_stride: int = 16,
                           source: str = "checkpoint") -> ResNetConfig:
    """The ResNet a torchvision-layout state dict holds (block counts and widths)."""
    if any(re.match(r"layer\d\.\d+\.conv3\.", k) for k in state):
        raise UserError(f"{source}: a bottleneck ResNet (conv3 keys: ResNet-50 or deeper); "
                        "only basic-block ResNets (18, 34) are supported")
    blocks, widths = [], []
    for stage in range(1, 5):
        indices = {int(m.group(1)) for k in state
                   if (m := re.match(rf"layer{stage}\.(\d+)\.conv1\.weight$", k))}
        if not indices:
            raise UserError(f"{source}: no key layer{stage}.0.conv1.weight: not a torchvision "
                            "ResNet state dict")
        blocks.append(max(indices) + 1)
        widths.append(int(state[f"layer{stage}.0.conv1.weight"].shape[0]))
    return ResNetConfig(tuple(blocks), tuple(widths), output_stride)


def _abstract_variables(config: ResNetConfig) -> dict:
    return jax.eval_shape(lambda: ResNetFeatures(config).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))


def params_from_state_dict(state: Mapping[str, np.ndarray], config: ResNetConfig,
                           dtype: Any = jnp.float32) -> dict:
    """torchvision-layout tensors -> Flax variables {'params', 'batch_stats'} of
    :class:`ResNetFeatures`; missing, unexpected and mis-shaped entries refused by name."""
    expected = traverse_util.flatten_dict(_abstract_variables(config))
    flat, unexpected, wrong_shape = {}, [], []
    for key, value in state.items():
        try:
            mapped = _flax_path(key.removeprefix("module."))
        except KeyError:
            unexpected.append(key)
            continue
        if mapped is None:
            continue
        path, is_conv = mapped
        value = np.asarray(value, np.float32)
        if is_conv:
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        if path not in expected:
            unexpected.append(key)
        elif value.shape != expected[path].shape:
            wrong_shape.append(f"{key}: {value.shape} vs {expected[path].shape}")
        else:
            flat[path] = jnp.asarray(value, dtype if path[0] == "params" else jnp.float32)
    check_params(flat, expected, "ResNet", unexpected, wrong_shape)
    return traverse_util.unflatten_dict(flat)


def state_dict_from_params(variables: Mapping) -> dict[str, np.ndarray]:
    """Inverse of :func:`params_from_state_dict` (torchvision key names; no classifier)."""
    out = {}
    for path, value in traverse_util.flatten_dict(dict(variables)).items():
        collection, *modules, leaf = path
        value = np.asarray(value, np.float32)
        if len(modules) == 1:
            prefix = modules[0]
        else:
            block, module = modules
            stage, index = block.removeprefix("layer").split("_")
            module = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(
                module, module)
            prefix = f"layer{stage}.{index}.{module}"
        if leaf == "kernel":
            out[f"{prefix}.weight"] = np.ascontiguousarray(value.transpose(3, 2, 0, 1))
        else:
            name = {"scale": "weight", "bias": "bias", "mean": "running_mean",
                    "var": "running_var"}[leaf]
            out[f"{prefix}.{name}"] = value
    return out


def _torchvision_file(name: str) -> str:
    """torchvision's published weights of ``name``, from the torch hub cache or downloaded into
    it (written to a temporary name and renamed)."""
    arch = name.split(":", 1)[1]
    if arch not in TORCHVISION_URLS:
        raise UserError(f"{name}: expected torchvision:{' or torchvision:'.join(TORCHVISION_URLS)}")
    url = TORCHVISION_URLS[arch]
    torch_home = os.environ.get("TORCH_HOME", os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"))
    folder = os.path.join(torch_home, "hub", "checkpoints")
    path = os.path.join(folder, url.rsplit("/", 1)[1])
    if os.path.isfile(path):
        return path
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"{path}: not cached, and HF_HUB_OFFLINE=1 forbids downloading")
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".download-", dir=folder)
    os.close(handle)
    try:
        urllib.request.urlretrieve(url, tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


class ResNet:
    """A frozen ResNet frame encoder: uint8 frames in, one pooled vector per frame out.

    Args:
        config: the architecture (:class:`ResNetConfig`).
        variables: {'params', 'batch_stats'} of :class:`ResNetFeatures`.
        preprocessing: how frames are resized, cropped and normalised (default: CLIP's, as the
            reference feeds its frames).
        pooling: ``max`` (the reference's) or ``mean`` over the feature map.
        dtype: compute dtype; vectors are returned in float32.
        mesh, batch_size: frames per compiled call, sharded over the mesh's first axis.
    """

    def __init__(self, config: ResNetConfig, variables: Mapping,
                 preprocessing: ImagePreprocessing | None = None, pooling: str = "max",
                 dtype: Any = jnp.float32, mesh: Mesh | None = None, batch_size: int = 64):
        if pooling not in POOLINGS:
            raise UserError(f"pooling={pooling!r}: expected one of {', '.join(POOLINGS)}")
        self.config = config
        self.preprocessing = preprocessing or ImagePreprocessing()
        self.pooling = pooling
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self._runner = BatchedRunner(mesh, batch_size)
        self.mesh, self.batch_size = self._runner.mesh, self._runner.batch_size
        self.variables = jax.device_put(dict(variables), self._runner.replicated)
        model = ResNetFeatures(config, dtype=self.dtype)

        def image_fn(variables, images):
            pixels = self.preprocessing.normalize(images, self.dtype)
            return pool_features(model.apply(variables, pixels), pooling)

        self._image_fn = self._runner.jit(image_fn)

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_RESNET, *, output_stride: int = 16,
                        pooling: str = "max", preprocessing: str | ImagePreprocessing = "clip",
                        dtype: Any = jnp.float32, mesh: Mesh | None = None, batch_size: int = 64,
                        **hub_kwargs: Any) -> ResNet:
        """Loads torchvision-layout weights (see the module docs for what ``name_or_path`` may
        be); ``hub_kwargs`` go to transformers' ``cached_file`` (revision, cache_dir, token)."""
        if name_or_path.startswith("torchvision:"):
            name_or_path = _torchvision_file(name_or_path)
        state = read_weights(name_or_path, **hub_kwargs)
        config = config_from_state_dict(state, output_stride, source=name_or_path)
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        try:
            variables = params_from_state_dict(state, config, dtype)
        except ValueError as e:
            raise UserError(f"{name_or_path}: {e}") from e
        if isinstance(preprocessing, str):
            if preprocessing not in ("clip", "imagenet"):
                raise UserError(f"preprocessing={preprocessing!r}: expected clip or imagenet")
            preprocessing = (ImagePreprocessing() if preprocessing == "clip"
                             else IMAGENET_PREPROCESSING)
        return cls(config, variables, preprocessing, pooling, dtype, mesh, batch_size)

    @property
    def embedding_dim(self) -> int:
        return self.config.widths[-1]

    @property
    def image_size(self) -> tuple[int, int]:
        p = self.preprocessing
        return p.crop_size or p.resize_to or (p.shortest_edge, p.shortest_edge)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        raise ValueError("a ResNet encodes images only: query this model with images")

    def preprocess(self, images: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
        """Images of any size -> uint8 [B, h, w, 3] resized and cropped (host side, PIL)."""
        h, w = self.image_size
        out = [self.preprocessing.resize_and_crop(im) for im in images]
        return np.stack(out) if out else np.zeros((0, h, w, 3), np.uint8)

    def encode_image(self, images: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
        """uint8 RGB images of any size -> pooled vectors, float32 [B, embedding_dim]."""
        return self.encode_preprocessed(self.preprocess(images))

    def encode_preprocessed(self, images: np.ndarray) -> np.ndarray:
        """Images already resized and cropped (uint8 [B, h, w, 3], from :meth:`preprocess`)."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected preprocessed uint8 images [B, h, w, 3], got "
                             f"{images.shape}")
        if len(images) == 0:
            return np.zeros((0, self.embedding_dim), np.float32)
        return self._runner(lambda x: self._image_fn(self.variables, x), images)
