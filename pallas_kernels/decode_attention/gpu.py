"""GQA decode on GPUs (Pallas Triton): flash-decoding over a key/value cache read in place.

Grid (key head, batch row, split): a program takes the G query heads that share one key head (q [G, D],
G padded to Triton's 16 rows) and one split of its row's slots, walks that split in blocks of slots with
an online softmax (running max, sum and float32 accumulator [G, Dv]), and writes its normalised output and
log-sum-exp; ops.py combines the splits (and the learned sink logits). The cache stays [B, S, KV, D] as the
layers hold it: a program reads its key head's column of slots, so every key byte is read once per step.

Which slots a query sees comes from the slots' positions and segment ids (masking.visible), so a ring-
buffer cache (sliding window with sink tokens) needs no unrolling. A row's walk stops at its `used` count
(ops.py: one past the last slot holding a token). When the cache length is not a multiple of the block the
last block is read ending at the cache's end, overlapping its predecessor, and the slots already counted
are masked: no padded copy of the cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from zoo.pallas_kernels.flash_attention.masking import visible
from zoo.pallas_kernels.splits import split_result
from zoo.pallas_kernels.tiles import F32, MASKED, dot, dot_nt

WARPS, STAGES = 4, 2


def _kernel(used_ref, q_pos_ref, q_seg_ref, q_ref, k_ref, v_ref, k_pos_ref, k_seg_ref, o_ref, lse_ref, *, block,
            split_len, scale, window, sink_tokens):
    slots = k_ref.shape[0]
    start = pl.program_id(2) * split_len
    stop = jnp.minimum(start + split_len, used_ref[...])
    q, q_pos, q_seg = q_ref[...], q_pos_ref[...], q_seg_ref[...]
    heads = q.shape[0]

    def body(i, carry):
        running_max, total, acc = carry
        first = start + i * block
        read_from = jnp.minimum(first, slots - block)  # the cache's last block may overlap the one before
        rows = pl.ds(read_from, block)
        k_pos, k_seg = k_pos_ref[rows], k_seg_ref[rows]
        slot = read_from + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
        seen = (slot >= first) & visible(q_pos, q_seg, k_pos[None, :], k_seg[None, :], window=window,
                                         sink_tokens=sink_tokens)
        scores = jnp.where(seen, dot_nt(q, k_ref[rows, :]) * scale, MASKED)
        new_max = jnp.maximum(running_max, jnp.max(scores, axis=1))
        # A block with no visible slot leaves new_max at MASKED: its weights must be 0, not exp(0), or a split
        # that sees nothing would average its values (a row seeing nothing gets zeros, as mla_decode's).
        probs = jnp.where(seen, jnp.exp(scores - new_max[:, None]), 0.0)
        rescale = jnp.exp(running_max - new_max)
        v = v_ref[rows, :]
        acc = acc * rescale[:, None] + dot(probs.astype(v.dtype), v)
        return new_max, total * rescale + jnp.sum(probs, axis=1), acc

    count = (jnp.maximum(stop - start, 0) + block - 1) // block
    init = (jnp.full((heads,), MASKED, F32), jnp.zeros((heads,), F32), jnp.zeros((heads, o_ref.shape[-1]), F32))
    running_max, total, acc = jax.lax.fori_loop(0, count, body, init)
    o_ref[...], lse_ref[...] = split_result(acc, running_max, total)


def decode_attention(q, k, v, k_pos, k_seg, q_pos, q_seg, used, *, scale: float, window: int | None,
                     sink_tokens: int, block: int, splits: int, split_len: int, interpret: bool):
    """q [B, KV, G, D] (G >= 16), k [B, S, KV, D], v [B, S, KV, Dv] (S >= block), k_pos / k_seg [B, S],
    q_pos / q_seg / used [B] int32; split s covers a row's slots [s * split_len, (s + 1) * split_len)
    (split_len a multiple of block). Returns each split's normalised output [B, splits, KV, G, Dv] and
    log-sum-exp [B, splits, KV, G], float32."""
    batch, kv_heads, groups, _ = q.shape
    slots, dv = k.shape[1], v.shape[-1]
    per_row = pl.BlockSpec((None,), lambda h, b, s: (b,))
    key_column = lambda width: pl.BlockSpec((None, slots, None, width), lambda h, b, s: (b, 0, h, 0))  # noqa: E731
    slot_info = pl.BlockSpec((None, slots), lambda h, b, s: (b, 0))
    return pl.pallas_call(
        functools.partial(_kernel, block=block, split_len=split_len, scale=scale, window=window,
                          sink_tokens=sink_tokens),
        grid=(kv_heads, batch, splits),
        in_specs=[per_row, per_row, per_row, pl.BlockSpec((None, None, groups, q.shape[-1]), lambda h, b, s: (b, h, 0, 0)),
                  key_column(k.shape[-1]), key_column(dv), slot_info, slot_info],
        out_specs=[pl.BlockSpec((None, None, None, groups, dv), lambda h, b, s: (b, s, h, 0, 0)),
                   pl.BlockSpec((None, None, None, groups), lambda h, b, s: (b, s, h, 0))],
        out_shape=[jax.ShapeDtypeStruct((batch, splits, kv_heads, groups, dv), F32),
                   jax.ShapeDtypeStruct((batch, splits, kv_heads, groups), F32)],
        compiler_params=plgpu.CompilerParams(num_warps=WARPS, num_stages=STAGES), interpret=interpret,
        name="decode_attention",
    )(used, q_pos, q_seg, q, k, v, k_pos, k_seg)
