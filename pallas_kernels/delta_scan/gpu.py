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



BLOCK = 16  # the WY kernel's diagonal blocks (Triton's smallest matmul)
# The WY kernel's float32 matmuls as three TF32 passes on the tensor cores (error ~ float32's): Triton's
# IEEE float32 dot runs on the CUDA cores and was ~10x slower here. The interpreter (CPU) takes IEEE.
COMPILED_FLOAT32 = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def _blocks_inverse(a_blocks, diagonal_inverses, dot):
    """Block forward substitution: T_ij = -T_ii sum_{j <= m < i} A_im T_mj for a unit lower-triangular
    I + A given its strictly-lower blocks A_im (i > m) and the inverses T_ii of its diagonal blocks."""
    count = len(diagonal_inverses)
    inverse = [[None] * count for _ in range(count)]
    for i in range(count):
        inverse[i][i] = diagonal_inverses[i]
        for j in range(i - 1, -1, -1):
            acc = sum(dot(a_blocks[i][m], inverse[m][j]) for m in range(j, i))
            inverse[i][j] = -dot(inverse[i][i], acc)
    return inverse


def _diagonal_inverse(k, beta, cum, seg, dot_nt):
    """(I + A)^-1 of one diagonal block by forward substitution: row i of T = e_i - A[i, :] T (rows above
    i final), rows taken from tiles by masked reductions (no scalar indexing); A[i, :] is read as a column
    of A^T, built directly (the Gram matrix of a diagonal block is symmetric) so that it broadcasts."""
    size = k.shape[0]
    row = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)
    visible = (row < col) & (seg[:, None] == seg[None, :])  # A^T[j, i] = A[i, j]: j < i, same document
    a_t = jnp.where(visible, beta[None, :] * jnp.exp(jnp.where(visible, cum[None, :] - cum[:, None], 0.0))
                    * dot_nt(k, k), 0.0)

    def substitute(i, inverse):
        a_i = jnp.sum(jnp.where(col == i, a_t, 0.0), axis=1, keepdims=True)  # [size, 1]: A[i, :] as a column
        return inverse - jnp.where(row == i, jnp.sum(a_i * inverse, axis=0, keepdims=True), 0.0)

    return jax.lax.fori_loop(1, size, substitute, jnp.where(row == col, 1.0, 0.0))


def _wy_kernel(k_ref, v_ref, beta_ref, cum_ref, seg_ref, segprev_ref, w_ref, u_ref, inverse_ref, *, dtype, precision):
    """One chunk's WY representation, T = (I + A)^-1 in float32 as fla's solve_tril does it: each 16 x 16
    diagonal block by forward substitution, the rest by block forward substitution (small matmuls); then
    w = T diag(beta * read) k and u = T diag(beta) v as matmuls in the kernels' dtype. (The nilpotent
    series (I + N)(I + N^2)(I + N^4)... would be all matmuls, but with correlated keys its partial powers
    grow like binomial coefficients and cancel catastrophically; a 64-row substitution loop was 8x slower.)
    The inverse is written as its [16, 16] blocks, row-block-major: rows (i * count + j) * 16 .."""
    def general(a, b, contract):
        return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32)

    def dot(a, b):
        return general(a, b, ((1,), (0,))) if a.dtype == jnp.float32 else cm.dot(a, b)

    def dot_nt(a, b):
        return general(a, b, ((1,), (1,)))

    count = k_ref.shape[0] // BLOCK
    rows = lambda i: pl.ds(i * BLOCK, BLOCK)  # noqa: E731
    k = [k_ref[rows(i), :].astype(jnp.float32) for i in range(count)]
    beta, cum, seg = ([ref[rows(i)] for i in range(count)] for ref in (beta_ref, cum_ref, seg_ref))
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, BLOCK), 1)
    seg_before = jnp.sum(jnp.where(lane == 0, segprev_ref[rows(0)][None, :], 0.0), axis=1, keepdims=True)
    a_blocks = [[None] * count for _ in range(count)]
    for i in range(count):
        for j in range(i):  # whole blocks j < i: every pair s < t; A_ts = beta_t exp(G_t - G_s) k_t.k_s
            same = seg[i][:, None] == seg[j][None, :]
            decay = jnp.exp(jnp.where(same, cum[i][:, None] - cum[j][None, :], 0.0))
            a_blocks[i][j] = jnp.where(same, beta[i][:, None] * decay * dot_nt(k[i], k[j]), 0.0)
    diagonal = [_diagonal_inverse(k[i], beta[i], cum[i], seg[i], dot_nt) for i in range(count)]
    inverse = _blocks_inverse(a_blocks, diagonal, dot)
    zeros = jnp.zeros((BLOCK, BLOCK), jnp.float32)
    for i in range(count):
        for j in range(count):
            inverse_ref[rows(i * count + j), :] = inverse[i][j] if j <= i else zeros
    read = [jnp.where(seg[j][:, None] == seg_before, jnp.exp(cum[j])[:, None], 0.0) for j in range(count)]
    keys = [((beta[j][:, None] * read[j]) * k[j]).astype(dtype) for j in range(count)]
    values = [(beta[j][:, None] * v_ref[rows(j), :].astype(jnp.float32)).astype(dtype) for j in range(count)]
    for i in range(count):
        low = [inverse[i][j].astype(dtype) for j in range(i + 1)]
        w_ref[rows(i), :] = sum(dot(low[j], keys[j]) for j in range(i + 1)).astype(dtype)
        u_ref[rows(i), :] = sum(dot(low[j], values[j]) for j in range(i + 1)).astype(dtype)


def wy_representation(k, v, beta, cum, seg, segprev, *, chunk: int, interpret: bool, dtype):
    """Every chunk at once, grid (row, head, chunk); [B, T, H, *] inputs. Returns w [B, T, H, K] and u [B, T,
    H, V] in `dtype` and the float32 inverses [B, H, N, C, C]."""
    batch, length, heads, dk = k.shape
    dv = v.shape[-1]
    count = length // chunk
    tokens = lambda width: pl.BlockSpec((None, chunk, None, width), lambda b, h, n: (b, n, h, 0))  # noqa: E731
    per_head = pl.BlockSpec((None, chunk, None), lambda b, h, n: (b, n, h))
    per_row = pl.BlockSpec((None, chunk), lambda b, h, n: (b, n))
    blocks = chunk // BLOCK
    precision = jax.lax.Precision.HIGHEST if interpret else COMPILED_FLOAT32
    w, u, inverse = pl.pallas_call(
        functools.partial(_wy_kernel, dtype=dtype, precision=precision), grid=(batch, heads, count),
        in_specs=[tokens(dk), tokens(dv), per_head, per_head, per_row, per_row],
        out_specs=[tokens(dk), tokens(dv), pl.BlockSpec((None, None, blocks * chunk, BLOCK), lambda b, h, n: (b, h, n, 0))],
        out_shape=[jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype),
                   jax.ShapeDtypeStruct((batch, heads, count * blocks * chunk, BLOCK), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2), interpret=interpret, name="delta_scan_wy",
    )(k, v, beta, cum, seg, segprev)
    inverse = inverse.reshape(batch, heads, count, blocks, blocks, BLOCK, BLOCK).swapaxes(4, 5)
    return w, u, inverse.reshape(batch, heads, count, chunk, chunk)
