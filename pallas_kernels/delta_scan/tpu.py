"""Gated delta rule kernels for TPUs (Pallas Mosaic): the sequential part of the chunked form.

Grid (batch row, head, chunk) with the chunk axis sequential ("arbitrary"), the float32 state in a VMEM
scratch, [B, H, T, D] layouts and the decay/segment blocks of zoo.pallas_kernels.ssd_scan.tpu (every
block's last two dims are (chunk, full feature dim) or full array dims, so the (8, 128) rule holds for
chunk a multiple of 8). The forward writes o, the final state and (for the backward) each chunk's
entering state as the [K, V] block n of a [B, H, N * K, V] array; the backward walks the chunks in
reverse writing each chunk's leaving-state gradient. (The WY representation stays in XLA here:
ops.wy_representation.)

VMEM per program at chunk 64, K = 128, V = 256 (Gated DeltaNet's expand_v = 2), bf16: q/k/w blocks 16 KiB,
u/o/do 32 KiB, each double-buffered; the float32 state scratch 128 KiB, the per-chunk state block (in the
kernels' dtype) 64 KiB double-buffered; [C, C] float32 temporaries 16 KiB; the [64, 1] float32 columns pad to 32 KiB.
About 1 MiB, inside the 16 MiB default scoped VMEM of v5e and later.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from zoo.pallas_kernels.delta_scan import chunk_math as cm
from zoo.pallas_kernels.ssd_scan.tpu import Layout, decay_at, from_heads_major

DECAY_INPUTS = 5  # Layout.decay: cumulative decay and segments as columns and rows


def _forward_kernel(q_ref, k_ref, w_ref, u_ref, *refs, with_states):
    decay_refs, (s0_ref, o_ref, final_ref, *states_ref, state_ref) = refs[:DECAY_INPUTS], refs[DECAY_INPUTS:]
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        state_ref[...] = s0_ref[...]

    d = decay_at(*decay_refs, n)
    state = state_ref[...]
    if with_states:
        states_ref[0][...] = state.astype(states_ref[0].dtype)
    o, leaving = cm.forward(q_ref[...], k_ref[...], w_ref[...], u_ref[...], d, state)
    o_ref[...] = o.astype(o_ref.dtype)
    state_ref[...] = leaving

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        final_ref[...] = state_ref[...]


def _backward_kernel(q_ref, k_ref, w_ref, do_ref, *refs):
    decay_refs, (dfinal_ref, dleaving_ref, ds0_ref, dstate_ref) = refs[:DECAY_INPUTS], refs[DECAY_INPUTS:]
    i = pl.program_id(2)
    last = pl.num_programs(2) - 1

    @pl.when(i == 0)
    def _():
        dstate_ref[...] = dfinal_ref[...]

    d = decay_at(*decay_refs, last - i)
    dstate = dstate_ref[...]
    dleaving_ref[...] = dstate.astype(dleaving_ref.dtype)
    dstate_ref[...] = cm.retreat(q_ref[...], k_ref[...], w_ref[...], do_ref[...], d, dstate)

    @pl.when(i == last)
    def _():
        ds0_ref[...] = dstate_ref[...]


def _per_chunk_states(lay, state):
    batch, heads, dk, dv = state.shape
    return jax.ShapeDtypeStruct((batch, heads, lay.count * dk, dv), lay.v.dtype)


def forward(p, w, state, *, chunk: int, interpret: bool, with_states: bool):
    """As delta_scan.gpu.forward."""
    lay = Layout(p, chunk, reverse=False)
    dk, dv = p.q.shape[-1], p.v.shape[-1]
    states = [_per_chunk_states(lay, state)] if with_states else []
    out = lay.call(
        functools.partial(_forward_kernel, with_states=with_states),
        [lay.heads_spec(dk), lay.heads_spec(dk), lay.heads_spec(dk), lay.heads_spec(dv), *lay.decay_specs(),
         lay.state_spec(state.shape)],
        [lay.heads_spec(dv), lay.state_spec(state.shape)] + [lay.chunk_state_spec(state.shape)] * with_states,
        [jax.ShapeDtypeStruct(lay.v.shape, p.v.dtype), jax.ShapeDtypeStruct(state.shape, jnp.float32), *states],
        state.shape, interpret, "delta_scan_fwd",
    )(lay.q, lay.k, jnp.swapaxes(w, 1, 2), lay.v, *lay.decay, state)
    return (from_heads_major(out[0]), *out[1:])


def backward(p, w, do, dfinal, *, chunk: int, interpret: bool):
    """As delta_scan.gpu.backward."""
    lay = Layout(p, chunk, reverse=True)
    dk, dv = p.q.shape[-1], p.v.shape[-1]
    return lay.call(
        _backward_kernel,
        [lay.heads_spec(dk), lay.heads_spec(dk), lay.heads_spec(dk), lay.heads_spec(dv), *lay.decay_specs(),
         lay.state_spec(dfinal.shape)],
        [lay.chunk_state_spec(dfinal.shape), lay.state_spec(dfinal.shape)],
        [_per_chunk_states(lay, dfinal), jax.ShapeDtypeStruct(dfinal.shape, jnp.float32)],
        dfinal.shape, interpret, "delta_scan_bwd",
    )(lay.q, lay.k, jnp.swapaxes(w, 1, 2), jnp.swapaxes(do, 1, 2), *lay.decay, dfinal)
