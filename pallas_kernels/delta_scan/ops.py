"""delta_scan: the chunked gated delta rule (Gated DeltaNet) with Pallas kernels.

Forward:
  1. Every chunk at once: the WY representation (UT transform) of zoo.layers.gated_deltanet,
     (I + A) [U | W] = [diag(beta) V | diag(beta * read) K]: chunk-parallel Pallas kernels on GPUs
     (gpu_wy.py, forward and backward), batched triangular solves in XLA elsewhere; its own custom_vjp.
  2. Pallas (gpu.py / tpu.py): walk the chunks carrying the state; o and the final state.
Backward (the custom_vjp of step 2):
  - Pallas: the forward walk again, writing each chunk's entering state, and a reverse walk writing the
    gradient of each chunk's leaving state (and of the initial state).
  - Every chunk at once: given its entering state and its leaving state's gradient, a chunk's outputs
    depend on its own inputs only; their gradients (q, k, w, u and the cumulative decay) come from a
    chunk-parallel Pallas kernel on GPUs (gpu.chunk_grads, derived by hand) and, elsewhere, from XLA's
    VJP of chunk_math.forward vmapped over (row, head, chunk) (chunk_grads_xla).
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
from zoo.pallas_kernels.delta_scan import gpu, gpu_wy, tpu
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
    the kernels' matmul input dtype (default v's); the WY system is solved in float32. Returns
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
    dtype = jnp.dtype(dtype or v.dtype)
    static = _Static(backend.kind, backend.interpret, chunk_size, dtype.name)
    args = (*(a.astype(dtype) for a in (q, k, v)), *(a.astype(F32) for a in (log_alpha, beta, state)),
            segment_ids.astype(jnp.int32), last_segment.astype(jnp.int32))
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
    w, u = wy_representation(static, p.k, p.v, beta, p.cum, p.seg, p.segprev)
    o, final = _walk(static, p.q, p.k, w, u, p.cum, p.seg, p.segprev, padded_state)
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


def chunk_system(k, v, beta, cum, seg, segprev, precision=jax.lax.Precision.HIGHEST):
    """One chunk's UT-transform system (I + A) X = rhs: (A [C, C] strictly lower, A_ts = beta_t within_ts
    k_t.k_s; rhs [C, V + K] = [diag(beta) v | diag(beta * read) k]), float32 (zoo.layers.gated_deltanet)."""
    d = _decay(cum, seg, segprev)
    k, v = k.astype(F32), v.astype(F32)
    gram = jnp.dot(k, k.T, precision=precision)
    lower = jnp.tril(beta[:, None] * d.within * gram, -1)
    return lower, jnp.concatenate([beta[:, None] * v, (beta[:, None] * d.read) * k], axis=-1)


def _per_chunk(fn, segment_args: int = 2):
    """fn over one chunk, vmapped over (row, head, chunk); its last `segment_args` are per row, not head."""
    def vmapped(*args):
        per_head = (0,) * (len(args) - segment_args) + (None,) * segment_args
        return jax.vmap(jax.vmap(jax.vmap(fn), in_axes=per_head))(*args)
    return vmapped


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def wy_representation(static: _Static, k, v, beta, cum, seg, segprev):
    """(w [B, T, H, K], u [B, T, H, V]) in the kernels' dtype: per chunk X = [U | W] = (I + A)^-1 rhs
    (chunk_system, float32).
    GPUs: Pallas kernels forward and backward (gpu_wy.py). Elsewhere XLA: triangular solves forward;
    the gradient given the inverse T, d rhs = T^T dX, dA = -(d rhs) X^T, then autodiff of chunk_system."""
    return _wy_solve(static, k, v, beta, cum, seg, segprev, with_inverse=False)[:2]


def _wy_forward(static, k, v, beta, cum, seg, segprev):
    w, u, inverse = _wy_solve(static, k, v, beta, cum, seg, segprev, with_inverse=True)
    return (w, u), (k, v, beta, cum, seg, segprev, w, u, inverse)


def _wy_solve(static, k, v, beta, cum, seg, segprev, *, with_inverse):
    """(w, u, the inverses as _wy_backward takes them, or None)."""
    if static.kind == "gpu":
        outputs = gpu_wy.wy_representation(k, v, beta, cum, seg, segprev, chunk=static.chunk,
                                           interpret=static.interpret, dtype=jnp.dtype(static.dtype),
                                           with_inverse=with_inverse)
        return outputs if with_inverse else (*outputs, None)

    def one_chunk(k, v, beta, cum, seg, segprev):
        lower, rhs = chunk_system(k, v, beta, cum, seg, segprev)
        system = jnp.eye(lower.shape[0], dtype=F32) + lower
        inverse = jax.scipy.linalg.solve_triangular(system, jnp.eye(lower.shape[0], dtype=F32), lower=True,
                                                    unit_diagonal=True)
        solved = jnp.dot(inverse, rhs, precision=jax.lax.Precision.HIGHEST).astype(v.dtype)
        return solved[:, v.shape[-1]:], solved[:, :v.shape[-1]], inverse

    w, u, inverse = _per_chunk(one_chunk)(*(_chunked(a, static.chunk) for a in (k, v, beta, cum, seg, segprev)))
    return _unchunked(w), _unchunked(u), inverse


def _wy_backward(static, residuals, cotangents):
    k, v, beta, cum, seg, segprev, w, u, inverse = residuals
    dw, du = cotangents
    zeros = (jnp.zeros_like(seg), jnp.zeros_like(segprev))
    if static.kind == "gpu":
        grads = gpu_wy.wy_backward(k, v, beta, cum, seg, segprev, w, u, inverse, dw, du, chunk=static.chunk,
                                   interpret=static.interpret)
        return (*grads, *zeros)
    c = static.chunk
    solved = jnp.concatenate([_chunked(u, c), _chunked(w, c)], axis=-1).astype(F32)
    dsolved = jnp.concatenate([_chunked(du, c), _chunked(dw, c)], axis=-1).astype(F32)
    # Exact float32 products for float32 kernels; XLA's default for bf16 kernels, whose rounding is below
    # the bf16 rounding the gradients get.
    precision = jax.lax.Precision.HIGHEST if static.dtype == "float32" else jax.lax.Precision.DEFAULT
    drhs = jnp.einsum("...ts,...tx->...sx", inverse, dsolved, precision=precision)
    dlower = -jnp.einsum("...tx,...sx->...ts", drhs, solved, precision=precision)
    segs = (_chunked(seg, c), _chunked(segprev, c))
    system = functools.partial(chunk_system, precision=precision)
    _, vjp = jax.vjp(lambda *a: _per_chunk(system)(*a, *segs), *(_chunked(a, c) for a in (k, v, beta, cum)))
    dk, dv, dbeta, dcum = (_unchunked(g) for g in vjp((dlower, drhs)))
    return dk.astype(k.dtype), dv.astype(v.dtype), dbeta, dcum, *zeros


wy_representation.defvjp(_wy_forward, _wy_backward)


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
    do = do.astype(p.v.dtype)
    dleaving, dstate = KERNELS[static.kind].backward(p, w, do, dfinal.astype(F32), chunk=static.chunk,
                                                     interpret=static.interpret)
    chunk_grads = gpu.chunk_grads if static.kind == "gpu" else chunk_grads_xla
    grads = chunk_grads(p, w, do, states, dleaving, chunk=static.chunk, interpret=static.interpret)
    return (*grads, jnp.zeros_like(p.seg), jnp.zeros_like(p.segprev), dstate)


def chunk_grads_xla(p, w, do, entering, dleaving, *, chunk: int, interpret: bool = False):
    """gpu.chunk_grads in XLA (TPUs): every chunk's gradients of q, k, w, u and cum given its entering
    state and its leaving state's gradient, as the VJP of chunk_math.forward vmapped over (row, head,
    chunk)."""
    del interpret
    batch, heads, _, dv = entering.shape
    dk = p.q.shape[-1]
    entering, dleaving = (a.reshape(batch, heads, -1, dk, dv) for a in (entering, dleaving))
    dtypes = [a.dtype for a in (p.q, p.k, w, p.v)]

    def one_chunk(q, k, w, u, cum, entering, seg, segprev):
        # float32 primals cast inside, so the cotangents come back float32 (as the kernel rounds).
        q, k, w, u = (a.astype(t) for a, t in zip((q, k, w, u), dtypes))
        return cm.forward(q, k, w, u, _decay(cum, seg, segprev), entering)

    per_chunk = _per_chunk(one_chunk)
    seg, segprev = _chunked(p.seg, chunk), _chunked(p.segprev, chunk)
    inputs = [_chunked(a.astype(F32), chunk) for a in (p.q, p.k, w, p.v, p.cum)]
    _, vjp = jax.vjp(lambda *a: per_chunk(*a, entering, seg, segprev), *inputs)
    dq, dk_, dw, du, dcum = (_unchunked(g) for g in vjp((_chunked(do.astype(F32), chunk), dleaving.astype(F32))))
    return dq.astype(p.q.dtype), dk_.astype(p.k.dtype), dw.astype(w.dtype), du.astype(p.v.dtype), dcum


_walk.defvjp(_walk_forward, _walk_backward)
