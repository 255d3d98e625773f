"""Losses against brute-force loops over permutations and against PyTorch's BCE."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import relative_error

from clipsep_jax import losses


def _random_problem(seed, batch, num_queries, num_noise, size=(8, 6)):
    rng = np.random.default_rng(seed)
    query_logits = rng.normal(0, 3, (batch, num_queries, *size)).astype(np.float32)
    noise_logits = rng.normal(-1, 3, (batch, num_noise, *size)).astype(np.float32)
    targets = (rng.uniform(size=(batch, num_queries, *size)) > 0.5).astype(np.float32)
    weight = rng.uniform(1e-3, 3, (batch, *size)).astype(np.float32)
    return query_logits, noise_logits, targets, weight


def _bce_mean(prob, target, weight):
    as_double = lambda x: torch.tensor(np.asarray(x, np.float64))
    return float(F.binary_cross_entropy(as_double(prob), as_double(target), as_double(weight)))


def _sigmoid(x):
    return 1 / (1 + np.exp(-x.astype(np.float64)))


def _brute_force_nit(query_logits, noise_logits, targets, weight, reg_coef, reg_eps, act_coef,
                     act_eps):
    batch, n = query_logits.shape[:2]
    heads = noise_logits.shape[1]
    q, z = _sigmoid(query_logits), _sigmoid(noise_logits)
    per_example = []
    for b in range(batch):
        best = np.inf
        for assignment in itertools.permutations(range(heads), n):
            cost = reg = 0.0
            for i, j in enumerate(assignment):
                combined = np.minimum(1.0, q[b, i] + z[b, j])
                with_noise = _bce_mean(combined, targets[b, i], weight[b])
                cost += with_noise
                reg += max(0.0, with_noise - _bce_mean(z[b, j], targets[b, i], weight[b]) + reg_eps)
            best = min(best, cost / n + reg_coef * reg / n)
        per_example.append(best)
    activation = np.mean(z.sum(axis=1))
    return np.mean(per_example) + act_coef * max(0.0, activation - act_eps)


@pytest.mark.parametrize("num_queries", [2, 3, 4])
@pytest.mark.parametrize("reg_coef", [0.0, 0.5])
def test_nit_loss_equals_a_loop_over_assignments(num_queries, reg_coef):
    problem = _random_problem(num_queries, 3, num_queries, num_queries)
    got = jax.jit(
        lambda *a: losses.nit_loss(*a, reg_coef=reg_coef, reg_epsilon=0.1,
                                   activation_reg_coef=0.1, activation_reg_epsilon=0.25)
    )(*problem)
    expected = _brute_force_nit(*problem, reg_coef, 0.1, 0.1, 0.25)
    assert abs(float(got) - expected) <= 1e-5 * abs(expected)


def test_nit_loss_with_more_noise_heads_than_queries():
    problem = _random_problem(7, 2, 2, 3)
    got = losses.nit_loss(*problem)
    expected = _brute_force_nit(*problem, 0.0, 0.1, 0.1, 0.25)
    assert abs(float(got) - expected) <= 1e-5 * abs(expected)


def test_nit_warm_up_trains_query_masks_alone():
    query_logits, noise_logits, targets, weight = _random_problem(8, 2, 2, 2)
    plain = losses.separation_loss(query_logits, targets, weight)
    assert float(losses.nit_loss(query_logits, noise_logits, targets, weight,
                                 use_noise_heads=False)) == pytest.approx(float(plain))
    traced = jax.jit(lambda flag: losses.nit_loss(query_logits, noise_logits, targets, weight,
                                                  use_noise_heads=flag))
    assert float(traced(False)) == pytest.approx(float(plain))
    assert float(traced(True)) == pytest.approx(
        float(losses.nit_loss(query_logits, noise_logits, targets, weight)))
    assert float(traced(True)) != pytest.approx(float(plain))


@pytest.mark.parametrize("n", [2, 3, 4])
def test_pit_loss_equals_a_loop_over_permutations(n):
    query_logits, _, targets, weight = _random_problem(10 + n, 3, n, n)
    got = jax.jit(losses.pit_loss)(query_logits, targets, weight)
    prob = _sigmoid(query_logits)
    per_example = []
    for b in range(3):
        per_example.append(min(
            np.mean([_bce_mean(prob[b, i], targets[b, perm[i]], weight[b]) for i in range(n)])
            for perm in itertools.permutations(range(n))
        ))
    assert abs(float(got) - np.mean(per_example)) <= 1e-5 * np.mean(per_example)


def test_assignment_table():
    table = losses.assignment_table(3, 3)
    assert table.shape == (6, 3)
    assert {tuple(row) for row in table} == set(itertools.permutations(range(3)))
    assert losses.assignment_table(2, 3).shape == (6, 2)
    with pytest.raises(ValueError):
        losses.assignment_table(3, 2)


def test_bce_matches_torch_values_and_gradients_at_saturation():
    prob = np.array([0.0, 1.0, 0.0, 1.0, 0.3, 1e-30, 1 - 1e-7, 0.5], np.float32)
    target = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.25], np.float32)
    weight = np.array([1.0, 2.0, 0.5, 3.0, 1.5, 1.0, 1.0, 2.0], np.float32)
    p = torch.tensor(prob, requires_grad=True)
    expected = F.binary_cross_entropy(p, torch.tensor(target), torch.tensor(weight),
                                      reduction="none")
    expected.sum().backward()
    value, grad = jax.value_and_grad(
        lambda x: jnp.sum(losses.binary_cross_entropy(x, target, weight))
    )(prob)
    got = losses.binary_cross_entropy(prob, target, weight)
    np.testing.assert_allclose(got, expected.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(grad, p.grad.numpy(), rtol=1e-5)
    assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_gradients_are_finite_when_masks_saturate():
    query_logits, noise_logits, targets, weight = _random_problem(11, 2, 2, 2)
    # Logits of +-200 give sigmoid exactly 0 or 1 in float32; q + n also hits the min(1, .) kink.
    query_logits = np.where(np.arange(query_logits.size).reshape(query_logits.shape) % 2,
                            200.0, -200.0).astype(np.float32)
    noise_logits[:, 0] = 200.0
    for name, fn in {
        "nit": lambda q, z: losses.nit_loss(q, z, targets, weight, reg_coef=0.5),
        "pit": lambda q, z: losses.pit_loss(q, targets, weight),
        "plain": lambda q, z: losses.separation_loss(q, targets, weight),
    }.items():
        value, grads = jax.value_and_grad(fn, argnums=(0, 1))(query_logits, noise_logits)
        assert np.isfinite(value), name
        assert all(np.all(np.isfinite(g)) for g in grads), name


def test_nit_loss_gradient_matches_torch():
    query_logits, noise_logits, targets, weight = _random_problem(12, 2, 2, 2)
    noise_logits[0, 1] += 4.0  # some combined masks clip at 1

    def torch_loss(q, z):
        w = torch.tensor(weight)

        def cost(i, j):
            pred = 1 - F.relu(1 - (torch.sigmoid(q[:, i]) + torch.sigmoid(z[:, j])))
            return F.binary_cross_entropy(pred, torch.tensor(targets[:, i]), w,
                                          reduction="none").mean((1, 2))

        keep = (cost(0, 0) + cost(1, 1)) / 2
        swap = (cost(0, 1) + cost(1, 0)) / 2
        act = torch.mean(torch.sigmoid(z[:, 0]) + torch.sigmoid(z[:, 1]))
        return torch.minimum(keep, swap).mean() + 0.1 * F.relu(act - 0.25)

    q = torch.tensor(query_logits, requires_grad=True)
    z = torch.tensor(noise_logits, requires_grad=True)
    expected = torch_loss(q, z)
    expected.backward()
    value, (grad_q, grad_z) = jax.value_and_grad(
        lambda a, b: losses.nit_loss(a, b, targets, weight), argnums=(0, 1)
    )(query_logits, noise_logits)
    assert float(value) == pytest.approx(expected.item(), rel=1e-5)
    assert relative_error(grad_q, q.grad.numpy()) <= 1e-4
    assert relative_error(grad_z, z.grad.numpy()) <= 1e-4


def test_mask_targets():
    rng = np.random.default_rng(13)
    mags = rng.gamma(0.5, 1.0, (2, 3, 5, 4)).astype(np.float32)
    mix = mags.sum(axis=1) + 1e-10
    targets, weight = losses.mask_targets(mix, mags)
    np.testing.assert_array_equal(targets, (mags > 0.5 * mix[:, None]).astype(np.float32))
    np.testing.assert_allclose(weight, np.clip(np.log1p(mix), 1e-3, 10), rtol=1e-6)
    ratio, ones = losses.mask_targets(mix, mags, binary=False, weighted=False)
    np.testing.assert_allclose(ratio.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(ones, 1.0)
