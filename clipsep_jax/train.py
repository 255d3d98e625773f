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
import numpy as np
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


# ---------------------------------------------------------------------------------------------
# The training loop


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN or infinite loss; the message names the last good checkpoint."""


def eval_step(config: ml_collections.ConfigDict, state: TrainState, batch: dict) -> dict:
    """Evaluation-mode forward on ``batch``: loss and query mask logits [B, N, F', T]."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    out = forward(config, variables, batch["mag_mix"], batch.get("queries"), batch["mags"])
    return {"loss": out["loss"], "query_logits": out["query_logits"]}


def _checkpoint_manager(config: ml_collections.ConfigDict, directory: str):
    import orbax.checkpoint as ocp

    policies = ocp.checkpoint_managers
    preservation = policies.AnyPreservationPolicy([
        policies.LatestN(n=config.train.keep_checkpoints),
        policies.BestN(get_metric_fn=lambda m: m["validation_loss"], reverse=True, n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(preservation_policy=preservation,
                                           enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(directory, options=options,
                                 item_names=("state", "data"))


def _save(manager, step: int, state: TrainState, iterator, metrics: dict | None = None) -> None:
    import grain
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)),
        metrics=metrics, force=True)


def _restore(manager, step: int, abstract_state, iterator):
    import grain
    import orbax.checkpoint as ocp

    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(iterator)))
    return restored["state"]


