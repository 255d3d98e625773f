"""Training state, optimizer and the train step.

The optimizer is the reference's: Adam with a learning rate that rises linearly from 0 over
``lr_warmup_steps``, then falls linearly to ``lr_decay_end_multiplier`` times its peak at
``lr_decay_end_step`` and stays there, after clipping gradients to a global norm of
``grad_norm_clip``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from clipsep_jax.models import forward, init_variables


def learning_rate_multiplier(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
    """The reference's multiplier at optimizer step ``step`` (0 for the first update)."""
    t = config.train
    step = jnp.asarray(step, jnp.float32)
    rising = (step + 1.0) / max(t.lr_warmup_steps, 1)
    position = (step - t.lr_warmup_steps) / max(t.lr_decay_end_step - t.lr_warmup_steps, 1)
    falling = 1.0 - (1.0 - t.lr_decay_end_multiplier) * position
    return jnp.where(
        step < t.lr_warmup_steps,
        rising,
        jnp.where(step > t.lr_decay_end_step, t.lr_decay_end_multiplier, falling),
    )


def learning_rate(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
    """Learning rate of optimizer step ``step``: peak times the reference's multiplier."""
    return config.train.learning_rate * learning_rate_multiplier(config, step)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping, then Adam with the reference's learning-rate schedule."""
    t = config.train
    return optax.chain(
        optax.clip_by_global_norm(t.grad_norm_clip),
        optax.adam(
            lambda count: learning_rate(config, count),
            b1=t.adam_b1,
            b2=t.adam_b2,
            eps=t.adam_eps,
        ),
    )


class TrainState(flax.struct.PyTreeNode):
    """Everything a training step changes: step count, parameters, BatchNorm statistics, Adam."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def create_train_state(
    config: ml_collections.ConfigDict, rng: jax.Array, optimizer: optax.GradientTransformation
) -> TrainState:
    variables = init_variables(config, rng)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=optimizer.init(variables["params"]),
    )


def training_queries(config: ml_collections.ConfigDict, batch: dict, step: jax.Array):
    """The queries of this step: ``batch["queries"]``, or for hybrid training image queries on
    even steps and text queries on odd steps (the reference's alternation)."""
    if "queries" in batch or config.model.kind == "pit":
        return batch.get("queries")
    if config.query.mode == "hybrid":
        return jnp.where(step % 2 == 0, batch["image_queries"], batch["text_queries"])
    return batch[f"{config.query.mode}_queries"]


def train_step(
    config: ml_collections.ConfigDict,
    optimizer: optax.GradientTransformation,
    state: TrainState,
    batch: dict,
) -> tuple[TrainState, dict]:
    """One optimizer step on ``batch`` = {mag_mix [B, 513, T], mags [B, N, 513, T], queries}
    (or ``image_queries`` / ``text_queries`` [B, N, D], chosen by :func:`training_queries`).

    Pure: jit it with ``config`` and ``optimizer`` closed over. Returns the new state and metrics
    (``loss``, ``grad_norm``, ``learning_rate``).
    """

    queries = training_queries(config, batch, state.step)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        out = forward(
            config, variables, batch["mag_mix"], queries, batch["mags"],
            train=True, step=state.step,
        )
        return out["loss"], out["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": learning_rate(config, state.step),
    }
    return new_state, metrics


def sharded_train_state(
    config: ml_collections.ConfigDict, rng: jax.Array, optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
) -> tuple[TrainState, Any]:
    """A train state created directly in its shards on ``mesh``; returns (state, shardings)."""
    from clipsep_jax import sharding

    create = functools.partial(create_train_state, config, optimizer=optimizer)
    shardings = sharding.state_shardings(jax.eval_shape(create, rng), mesh, config)
    state = jax.jit(create, out_shardings=shardings)(rng)
    return state, shardings


def sharded_train_step(
    config: ml_collections.ConfigDict, optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh, state_shardings: Any,
):
    """:func:`train_step` jit-compiled for ``mesh``: the state keeps ``state_shardings`` and is
    donated; the batch comes as global arrays (:func:`clipsep_jax.sharding.global_batch`);
    metrics are replicated."""
    from clipsep_jax import sharding

    return jax.jit(
        functools.partial(train_step, config, optimizer),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
