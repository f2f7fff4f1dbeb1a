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


# Warps per program (`python bench/delta_scan_breakdown.py --sweep`, B8 T4096 H16 K=V=128 bf16, H100):
# 49.6 / 61.9 / 2.75 / 3.76 ms with 1 / 2 / 4 / 8 warps (fewer spill registers); XLA's vmapped VJP of the
# same 3.85 ms.
CHUNK_GRAD_WARPS = 4


def _chunk_grads_kernel(q_ref, k_ref, w_ref, u_ref, do_ref, cum_ref, seg_ref, segprev_ref, entering_ref, dleaving_ref,
                        dq_ref, dk_ref, dw_ref, du_ref, dcum_ref, *, key_tiles):
    """One chunk's gradients given the state entering it (S) and the gradient of the state leaving it
    (dS'): with corrections c = u - w S, the chunk is a scalar-decay chunk with values c (chunk_math), so
        dc = ((q k^T) * within)^T do + to_end * k dS',  du = dc,  dw = -dc S^T,
        dq = ((do c^T) * within) k + read * do S^T,  dk = ((do c^T) * within)^T q + to_end * c dS'^T,
    and, since the chunk depends on cum only through q_t exp(G_t) and k_s exp(-G_s) and its leaving state
    is proportional to exp(G_last), dcum_t = q_t.dq_t - k_t.dk_t, plus sum(dS' * S') for the last token.
    A program owns one 64-wide tile of K (the columns of dq, dk, dw; the rows of S, dS' and S' its part
    of dcum sums) and walks V in 64-wide tiles, accumulating what contracts over V: one program for all
    of K kept three [C, K] float32 accumulators live and was slower. c and dc need all of
    K; the first K-tile's program writes du."""
    chunk = q_ref.shape[0]
    dtype = u_ref.dtype
    key_tile = pl.program_id(2) % key_tiles
    width = q_ref.shape[1] // key_tiles
    keys = pl.ds(pl.multiple_of(key_tile * width, width), width)
    d = decay_at(cum_ref, seg_ref, segprev_ref, pl.ds(0, chunk))
    q, k, w = q_ref[...], k_ref[...], w_ref[...]
    q_tile, k_tile = q_ref[:, keys], k_ref[:, keys]
    scores = (cm.dot_nt(q, k) * d.within).astype(dtype)
    dscores = jnp.zeros((chunk, chunk), jnp.float32)
    dq = jnp.zeros((chunk, width), jnp.float32)
    dk = jnp.zeros((chunk, width), jnp.float32)
    dw = jnp.zeros((chunk, width), jnp.float32)
    leaving_dot = jnp.zeros((), jnp.float32)
    tile = min(TILE, u_ref.shape[1])
    for start in range(0, u_ref.shape[1], tile):
        cols = pl.ds(start, tile)
        state, do = entering_ref[:, cols], do_ref[:, cols]
        state_rows, dleaving_rows = entering_ref[keys, cols], dleaving_ref[keys, cols]
        corrected = (u_ref[:, cols].astype(jnp.float32) - cm.dot(w, state)).astype(dtype)
        dcorrected = cm.dot_tn(scores, do) + d.to_end * cm.dot(k, dleaving_ref[:, cols])

        @pl.when(key_tile == 0)
        def _():
            du_ref[:, cols] = dcorrected.astype(du_ref.dtype)

        dscores += cm.dot_nt(do, corrected)
        dq += d.read * cm.dot_nt(do, state_rows)
        dk += d.to_end * cm.dot_nt(corrected, dleaving_rows)
        dw -= cm.dot_nt(dcorrected.astype(dtype), state_rows)
        leaving_rows = d.survive * state_rows.astype(jnp.float32) + cm.dot_tn((k_tile * d.to_end).astype(dtype), corrected)
        leaving_dot += jnp.sum(jnp.sum(dleaving_rows.astype(jnp.float32) * leaving_rows, axis=1), axis=0)
    dscores = (dscores * d.within).astype(dtype)
    dq += cm.dot(dscores, k_tile)
    dk += cm.dot_tn(dscores, q_tile)
    token = jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0)
    dcum_ref[...] = (jnp.sum(q_tile.astype(jnp.float32) * dq - k_tile.astype(jnp.float32) * dk, axis=1)
                     + jnp.where(token == chunk - 1, leaving_dot, 0.0))
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dw_ref[...] = dw.astype(dw_ref.dtype)


def chunk_grads(p, w, do, entering, dleaving, *, chunk: int, interpret: bool):
    """Every chunk at once, grid (row, head, chunk x K-tile): the gradients of q, k, w, u (their dtypes)
    and cum (float32) given each chunk's entering state and leaving state's gradient (as forward /
    backward write them, [B, H, N * K, V])."""
    batch, length, heads, dv = p.v.shape
    dk = p.q.shape[-1]
    key_tiles = max(dk // TILE, 1)
    width = dk // key_tiles

    def tokens(width, tiled):
        return pl.BlockSpec((None, chunk, None, width),
                            lambda b, h, i: (b, i // key_tiles, h, i % key_tiles if tiled else 0))

    per_head = pl.BlockSpec((None, chunk, None), lambda b, h, i: (b, i // key_tiles, h))
    per_row = pl.BlockSpec((None, chunk), lambda b, h, i: (b, i // key_tiles))
    state = pl.BlockSpec((None, None, dk, dv), lambda b, h, i: (b, h, i // key_tiles, 0))
    dq, dk_, dw, du, dcum = pl.pallas_call(
        functools.partial(_chunk_grads_kernel, key_tiles=key_tiles), grid=(batch, heads, length // chunk * key_tiles),
        in_specs=[tokens(dk, False), tokens(dk, False), tokens(dk, False), tokens(dv, False), tokens(dv, False),
                  per_head, per_row, per_row, state, state],
        out_specs=[tokens(width, True), tokens(width, True), tokens(width, True), tokens(dv, False),
                   pl.BlockSpec((None, None, chunk, None), lambda b, h, i: (i % key_tiles, b, i // key_tiles, h))],
        out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (p.q, p.k, w, p.v)]
        + [jax.ShapeDtypeStruct((key_tiles, *p.cum.shape), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=CHUNK_GRAD_WARPS, num_stages=2), interpret=interpret,
        name="delta_scan_chunk_grads",
    )(p.q, p.k, w, p.v, do, p.cum, p.seg, p.segprev, entering, dleaving)
    return dq, dk_, dw, du, dcum.sum(axis=0)
