"""mLSTM's chunkwise form on the scalar-decay scan kernels: the stabiliser and normaliser need no kernel
of their own.

mLSTM (zoo.layers.xlstm) keeps C_t = f_t C_{t-1} + i_t k_t v_t^T and n_t = f_t n_{t-1} + i_t k_t divided
by exp(m_t), with m_t = max(log f_t + m_{t-1}, log i_t) the running max-state. Dividing through, the
stabilised pair is itself a scalar-decay scan:

    [C~ | n~]_t = exp(log f_t + m_{t-1} - m_t) [C~ | n~]_{t-1} + (exp(log i_t - m_t) k_t) [v_t | 1]^T

with log decay <= 0 and key scale <= 1 (both bounded, for any gate values), so ssd_scan runs it with v
widened by a column of ones whose output is n~_t^T q_t. m_t itself is a max-plus linear recurrence,
computed for every token at once by an associative scan; the output
h_t = C~_t^T q_t / (max(|n~_t^T q_t|, exp(-m_t)) + eps) is then elementwise. Gradients flow through
the scan's custom_vjp and through m by autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zoo.layers.recurrent import NEG_LOG, continues
from zoo.pallas_kernels import dispatch
from zoo.pallas_kernels.ssd_scan.ops import ssd_scan


def running_max_state(log_i, log_f, carries, m_initial):
    """m_t = max(log f_t + m_{t-1}, log i_t), restarting (m_{t-1} = -inf) where carries is False.

    log_i, log_f [B, T, H]; carries [B, T]; m_initial [B, H] (the max-state before the sequence)."""
    carry = carries[..., None]
    first = jnp.where(carry[:, :1], jnp.maximum(log_f[:, :1] + m_initial[:, None], log_i[:, :1]), log_i[:, :1])
    offset = jnp.where(carry, log_f, NEG_LOG)  # m_t = max(offset_t + m_{t-1}, log_i_t)
    bound = jnp.concatenate([first, log_i[:, 1:]], axis=1)

    def compose(earlier, later):
        a_earlier, b_earlier = earlier
        a_later, b_later = later
        # Clamped at NEG_LOG so that sums over many document starts stay finite.
        return jnp.maximum(a_earlier + a_later, NEG_LOG), jnp.maximum(a_later + b_earlier, b_later)

    return jax.lax.associative_scan(compose, (offset, bound), axis=1)[1]


def mlstm_scan(q, k, v, log_i, log_f, segment_ids, state, last_segment=None, chunk_size: int = 64, *,
               impl: str = "auto", dtype=None, platform: str | None = None, eps: float = 1e-6):
    """The chunked mLSTM of zoo.layers.xlstm.mlstm_chunked (same arguments and results: q, k [B,T,H,K],
    v [B,T,H,V], log_i, log_f [B,T,H], state {C [B,H,K,V], n [B,H,K], m [B,H]}), on the scan kernels.
    impl="xla" runs mlstm_chunked itself."""
    if dispatch.resolve(impl, platform).kind == "xla":
        from zoo.layers.xlstm import mlstm_chunked  # zoo.layers imports this module

        return mlstm_chunked(q, k, v, log_i, log_f, segment_ids, state, last_segment, chunk_size)
    carries = continues(segment_ids, last_segment)
    m = running_max_state(log_i, log_f, carries, state["m"])
    m_before = jnp.concatenate([state["m"][:, None], m[:, :-1]], axis=1)
    log_decay = jnp.where(carries[..., None], log_f + m_before - m, 0.0)
    keys = k * jnp.exp(log_i - m)[..., None]
    values = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)
    entering = jnp.concatenate([state["C"], state["n"][..., None]], axis=-1)
    out, final = ssd_scan(q, keys, values, log_decay, segment_ids, entering, last_segment, chunk_size,
                          impl=impl, dtype=dtype, platform=platform)
    out = out.astype(jnp.float32)
    numerator, denominator = out[..., :-1], out[..., -1]
    h = numerator / (jnp.maximum(jnp.abs(denominator), jnp.exp(-m)) + eps)[..., None]
    return h, {"C": final[..., :-1], "n": final[..., -1], "m": m[:, -1]}
