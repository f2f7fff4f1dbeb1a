"""Gated delta rule kernels for GPUs (Pallas Triton): the sequential part of the chunked form.

One program owns one (batch row, head, value tile) and walks its chunks, carrying the float32 state
tile [K, 64] in registers (the corrections u - w S need all of K but only the tile's value columns).
The forward writes o and the final state, and for the backward also each chunk's entering state; the
backward walk writes the gradient of each chunk's leaving state and of the initial state. Everything
else (the WY representation, and the chunk-parallel gradients given those states) is XLA: ops.py.
Shapes are powers of two (Triton); ops.py pads K, V and the chunk accordingly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zoo.pallas_kernels.delta_scan import chunk_math as cm
from zoo.pallas_kernels.ssd_scan.gpu import TILE, Specs, call, chunk_count, chunk_rows, decay_at


def _forward_kernel(q_ref, k_ref, w_ref, u_ref, cum_ref, seg_ref, segprev_ref, s0_ref, o_ref, final_ref, *states_ref,
                    chunk):
    width = q_ref.shape[-1]

    def body(n, state):
        rows = chunk_rows(n, chunk)
        d = decay_at(cum_ref, seg_ref, segprev_ref, rows)
        if states_ref:
            states_ref[0][chunk_rows(n, width), :] = state
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
        dleaving_ref[chunk_rows(n, width), :] = dstate
        return cm.retreat(q_ref[rows, :], k_ref[rows, :], w_ref[rows, :], do_ref[rows, :], d, dstate)

    ds0_ref[...] = jax.lax.fori_loop(0, count, body, dfinal_ref[...])


def _per_chunk_states(p, state, chunk):
    """[B, H, N * K, V] float32: chunk n's [K, V] state in rows n*K .. (n+1)*K."""
    batch, heads, dk, dv = state.shape
    return jax.ShapeDtypeStruct((batch, heads, p.v.shape[1] // chunk * dk, dv), jnp.float32)


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