def validate(
    config: ml_collections.ConfigDict, state: TrainState, dataset, mesh, eval_fn, separate_fn,
) -> tuple[dict, dict]:
    """Validation loss over the split (full batches) and plain SDR of a fixed subset with image
    and text queries; returns (scalars, summaries of the first few examples)."""
    from clipsep_jax import input_pipeline, sharding
    from clipsep_jax.separation import signal_to_distortion

    devices = mesh.devices.size
    batch_size = min(config.train.batch_size, len(dataset) // devices * devices)
    if batch_size == 0:
        print(f"validation skipped: {len(dataset)} examples for {devices} devices", flush=True)
        return {}, {}
    limit = config.train.num_validation_examples or len(dataset)
    limit = min(limit, len(dataset)) // batch_size * batch_size
    sdr_limit = min(config.train.validation_sdr_examples, limit)
    losses, sdr, summaries, mixture_sdr = [], {"image": [], "text": []}, {}, []
    modes = ["image", "text"] if config.model.kind not in ("pit", "labelsep") else ["image"]
    for start in range(0, limit, batch_size):
        examples = [dataset[i] for i in range(start, start + batch_size)]
        batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
        for mode in modes:
            inputs = sharding.global_batch(input_pipeline.model_batch(config, batch, mode), mesh)
            out = eval_fn(state, inputs)
            if mode == config.query.mode or (config.query.mode == "hybrid" and mode == "image"):
                losses.append(float(out["loss"]))
            if start < sdr_limit:
                # A silent queried source has no SDR; it is left out, as in the evaluation.
                audible = np.abs(batch["waveforms"][:, 0]).sum(-1) > 1e-5
                if mode == modes[0]:  # the mixture itself scored as the estimate: the baseline
                    mixture = np.broadcast_to(batch["waveforms"].sum(1, keepdims=True),
                                              batch["waveforms"].shape)
                    mixture_sdr.append(np.asarray(
                        signal_to_distortion(batch["waveforms"], mixture))[:, 0][audible])
                mix = batch["mix_stft"][..., 0] + 1j * batch["mix_stft"][..., 1]
                waves = np.asarray(separate_fn(out["query_logits"], mix))
                values = np.asarray(signal_to_distortion(batch["waveforms"], waves))[:, 0]
                sdr[mode].append(values[audible])
                if start == 0 and mode == modes[0]:
                    summaries = _summaries(config, batch, out, waves)
    scalars = {"validation_loss": float(np.mean(losses)) if losses else float("nan")}
    for mode, values in sdr.items():
        if values and len(np.concatenate(values)):
            scalars[f"validation_sdr_{mode}"] = float(np.mean(np.concatenate(values)))
    if mixture_sdr and len(np.concatenate(mixture_sdr)):
        scalars["validation_sdr_mixture"] = float(np.mean(np.concatenate(mixture_sdr)))
    return scalars, summaries


def _summaries(config, batch: dict, out: dict, waves: np.ndarray) -> dict:
    from clipsep_jax import audio
    from clipsep_jax.pictures import spectrogram_picture
    from clipsep_jax.separation import binary_masks

    count = min(config.train.num_summary_examples, len(batch["mag_mix"]))
    images, audios = {}, {}
    mix_log = np.asarray(audio.warp_to_log_frequency(jnp.asarray(batch["mag_mix"][:count])))
    masks = np.asarray(binary_masks(out["query_logits"][:count]))
    for i in range(count):
        images[f"example_{i}/mixture"] = spectrogram_picture(np.log1p(mix_log[i]))
        images[f"example_{i}/mask"] = spectrogram_picture(masks[i, 0])
        audios[f"example_{i}/mixture"] = batch["waveforms"][i].sum(0)[None, :, None]
        audios[f"example_{i}/separated"] = waves[i, :1, :, None]
        audios[f"example_{i}/source"] = batch["waveforms"][i, :1, :, None]
    return {"images": images, "audios": audios}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains ``config`` with checkpoints, logs and validation in ``workdir``; resumes from the
    last checkpoint there. Returns the final state."""
    import json
    import os
    import signal
    import time

    from clipsep_jax import input_pipeline, sharding
    from clipsep_jax.config import validate as validate_config
    from clipsep_jax.metric_writers import create_writer
    from clipsep_jax.separation import linear_masks, masked_waveforms

    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    writer = create_writer(os.path.join(workdir, "logs"), is_main_process=is_main)
    writer.write_hparams(dict(_flatten(config.to_dict())))
    mesh = sharding.make_mesh(config)

    train_source, metadata = input_pipeline.open_split(config, config.data.train_split)
    val_source, _ = input_pipeline.open_split(config, config.data.val_split)
    train_data = input_pipeline.training_dataset(
        config, train_source, metadata, process_index=jax.process_index(),
        process_count=jax.process_count())
    val_data = input_pipeline.evaluation_dataset(config, val_source, metadata,
                                                 seed=config.train.seed)
    iterator = iter(train_data)

    optimizer = make_optimizer(config)
    state, shardings = sharded_train_state(
        config, jax.random.PRNGKey(config.train.seed), optimizer, mesh)
    step_fn = sharded_train_step(config, optimizer, mesh, shardings)
    eval_fn = jax.jit(functools.partial(eval_step, config),
                      out_shardings=sharding.replicated(mesh))
    length = config.audio.crop_samples
    separate_fn = jax.jit(
        lambda logits, mix: masked_waveforms(
            config, linear_masks(config, jax.nn.sigmoid(logits.astype(jnp.float32))), mix,
            length))

    manager = _checkpoint_manager(config, os.path.join(os.path.abspath(workdir), "checkpoints"))
    if manager.latest_step() is not None:
        abstract = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
        state = _restore(manager, manager.latest_step(), abstract, iterator)
        print(f"resumed from step {int(state.step)} in {manager.directory}", flush=True)
    start_step = int(state.step)

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda s, f: stop.update(signal=s))
    log_path = os.path.join(workdir, "train_log.jsonl")
    t = config.train
    history: list[dict] = []
    timer = time.perf_counter()
    timer_step = start_step
    pending = None  # (step, metrics) of the step whose loss has not been checked yet

    def check(step_and_metrics):
        step, metrics = step_and_metrics
        values = {k: float(v) for k, v in metrics.items()}
        if not np.isfinite(values["loss"]):
            manager.wait_until_finished()
            last = manager.latest_step()
            raise NonFiniteLossError(
                f"loss is {values['loss']} at step {step}; training stopped. The last good "
                f"checkpoint is step {last} in {manager.directory}"
                if last is not None else
                f"loss is {values['loss']} at step {step}; training stopped before any "
                "checkpoint was written")
        history.append({"step": step, **values})
        del history[: -t.log_every_steps]
        return values

    try:
        for step in range(start_step + 1, t.num_steps + 1):
            if step == t.profile_start_step:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
            batch = next(iterator)
            inputs = sharding.global_batch(input_pipeline.model_batch(config, batch), mesh)
            state, metrics = step_fn(state, inputs)
            if pending is not None:
                check(pending)
            pending = (step, metrics)
            if t.profile_start_step >= 0 and step == t.profile_start_step + t.profile_num_steps:
                jax.profiler.stop_trace()
            checkpoint_now = step % t.checkpoint_every_steps == 0 or step == t.num_steps
            validate_now = step % t.validation_every_steps == 0 or step == t.num_steps
            if step % t.log_every_steps == 0 or checkpoint_now or stop["signal"]:
                check(pending)
                pending = None
                window = [h for h in history if h["step"] > step - t.log_every_steps]
                elapsed = time.perf_counter() - timer
                rate = (step - timer_step) / max(elapsed, 1e-9)
                scalars = {
                    "loss": float(np.mean([h["loss"] for h in window])),
                    "grad_norm": window[-1]["grad_norm"],
                    "learning_rate": window[-1]["learning_rate"],
                    "steps_per_s": rate,
                    "examples_per_s": rate * t.batch_size,
                }
                writer.write_scalars(step, scalars)
                eta = (t.num_steps - step) / max(rate, 1e-9)
                if is_main:
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"step": step, "loss": window[-1]["loss"],
                                            **{k: v for k, v in scalars.items()
                                               if k != "loss"}}) + "\n")
                    print(f"step {step}/{t.num_steps}  loss {scalars['loss']:.4f}  "
                          f"{rate:.2f} steps/s  {rate * t.batch_size:.1f} examples/s  "
                          f"ETA {eta / 60:.1f} min", flush=True)
                timer, timer_step = time.perf_counter(), step
            val_scalars = None
            if validate_now:
                val_scalars, summaries = validate(config, state, val_data, mesh, eval_fn,
                                                  separate_fn)
                if val_scalars:
                    writer.write_scalars(step, val_scalars)
                if summaries:
                    writer.write_images(step, summaries["images"])
                    writer.write_audios(step, summaries["audios"],
                                        sample_rate=config.audio.sample_rate)
                if is_main:
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"step": step, **val_scalars}) + "\n")
                    print(f"step {step}  " + "  ".join(
                        f"{k} {v:.3f}" for k, v in val_scalars.items()), flush=True)
            if checkpoint_now or validate_now or stop["signal"]:
                _save(manager, step, state, iterator,
                      {"validation_loss": val_scalars["validation_loss"]}
                      if val_scalars and np.isfinite(val_scalars["validation_loss"]) else None)
            if stop["signal"]:
                print(f"SIGTERM: saved step {step}; stopping", flush=True)
                break
        if pending is not None:
            check(pending)
    finally:
        signal.signal(signal.SIGTERM, previous)
        manager.wait_until_finished()
        manager.close()
        writer.flush()
    return state


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
