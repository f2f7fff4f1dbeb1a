"""Scalar-decay scan kernels for GPUs (Pallas Triton).

One program owns one (batch row, head, feature tile) and walks the chunks of its sequence in order
(backward: in reverse), carrying the float32 state tile in registers. Nothing per chunk goes to HBM
but the outputs, so the forward reads q, k, v once and writes o once (fla's chunk kernels write and
re-read a state per chunk). Tiles: the state is [K, 64] in the forward and the dv kernel, [64, V] in
the dq and dk kernels, so a 128 x 128 head splits into two programs per (row, head) and B*H*2
programs fill the GPU. q and k are indexed per group (Mamba-2's B/C groups are read, not repeated).

Shapes must be powers of two (Triton); ops.py pads K, V and the chunk accordingly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from zoo.pallas_kernels.ssd_scan import chunk_math as cm

TILE = 64  # feature tile of the carried state (see the module docstring)


def decay_at(cum_ref, seg_ref, segprev_ref, rows):
    cum, seg, segprev = cum_ref[rows], seg_ref[rows], segprev_ref[rows]
    return cm.decay_terms(cum[:, None], cum[None, :], seg[:, None], seg[None, :], segprev[None, :])


def chunk_count(ref, chunk):
    return ref.shape[0] // chunk


def chunk_rows(n, chunk):
    return pl.ds(pl.multiple_of(n * chunk, chunk), chunk)


def _forward_kernel(q_ref, k_ref, v_ref, cum_ref, seg_ref, segprev_ref, s0_ref, o_ref, final_ref, *, chunk):
    def body(n, state):
        rows = chunk_rows(n, chunk)
        d = decay_at(cum_ref, seg_ref, segprev_ref, rows)
        q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
        o_ref[rows, :] = cm.output(q, k, v, d, state).astype(o_ref.dtype)
        return cm.advance(k, v, d, state)

    final_ref[...] = jax.lax.fori_loop(0, chunk_count(q_ref, chunk), body, s0_ref[...])


def _dq_kernel(k_ref, v_ref, do_ref, cum_ref, seg_ref, segprev_ref, s0_ref, dq_ref, *, chunk):
    def body(n, state):
        rows = chunk_rows(n, chunk)
        d = decay_at(cum_ref, seg_ref, segprev_ref, rows)
        k, v, do = k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
        dq_ref[rows, :] = cm.grad_q(k, v, do, d, state)
        return cm.advance(k, v, d, state)

    jax.lax.fori_loop(0, chunk_count(k_ref, chunk), body, s0_ref[...])


def _dk_kernel(q_ref, v_ref, do_ref, cum_ref, seg_ref, segprev_ref, dfinal_ref, dk_ref, ds0_ref, *, chunk):
    count = chunk_count(q_ref, chunk)

    def body(i, dstate):
        rows = chunk_rows(count - 1 - i, chunk)
        d = decay_at(cum_ref, seg_ref, segprev_ref, rows)
        q, v, do = q_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
        dk_ref[rows, :] = cm.grad_k(q, v, do, d, dstate)
        return cm.retreat(q, do, d, dstate)

    ds0_ref[...] = jax.lax.fori_loop(0, count, body, dfinal_ref[...])


def _dv_kernel(q_ref, k_ref, do_ref, cum_ref, seg_ref, segprev_ref, dfinal_ref, dv_ref, *, chunk):
    count = chunk_count(q_ref, chunk)

    def body(i, dstate):
        rows = chunk_rows(count - 1 - i, chunk)
        d = decay_at(cum_ref, seg_ref, segprev_ref, rows)
        q, k, do = q_ref[rows, :], k_ref[rows, :], do_ref[rows, :]
        dv_ref[rows, :] = cm.grad_v(q, k, do, d, dstate)
        return cm.retreat(q, do, d, dstate)

    jax.lax.fori_loop(0, count, body, dfinal_ref[...])


class Specs:
    """BlockSpecs over the grid (batch, head, tile) for arrays laid out [B, T, H|G, D]."""

    def __init__(self, p):
        self.length = p.v.shape[1]
        self.per_group = p.v.shape[2] // p.q.shape[2]

    def grouped(self, width, tiled):
        per_group = self.per_group
        return pl.BlockSpec((None, self.length, None, width), lambda b, h, j: (b, 0, h // per_group, j if tiled else 0))

    def heads(self, width, tiled):
        return pl.BlockSpec((None, self.length, None, width), lambda b, h, j: (b, 0, h, j if tiled else 0))

    def decay(self):
        return [pl.BlockSpec((None, self.length, None), lambda b, h, j: (b, 0, h)),
                pl.BlockSpec((None, self.length), lambda b, h, j: (b, 0)),
                pl.BlockSpec((None, self.length), lambda b, h, j: (b, 0))]

    @staticmethod
    def state(rows, cols, tile_rows):
        return pl.BlockSpec((None, None, rows, cols), (lambda b, h, j: (b, h, j, 0)) if tile_rows else (lambda b, h, j: (b, h, 0, j)))


def call(kernel, grid, in_specs, out_specs, out_shape, interpret, chunk, name):
    return pl.pallas_call(
        functools.partial(kernel, chunk=chunk), grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2), interpret=interpret, name=name,
    )


def forward(p, state, *, chunk: int, interpret: bool):
    """p: ops.Prepared; state [B, H, K, V] float32. Returns (o [B, T, H, V] in v's dtype, final state)."""
    batch, length, heads, dv = p.v.shape
    dk = p.q.shape[-1]
    tile = min(TILE, dv)
    s = Specs(p)
    return call(
        _forward_kernel, (batch, heads, dv // tile),
        [s.grouped(dk, False), s.grouped(dk, False), s.heads(tile, True), *s.decay(), s.state(dk, tile, False)],
        [s.heads(tile, True), s.state(dk, tile, False)],
        [jax.ShapeDtypeStruct(p.v.shape, p.v.dtype), jax.ShapeDtypeStruct(state.shape, jnp.float32)],
        interpret, chunk, "ssd_scan_fwd",
    )(p.q, p.k, p.v, p.cum, p.seg, p.segprev, state)


def backward(p, state, do, dfinal, *, chunk: int, interpret: bool):
    """Returns per-head float32 (dq [B,T,H,K], dk [B,T,H,K], dv [B,T,H,V], d initial state)."""
    batch, length, heads, dv = p.v.shape
    dk = p.q.shape[-1]
    k_tile, v_tile = min(TILE, dk), min(TILE, dv)
    s = Specs(p)
    grad_shape = jax.ShapeDtypeStruct((batch, length, heads, dk), jnp.float32)
    dq = call(
        _dq_kernel, (batch, heads, dk // k_tile),
        [s.grouped(k_tile, True), s.heads(dv, False), s.heads(dv, False), *s.decay(), s.state(k_tile, dv, True)],
        s.heads(k_tile, True), grad_shape, interpret, chunk, "ssd_scan_dq",
    )(p.k, p.v, do, p.cum, p.seg, p.segprev, state)
    dk_, dstate = call(
        _dk_kernel, (batch, heads, dk // k_tile),
        [s.grouped(k_tile, True), s.heads(dv, False), s.heads(dv, False), *s.decay(), s.state(k_tile, dv, True)],
        [s.heads(k_tile, True), s.state(k_tile, dv, True)],
        [grad_shape, jax.ShapeDtypeStruct(state.shape, jnp.float32)], interpret, chunk, "ssd_scan_dk",
    )(p.q, p.v, do, p.cum, p.seg, p.segprev, dfinal)
    dv_ = call(
        _dv_kernel, (batch, heads, dv // v_tile),
        [s.grouped(dk, False), s.grouped(dk, False), s.heads(v_tile, True), *s.decay(), s.state(dk, v_tile, False)],
        s.heads(v_tile, True), jax.ShapeDtypeStruct(p.v.shape, jnp.float32), interpret, chunk, "ssd_scan_dv",
    )(p.q, p.k, do, p.cum, p.seg, p.segprev, dfinal)
    return dq, dk_, dv_, dstate
