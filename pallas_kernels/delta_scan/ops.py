"""delta_scan: the chunked gated delta rule (Gated DeltaNet), with Pallas kernels for its sequential part.

Forward:
  1. XLA, every chunk at once: the WY representation (UT transform) of zoo.layers.gated_deltanet,
     (I + A) [U | W] = [diag(beta) V | diag(beta * read) K], batched [C, C] unit-triangular solves.
  2. Pallas (gpu.py / tpu.py): walk the chunks carrying the state; o and the final state.
Backward (the custom_vjp of step 2; step 1 is differentiated by autodiff):
  - Pallas: the forward walk again, writing each chunk's entering state, and a reverse walk writing the
    gradient of each chunk's leaving state (and of the initial state).
  - XLA, every chunk at once: given its entering state and its leaving state's gradient, a chunk's
    outputs depend on its own inputs only, so their gradients (q, k, w, u and the cumulative decay) are
    the VJP of chunk_math.forward vmapped over (row, head, chunk) — no hand-derived gradient to get
    wrong, and the chunk-parallel matmuls are what XLA does well.
This is the split flash-linear-attention's chunk_gated_delta_rule makes too (separate kernels for the
WY representation, the state walk, and the outputs).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from zoo.layers.recurrent import NO_SEGMENT
from zoo.pallas_kernels import dispatch
from zoo.pallas_kernels.delta_scan import chunk_math as cm
from zoo.pallas_kernels.delta_scan import gpu, tpu
from zoo.pallas_kernels.delta_scan.reference import delta_scan_reference
from zoo.pallas_kernels.ssd_scan.ops import Prepared, prepare

KERNELS = {"gpu": gpu, "tpu": tpu}
F32 = jnp.float32


class _Static(NamedTuple):
    kind: str
    interpret: bool
    chunk: int
    dtype: str


def delta_scan(q, k, v, log_alpha, beta, segment_ids, state, last_segment=None, chunk_size: int = 64, *,
               impl: str = "auto", dtype=None, platform: str | None = None):
    """S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T q_t, per document.

    Arguments and results as zoo.layers.gated_deltanet.delta_chunked: q, k [B, T, H, K]; v [B, T, H, V];
    log_alpha, beta [B, T, H]; state [B, H, K, V]; last_segment [B] (None: nothing continues). dtype:
    the kernels' matmul input dtype (default v's); the WY representation is always float32. Returns
    (o [B, T, H, V]: float32 from the reference, `dtype` from the kernels; final state float32)."""
    batch, length, heads, _ = v.shape
    if q.shape != k.shape or q.shape[:3] != v.shape[:3] or log_alpha.shape != v.shape[:3] or beta.shape != v.shape[:3]:
        raise ValueError("q, k [B, T, H, K], v [B, T, H, V] and log_alpha, beta [B, T, H] must agree: "
                         f"{q.shape}, {k.shape}, {v.shape}, {log_alpha.shape}, {beta.shape}")
    backend = dispatch.resolve(impl, platform)
    if backend.kind == "xla":
        return delta_scan_reference(q, k, v, log_alpha, beta, segment_ids, state, last_segment, chunk_size)
    dispatch.check_chunk(backend, chunk_size)
    if last_segment is None:
        last_segment = jnp.full((batch,), NO_SEGMENT, jnp.int32)
    static = _Static(backend.kind, backend.interpret, chunk_size, jnp.dtype(dtype or v.dtype).name)
    args = (*(a.astype(F32) for a in (q, k, v, log_alpha, beta, state)), segment_ids.astype(jnp.int32),
            last_segment.astype(jnp.int32))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return _delta(static, *args)
    shard = dispatch.per_shard(functools.partial(_delta, static), mesh, v.shape,
                               ("b.h.", "b.h.", "b.h.", "b.h", "b.h", "bh..", "b.", "b"), ("b.h.", "bh.."))
    return shard(*args)


def _delta(static: _Static, q, k, v, log_alpha, beta, state, segment_ids, last_segment):
    length, (dk, dv) = v.shape[1], state.shape[2:]
    p, padded_state = prepare(static.kind, static.chunk, q, k, v, log_alpha, segment_ids, last_segment, state)
    beta = jnp.pad(beta, ((0, 0), (0, p.v.shape[1] - length), (0, 0)))  # padding writes nothing
    w, u = wy_representation(p.k, p.v, beta, p, static.chunk)
    dtype = jnp.dtype(static.dtype)
    o, final = _walk(static, p.q.astype(dtype), p.k.astype(dtype), w.astype(dtype), u.astype(dtype), p.cum, p.seg,
                     p.segprev, padded_state)
    return o[:, :length, :, :dv], final[:, :, :dk, :dv]


def _chunked(a, chunk):
    """[B, T, H, ...] -> [B, H, N, C, ...]; [B, T] -> [B, N, C]."""
    a = a.reshape(a.shape[0], -1, chunk, *a.shape[2:])
    return jnp.moveaxis(a, 3, 1) if a.ndim > 3 else a


def _unchunked(a):
    """[B, H, N, C, ...] -> [B, T, H, ...]."""
    a = jnp.moveaxis(a, 1, 3)
    return a.reshape(a.shape[0], -1, *a.shape[3:])


def _decay(cum, seg, segprev):
    return cm.decay_terms(cum[:, None], cum[None, :], seg[:, None], seg[None, :], segprev[None, :])


def wy_representation(k, v, beta, p: Prepared, chunk: int):
    """(w [B, T, H, K], u [B, T, H, V]) float32: per chunk, U = T diag(beta) V and W = T diag(beta * read) K
    with T = (I + A)^-1, A_ts = beta_t within_ts k_t.k_s for s < t (zoo.layers.gated_deltanet)."""
    c = chunk

    def one_chunk(k, v, beta, cum, seg, segprev):
        d = _decay(cum, seg, segprev)
        gram = jnp.dot(k, k.T, precision=jax.lax.Precision.HIGHEST)
        system = jnp.eye(c, dtype=F32) + jnp.tril(beta[:, None] * d.within * gram, -1)
        rhs = jnp.concatenate([beta[:, None] * v, (beta[:, None] * d.read) * k], axis=-1)
        solved = jax.scipy.linalg.solve_triangular(system, rhs, lower=True, unit_diagonal=True)
        return solved[:, v.shape[-1]:], solved[:, :v.shape[-1]]

    per_chunk = jax.vmap(jax.vmap(jax.vmap(one_chunk), in_axes=(0, 0, 0, 0, None, None)))
    w, u = per_chunk(*(_chunked(a, c) for a in (k, v, beta, p.cum, p.seg, p.segprev)))
    return _unchunked(w), _unchunked(u)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _walk(static: _Static, q, k, w, u, cum, seg, segprev, state):
    p = Prepared(q, k, u, cum, seg, segprev)
    return KERNELS[static.kind].forward(p, w, state, chunk=static.chunk, interpret=static.interpret, with_states=False)


def _walk_forward(static, q, k, w, u, cum, seg, segprev, state):
    p = Prepared(q, k, u, cum, seg, segprev)
    o, final, states = KERNELS[static.kind].forward(p, w, state, chunk=static.chunk, interpret=static.interpret,
                                                    with_states=True)
    return (o, final), (p, w, states)


def _walk_backward(static, residuals, cotangents):
    p, w, states = residuals
    do, dfinal = cotangents
    dleaving, dstate = KERNELS[static.kind].backward(p, w, do.astype(p.v.dtype), dfinal.astype(F32),
                                                     chunk=static.chunk, interpret=static.interpret)
    c = static.chunk
    batch, heads, dk, dv = dstate.shape
    entering, dleaving = (a.reshape(batch, heads, -1, dk, dv) for a in (states, dleaving))
    dtypes = [a.dtype for a in (p.q, p.k, w, p.v)]

    def one_chunk(q, k, w, u, cum, entering, seg, segprev):
        # float32 primals cast inside, so the cotangents come back float32 (as the kernel rounds).
        q, k, w, u = (a.astype(t) for a, t in zip((q, k, w, u), dtypes))
        return cm.forward(q, k, w, u, _decay(cum, seg, segprev), entering)

    per_chunk = jax.vmap(jax.vmap(jax.vmap(one_chunk), in_axes=(0,) * 6 + (None, None)))
    seg, segprev = _chunked(p.seg, c), _chunked(p.segprev, c)
    inputs = [_chunked(a.astype(F32), c) for a in (p.q, p.k, w, p.v, p.cum)]
    _, vjp = jax.vjp(lambda *a: per_chunk(*a, entering, seg, segprev), *inputs)
    dq, dk_, dw, du, dcum = (_unchunked(g) for g in vjp((_chunked(do.astype(F32), c), dleaving)))
    cast = lambda g, like: g.astype(like.dtype)  # noqa: E731
    return (cast(dq, p.q), cast(dk_, p.k), cast(dw, w), cast(du, p.v), dcum, jnp.zeros_like(p.seg),
            jnp.zeros_like(p.segprev), dstate)


_walk.defvjp(_walk_forward, _walk_backward)
