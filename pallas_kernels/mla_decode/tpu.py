"""MLA decode on TPUs (Pallas Mosaic): the paged latent cache walked page by page.

Grid (batch row, split, page of the split), the page axis sequential ("arbitrary"). Lengths and the block
table are scalar-prefetched into SMEM and the cache blocks' index maps read them: each step DMAs the page
the table names, clamped to the row's last valid page, so steps past a row's length keep the previous
block index and Mosaic's pipeline fetches nothing new for them. All heads of a row are one block, so a
page is read once per (row, split) however many heads there are. The online softmax lives in float32 VMEM
scratch (running max and sum [H, 1], accumulator [H, R]); each split writes its normalised output and
log-sum-exp, which ops.py combines as it does the GPU kernel's splits.

Blocks are whole in their last two dims (heads x features, page x features), so any head count and width
tile; the page size must be a multiple of 8 (sublanes). VMEM at H 128, R 512, P 64, page 64, bf16: the
queries 144 KiB and a page 72 KiB (each double-buffered), the accumulator and the output block 256 KiB
each (the output double-buffered), the [H, page] float32 scores 32 KiB: about 1.3 MiB, inside the 16 MiB
default scoped VMEM of v5e and later.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from zoo.pallas_kernels.splits import split_result
from zoo.pallas_kernels.tiles import F32, MASKED, dot, dot_nt


def _kernel(lengths_ref, table_ref, q_lat_ref, q_pe_ref, c_ref, k_pe_ref, o_ref, lse_ref, max_ref, sum_ref,
            acc_ref, *, page, pages_per_split, scale):
    row, split, step = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    first = (split * pages_per_split + step) * page
    length = lengths_ref[row]

    @pl.when(step == 0)
    def _():
        max_ref[...] = jnp.full(max_ref.shape, MASKED, F32)
        sum_ref[...] = jnp.zeros(sum_ref.shape, F32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, F32)

    @pl.when(first < length)
    def _():
        c = c_ref[...]
        scores = (dot_nt(q_lat_ref[...], c) + dot_nt(q_pe_ref[...], k_pe_ref[...])) * scale  # [H, page]
        slot = first + jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
        scores = jnp.where(slot < length, scores, MASKED)
        running_max = max_ref[...]
        new_max = jnp.maximum(running_max, jnp.max(scores, axis=1, keepdims=True))
        probs = jnp.exp(scores - new_max)
        rescale = jnp.exp(running_max - new_max)
        acc_ref[...] = acc_ref[...] * rescale + dot(probs.astype(c.dtype), c)
        sum_ref[...] = sum_ref[...] * rescale + jnp.sum(probs, axis=1, keepdims=True)
        max_ref[...] = new_max

    @pl.when(step == pl.num_programs(2) - 1)
    def _():
        o_ref[...], lse_ref[...] = split_result(acc_ref[...], max_ref[...], sum_ref[...])


def mla_decode(q_lat, q_pe, c, k_pe, lengths, block_table, *, scale: float, splits: int, interpret: bool):
    """q_lat [B, H, R], q_pe [B, H, P]; the page pool c [N, page, R], k_pe [N, page, P]; lengths [B] int32 in
    [0, M * page] and block_table [B, M] int32 in [0, N). Split s covers a row's pages
    [s * ceil(M / splits), (s + 1) * ceil(M / splits)). Returns each split's normalised output
    [B, splits, H, R] and log-sum-exp [B, splits, H], float32."""
    batch, heads, rank = q_lat.shape
    page, rope = c.shape[1], k_pe.shape[-1]
    pages_per_split = -(-block_table.shape[1] // splits)

    def page_of(row, split, step, lengths, table):
        last = jnp.maximum(lengths[row] - 1, 0) // page  # past the length: the last page again (no new DMA)
        return table[row, jnp.minimum(split * pages_per_split + step, last)], 0, 0

    per_row = lambda width: pl.BlockSpec((None, heads, width), lambda row, split, step, *_: (row, 0, 0))  # noqa: E731
    per_split = lambda width: pl.BlockSpec((None, None, heads, width),  # noqa: E731
                                           lambda row, split, step, *_: (row, split, 0, 0))
    partial, lse = pl.pallas_call(
        functools.partial(_kernel, page=page, pages_per_split=pages_per_split, scale=scale),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(batch, splits, pages_per_split),
            in_specs=[per_row(rank), per_row(rope), pl.BlockSpec((None, page, rank), page_of),
                      pl.BlockSpec((None, page, rope), page_of)],
            out_specs=[per_split(rank), per_split(1)],
            scratch_shapes=[pltpu.VMEM((heads, 1), F32), pltpu.VMEM((heads, 1), F32),
                            pltpu.VMEM((heads, rank), F32)]),
        out_shape=[jax.ShapeDtypeStruct((batch, splits, heads, rank), F32),
                   jax.ShapeDtypeStruct((batch, splits, heads, 1), F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False, name="mla_decode",
    )(lengths, block_table, q_lat, q_pe, c, k_pe)
    return partial, lse[..., 0]
