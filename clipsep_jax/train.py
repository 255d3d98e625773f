"""Training, for every model family: the train state, the optimizer, the sharded step and the loop.

The model family (``config.model.kind``, :mod:`clipsep_jax.families`) supplies the variables,
the loss and the examples; everything here is the same for all of them.

The optimizer clips gradients to a global norm of ``train.grad_norm_clip``, then runs Adam (AdamW
when ``train.weight_decay`` > 0) with the learning rate ``train.learning_rate`` times the
schedule ``train.lr_schedule``: ``warmup_linear`` (the reference's: a linear rise from 0 over
``lr_warmup_steps``, then a linear fall to ``lr_decay_end_multiplier`` times the peak at
``lr_decay_end_step``, flat after), ``warmup_cosine`` (optax's warm-up cosine decay to the same
end value at the same step) or ``constant`` (after the same warm-up).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from clipsep_jax import checkpoints, input_pipeline, sharding
from clipsep_jax.config import validate as validate_config
from clipsep_jax.errors import UserError
from clipsep_jax.families import Family, get_family
from clipsep_jax.files import write_text_atomic
from clipsep_jax.metric_writers import create_writer

__all__ = [
    "learning_rate_multiplier",
    "learning_rate",
    "make_optimizer",
    "TrainState",
    "create_train_state",
    "train_step",
    "sharded_train_state",
    "sharded_train_step",
    "NonFiniteLossError",
    "train_and_evaluate",
]


def learning_rate_multiplier(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
    """The schedule's multiplier at optimizer step ``step`` (0 for the first update);
    ``config`` is the whole config or its ``train`` section."""
    t = config.train if "train" in config else config
    step = jnp.asarray(step, jnp.float32)
    if t.lr_schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, 1.0, max(t.lr_warmup_steps, 1), max(t.lr_decay_end_step, t.lr_warmup_steps + 1),
            end_value=t.lr_decay_end_multiplier)(step)
    rising = (step + 1.0) / max(t.lr_warmup_steps, 1)
    if t.lr_schedule == "constant":
        return jnp.minimum(rising, 1.0)
    position = (step - t.lr_warmup_steps) / max(t.lr_decay_end_step - t.lr_warmup_steps, 1)
    falling = 1.0 - (1.0 - t.lr_decay_end_multiplier) * position
    return jnp.where(
        step < t.lr_warmup_steps,
        rising,
        jnp.where(step > t.lr_decay_end_step, t.lr_decay_end_multiplier, falling),
    )


def learning_rate(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
    """Learning rate of optimizer step ``step``: peak times the schedule's multiplier."""
    t = config.train if "train" in config else config
    return t.learning_rate * learning_rate_multiplier(t, step)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping, then Adam (AdamW with ``weight_decay``) on the schedule."""
    t = config.train if "train" in config else config
    schedule = functools.partial(learning_rate, t)
    if t.weight_decay > 0:
        adam = optax.adamw(schedule, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps,
                           weight_decay=t.weight_decay)
    else:
        adam = optax.adam(schedule, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps)
    return optax.chain(optax.clip_by_global_norm(t.grad_norm_clip), adam)


class TrainState(flax.struct.PyTreeNode):
    """Everything a training step changes.

    step: optimizer steps taken; params: the trained parameters; model_state: the variables the
    model updates itself (BatchNorm statistics: ``{"batch_stats": ...}``; ``{}`` if none);
    opt_state: the optimizer's; rng: a PRNG key (uint32 [2]) folded with the step for each
    step's randomness; ema_params: the parameters' exponential moving average (``{}`` unless
    ``train.ema_decay`` > 0).
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    rng: jax.Array
    ema_params: Any


def create_train_state(
    config: ml_collections.ConfigDict, rng: jax.Array, optimizer: optax.GradientTransformation
) -> TrainState:
    """A fresh state: the family's variables initialised from ``rng``, the step rng from
    ``train.seed``."""
    variables = dict(get_family(config).init_variables(config, rng))
    params = variables.pop("params")
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=variables,
        opt_state=optimizer.init(params),
        rng=jax.random.PRNGKey(config.train.seed + 1),
        ema_params=params if config.train.ema_decay > 0 else {},
    )


def with_frozen(model_state: dict, frozen: dict | None) -> dict:
    """The model state a family's loss and validation read: the trained state, plus the frozen
    variables (:meth:`~clipsep_jax.families.base.Family.frozen_variables`) under ``"frozen"``."""
    return {**model_state, "frozen": frozen} if frozen else model_state


