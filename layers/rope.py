"""Rotary position embeddings (Su et al. 2021), rotate-half layout as in GPT-NeoX / Llama.

`rotary_dim < head_dim` rotates only the leading `rotary_dim` features (partial RoPE, as in
GPT-NeoX's rotary_pct); MLA's decoupled RoPE is this function applied to its separate rope part.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_inverse_frequencies(rotary_dim: int, base: float) -> jax.Array:
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
    return 1.0 / (base ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float, rotary_dim: int | None = None) -> jax.Array:
    """Rotate x [B, T, heads, D] by positions [B, T]; features past `rotary_dim` pass through."""
    head_dim = x.shape[-1]
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    if not 0 < rotary_dim <= head_dim:
        raise ValueError(f"rotary_dim must be in (0, {head_dim}], got {rotary_dim}")
    angles = positions.astype(jnp.float32)[..., None] * rope_inverse_frequencies(rotary_dim, base)
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    rot = x[..., :rotary_dim].astype(jnp.float32)
    first, second = jnp.split(rot, 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), x[..., rotary_dim:]], axis=-1)
