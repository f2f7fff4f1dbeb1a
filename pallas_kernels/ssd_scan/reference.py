"""The truth the scan kernels are tested against: zoo.layers.ssd's chunked form (itself tested against
a float64 per-token loop of the recurrence), with grouped q/k repeated to heads and autodiff for grads."""

from __future__ import annotations

import jax.numpy as jnp

from zoo.layers.ssd import ssd_chunked


def ssd_scan_reference(q, k, v, log_decay, segment_ids, state, last_segment, chunk_size: int):
    """q, k [B, T, G, K] with G dividing H; v [B, T, H, V]; log_decay [B, T, H]; state [B, H, K, V]."""
    per_group = v.shape[2] // q.shape[2]
    q, k = (jnp.repeat(a, per_group, axis=2) for a in (q, k))
    return ssd_chunked(q, k, v, log_decay, segment_ids, state, last_segment, chunk_size)
