"""The truth for mla_decode: zoo.layers.mla.latent_attention (tested against a float64 NumPy reference in
tests/test_mla.py) with one latent shard and a length mask."""

from __future__ import annotations

import jax.numpy as jnp


def mla_decode_reference(q_lat, q_pe, c, k_pe, lengths, *, scale: float):
    """q_lat [B, H, R], q_pe [B, H, P], c [B, S, R], k_pe [B, S, P], lengths [B] (slots 0 .. length-1 are
    attended) -> the latent output [B, H, R] in float32."""
    from zoo.layers.mla import latent_attention  # layers import the kernels; the truth imports lazily

    mask = jnp.arange(c.shape[1])[None, None, :] < lengths[:, None, None]  # [B, 1, S]
    out = latent_attention(q_lat[:, None, :, None, :].astype(jnp.float32), q_pe[:, None].astype(jnp.float32),
                           c[:, :, None, :].astype(jnp.float32), k_pe.astype(jnp.float32), mask, scale=scale)
    return out[:, 0, :, 0, :]
