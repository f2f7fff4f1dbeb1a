"""One chunk of the scalar-decay scan, as tile arithmetic shared by the GPU (Triton) and TPU (Mosaic)
kernels.

The recurrence is S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t (see zoo.layers.ssd). A chunk of C
tokens with chunk-local cumulative log decay G reads the state S entering it and returns

    o     = ((q k^T) * within) v + (q * read) S
    S_out = survive * S + (k * to_end)^T v

The backward pieces are the transposes of these products. Tiles are 2-D on purpose: a chunk's tokens
lie on rows ([C, 1] "columns") or on lanes ([1, C] "rows"), shapes that both Triton and Mosaic lower;
one-element reductions with a lane mask stand in for scalar indexing, which neither supports on tiles.
Matmul inputs keep the caller's dtype (bf16 on the fast path) and accumulate in float32; the decay
weights and the carried state are float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from zoo.pallas_kernels.tiles import dot, dot_nt, dot_tn


class Decay(NamedTuple):
    within: jax.Array  # [C, C] exp(G_t - G_s) where s <= t in the same document, else 0
    read: jax.Array  # [C, 1] exp(G_t) where t continues the state entering the chunk, else 0
    to_end: jax.Array  # [C, 1] exp(G_last - G_s) where s is in the chunk's last document, else 0
    survive: jax.Array  # [1, 1] exp(G_last) where the entering state reaches the chunk's end, else 0


def decay_terms(cum_col, cum_row, seg_col, seg_row, segprev_row) -> Decay:
    """cum: chunk-local inclusive cumsum of the log decay; seg: segment ids (as float32); segprev_row:
    the segment id of each token's predecessor (its first lane is the token before the chunk)."""
    size = cum_col.shape[0]
    t = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
    s = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, size), 1)
    is_last, is_first = lane == size - 1, lane == 0
    g_last = jnp.sum(jnp.where(is_last, cum_row, 0.0), axis=1, keepdims=True)
    seg_last = jnp.sum(jnp.where(is_last, seg_row, 0.0), axis=1, keepdims=True)
    seg_before = jnp.sum(jnp.where(is_first, segprev_row, 0.0), axis=1, keepdims=True)
    same = (s <= t) & (seg_col == seg_row)
    # The exponent is masked before exp: invisible pairs (s > t) have positive gaps that could overflow.
    within = jnp.where(same, jnp.exp(jnp.where(same, cum_col - cum_row, 0.0)), 0.0)
    read = jnp.where(seg_col == seg_before, jnp.exp(cum_col), 0.0)
    to_end = jnp.where(seg_col == seg_last, jnp.exp(g_last - cum_col), 0.0)
    survive = jnp.where(seg_last == seg_before, jnp.exp(g_last), 0.0)
    return Decay(within, read, to_end, survive)


def output(q, k, v, d: Decay, state):
    """o [C, V] for q, k [C, K], v [C, V] and the entering state [K, V]."""
    dtype = v.dtype
    scores = dot_nt(q, k) * d.within
    return dot(scores.astype(dtype), v) + dot((q * d.read).astype(dtype), state.astype(dtype))


def advance(k, v, d: Decay, state):
    """The state leaving the chunk. Tiles of K (rows of k and state) or V (v and state columns) work."""
    return d.survive * state + dot_tn((k * d.to_end).astype(v.dtype), v)


def grad_q(k, v, do, d: Decay, state):
    """dq [C, K'] for a K-tile k [C, K'] and state [K', V]."""
    dtype = v.dtype
    dscores = dot_nt(do, v) * d.within
    return dot(dscores.astype(dtype), k) + d.read * dot_nt(do, state.astype(dtype))


def grad_k(q, v, do, d: Decay, dstate):
    """dk [C, K'] for a K-tile q [C, K'] and dstate [K', V], the gradient of the state leaving the chunk."""
    dtype = v.dtype
    dscores = dot_nt(do, v) * d.within
    return dot_tn(dscores.astype(dtype), q) + d.to_end * dot_nt(v, dstate.astype(dtype))


def grad_v(q, k, do, d: Decay, dstate):
    """dv [C, V'] for a V-tile do [C, V'] and dstate [K, V']."""
    dtype = do.dtype
    scores = dot_nt(q, k) * d.within
    return dot_tn(scores.astype(dtype), do) + d.to_end * dot(k, dstate.astype(dtype))


def retreat(q, do, d: Decay, dstate):
    """The gradient of the state entering the chunk from that of the state leaving it (tiles as advance)."""
    return d.survive * dstate + dot_tn((q * d.read).astype(do.dtype), do)
