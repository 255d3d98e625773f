"""The optimizer and train step against PyTorch's Adam, clipping and the reference's schedule."""

import functools

import jax
import numpy as np
import optax
import pytest
import torch
from test_parity import convert_through_file, make_batch, run_torch, torch_model

from clipsep_jax import convert
from clipsep_jax.config import default_config
from clipsep_jax.train import (
    TrainState,
    learning_rate_multiplier,
    make_optimizer,
    train_step,
)


def reference_multiplier(step, warmup, decay_end, end_multiplier):
    if step < warmup:
        return (step + 1) / warmup
    if step > decay_end:
        return end_multiplier
    return 1 - (1 - end_multiplier) * (step - warmup) / (decay_end - warmup)


def test_learning_rate_schedule_matches_the_reference():
    config = default_config()
    for step in [0, 1, 4999, 5000, 5001, 50_000, 99_999, 100_000, 100_001, 199_999]:
        expected = reference_multiplier(step, 5000, 100_000, 0.1)
        assert float(learning_rate_multiplier(config, step)) == pytest.approx(expected, rel=1e-6)


def test_optimizer_matches_torch_adam_with_clipping_and_schedule():
    """Same gradients into both optimizers for several steps: clip, Adam and schedule agree."""
    config = default_config()
    config.train.lr_warmup_steps = 2
    config.train.lr_decay_end_step = 4
    config.train.grad_norm_clip = 1.0
    rng = np.random.default_rng(0)
    params = {"a": rng.normal(size=(3, 4)).astype(np.float32),
              "b": rng.normal(size=(5,)).astype(np.float32)}
    torch_params = [torch.tensor(params["a"], requires_grad=True),
                    torch.tensor(params["b"], requires_grad=True)]
    optimizer_t = torch.optim.Adam(torch_params, lr=config.train.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer_t, lambda s: reference_multiplier(s, 2, 4, 0.1))
    optimizer = make_optimizer(config)
    opt_state = optimizer.init(params)
    for step in range(7):
        scale = 3.0 if step % 2 else 0.1  # alternate clipped and unclipped steps
        grads = {"a": (scale * rng.normal(size=(3, 4))).astype(np.float32),
                 "b": (scale * rng.normal(size=(5,))).astype(np.float32)}
        torch_params[0].grad = torch.tensor(grads["a"])
        torch_params[1].grad = torch.tensor(grads["b"])
        torch.nn.utils.clip_grad_norm_(torch_params, 1.0)
        optimizer_t.step()
        scheduler.step()
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(params["a"], torch_params[0].detach().numpy(), atol=1e-6)
        np.testing.assert_allclose(params["b"], torch_params[1].detach().numpy(), atol=1e-6)


@pytest.mark.parametrize("kind", ["clipsep", "clipsep_nit", "pit", "labelsep"])
def test_train_step_matches_torch(kind, tmp_path):
    """One full step (forward, loss, gradients, clipping, Adam) from the same parameters.

    Several steps are not compared: wherever successive gradients nearly cancel, Adam's
    normalisation amplifies float32 rounding, and CLIPSep-NIT at the reference's initialisation
    sits on the min(1, sigmoid(z) + sigmoid(n)) kink, where rounding moves mask elements between
    log(tiny) and the -100 clamp; both make later steps differ by percents in either framework.
    """
    net = torch_model(kind, seed=2, layers=5, ngf=8, channels=4)
    config, variables = convert_through_file(net, kind, tmp_path)
    config.train.lr_warmup_steps = 2
    mag_mix, sources, embeddings, labels = make_batch(2, 64, seed=3)

    optimizer_t = torch.optim.Adam(net.parameters(), lr=config.train.learning_rate / 2)
    optimizer_t.zero_grad()
    loss, _ = run_torch(net, kind, mag_mix, sources, embeddings, labels, train=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), config.train.grad_norm_clip)
    optimizer_t.step()

    optimizer = make_optimizer(config)
    state = TrainState(step=np.int32(0), params=variables["params"],
                       model_state={"batch_stats": variables["batch_stats"]},
                       opt_state=optimizer.init(variables["params"]),
                       rng=jax.random.PRNGKey(0), ema_params={})
    queries = {"pit": None, "labelsep": labels.astype(np.int32)}.get(kind, embeddings)
    batch = {"mag_mix": mag_mix, "mags": sources, "queries": queries}
    state, metrics = jax.jit(functools.partial(train_step, config, optimizer))(state, batch)
    assert float(metrics["loss"]) == pytest.approx(loss.item(), rel=1e-4)
    assert float(metrics["grad_norm"]) == pytest.approx(norm.item(), rel=1e-3)
    assert float(metrics["learning_rate"]) == pytest.approx(config.train.learning_rate / 2)
    assert int(state.step) == 1
    trained = dict(net.named_parameters())
    for entry in convert.key_table(config):
        if entry.flax_path[0] != "params":
            continue
        node = state.params
        for part in entry.flax_path[1:]:
            node = node[part]
        if entry.index is not None:
            node = node[entry.index]
        expected = convert._to_flax_layout(trained[entry.torch_key].detach().numpy(), entry.layout)
        # Updates agree to 1e-4 of a step for the median element (any error in the learning
        # rate, Adam or the schedule shows here) and to 5% for the worst: elements whose gradient
        # is the sum of many cancelling terms carry large relative float32 error, and Adam's
        # g / (|g| + eps) passes that on. Clipping is compared in the optimizer test.
        difference = np.abs(np.asarray(node) - expected)
        step_size = config.train.learning_rate / 2
        assert np.median(difference) <= 1e-4 * step_size, entry.torch_key
        assert difference.max() <= 0.05 * step_size, entry.torch_key


def test_the_best_checkpoint_is_kept_and_found(tmp_path):
    """Validation losses 0.5, none, 0.9, 0.7 with keep=1: the best (step 1) stays beside the
    latest and ``"best"`` finds it."""
    import grain

    from clipsep_jax import checkpoints

    saved = checkpoints.TrainingCheckpoints(tmp_path, keep=1)
    iterator = iter(grain.MapDataset.range(4).to_iter_dataset())
    for step, value in ((1, 0.5), (2, None), (3, 0.9), (4, 0.7)):
        metrics = None if value is None else {checkpoints.BEST_METRIC: value}
        saved.save(step, {"w": np.full(3, step, np.float32)}, iterator, metrics)
    saved.wait()
    assert saved.manager.all_steps() == [1, 4]
    assert checkpoints._choose_step(saved.manager, tmp_path, "best") == 1
