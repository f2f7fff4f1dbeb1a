"""Scalar-decay scan kernels for TPUs (Pallas Mosaic).

Grid (batch row, head, chunk) with the chunk axis sequential ("arbitrary"): the float32 state lives
in a VMEM scratch across the chunks of one (row, head); the backward walks the chunks in reverse
through its index maps. Arrays are transposed to [B, H, T, D] so every block's last two dims are
(chunk, full feature dim): chunk a multiple of 8 (sublanes), features whole (lanes). The per-token
decay and segment ids come twice: as [chunk, 1] columns and as the whole sequence's [N, chunk] rows
(a block equal to the full array dims), from which a kernel reads its chunk's row.

VMEM per program at chunk 128, K = V = 128, bf16 (the default tiles): q/k/v/do/o/dq/dk/dv blocks 32 KiB
each, double-buffered; the [128, 1] float32 columns pad to 64 KiB each; the state scratch 64 KiB; the
[C, C] float32 temporaries 64 KiB each. About 1.5 MiB at most, well inside the 16 MiB default scoped
VMEM of v5e and later, so no vmem_limit_bytes is set.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from zoo.pallas_kernels.ssd_scan import chunk_math as cm


def decay_at(cum_col_ref, cum_rows_ref, seg_col_ref, seg_rows_ref, segprev_rows_ref, n):
    row = pl.ds(n, 1)
    return cm.decay_terms(cum_col_ref[...], cum_rows_ref[row, :], seg_col_ref[...], seg_rows_ref[row, :],
                          segprev_rows_ref[row, :])


def _forward_kernel(q_ref, k_ref, v_ref, *refs):
    *decay_refs, s0_ref, o_ref, final_ref, state_ref = refs
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        state_ref[...] = s0_ref[...]

    d = decay_at(*decay_refs, n)
    q, k, v, state = q_ref[...], k_ref[...], v_ref[...], state_ref[...]
    o_ref[...] = cm.output(q, k, v, d, state).astype(o_ref.dtype)
    state_ref[...] = cm.advance(k, v, d, state)

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        final_ref[...] = state_ref[...]


def _dq_kernel(k_ref, v_ref, do_ref, *refs):
    *decay_refs, s0_ref, dq_ref, state_ref = refs
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        state_ref[...] = s0_ref[...]

    d = decay_at(*decay_refs, n)
    k, v, do, state = k_ref[...], v_ref[...], do_ref[...], state_ref[...]
    dq_ref[...] = cm.grad_q(k, v, do, d, state)
    state_ref[...] = cm.advance(k, v, d, state)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, *refs):
    *decay_refs, dfinal_ref, dk_ref, dv_ref, ds0_ref, dstate_ref = refs
    i = pl.program_id(2)
    last = pl.num_programs(2) - 1

    @pl.when(i == 0)
    def _():
        dstate_ref[...] = dfinal_ref[...]

    d = decay_at(*decay_refs, last - i)
    q, k, v, do, dstate = q_ref[...], k_ref[...], v_ref[...], do_ref[...], dstate_ref[...]
    dk_ref[...] = cm.grad_k(q, v, do, d, dstate)
    dv_ref[...] = cm.grad_v(q, k, do, d, dstate)
    dstate_ref[...] = cm.retreat(q, do, d, dstate)

    @pl.when(i == last)
    def _():
        ds0_ref[...] = dstate_ref[...]


class Layout:
    """[B, H, T, D] views of ops.Prepared and their BlockSpecs over the grid (batch, head, chunk)."""

    def __init__(self, p, chunk: int, reverse: bool):
        batch, length, heads, _ = p.v.shape
        self.chunk, self.count, self.heads = chunk, length // chunk, heads
        self.per_group = heads // p.q.shape[2]
        self.reverse = reverse
        to_heads_major = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731
        self.q, self.k, self.v = map(to_heads_major, (p.q, p.k, p.v))
        cum = jnp.swapaxes(p.cum, 1, 2)  # [B, H, T]
        self.decay = (cum[..., None], cum.reshape(batch, heads, self.count, chunk), p.seg[..., None],
                      p.seg.reshape(batch, self.count, chunk), p.segprev.reshape(batch, self.count, chunk))

    def _n(self, n):
        return self.count - 1 - n if self.reverse else n

    def grouped(self, width):
        return pl.BlockSpec((None, None, self.chunk, width), lambda b, h, n: (b, h // self.per_group, self._n(n), 0))

    def heads_spec(self, width):
        return pl.BlockSpec((None, None, self.chunk, width), lambda b, h, n: (b, h, self._n(n), 0))

    def decay_specs(self):
        c, count = self.chunk, self.count
        return [pl.BlockSpec((None, None, c, 1), lambda b, h, n: (b, h, self._n(n), 0)),
                pl.BlockSpec((None, None, count, c), lambda b, h, n: (b, h, 0, 0)),
                pl.BlockSpec((None, c, 1), lambda b, h, n: (b, self._n(n), 0)),
                pl.BlockSpec((None, count, c), lambda b, h, n: (b, 0, 0)),
                pl.BlockSpec((None, count, c), lambda b, h, n: (b, 0, 0))]

    @staticmethod
    def state_spec(shape):
        return pl.BlockSpec((None, None, *shape[2:]), lambda b, h, n: (b, h, 0, 0))

    def chunk_state_spec(self, shape):
        """The current chunk's [K, V] block of a per-chunk [B, H, N * K, V] array."""
        return pl.BlockSpec((None, None, *shape[2:]), lambda b, h, n: (b, h, self._n(n), 0))

    def call(self, kernel, in_specs, out_specs, out_shape, state_shape, interpret, name):
        return pl.pallas_call(
            kernel, grid=(self.q.shape[0], self.heads, self.count), in_specs=in_specs, out_specs=out_specs,
            out_shape=out_shape, scratch_shapes=[pltpu.VMEM(state_shape[2:], jnp.float32)],
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=pltpu.InterpretParams() if interpret else False, name=name,
        )


