"""GQA decode on TPUs (Pallas Mosaic): the key/value cache walked block by block, all heads of a row at once.

Grid (batch row, split, block of the split), the block axis sequential ("arbitrary"). The cache is read as
[B, S, KV * D] (a free reshape of the layers' [B, S, KV, D]) so a block is whole in its last dim and each
step DMAs a row's slots for every key head: a block is read once per (row, split). The per-row `used`
counts are scalar-prefetched and the index maps clamp to a row's last used block, so steps past it fetch
nothing new. Scores are kept transposed ([slots, G] per key head) so that the slots' positions, a column
[block, 1], mask them without a relayout; the online softmax state lives in float32 VMEM scratch
(running max and sum [KV, 1, G], accumulator [KV, Dv, G]). Each split writes its normalised output and
log-sum-exp, which ops.py combines as it does the GPU kernel's splits. The block must be a multiple of 8
(sublanes) and divide the cache length (ops.py pads when it does not).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from zoo.pallas_kernels.flash_attention.masking import visible
from zoo.pallas_kernels.splits import split_result
from zoo.pallas_kernels.tiles import F32, MASKED, dot_nt, dot_tn


def _kernel(used_ref, q_pos_ref, q_seg_ref, q_ref, k_ref, v_ref, k_pos_ref, k_seg_ref, o_ref, lse_ref, max_ref,
            sum_ref, acc_ref, *, block, blocks_per_split, scale, window, sink_tokens, kv_heads):
    row, split, step = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    first = (split * blocks_per_split + step) * block
    groups, width, dv = q_ref.shape[0] // kv_heads, q_ref.shape[1], acc_ref.shape[1]

    @pl.when(step == 0)
    def _():
        max_ref[...] = jnp.full(max_ref.shape, MASKED, F32)
        sum_ref[...] = jnp.zeros(sum_ref.shape, F32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, F32)

    @pl.when(first < used_ref[row])
    def _():
        seen = visible(q_pos_ref[row], q_seg_ref[row], k_pos_ref[...], k_seg_ref[...], window=window,
                       sink_tokens=sink_tokens)  # [block, 1]
        keys, values, queries = k_ref[...], v_ref[...], q_ref[...]
        for head in range(kv_heads):
            q = queries[head * groups:(head + 1) * groups]
            scores = jnp.where(seen, dot_nt(keys[:, head * width:(head + 1) * width], q) * scale, MASKED)  # [block, G]
            running_max = max_ref[head]
            new_max = jnp.maximum(running_max, jnp.max(scores, axis=0, keepdims=True))
            probs = jnp.where(seen, jnp.exp(scores - new_max), 0.0)
            rescale = jnp.exp(running_max - new_max)
            value = values[:, head * dv:(head + 1) * dv]
            acc_ref[head] = acc_ref[head] * rescale + dot_tn(value, probs.astype(value.dtype))  # [Dv, G]
            sum_ref[head] = sum_ref[head] * rescale + jnp.sum(probs, axis=0, keepdims=True)
            max_ref[head] = new_max

    @pl.when(step == pl.num_programs(2) - 1)
    def _():
        o_ref[...], lse_ref[...] = split_result(acc_ref[...], max_ref[...], sum_ref[...])


def decode_attention(q, k, v, k_pos, k_seg, q_pos, q_seg, used, *, scale: float, window: int | None,
                     sink_tokens: int, block: int, splits: int, interpret: bool):
    """q [B, KV, G, D], k [B, S, KV, D], v [B, S, KV, Dv] with S a multiple of block, k_pos / k_seg [B, S],
    q_pos / q_seg / used [B] int32. Split s covers a row's blocks [s * ceil(n / splits), (s + 1) * ceil(n /
    splits)) of its n = S / block. Returns each split's normalised output [B, splits, KV, G, Dv] and
    log-sum-exp [B, splits, KV, G], float32."""
    batch, kv_heads, groups, width = q.shape
    slots, dv = k.shape[1], v.shape[-1]
    blocks_per_split = -(-(slots // block) // splits)

    def block_of(row, split, step, used, *_):
        last = jnp.maximum(used[row] - 1, 0) // block  # past the used slots: the last block again (no new DMA)
        return jnp.minimum(split * blocks_per_split + step, last), 0

    cache_block = lambda features: pl.BlockSpec(  # noqa: E731
        (None, block, features), lambda row, split, step, *s: (row, *block_of(row, split, step, *s)))
    per_split = lambda shape: pl.BlockSpec((None, None, *shape), lambda row, split, step, *_: (row, split, 0, 0, 0))  # noqa: E731
    partial, lse = pl.pallas_call(
        functools.partial(_kernel, block=block, blocks_per_split=blocks_per_split, scale=scale, window=window,
                          sink_tokens=sink_tokens, kv_heads=kv_heads),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(batch, splits, blocks_per_split),
            in_specs=[pl.BlockSpec((None, kv_heads * groups, width), lambda row, split, step, *_: (row, 0, 0)),
                      cache_block(kv_heads * width), cache_block(kv_heads * dv), cache_block(1), cache_block(1)],
            out_specs=[per_split((kv_heads, dv, groups)), per_split((kv_heads, 1, groups))],
            scratch_shapes=[pltpu.VMEM((kv_heads, 1, groups), F32), pltpu.VMEM((kv_heads, 1, groups), F32),
                            pltpu.VMEM((kv_heads, dv, groups), F32)]),
        out_shape=[jax.ShapeDtypeStruct((batch, splits, kv_heads, dv, groups), F32),
                   jax.ShapeDtypeStruct((batch, splits, kv_heads, 1, groups), F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False, name="decode_attention",
    )(used, q_pos, q_seg, q.reshape(batch, kv_heads * groups, width), k.reshape(batch, slots, kv_heads * width),
      v.reshape(batch, slots, kv_heads * dv), k_pos[..., None], k_seg[..., None])
    return jnp.swapaxes(partial, -1, -2), lse[..., 0, :]
