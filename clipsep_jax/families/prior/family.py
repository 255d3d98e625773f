"""The diffusion prior behind the family interface (model kind ``diffusion_prior``): trained by
``python -m clipsep_jax.main`` on the image-text pairs of a prepared dataset's split (each
clip's label-prompt CLIP text embedding and the CLIP embeddings of its frames), for
CLIPSonic-PD (``config.clipsonic.prior.kind="diffusion"``). Train it on data that is not the
generator's training split, so that no text-audio supervision reaches CLIPSonic-PD.

Validation scores the x0 error at fixed times and noise; evaluation samples an image embedding
for each clip of ``config.eval.split`` from its text and reports the mean cosine similarity to
the clip's own frames' embedding and the accuracy of the nearest class centroid (centroids of
the training split's image embeddings), beside the ridge-regression and retrieval priors fitted
on the same training pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipsep_jax.errors import UserError
from clipsep_jax.families.base import Family
from clipsep_jax.families.prior.baselines import RetrievalPrior, RidgePrior
from clipsep_jax.families.prior.model import (
    LoadedPrior,
    PairExamples,
    build_network,
    fixed_time_losses,
    prior_loss,
)
from clipsep_jax.input_pipeline import open_split, record_column

__all__ = ["PriorFamily"]


class PriorFamily(Family):
    """Text -> image embedding priors (CLIPSonic-PD)."""

    name = "prior"
    kinds = ("diffusion_prior",)
    task = "prior"

    def model_config(self, kind: str) -> ml_collections.ConfigDict:
        m = ml_collections.ConfigDict()
        m.kind = kind
        m.dim = 512  # the CLIP embedding size
        m.depth = 6
        m.heads = 8
        m.dim_head = 64
        m.ff_mult = 4.0
        m.num_timesteps = 1000
        m.max_text_len = 0  # token states: none (the prepared datasets keep only embeddings)
        m.normformer = False
        return m

    def family_config(self) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.condition_dropout = 0.2  # examples trained without their text (guidance)
        c.eval = ml_collections.ConfigDict()
        c.eval.steps = 64  # DDIM steps
        c.eval.best_of = 2
        c.eval.guidance = 1.0
        c.eval.ridge_l2 = 0.1
        c.eval.top_k = 8
        return c

    def kind_defaults(self, config: ml_collections.ConfigDict) -> None:
        config.data.train_split = "held_out"  # not the generator's training clips
        config.train.batch_size = 64
        config.train.learning_rate = 1.1e-4
        config.train.weight_decay = 6.02e-2  # LAION's prior training settings
        config.train.lr_schedule = "warmup_cosine"
        config.train.lr_warmup_steps = 100
        config.train.ema_decay = 0.999

    def validate_config(self, config: ml_collections.ConfigDict) -> None:
        m = config.model
        if m.dim % 2 or m.depth < 1 or m.heads < 1 or m.num_timesteps < 2:
            raise UserError(f"config.model: dim={m.dim} (even), depth={m.depth}, heads="
                            f"{m.heads} (>= 1) and num_timesteps={m.num_timesteps} (>= 2)")
        if not 0.0 <= config.prior.condition_dropout < 1.0:
            raise UserError(f"config.prior.condition_dropout={config.prior.condition_dropout}:"
                            " must be in [0, 1)")
        if not 1 <= config.prior.eval.steps < m.num_timesteps or config.prior.eval.best_of < 1:
            raise UserError(f"config.prior.eval.steps={config.prior.eval.steps} (from 1 to "
                            f"config.model.num_timesteps - 1 = {m.num_timesteps - 1}) and "
                            f"best_of={config.prior.eval.best_of} (>= 1)")

    def init_variables(self, config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
        d = config.model.dim
        return dict(build_network(config).init(rng, jnp.zeros((1, d)), jnp.zeros((1,), jnp.int32),
                                               jnp.zeros((1, d)), None, jnp.zeros((1,), bool)))

    def loss(self, config, params, model_state, batch, rng, step):
        loss, metrics = prior_loss(config, params, batch, rng)
        return loss, (metrics, {})

    def training_transform(self, config, source, metadata):
        return PairExamples(config, source)

    def validation_transform(self, config, source, metadata):
        pairs = PairExamples(config, source)
        return lambda index: pairs(index)

    def validation_step(self, config, variables, batch):
        errors = fixed_time_losses(config, variables["params"], batch)
        # "loss" is what picks the best checkpoint
        return {"per_example": {"loss": errors, "x0_mse": errors}, "summary": None}

    def evaluate(self, config, variables, mesh, *, progress=True):
        def pairs(split):
            source, _ = open_split(config.data, split)
            examples = PairExamples(config, source)
            rows = [examples(i) for i in range(len(source))]
            labels = record_column(source, "label")
            return (np.stack([r["text"] for r in rows]), np.stack([r["image"] for r in rows]),
                    labels)

        train_texts, train_images, train_labels = pairs(config.data.train_split)
        texts, images, labels = pairs(config.eval.split)
        if config.eval.num_examples:
            texts, images = texts[:config.eval.num_examples], images[:config.eval.num_examples]
            labels = labels[:config.eval.num_examples]
        classes = sorted(set(train_labels))
        centroids = np.stack([train_images[[x == c for x in train_labels]].mean(0)
                              for c in classes])
        centroids /= np.linalg.norm(centroids, axis=-1, keepdims=True)
        e = config.prior.eval
        priors = {
            "diffusion prior": LoadedPrior(build_network(config), variables["params"], e.steps,
                                           e.best_of, e.guidance, config.eval.seed),
            "ridge": RidgePrior.fit(train_texts, train_images, e.ridge_l2),
            "retrieval": RetrievalPrior(train_images, e.top_k),
            "text itself": lambda t: t,
        }
        rows = []
        for name, prior in priors.items():
            predicted = np.asarray(prior(texts), np.float64)
            predicted /= np.linalg.norm(predicted, axis=-1, keepdims=True)
            nearest = np.argmax(predicted @ centroids.T, axis=-1)
            rows.append({"prior": name,
                         "cosine": float(np.mean(np.sum(predicted * images, -1))),
                         "centroid_accuracy": float(np.mean([classes[k] == label for k, label
                                                             in zip(nearest, labels,
                                                                    strict=True)]))})
        return {"model_kind": config.model.kind, "split": config.eval.split,
                "train_split": config.data.train_split, "count": len(texts),
                "classes": len(classes), "rows": rows}

    def format_table(self, report: dict) -> str:
        lines = ["| prior | cosine to the clip's frames | nearest-centroid accuracy |",
                 "|---|---|---|"]
        lines += [f"| {r['prior']} | {r['cosine']:.3f} | {r['centroid_accuracy']:.3f} |"
                  for r in report["rows"]]
        lines.append(f"\nImage embeddings predicted from the label-prompt text embeddings of the "
                     f"{report['count']} {report['split']} clips, against each clip's own frames "
                     f"(cosine, higher is better) and the nearest of the {report['classes']} "
                     f"class centroids of the {report['train_split']} split's frames (chance "
                     f"{1 / report['classes']:.3f}). The priors were fitted on the "
                     f"{report['train_split']} split.")
        return "\n".join(lines)

    def describe_model(self, config) -> str:
        m = config.model
        return f"diffusion prior, dim {m.dim}, depth {m.depth}, {m.heads} heads"