def from_heads_major(a):
    return jnp.swapaxes(a, 1, 2)


def forward(p, state, *, chunk: int, interpret: bool):
    """p: ops.Prepared; state [B, H, K, V] float32. Returns (o [B, T, H, V] in v's dtype, final state)."""
    lay = Layout(p, chunk, reverse=False)
    dk, dv = p.q.shape[-1], p.v.shape[-1]
    o, final = lay.call(
        _forward_kernel,
        [lay.grouped(dk), lay.grouped(dk), lay.heads_spec(dv), *lay.decay_specs(), lay.state_spec(state.shape)],
        [lay.heads_spec(dv), lay.state_spec(state.shape)],
        [jax.ShapeDtypeStruct(lay.v.shape, p.v.dtype), jax.ShapeDtypeStruct(state.shape, jnp.float32)],
        state.shape, interpret, "ssd_scan_fwd",
    )(lay.q, lay.k, lay.v, *lay.decay, state)
    return from_heads_major(o), final


def backward(p, state, do, dfinal, *, chunk: int, interpret: bool):
    """Returns per-head float32 (dq [B,T,H,K], dk [B,T,H,K], dv [B,T,H,V], d initial state)."""
    dk, dv = p.q.shape[-1], p.v.shape[-1]
    do = jnp.swapaxes(do, 1, 2)
    forward_lay = Layout(p, chunk, reverse=False)
    per_head = lambda lay, width: jax.ShapeDtypeStruct((*lay.v.shape[:3], width), jnp.float32)  # noqa: E731
    dq = forward_lay.call(
        _dq_kernel,
        [forward_lay.grouped(dk), forward_lay.heads_spec(dv), forward_lay.heads_spec(dv), *forward_lay.decay_specs(),
         forward_lay.state_spec(state.shape)],
        forward_lay.heads_spec(dk), per_head(forward_lay, dk), state.shape, interpret, "ssd_scan_dq",
    )(forward_lay.k, forward_lay.v, do, *forward_lay.decay, state)
    lay = Layout(p, chunk, reverse=True)
    dk_, dv_, dstate = lay.call(
        _dkdv_kernel,
        [lay.grouped(dk), lay.grouped(dk), lay.heads_spec(dv), lay.heads_spec(dv), *lay.decay_specs(),
         lay.state_spec(state.shape)],
        [lay.heads_spec(dk), lay.heads_spec(dv), lay.state_spec(state.shape)],
        [per_head(lay, dk), per_head(lay, dv), jax.ShapeDtypeStruct(state.shape, jnp.float32)],
        state.shape, interpret, "ssd_scan_dkdv",
    )(lay.q, lay.k, lay.v, do, *lay.decay, dfinal)
    return from_heads_major(dq), from_heads_major(dk_), from_heads_major(dv_), dstate
