"""Gated delta rule kernels for GPUs (Pallas Triton): the sequential part of the chunked form.

One program owns one (batch row, head, value tile) and walks its chunks, carrying the float32 state
tile [K, 64] in registers (the corrections u - w S need all of K but only the tile's value columns).
The forward writes o and the final state, and for the backward also each chunk's entering state; the
backward walk writes the gradient of each chunk's leaving state and of the initial state. A third kernel
computes every chunk's WY representation at once (chunk-parallel); the chunk-parallel gradients given
the walks' states are XLA (ops.py).
Shapes are powers of two (Triton); ops.py pads K, V and the chunk accordingly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from zoo.pallas_kernels.delta_scan import chunk_math as cm
from zoo.pallas_kernels.ssd_scan.gpu import TILE, Specs, call, chunk_count, chunk_rows, decay_at


def _forward_kernel(q_ref, k_ref, w_ref, u_ref, cum_ref, seg_ref, segprev_ref, s0_ref, o_ref, final_ref, *states_ref,
                    chunk):
    width = q_ref.shape[-1]

    def body(n, state):
        rows = chunk_rows(n, chunk)
        d = decay_at(cum_ref, seg_ref, segprev_ref, rows)
        if states_ref:
            states_ref[0][chunk_rows(n, width), :] = state.astype(states_ref[0].dtype)
        o, leaving = cm.forward(q_ref[rows, :], k_ref[rows, :], w_ref[rows, :], u_ref[rows, :], d, state)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return leaving

    final_ref[...] = jax.lax.fori_loop(0, chunk_count(q_ref, chunk), body, s0_ref[...])


def _backward_kernel(q_ref, k_ref, w_ref, do_ref, cum_ref, seg_ref, segprev_ref, dfinal_ref, dleaving_ref, ds0_ref, *,
                     chunk):
    count, width = chunk_count(q_ref, chunk), q_ref.shape[-1]

    def body(i, dstate):
        n = count - 1 - i
        rows = chunk_rows(n, chunk)
        d = decay_at(cum_ref, seg_ref, segprev_ref, rows)
        dleaving_ref[chunk_rows(n, width), :] = dstate.astype(dleaving_ref.dtype)
        return cm.retreat(q_ref[rows, :], k_ref[rows, :], w_ref[rows, :], do_ref[rows, :], d, dstate)

    ds0_ref[...] = jax.lax.fori_loop(0, count, body, dfinal_ref[...])


def _per_chunk_states(p, state, chunk):
    """[B, H, N * K, V]: chunk n's [K, V] state in rows n*K .. (n+1)*K, in the kernels' dtype (they feed
    matmuls in that dtype; bf16 halves the backward's largest traffic)."""
    batch, heads, dk, dv = state.shape
    return jax.ShapeDtypeStruct((batch, heads, p.v.shape[1] // chunk * dk, dv), p.v.dtype)


def forward(p, w, state, *, chunk: int, interpret: bool, with_states: bool):
    """p: ssd_scan.ops.Prepared with v = u; w [B, T, H, K]; state [B, H, K, V] float32. Returns o [B, T,
    H, V] (u's dtype), the final state and, with_states, every chunk's entering state (_per_chunk_states)."""
    batch, length, heads, dv = p.v.shape
    dk = p.q.shape[-1]
    tile = min(TILE, dv)
    s = Specs(p)
    states = [_per_chunk_states(p, state, chunk)] if with_states else []
    return call(
        _forward_kernel, (batch, heads, dv // tile),
        [s.heads(dk, False), s.heads(dk, False), s.heads(dk, False), s.heads(tile, True), *s.decay(),
         s.state(dk, tile, False)],
        [s.heads(tile, True), s.state(dk, tile, False)] + [s.state(a.shape[2], tile, False) for a in states],
        [jax.ShapeDtypeStruct(p.v.shape, p.v.dtype), jax.ShapeDtypeStruct(state.shape, jnp.float32), *states],
        interpret, chunk, "delta_scan_fwd",
    )(p.q, p.k, w, p.v, p.cum, p.seg, p.segprev, state)


def backward(p, w, do, dfinal, *, chunk: int, interpret: bool):
    """The gradients of every chunk's leaving state (as _per_chunk_states) and of the initial state."""
    batch, length, heads, dv = p.v.shape
    dk = p.q.shape[-1]
    tile = min(TILE, dv)
    s = Specs(p)
    dleaving = _per_chunk_states(p, dfinal, chunk)
    return call(
        _backward_kernel, (batch, heads, dv // tile),
        [s.heads(dk, False), s.heads(dk, False), s.heads(dk, False), s.heads(tile, True), *s.decay(),
         s.state(dk, tile, False)],
        [s.state(dleaving.shape[2], tile, False), s.state(dk, tile, False)],
        [dleaving, jax.ShapeDtypeStruct(dfinal.shape, jnp.float32)],
        interpret, chunk, "delta_scan_bwd",
    )(p.q, p.k, w, do, p.cum, p.seg, p.segprev, dfinal)



def _wy_kernel(k_ref, v_ref, beta_ref, cum_ref, seg_ref, segprev_ref, w_ref, u_ref, inverse_ref, *, dtype):
    """One chunk's WY representation: T = (I + A)^-1 by forward substitution, row i of T = e_i - A[i, :] T
    (rows above i final), in float32 on the CUDA cores; then w = T diag(beta * read) k and u = T diag(beta) v
    as matmuls in the kernels' dtype. Rows come out of tiles by masked reductions (no scalar indexing); the
    row of A is read as a column of A^T, built directly (the Gram matrix is symmetric), so that it
    broadcasts over T's rows. (The nilpotent series (I + N)(I + N^2)(I + N^4)... would be all matmuls, but
    with correlated keys its partial powers grow like binomial coefficients and cancel catastrophically.)"""
    k, beta, cum = k_ref[...].astype(jnp.float32), beta_ref[...], cum_ref[...]
    seg, segprev = seg_ref[...], segprev_ref[...]
    size = k.shape[0]
    d = cm.decay_terms(cum[:, None], cum[None, :], seg[:, None], seg[None, :], segprev[None, :])
    row = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)
    # A^T[j, i] = A[i, j] = beta_i exp(G_i - G_j) k_i.k_j for j < i in the same document.
    visible = (row < col) & (seg[:, None] == seg[None, :])
    decay_t = jnp.exp(jnp.where(visible, cum[None, :] - cum[:, None], 0.0))
    a_t = jnp.where(visible, beta[None, :] * decay_t * cm.dot_nt(k, k), 0.0)

    def substitute(i, inverse):
        a_i = jnp.sum(jnp.where(col == i, a_t, 0.0), axis=1, keepdims=True)  # [C, 1]: A[i, :] as a column
        return inverse - jnp.where(row == i, jnp.sum(a_i * inverse, axis=0, keepdims=True), 0.0)

    inverse = jax.lax.fori_loop(1, size, substitute, jnp.where(row == col, 1.0, 0.0))
    inverse_ref[...] = inverse
    low = inverse.astype(dtype)
    w_ref[...] = cm.dot(low, ((beta[:, None] * d.read) * k).astype(dtype)).astype(dtype)
    u_ref[...] = cm.dot(low, (beta[:, None] * v_ref[...].astype(jnp.float32)).astype(dtype)).astype(dtype)


def wy_representation(k, v, beta, cum, seg, segprev, *, chunk: int, interpret: bool, dtype):
    """Every chunk at once, grid (row, head, chunk); [B, T, H, *] inputs. Returns w [B, T, H, K] and u [B, T,
    H, V] in `dtype` and the float32 inverses [B, H, N * C, C]."""
    batch, length, heads, dk = k.shape
    dv = v.shape[-1]
    count = length // chunk
    tokens = lambda width: pl.BlockSpec((None, chunk, None, width), lambda b, h, n: (b, n, h, 0))  # noqa: E731
    per_head = pl.BlockSpec((None, chunk, None), lambda b, h, n: (b, n, h))
    per_row = pl.BlockSpec((None, chunk), lambda b, h, n: (b, n))
    return pl.pallas_call(
        functools.partial(_wy_kernel, dtype=dtype), grid=(batch, heads, count),
        in_specs=[tokens(dk), tokens(dv), per_head, per_head, per_row, per_row],
        out_specs=[tokens(dk), tokens(dv), pl.BlockSpec((None, None, chunk, chunk), lambda b, h, n: (b, h, n, 0))],
        out_shape=[jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype),
                   jax.ShapeDtypeStruct((batch, heads, count * chunk, chunk), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2), interpret=interpret, name="delta_scan_wy",
    )(k, v, beta, cum, seg, segprev)
