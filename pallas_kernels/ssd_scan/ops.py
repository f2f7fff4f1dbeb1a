"""ssd_scan: the chunked scalar-decay scan with Pallas forward and backward kernels (custom_vjp).

Forward kernels give o and the final state; the backward kernels give dq, dk, dv and the initial
state's gradient. The log-decay gradient needs no kernel: with G the cumulative log decay, every
output depends on G only through exp(G_t) q_t and exp(-G_s) k_s (per document), so
dL/dG_t = q_t . dq_t - k_t . dk_t (+ <dS_final, S_final> at the last token), and dL/dg_t is the sum of
that over t and the later tokens of its document: an elementwise product and a segmented reverse
cumsum in XLA, as flash-linear-attention also does.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from zoo.layers.recurrent import NO_SEGMENT, continues
from zoo.pallas_kernels import dispatch
from zoo.pallas_kernels.ssd_scan import gpu, tpu
from zoo.pallas_kernels.ssd_scan.reference import ssd_scan_reference
from zoo.pallas_kernels.tiles import triton_width

KERNELS = {"gpu": gpu, "tpu": tpu}


class Prepared(NamedTuple):
    """Kernel inputs: T padded to a multiple of the chunk (and, on GPU, K and V to powers of two)."""

    q: jax.Array  # [B, T, G, K]
    k: jax.Array  # [B, T, G, K]
    v: jax.Array  # [B, T, H, V]
    cum: jax.Array  # [B, T, H] float32 chunk-local inclusive cumsum of the log decay
    seg: jax.Array  # [B, T] float32 segment ids (exact below 2^24)
    segprev: jax.Array  # [B, T] float32 segment id of each token's predecessor


class _Static(NamedTuple):
    kind: str
    interpret: bool
    chunk: int


def ssd_scan(q, k, v, log_decay, segment_ids, state, last_segment=None, chunk_size: int = 64, *,
             impl: str = "auto", dtype=None, platform: str | None = None):
    """S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, restarting at document boundaries.

    q, k [B, T, G, K] (G groups, dividing H); v [B, T, H, V]; log_decay [B, T, H] (<= 0); segment_ids
    [B, T]; state [B, H, K, V] entering the sequence; last_segment [B] the segment of the token before
    it (None: nothing continues). dtype: matmul input dtype of the kernels (default v's; the XLA
    reference always computes in float32). Returns (o [B, T, H, V], final state float32); o is float32
    from the reference and `dtype` from the kernels.
    """
    batch, length, heads, _ = v.shape
    if heads % q.shape[2] or q.shape != k.shape:
        raise ValueError(f"q and k [B, T, G, K] must match, with G dividing v's heads: {q.shape}, {k.shape}, {v.shape}")
    backend = dispatch.resolve(impl, platform)
    if backend.kind == "xla":
        return ssd_scan_reference(q, k, v, log_decay, segment_ids, state, last_segment, chunk_size)
    dispatch.check_chunk(backend, chunk_size)
    if last_segment is None:
        last_segment = jnp.full((batch,), NO_SEGMENT, jnp.int32)
    dtype = dtype or v.dtype
    static = _Static(backend.kind, backend.interpret, chunk_size)
    args = (q.astype(dtype), k.astype(dtype), v.astype(dtype), log_decay.astype(jnp.float32), state.astype(jnp.float32),
            segment_ids.astype(jnp.int32), last_segment.astype(jnp.int32))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return _scan(static, *args)
    return _scan_per_shard(static, mesh, *args)


def _scan_per_shard(static: _Static, mesh, q, k, v, log_decay, state, segment_ids, last_segment):
    """Under a mesh (the train step's): dispatch.per_shard, with grouped q and k repeated to heads so
    that every input splits the same way when heads are split."""
    if q.shape[2] != v.shape[2]:
        q, k = (jnp.repeat(a, v.shape[2] // q.shape[2], axis=2) for a in (q, k))
    shard = dispatch.per_shard(functools.partial(_scan, static), mesh, v.shape,
                               ("b.h.", "b.h.", "b.h.", "b.h", "bh..", "b.", "b"), ("b.h.", "bh.."))
    return shard(q, k, v, log_decay, state, segment_ids, last_segment)


def _feature_size(kind: str, size: int) -> int:
    if kind != "gpu":
        return size
    return triton_width(size)


def prepare(kind: str, chunk: int, q, k, v, log_decay, segment_ids, last_segment, state):
    c = chunk
    batch, length, heads, dv = v.shape
    dk = q.shape[-1]
    pad_t = -length % c
    pad_k, pad_v = _feature_size(kind, dk) - dk, _feature_size(kind, dv) - dv
    q, k = (jnp.pad(a, ((0, 0), (0, pad_t), (0, 0), (0, pad_k))) for a in (q, k))
    v = jnp.pad(v, ((0, 0), (0, pad_t), (0, 0), (0, pad_v)))
    g = jnp.pad(log_decay, ((0, 0), (0, pad_t), (0, 0)))
    cum = jnp.cumsum(g.reshape(batch, -1, c, heads), axis=2).reshape(g.shape)
    # Padding continues the last document with zero inputs and zero log decay: the state passes unchanged.
    seg = jnp.pad(segment_ids, ((0, 0), (0, pad_t)), mode="edge").astype(jnp.float32)
    segprev = jnp.concatenate([last_segment[:, None].astype(jnp.float32), seg[:, :-1]], axis=1)
    state = jnp.pad(state, ((0, 0), (0, 0), (0, pad_k), (0, pad_v)))
    return Prepared(q, k, v, cum, seg, segprev), state


def _pad_like(x, padded_shape):
    return jnp.pad(x, [(0, p - s) for s, p in zip(x.shape, padded_shape)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(static: _Static, q, k, v, log_decay, state, segment_ids, last_segment):
    return _scan_forward(static, q, k, v, log_decay, state, segment_ids, last_segment)[0]


def _scan_forward(static, q, k, v, log_decay, state, segment_ids, last_segment):
    p, padded_state = prepare(static.kind, static.chunk, q, k, v, log_decay, segment_ids, last_segment, state)
    o, final = KERNELS[static.kind].forward(p, padded_state, chunk=static.chunk, interpret=static.interpret)
    length, (dk, dv) = v.shape[1], state.shape[2:]
    o, final = o[:, :length, :, :dv], final[:, :, :dk, :dv]
    return (o, final), (q, k, v, log_decay, state, segment_ids, last_segment, final)


def _scan_backward(static, residuals, cotangents):
    q, k, v, log_decay, state, segment_ids, last_segment, final = residuals
    do, dfinal = cotangents
    batch, length, heads, dv = v.shape
    groups, dk = q.shape[2:]
    p, padded_state = prepare(static.kind, static.chunk, q, k, v, log_decay, segment_ids, last_segment, state)
    do = _pad_like(do.astype(p.v.dtype), p.v.shape)
    dfinal_padded = _pad_like(dfinal.astype(jnp.float32), padded_state.shape)
    dq, dk_, dv_, dstate = KERNELS[static.kind].backward(p, padded_state, do, dfinal_padded, chunk=static.chunk,
                                                         interpret=static.interpret)
    dq, dk_, dv_ = dq[:, :length, :, :dk], dk_[:, :length, :, :dk], dv_[:, :length, :, :dv]
    dstate = dstate[:, :, :dk, :dv]

    per_group = heads // groups
    q_heads, k_heads = (jnp.repeat(a.astype(jnp.float32), per_group, axis=2) for a in (q, k))
    dcum = jnp.sum(q_heads * dq - k_heads * dk_, axis=-1)  # [B, T, H]
    dcum = dcum.at[:, -1].add(jnp.sum(dfinal * final, axis=(-2, -1)))
    carries = continues(segment_ids, last_segment)
    dlog_decay = reverse_cumsum_within_documents(dcum, carries) * carries[..., None]

    def per_group_sum(x):
        return x.reshape(batch, length, groups, per_group, dk).sum(axis=3)

    return (per_group_sum(dq).astype(q.dtype), per_group_sum(dk_).astype(k.dtype), dv_.astype(v.dtype),
            dlog_decay.astype(log_decay.dtype), dstate.astype(state.dtype), None, None)


_scan.defvjp(_scan_forward, _scan_backward)


def reverse_cumsum_within_documents(x, carries):
    """y_t = x_t + y_{t+1} while token t+1 continues t's document. x [B, T, ...]; carries [B, T] bool."""
    follows = jnp.concatenate([carries[:, 1:], jnp.zeros_like(carries[:, :1])], axis=1)
    follows = follows.reshape(*follows.shape, *(1,) * (x.ndim - 2)).astype(x.dtype)

    def combine(later, earlier):  # elements y -> a * y + b, composed from the end of the sequence
        a_later, b_later = later
        a_earlier, b_earlier = earlier
        return a_later * a_earlier, a_earlier * b_later + b_earlier

    return jax.lax.associative_scan(combine, (jnp.broadcast_to(follows, x.shape), x), reverse=True, axis=1)[1]
