"""MLA decode on GPUs (Pallas Triton): flash-decoding over the latent cache.

The cache is paged: a pool of pages of `block` slots (c [N * block, R], k_pe [N * block, P]) and a block
table per row naming the page that holds its slots [i * block, (i + 1) * block) (ops.py builds the table
of a contiguous [B, S] cache, so both layouts run this one kernel).
Grid (head block, batch row, split): a program takes a block of heads' absorbed queries (q_lat [HB, R],
q_pe [HB, P]) and one split of its row's slots, walks that split's valid slots page by page with an
online softmax (running max, sum and float32 accumulator [HB, R]), and writes its
normalised output and log-sum-exp; ops.py combines the splits. Head blocks vary fastest so the programs
reading the same cache blocks run together and share them through L2. Slots at or past the row's length
are never loaded as scores: whole blocks past it are skipped, the last one masked.
Shapes are powers of two (Triton); ops.py pads heads, R, P and the cache length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from zoo.pallas_kernels.splits import split_result
from zoo.pallas_kernels.tiles import F32, MASKED, dot, dot_nt

# `python bench/attention_kernels.py --sweep` (B128, 8K context, 128 heads, R 512, bf16, H100): 32 heads
# per program, 64-slot blocks, 4 warps 1.11 ms; 64 heads 1.28 ms (8 warps) / 2.93 ms (4: the float32
# accumulator [64, 512] spills); 16 heads 1.60 ms. The transposed walk (scores [slots, heads], accumulator
# [R, heads], so that every matmul has 64+ rows for Hopper's wgmma) was slower on the H200: best 1.58 ms
# (32 heads, 4 warps, 3 stages) against this one's 1.12-1.16 (bench/results/attention_kernels_sweep_h200.jsonl).
WARPS, STAGES = 4, 2


def _kernel(lengths_ref, table_ref, q_lat_ref, q_pe_ref, c_ref, k_pe_ref, o_ref, lse_ref, *, block, split_len, scale):
    start = pl.program_id(2) * split_len
    stop = jnp.minimum(start + split_len, lengths_ref[...])
    q_lat, q_pe = q_lat_ref[...], q_pe_ref[...]
    heads = q_lat.shape[0]

    def body(i, carry):
        running_max, total, acc = carry
        first = start + i * block
        rows = pl.ds(pl.multiple_of(table_ref[first // block] * block, block), block)
        c = c_ref[rows, :]
        scores = (dot_nt(q_lat, c) + dot_nt(q_pe, k_pe_ref[rows, :])) * scale
        slot = first + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
        scores = jnp.where(slot < stop, scores, MASKED)
        new_max = jnp.maximum(running_max, jnp.max(scores, axis=1))
        probs = jnp.exp(scores - new_max[:, None])
        rescale = jnp.exp(running_max - new_max)
        acc = acc * rescale[:, None] + dot(probs.astype(c.dtype), c)
        return new_max, total * rescale + jnp.sum(probs, axis=1), acc

    count = (jnp.maximum(stop - start, 0) + block - 1) // block
    init = (jnp.full((heads,), MASKED, F32), jnp.zeros((heads,), F32), jnp.zeros((heads, q_lat.shape[1]), F32))
    running_max, total, acc = jax.lax.fori_loop(0, count, body, init)
    o_ref[...], lse_ref[...] = split_result(acc, running_max, total)


def mla_decode(q_lat, q_pe, c, k_pe, lengths, block_table, *, scale: float, block: int, splits: int,
               split_len: int, head_block: int, interpret: bool):
    """q_lat [B, H, R], q_pe [B, H, P]; the page pool c [N * block, R], k_pe [N * block, P]; lengths [B] int32
    in [0, M * block] and block_table [B, M] int32 in [0, N); split s covers a row's slots
    [s * split_len, (s + 1) * split_len) (split_len a multiple of block). Returns each split's normalised
    output [B, splits, H, R] and log-sum-exp [B, splits, H], float32."""
    batch, heads, rank = q_lat.shape
    rope = q_pe.shape[-1]
    per_head_block = lambda width: pl.BlockSpec((None, head_block, width), lambda h, b, s: (b, h, 0))  # noqa: E731
    whole_pool = lambda x: pl.BlockSpec(x.shape, lambda h, b, s: (0, 0))  # noqa: E731
    return pl.pallas_call(
        functools.partial(_kernel, block=block, split_len=split_len, scale=scale),
        grid=(heads // head_block, batch, splits),
        in_specs=[pl.BlockSpec((None,), lambda h, b, s: (b,)),
                  pl.BlockSpec((None, block_table.shape[1]), lambda h, b, s: (b, 0)),
                  per_head_block(rank), per_head_block(rope), whole_pool(c), whole_pool(k_pe)],
        out_specs=[pl.BlockSpec((None, None, head_block, rank), lambda h, b, s: (b, s, h, 0)),
                   pl.BlockSpec((None, None, head_block), lambda h, b, s: (b, s, h))],
        out_shape=[jax.ShapeDtypeStruct((batch, splits, heads, rank), F32),
                   jax.ShapeDtypeStruct((batch, splits, heads), F32)],
        compiler_params=plgpu.CompilerParams(num_warps=WARPS, num_stages=STAGES), interpret=interpret,
        name="mla_decode",
    )(lengths, block_table, q_lat, q_pe, c, k_pe)
