"""Distillation losses, as token-weighted sums (divide by the summed weight for a mean), in float32.

- `logit_kl`: KL(teacher || student) of the temperature-softened next-token distributions, times T^2 so
  that gradients keep their scale across temperatures (Hinton et al. 2015). With `top_k`, only the
  teacher's k largest logits are used, renormalised over those k (what a teacher's stored top-k logits
  allow), against the student's log-probabilities over the whole vocabulary at the same tokens.
- `alignment_mse`: mean squared difference per token between a student activation and the teacher's
  (MOHAWK's matrix-mixer and hidden-state alignment stages compare layer outputs this way).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def logit_kl(teacher_logits, student_logits, weights, *, temperature: float = 1.0, top_k: int | None = None):
    """Sum over tokens of weights * T^2 * KL(softmax(teacher / T) || softmax(student / T)).
    logits [..., V], weights [...]."""
    teacher = teacher_logits.astype(F32) / temperature
    student_log_probs = jax.nn.log_softmax(student_logits.astype(F32) / temperature, axis=-1)
    if top_k is not None and top_k < teacher.shape[-1]:
        teacher, index = jax.lax.top_k(teacher, top_k)
        student_log_probs = jnp.take_along_axis(student_log_probs, index, axis=-1)
    teacher_log_probs = jax.nn.log_softmax(teacher, axis=-1)
    per_token = jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
    return jnp.sum(per_token * weights.astype(F32)) * temperature**2


def alignment_mse(student, teacher, weights):
    """Sum over tokens of weights * mean over features of (student - teacher)^2. activations [..., D]."""
    error = jnp.mean(jnp.square(student.astype(F32) - jax.lax.stop_gradient(teacher).astype(F32)), axis=-1)
    return jnp.sum(error * weights.astype(F32))
