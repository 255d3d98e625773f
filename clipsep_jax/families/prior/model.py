"""The diffusion prior's model pieces: the network a config names, its image-text training pairs,
the training loss, and a loaded prior as a text -> image embedding function.

Training (DALLE2-pytorch's objective): image embeddings are L2-normalised and scaled by sqrt(D);
a time step t ~ U{0, ..., T - 1} and noise give x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
(the cosine schedule of :func:`.network.cosine_schedule`); the network predicts x0 from x_t, t
and the L2-normalised text embedding, which is replaced by the null condition for a fraction
``prior.condition_dropout`` of the examples (classifier-free guidance); the loss is the mean
squared error of x0.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipsep_jax import inference
from clipsep_jax.errors import UserError
from clipsep_jax.families.prior.baselines import unit
from clipsep_jax.families.prior.convert import load_prior_checkpoint
from clipsep_jax.families.prior.network import PriorNetwork, cosine_schedule, sample_prior

__all__ = ["build_network", "PairExamples", "prior_loss", "fixed_time_losses", "LoadedPrior",
           "load_prior"]


def build_network(config: ml_collections.ConfigDict) -> PriorNetwork:
    m = config.model
    return PriorNetwork(dim=m.dim, depth=m.depth, dim_head=m.dim_head, heads=m.heads,
                        ff_mult=m.ff_mult, num_timesteps=m.num_timesteps,
                        max_text_len=m.max_text_len, normformer=m.normformer, variant="head")


class PairExamples:
    """``(index, rng) -> {"text": [D], "image": [D]}``: clip ``index``'s label-prompt text
    embedding and the mean embedding of ``query.num_frames`` frames ``query.frame_stride``
    apart around a centre frame (random in training, the middle one with ``rng=None``): the
    image condition CLIPSonic trains on. Both L2-normalised."""

    def __init__(self, config: ml_collections.ConfigDict, source: Any):
        self.source, self.dim = source, config.model.dim
        self.frames, self.stride = config.query.num_frames, config.query.frame_stride

    def __call__(self, index: int, rng: np.random.Generator | None = None) -> dict:
        record = self.source[index]
        try:
            frames = np.asarray(record["frame_embeddings"], np.float32)
            text = np.asarray(record["text_embedding"], np.float32)
        except KeyError as e:
            raise UserError(f"the dataset's clips have no {e.args[0]!r}: the prior trains on "
                            "CLIP frame and label-prompt embeddings (prepare it with data_prep "
                            "and a CLIP)") from e
        if frames.shape[-1] != self.dim or text.shape[-1] != self.dim:
            raise UserError(f"config.model.dim={self.dim} but the dataset's embeddings have "
                            f"{frames.shape[-1]} dimensions")
        centre = len(frames) // 2 if rng is None else int(rng.integers(0, len(frames)))
        offsets = (np.arange(self.frames) - self.frames // 2) * self.stride
        window = np.clip(centre + offsets, 0, len(frames) - 1)
        return {"text": unit(text).astype(np.float32),
                "image": unit(frames[window].mean(axis=0)).astype(np.float32)}


def _noisy(config: ml_collections.ConfigDict, image: jax.Array, t: jax.Array,
           noise: jax.Array) -> tuple[jax.Array, jax.Array]:
    x0 = image * jnp.sqrt(float(image.shape[-1]))
    abar = jnp.asarray(cosine_schedule(config.model.num_timesteps)["alphas_cumprod"],
                       jnp.float32)[t][:, None]
    return x0, jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def prior_loss(config: ml_collections.ConfigDict, params: Any, batch: dict, rng: jax.Array
               ) -> tuple[jax.Array, dict]:
    """The x0 mean squared error of a batch (see the module docs) -> (loss, metrics)."""
    image, text = batch["image"], batch["text"]
    t_key, noise_key, drop_key = jax.random.split(rng, 3)
    t = jax.random.randint(t_key, (image.shape[0],), 0, config.model.num_timesteps)
    x0, x_t = _noisy(config, image, t, jax.random.normal(noise_key, image.shape))
    drop = jax.random.bernoulli(drop_key, config.prior.condition_dropout, (image.shape[0],))
    predicted = build_network(config).apply({"params": params}, x_t, t, text, None, drop)
    loss = jnp.mean(jnp.square(predicted - x0))
    cosine = jnp.mean(jnp.sum(predicted * x0, -1) / (jnp.linalg.norm(predicted, axis=-1)
                                                      * jnp.linalg.norm(x0, axis=-1) + 1e-12))
    return loss, {"x0_cosine": cosine}


def fixed_time_losses(config: ml_collections.ConfigDict, params: Any, batch: dict) -> jax.Array:
    """Deterministic per-example x0 errors [B]: example ``i`` at t = frac(0.5 + i x golden
    ratio) x T with noise from (seed, i), conditioned."""
    index = batch["index"]
    frac = jnp.mod(0.5 + index.astype(jnp.float32) * 0.6180339887, 1.0)
    t = jnp.minimum((frac * config.model.num_timesteps).astype(jnp.int32),
                    config.model.num_timesteps - 1)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(config.train.seed), i))(index)
    noise = jax.vmap(lambda k: jax.random.normal(k, batch["image"].shape[1:]))(keys)
    x0, x_t = _noisy(config, batch["image"], t, noise)
    predicted = build_network(config).apply({"params": params}, x_t, t, batch["text"])
    return jnp.mean(jnp.square(predicted - x0), axis=-1)


@dataclasses.dataclass
class LoadedPrior:
    """A diffusion prior as ``texts [N, D] -> L2-normalised image embeddings [N, D]`` (DDIM with
    ``steps`` steps, best of ``best_of`` by cosine to the text, guidance ``guidance``, seeded)."""

    network: PriorNetwork
    params: Any
    steps: int = 64
    best_of: int = 2
    guidance: float = 1.0
    seed: int = 0
    description: str = ""

    def __post_init__(self):
        network, num_timesteps = self.network, self.network.num_timesteps

        def run(params, texts, key):
            def apply(x, t, text, encodings, drop):
                return network.apply({"params": params}, x, t, text, encodings, drop)
            return sample_prior(apply, texts, None, key, num_timesteps=num_timesteps,
                                steps=self.steps, guidance=self.guidance, best_of=self.best_of)

        self._run = jax.jit(run)

    def __call__(self, texts: np.ndarray) -> np.ndarray:
        texts = unit(np.asarray(texts, np.float32))
        out = []
        for start in range(0, len(texts), 64):
            key = jax.random.fold_in(jax.random.key(self.seed), start)
            out.append(np.asarray(self._run(self.params, jnp.asarray(texts[start:start + 64]),
                                            key)))
        return unit(np.concatenate(out)).astype(np.float32)


def load_prior(path: str, *, steps: int = 64, best_of: int = 2, guidance: float = 1.0,
               seed: int = 0) -> tuple[LoadedPrior, ml_collections.ConfigDict | None]:
    """A prior trained here (training workdir, model directory or pretrained folder of kind
    ``diffusion_prior``; returned with its config) or a DALLE2-pytorch checkpoint file such as
    LAION's (config None; guidance must be 1: those priors have no null condition)."""
    if Path(path).is_file():
        network, params = load_prior_checkpoint(path)
        if guidance != 1.0:
            raise UserError(f"{path}: a DALLE2-pytorch (LAION) prior has no null condition: "
                            f"guidance must be 1, not {guidance}")
        _check_steps(path, steps, network.num_timesteps)
        return LoadedPrior(network, params, steps, best_of, 1.0, seed,
                           f"DALLE2-pytorch prior {path}"), None
    config, variables = inference.load_for_inference(path)
    if config.model.kind != "diffusion_prior":
        raise UserError(f"{path}: model kind {config.model.kind!r} is not a diffusion prior")
    _check_steps(path, steps, config.model.num_timesteps)
    return LoadedPrior(build_network(config), variables["params"], steps, best_of, guidance,
                       seed, f"diffusion prior {path}"), config


def _check_steps(path: str, steps: int, num_timesteps: int) -> None:
    if not 1 <= steps < num_timesteps:
        raise UserError(f"{path}: {steps} DDIM steps for a prior of {num_timesteps} time "
                        "steps: use at least 1 and fewer than its time steps")
