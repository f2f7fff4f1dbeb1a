"""The scalar-decay linear recurrence behind Mamba-2 (SSD, Dao & Gu 2024) and RetNet (Sun et al. 2023).

    S_t = exp(g_t) S_{t-1} + k_t v_t^T        S_t [K, V] per head, g_t <= 0 a per-head log decay
    o_t = S_t^T q_t

Mamba-2 reads it as h_t = exp(dt A) h_{t-1} + dt B_t x_t^T, y_t = h_t^T C_t (q=C, k=B, v=dt x);
RetNet as S_n = gamma S_{n-1} + k_n^T v_n with a fixed gamma per head.

Chunked form (the SSD algorithm, "Transformers are SSMs" section 6): within a chunk of C tokens the
output is a masked quadratic form (q k^T weighted by exp(G_t - G_s), G the in-chunk cumulative log
decay); across chunks a state is passed: each chunk adds its tokens' outer products decayed to its
end, and every token reads the entering state decayed by exp(G_t). Everything runs in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zoo.layers.recurrent import chunk, chunk_masks, chunk_size_for, unchunk


def ssd_step(state, q, k, v, log_decay, carry):
    """One token. state [B,H,K,V]; q, k [B,H,K]; v [B,H,V]; log_decay [B,H]; carry [B] bool."""
    decay = jnp.where(carry[:, None], jnp.exp(log_decay), 0.0)
    state = decay[..., None, None] * state + k[..., :, None] * v[..., None, :]
    return state, jnp.einsum("bhk,bhkv->bhv", q, state)


def ssd_chunked(q, k, v, log_decay, segment_ids, state, last_segment, chunk_size: int):
    """q, k [B,T,H,K]; v [B,T,H,V]; log_decay [B,T,H]; state [B,H,K,V] entering the sequence.

    Returns (o [B,T,H,V], final state)."""
    length = q.shape[1]
    size = chunk_size_for(length, chunk_size)
    q, k, v = (chunk(a.astype(jnp.float32), size) for a in (q, k, v))  # [B,N,C,H,*]
    g = chunk(log_decay.astype(jnp.float32), size)  # [B,N,C,H]
    masks = chunk_masks(chunk(segment_ids, size, "edge"), last_segment)
    cum = jnp.cumsum(g, axis=2)
    last = cum[:, :, -1]  # [B,N,H]

    # Inside each chunk: (q k^T * exp(G_t - G_s)) v over visible pairs. The exponent is masked
    # before exp so that invisible pairs (s > t, exponent > 0) cannot overflow.
    visible = masks.same[..., None]  # [B,N,t,s,1]
    gap = jnp.where(visible, cum[:, :, :, None] - cum[:, :, None, :], 0.0)
    weights = jnp.where(visible, jnp.exp(gap), 0.0) * jnp.einsum("bnthk,bnshk->bntsh", q, k)
    out = jnp.einsum("bntsh,bnshv->bnthv", weights, v)

    # Across chunks: what each chunk adds to the state, and how much of the entering state survives.
    to_end = jnp.where(masks.to_last[..., None], jnp.exp(last[:, :, None] - cum), 0.0)  # [B,N,C,H]
    added = jnp.einsum("bnch,bnchk,bnchv->bnhkv", to_end, k, v)
    survive = jnp.where(masks.keep[..., None], jnp.exp(last), 0.0)  # [B,N,H]

    def pass_state(entering, chunk_inputs):
        chunk_added, chunk_survive = chunk_inputs
        return chunk_survive[..., None, None] * entering + chunk_added, entering

    final, entering = jax.lax.scan(
        pass_state, state.astype(jnp.float32), (jnp.moveaxis(added, 1, 0), jnp.moveaxis(survive, 1, 0))
    )
    entering = jnp.moveaxis(entering, 0, 1)  # [B,N,H,K,V]
    read = jnp.where(masks.from_prev[..., None], jnp.exp(cum), 0.0)  # [B,N,C,H]
    out = out + jnp.einsum("bnch,bnchk,bnhkv->bnchv", read, q, entering)
    return unchunk(out, length), final
