"""Distillation losses against float64 NumPy written from their definitions."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from zoo.train.distill_losses import alignment_mse, logit_kl

FLOAT32_TOLERANCE = 1e-5  # relative; sums of a few hundred float32 terms


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference_kl(teacher, student, weights, temperature, top_k):
    t, s = np.float64(teacher) / temperature, log_softmax(np.float64(student) / temperature)
    total = 0.0
    for index in np.ndindex(weights.shape):
        row_t, row_s = t[index], s[index]
        keep = np.argsort(-row_t)[: top_k or len(row_t)]
        p = np.exp(log_softmax(row_t[keep]))
        total += weights[index] * np.sum(p * (np.log(p) - row_s[keep]))
    return total * temperature**2


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (2.0, None), (1.5, 5)])
def test_logit_kl_matches_its_definition(temperature, top_k, rng):
    teacher, student = (rng.standard_normal((2, 6, 17)).astype(np.float32) * 3 for _ in range(2))
    weights = (rng.random((2, 6)) > 0.3).astype(np.float32)
    ours = float(logit_kl(teacher, student, weights, temperature=temperature, top_k=top_k))
    assert ours == pytest.approx(reference_kl(teacher, student, weights, temperature, top_k), rel=FLOAT32_TOLERANCE)


def test_logit_kl_is_zero_at_the_teacher_and_its_gradient_points_there(rng):
    teacher = rng.standard_normal((3, 11)).astype(np.float32)
    weights = np.ones(3, np.float32)
    assert float(logit_kl(teacher, teacher, weights)) == pytest.approx(0.0, abs=1e-6)
    student = rng.standard_normal((3, 11)).astype(np.float32)
    grad = np.asarray(jax.grad(lambda s: logit_kl(teacher, s, weights))(student))
    # d KL / d student logits = softmax(student) - softmax(teacher), per token
    np.testing.assert_allclose(grad, np.exp(log_softmax(student)) - np.exp(log_softmax(teacher)), atol=1e-6)


def test_alignment_mse_matches_its_definition_and_stops_teacher_gradients(rng):
    student, teacher = rng.standard_normal((2, 4, 5, 8)).astype(np.float32)
    weights = rng.random((4, 5)).astype(np.float32)
    expected = np.sum(np.mean((np.float64(student) - teacher) ** 2, -1) * weights)
    assert float(alignment_mse(student, teacher, weights)) == pytest.approx(expected, rel=FLOAT32_TOLERANCE)
    assert np.all(np.asarray(jax.grad(lambda t: alignment_mse(student, t, weights))(teacher)) == 0)