def train_step(
    config: ml_collections.ConfigDict,
    optimizer: optax.GradientTransformation,
    state: TrainState,
    batch: dict,
    frozen: dict | None = None,
) -> tuple[TrainState, dict]:
    """One optimizer step on a batch of the family's training examples.

    Pure: jit it with ``config`` and ``optimizer`` closed over. ``frozen``: the family's frozen
    variables, read by its loss, neither trained nor kept in the state. Returns the new state and
    the metrics: ``loss``, ``grad_norm``, ``learning_rate`` and whatever the family's loss reports.
    """
    family = get_family(config)
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
        return family.loss(config, params, with_frozen(state.model_state, frozen), batch, rng,
                           state.step)

    (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    model_state = {k: v for k, v in model_state.items() if k != "frozen"}
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if config.train.ema_decay > 0:
        ema_params = optax.incremental_update(params, state.ema_params,
                                              1.0 - config.train.ema_decay)
    new_state = state.replace(step=state.step + 1, params=params, model_state=model_state,
                              opt_state=opt_state, ema_params=ema_params)
    metrics = {
        **metrics,
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
    create = functools.partial(create_train_state, config, optimizer=optimizer)
    shardings = sharding.state_shardings(jax.eval_shape(create, rng), mesh, config)
    state = jax.jit(create, out_shardings=shardings)(rng)
    return state, shardings


def sharded_train_step(
    config: ml_collections.ConfigDict, optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh, state_shardings: Any,
):
    """:func:`train_step` jit-compiled for ``mesh``: the state keeps ``state_shardings`` and is
    donated; the batch comes as global arrays (:func:`clipsep_jax.sharding.global_batch`), the
    frozen variables (if any) replicated; metrics are replicated."""
    return jax.jit(
        functools.partial(train_step, config, optimizer),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


# ---------------------------------------------------------------------------------------------
# Validation


def _validation_sums(family: Family, config: ml_collections.ConfigDict, variables: dict,
                     batch: dict) -> tuple[dict, Any]:
    """The family's validation step with its per-example values reduced over the batch's valid,
    finite entries -> ({name: (sum, count)}, summary)."""
    out = family.validation_step(config, variables, batch)
    valid = batch["valid"] > 0
    sums = {}
    for name, values in out["per_example"].items():
        # NaN means "no value for this example" (e.g. the SDR of a silent source), except for
        # the loss, which every example has: a non-finite loss makes the mean NaN.
        counted = valid & (jnp.isfinite(values) | (name == "loss"))
        sums[name] = (jnp.sum(jnp.where(counted, values, 0.0)), jnp.sum(counted))
    return sums, out.get("summary")


def validate(config: ml_collections.ConfigDict, family: Family, variables: dict,
             transform: Any, size: int, mesh: jax.sharding.Mesh,
             step_fn: Any) -> tuple[dict, dict]:
    """Means of the family's per-example validation values over ``size`` examples (every host
    reads its rows; each example counted once) -> (``validation_<name>`` scalars, the first
    batch's summaries for TensorBoard)."""
    limit = config.train.num_validation_examples or size
    size = min(limit, size)
    totals: dict[str, list[float]] = {}
    summary = None
    for batch in input_pipeline.sharded_batches(transform, size, config.train.batch_size, mesh):
        sums, batch_summary = step_fn(variables, batch)
        for name, (total, count) in sums.items():
            entry = totals.setdefault(name, [0.0, 0])
            entry[0] += float(total)
            entry[1] += int(count)
        if summary is None:
            summary = batch_summary
    scalars = {f"validation_{name}": total / count if count else float("nan")
               for name, (total, count) in totals.items()}
    summaries = family.validation_summaries(config, jax.device_get(summary)) if summary else {}
    return scalars, summaries


# ---------------------------------------------------------------------------------------------
# The training loop


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN or infinite loss; the message names the last good checkpoint."""


class Stopped(RuntimeError):  # noqa: N818 (it is how the run ended, not a failure)
    """Training stopped on SIGTERM (pre-emption) or SIGINT (interrupted) after saving a
    checkpoint; ``signal_number`` says which, ``step`` where."""

    def __init__(self, signal_number: int, step: int, directory: str):
        self.signal_number, self.step = signal_number, step
        how = "pre-empted (SIGTERM)" if signal_number == signal.SIGTERM else "interrupted"
        super().__init__(f"{how} at step {step}: checkpoint saved in {directory}; run the same "
                         "command to resume")


class _StopSignal:
    """Records SIGTERM (pre-emption) and SIGINT while installed; on several hosts they agree on
    whether any of them got one, so all stop at the same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> _StopSignal:
        self.previous = {s: signal.signal(s, self._record) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _record(self, signum, frame) -> None:
        self.received = signum

    def any_host(self) -> int | None:
        """The signal any host received (SIGTERM if several), or None."""
        if jax.process_count() == 1:
            return self.received
        received = multihost_utils.process_allgather(np.int32(self.received or 0))
        received = [int(r) for r in np.ravel(received) if r]
        return signal.SIGTERM if signal.SIGTERM in received else (received[0] if received
                                                                  else None)


# Fields that shape the train state: a run cannot resume with other values.
_STATE_SHAPING = ("model", "num_sources")


def _config_mismatch(saved: ml_collections.ConfigDict,
                     config: ml_collections.ConfigDict) -> list[str]:
    """'field: saved value, given value' for each field that shapes the train state."""
    def flat(c):
        out = {}
        for key in _STATE_SHAPING:
            value = c[key]
            if isinstance(value, ml_collections.ConfigDict):
                out.update({f"{key}.{k}": v for k, v in _flatten(value.to_dict())})
            else:
                out[key] = value
        out["train.ema_decay > 0"] = c.train.ema_decay > 0
        out["train.weight_decay > 0"] = c.train.weight_decay > 0
        return out

    a, b = flat(saved), flat(config)
    return [f"{k}: {a.get(k)!r} in the run, {b.get(k)!r} given" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def _trim_log(path: str, step: int) -> None:
    """Drops the lines of steps after ``step`` (written after the checkpoint a resumed run
    starts from), so the log holds every step once."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a line torn by a kill while it was written
            continue
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(kept))


def _variables(state: TrainState) -> dict:
    """The variables validation and evaluation use: the EMA parameters when kept."""
    params = state.ema_params if jax.tree_util.tree_leaves(state.ema_params) else state.params
    return {"params": params, **state.model_state}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains ``config`` with checkpoints, logs and validation in ``workdir``; resumes from the
    last checkpoint there (the newest intact one). Every host runs this. Returns the final state;
    raises :class:`Stopped` after saving on SIGTERM / SIGINT, :class:`NonFiniteLossError` on a
    NaN or infinite loss, ValueError naming the field or file for a config or workdir it cannot
    use.

    ``workdir/config.json`` is written once the state exists (restored or new), so a failed
    start leaves an existing run's files as they were."""
    validate_config(config)
    family = get_family(config)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config)
    t = config.train
    rows = family.rows_per_step(config)
    if t.batch_size % mesh.devices.size:
        raise UserError(f"config.train.batch_size={t.batch_size} is not divisible by the "
                        f"{mesh.devices.size} devices")
    if rows % mesh.devices.size:
        raise UserError(f"the family draws {rows} rows per step (config.train.batch_size="
                        f"{t.batch_size} plus the rows its loss drops, e.g. "
                        f"config.clipsep.drop_closest), not divisible by the "
                        f"{mesh.devices.size} devices")

    train_source, metadata = input_pipeline.open_split(config.data, config.data.train_split)
    train_source = input_pipeline.every_nth(train_source, config.data.train_stride,
                                            config.data.train_offset)
    val_source, _ = input_pipeline.open_split(config.data, config.data.val_split)
    batches = input_pipeline.training_batches(
        config, family.training_transform(config, train_source, metadata), len(train_source),
        mesh, rows)
    val_transform = family.validation_transform(config, val_source, metadata)
    frozen = family.frozen_variables(config)
    frozen = sharding.replicate(frozen, mesh) if frozen else None

    optimizer = make_optimizer(config)
    state, shardings = sharded_train_state(config, jax.random.PRNGKey(t.seed), optimizer, mesh)
    step_fn = sharded_train_step(config, optimizer, mesh, shardings)
    validation_fn = jax.jit(functools.partial(_validation_sums, family, config),
                            out_shardings=sharding.replicated(mesh))

    saved = checkpoints.TrainingCheckpoints(workdir, t.keep_checkpoints)
    log_path = os.path.join(workdir, "train_log.jsonl")
    if saved.latest_step() is not None:
        if os.path.exists(os.path.join(workdir, checkpoints.CONFIG_FILE)):
            differences = _config_mismatch(checkpoints.load_config(workdir), config)
            if differences:
                raise checkpoints.CheckpointError(
                    f"{workdir} holds a run of another model, which this config cannot resume: "
                    + "; ".join(differences) + f". Use a new --workdir, or the run's own config "
                    f"(--config=configs/from_workdir.py:{workdir})")
        state = saved.restore_newest_intact(state, batches.grain_iterator)
        print(f"resumed from step {int(state.step)} in {saved.directory}", flush=True)
        if is_main:
            _trim_log(log_path, int(state.step))
    if is_main:
        checkpoints.write_config(workdir, config)
    start_step = int(state.step)
    writer = create_writer(os.path.join(workdir, "logs"), is_main_process=is_main)
    if start_step == 0:
        writer.write_hparams(dict(_flatten(config.to_dict())))

    history: list[dict] = []
    timer = time.perf_counter()
    timer_step = start_step
    pending = None  # (step, metrics) of the step whose loss has not been checked yet

    def check(step_and_metrics):
        step, metrics = step_and_metrics
        values = {k: float(v) for k, v in metrics.items()}
        if not np.isfinite(values["loss"]):
            saved.wait()
            last = saved.latest_step()
            raise NonFiniteLossError(
                f"loss is {values['loss']} at step {step}; training stopped. The last good "
                f"checkpoint is step {last} in {saved.directory}"
                if last is not None else
                f"loss is {values['loss']} at step {step}; training stopped before any "
                "checkpoint was written")
        history.append({"step": step, **values})
        del history[: -t.log_every_steps]
        return values

    def append_log(record: dict) -> None:
        if is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    try:
        with _StopSignal() as stop:
            for step in range(start_step + 1, t.num_steps + 1):
                if step == t.profile_start_step:
                    jax.profiler.start_trace(os.path.join(workdir, "profile"))
                state, metrics = step_fn(state, next(batches), frozen)
                if pending is not None:
                    check(pending)
                pending = (step, metrics)
                if t.profile_start_step >= 0 and step == t.profile_start_step + t.profile_num_steps:
                    jax.profiler.stop_trace()
                stopping = stop.any_host()
                checkpoint_now = step % t.checkpoint_every_steps == 0 or step == t.num_steps
                # On a stop signal the checkpoint comes first: validation could outlast the
                # pre-emption grace period.
                validate_now = ((step % t.validation_every_steps == 0 or step == t.num_steps)
                                and not stopping)
                if step % t.log_every_steps == 0 or checkpoint_now or stopping:
                    check(pending)
                    pending = None
                    window = [h for h in history if h["step"] > step - t.log_every_steps]
                    elapsed = time.perf_counter() - timer
                    rate = (step - timer_step) / max(elapsed, 1e-9)
                    scalars = {
                        **{k: v for k, v in window[-1].items() if k != "step"},
                        "loss": float(np.mean([h["loss"] for h in window])),
                        "steps_per_s": rate,
                        "examples_per_s": rate * t.batch_size,
                    }
                    writer.write_scalars(step, scalars)
                    eta = (t.num_steps - step) / max(rate, 1e-9)
                    append_log({"step": step, **scalars, "last_loss": window[-1]["loss"]})
                    if is_main:
                        print(f"step {step}/{t.num_steps}  loss {scalars['loss']:.4f}  "
                              f"{rate:.2f} steps/s  {rate * t.batch_size:.1f} examples/s  "
                              f"ETA {eta / 60:.1f} min", flush=True)
                    timer, timer_step = time.perf_counter(), step
                val_scalars = None
                if validate_now:
                    variables = _variables(state)
                    if frozen:
                        variables["frozen"] = frozen
                    val_scalars, summaries = validate(config, family, variables,
                                                      val_transform, len(val_source), mesh,
                                                      validation_fn)
                    if val_scalars:
                        writer.write_scalars(step, val_scalars)
                    if summaries:
                        writer.write_images(step, summaries["images"])
                        writer.write_audios(step, summaries["audios"],
                                            sample_rate=config.audio.sample_rate)
                    append_log({"step": step, **val_scalars})
                    if is_main:
                        print(f"step {step}  " + "  ".join(
                            f"{k} {v:.3f}" for k, v in val_scalars.items()), flush=True)
                if checkpoint_now or validate_now or stopping:
                    saved.save(step, state, batches.grain_iterator, val_scalars)
                if stopping:
                    saved.wait()
                    raise Stopped(stopping, step, str(saved.directory))
            if pending is not None:
                check(pending)
    finally:
        saved.close()
        writer.flush()
    return state


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
