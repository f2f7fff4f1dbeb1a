"""Gated delta rule kernels for GPUs (Pallas Triton): the sequential part of the chunked form.

One program owns one (batch row, head, value tile) and walks its chunks, carrying the float32 state
tile [K, 64] in registers (the corrections u - w S need all of K but only the tile's value columns).
The forward writes o and the final state, and for the backward also each chunk's entering state; the
backward walk writes the gradient of each chunk's leaving state and of the initial state. The
chunk-parallel gradients given the walks' states are XLA (ops.py); the WY representation's kernels are
in gpu_wy.py.
Shapes are powers of two (Triton); ops.py pads K, V and the chunk accordingly.
"""

from __future__ import annotations


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


CHUNK_GRAD_WARPS = 4


def _chunk_grads_kernel(q_ref, k_ref, w_ref, u_ref, do_ref, cum_ref, seg_ref, segprev_ref, entering_ref, dleaving_ref,
                        dq_ref, dk_ref, dw_ref, du_ref, dcum_ref):
    """One chunk's gradients given the state entering it (S) and the gradient of the state leaving it
    (dS'): with corrections c = u - w S, the chunk is a scalar-decay chunk with values c (chunk_math), so
        dc = ((q k^T) * within)^T do + to_end * k dS',  du = dc,  dw = -dc S^T,
        dq = ((do c^T) * within) k + read * do S^T,  dk = ((do c^T) * within)^T q + to_end * c dS'^T,
    and, since the chunk depends on cum only through q_t exp(G_t) and k_s exp(-G_s) and its leaving state
    is proportional to exp(G_last), dcum_t = q_t.dq_t - k_t.dk_t, plus sum(dS' * S') for the last token.
    The value dimension is walked in 64-wide tiles (S, dS', u, do), accumulating what contracts over it."""
    chunk, dk_width = q_ref.shape
    dtype = u_ref.dtype
    d = decay_at(cum_ref, seg_ref, segprev_ref, pl.ds(0, chunk))
    q, k, w = q_ref[...], k_ref[...], w_ref[...]
    scores = (cm.dot_nt(q, k) * d.within).astype(dtype)
    dscores = jnp.zeros((chunk, chunk), jnp.float32)
    dq = jnp.zeros((chunk, dk_width), jnp.float32)
    dk = jnp.zeros((chunk, dk_width), jnp.float32)
    dw = jnp.zeros((chunk, dk_width), jnp.float32)
    leaving_dot = jnp.zeros((), jnp.float32)
    tile = min(TILE, u_ref.shape[1])
    for start in range(0, u_ref.shape[1], tile):
        cols = pl.ds(start, tile)
        state, dleaving, do = entering_ref[:, cols], dleaving_ref[:, cols], do_ref[:, cols]
        corrected = (u_ref[:, cols].astype(jnp.float32) - cm.dot(w, state)).astype(dtype)
        dscores += cm.dot_nt(do, corrected)
        dq += d.read * cm.dot_nt(do, state)
        dk += d.to_end * cm.dot_nt(corrected, dleaving)
        dcorrected = cm.dot_tn(scores, do) + d.to_end * cm.dot(k, dleaving)
        du_ref[:, cols] = dcorrected.astype(du_ref.dtype)
        dw -= cm.dot_nt(dcorrected.astype(dtype), state)
        leaving = d.survive * state.astype(jnp.float32) + cm.dot_tn((k * d.to_end).astype(dtype), corrected)
        leaving_dot += jnp.sum(jnp.sum(dleaving.astype(jnp.float32) * leaving, axis=1), axis=0)
    dscores = (dscores * d.within).astype(dtype)
    dq += cm.dot(dscores, k)
    dk += cm.dot_tn(dscores, q)
    token = jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0)
    dcum = (jnp.sum(q.astype(jnp.float32) * dq - k.astype(jnp.float32) * dk, axis=1)
            + jnp.where(token == chunk - 1, leaving_dot, 0.0))
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dw_ref[...] = dw.astype(dw_ref.dtype)
    dcum_ref[...] = dcum


def chunk_grads(p, w, do, entering, dleaving, *, chunk: int, interpret: bool):
    """Every chunk at once, grid (row, head, chunk): the gradients of q, k, w, u (their dtypes) and cum
    (float32) given each chunk's entering state and leaving state's gradient (as forward / backward
    write them, [B, H, N * K, V])."""
    batch, length, heads, dv = p.v.shape
    dk = p.q.shape[-1]

    def tokens(width):
        return pl.BlockSpec((None, chunk, None, width), lambda b, h, n: (b, n, h, 0))

    per_head = pl.BlockSpec((None, chunk, None), lambda b, h, n: (b, n, h))
    per_row = pl.BlockSpec((None, chunk), lambda b, h, n: (b, n))
    state = pl.BlockSpec((None, None, dk, dv), lambda b, h, n: (b, h, n, 0))
    return pl.pallas_call(
        _chunk_grads_kernel, grid=(batch, heads, length // chunk),
        in_specs=[tokens(dk), tokens(dk), tokens(dk), tokens(dv), tokens(dv), per_head, per_row, per_row, state, state],
        out_specs=[tokens(dk), tokens(dk), tokens(dk), tokens(dv), per_head],
        out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (p.q, p.k, w, p.v)]
        + [jax.ShapeDtypeStruct(p.cum.shape, jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=CHUNK_GRAD_WARPS, num_stages=2), interpret=interpret,
        name="delta_scan_chunk_grads",
    )(p.q, p.k, w, p.v, do, p.cum, p.seg, p.segprev, entering, dleaving)
