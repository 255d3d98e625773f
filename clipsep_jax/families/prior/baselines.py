"""The simple text -> image embedding priors a user can pick instead of the diffusion prior.

Both are fitted on image-text pairs of a split that is not the generator's training data
(CLIPSonic's ``config.clipsonic.prior.split``; the demo's ``held_out``: other recordings of
the same kinds of scene), so no label supervision of the generator's own clips leaks into
CLIPSonic-PD:

- :class:`RidgePrior` (``kind="ridge"``): a linear map fitted by ridge regression from
  L2-normalised text embeddings to L2-normalised image embeddings (bias unpenalised);
- :class:`RetrievalPrior` (``kind="retrieval"``): the mean of the ``top_k`` image embeddings of
  the split most similar (cosine) to the text embedding, as in text-to-frame retrieval.

Both return L2-normalised image embeddings [N, D] for text embeddings [N, D]. The pairs are
each clip's label-prompt text embedding with the mean embedding of its frames
(:func:`image_text_pairs`; CLIPSonic's :func:`clipsep_jax.families.clipsonic.pd.fit_prior`
fits them).
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from clipsep_jax.errors import UserError
from clipsep_jax.input_pipeline import open_split

__all__ = ["RidgePrior", "RetrievalPrior", "image_text_pairs", "unit"]

def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclasses.dataclass
class RidgePrior:
    """image = unit(unit(text) @ weights + bias); weights [D, D], bias [D]."""

    weights: np.ndarray
    bias: np.ndarray

    @classmethod
    def fit(cls, text: np.ndarray, image: np.ndarray, l2: float = 0.1) -> RidgePrior:
        """Least squares with ``l2`` * |weights|^2 on (text [N, D], image [N, D]) pairs."""
        x, y = unit(text), unit(image)
        x_mean, y_mean = x.mean(0), y.mean(0)
        xc, yc = x - x_mean, y - y_mean
        gram = xc.T @ xc + l2 * np.eye(x.shape[1])
        weights = np.linalg.solve(gram, xc.T @ yc)
        return cls(weights.astype(np.float32), (y_mean - x_mean @ weights).astype(np.float32))

    def __call__(self, text: np.ndarray) -> np.ndarray:
        return unit(unit(text) @ self.weights + self.bias).astype(np.float32)


@dataclasses.dataclass
class RetrievalPrior:
    """image = unit(mean of the ``top_k`` bank embeddings most similar to the text)."""

    bank: np.ndarray  # [M, D] image embeddings, L2-normalised
    top_k: int = 8

    def __call__(self, text: np.ndarray) -> np.ndarray:
        similarity = unit(text) @ self.bank.T
        k = min(self.top_k, len(self.bank))
        best = np.argpartition(-similarity, k - 1, axis=-1)[:, :k]
        return unit(self.bank[best].mean(axis=1)).astype(np.float32)


def image_text_pairs(data_config: ml_collections.ConfigDict, split: str
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(label-prompt text embeddings [N, D], mean frame embeddings [N, D]) of a split's clips."""
    source, _ = open_split(data_config, split)
    texts, images = [], []
    for i in range(len(source)):
        example = source[i]
        texts.append(np.asarray(example["text_embedding"], np.float32))
        images.append(np.asarray(example["frame_embeddings"], np.float32).mean(axis=0))
    if not texts:
        raise UserError(f"split {split!r} has no clips to fit the prior on")
    return np.stack(texts), np.stack(images)
