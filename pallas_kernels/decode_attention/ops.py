"""decode_attention: one decode step of softmax attention (GQA / MQA / MHA) over a key/value cache, with
Pallas kernels.

    o[b, h] = sum_s softmax_s(scale * q[b, h] . k[b, s, h // G] (+ sink_h)) v[b, s, h // G]

over the slots masking.visible admits for the query's position and segment (causal, same document,
sliding window with sink tokens), so a full cache and a ring buffer are read alike, in place. The caller
writes the new token into the cache first (one token cannot overwrite a slot its own query sees).
Decode is never differentiated, so there is no custom_vjp (DESIGN.md asks for one where training uses a
kernel). GPUs: gpu.py (split-K flash-decoding, one key head per program); TPUs: tpu.py (a row's heads
together, block by block); splits and learned sink logits are combined here by their log-sum-exp.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from zoo.pallas_kernels import dispatch
from zoo.pallas_kernels.decode_attention import gpu, tpu
from zoo.pallas_kernels.decode_attention.reference import decode_attention_reference
from zoo.pallas_kernels.splits import combine_splits, default_splits
from zoo.pallas_kernels.tiles import pad_axis, triton_width
from zoo.train.mesh import LOGICAL_RULES, logical_to_spec

BLOCKS = {"gpu": 64, "tpu": 128}  # slots per step of the walk


def decode_attention(q, k, v, k_positions, k_segments, q_position, q_segment, *, scale: float,
                     window: int | None = None, sink_tokens: int = 0, sink_logits=None, impl: str = "auto",
                     platform: str | None = None, block: int | None = None, splits: int | None = None):
    """q [B, H, D] (one token per row), k [B, S, KV, D], v [B, S, KV, Dv] (KV dividing H), the slots'
    positions / segment ids [B, S] (position -1: empty), the query's position / segment [B]; sink_logits [H].
    Returns [B, H, Dv] in v's dtype. A row that sees no slot and has no sink gets a zero output.

    block: slots per step (GPUs: a power of two >= 16, default 64; TPUs: a multiple of 8, default 128);
    splits: programs sharing a row's slots (default: default_splits on GPUs, 1 on TPUs). Under a mesh the
    kernel runs per shard: rows and heads split as the logical rules place [batch, 1, heads, head_dim]."""
    batch, heads, width = q.shape
    slots, kv_heads = k.shape[1:3]
    ok = (k.shape == (batch, slots, kv_heads, width) and v.shape[:3] == (batch, slots, kv_heads)
          and heads % kv_heads == 0 and k_positions.shape == k_segments.shape == (batch, slots)
          and q_position.shape == q_segment.shape == (batch,)
          and (sink_logits is None or sink_logits.shape == (heads,)))
    if not ok:
        raise ValueError("decode_attention needs q [B, H, D], k [B, S, KV, D], v [B, S, KV, Dv] (KV dividing H), slot "
                         "positions / segments [B, S], query position / segment [B], sink_logits [H]; got q "
                         f"{q.shape}, k {k.shape}, v {v.shape}, slots {k_positions.shape} / {k_segments.shape}, query "
                         f"{q_position.shape} / {q_segment.shape}, sinks "
                         f"{None if sink_logits is None else sink_logits.shape}")
    if window is not None and window <= 0:
        raise ValueError(f"window must be a positive length or None, got {window}")
    backend = dispatch.resolve(impl, platform)
    ints = [x.astype(jnp.int32) for x in (k_positions, k_segments, q_position, q_segment)]
    if backend.kind == "xla":
        return decode_attention_reference(q, k, v, *ints, scale=scale, window=window, sink_tokens=sink_tokens,
                                          sink_logits=sink_logits)
    block = block or BLOCKS[backend.kind]
    if backend.kind == "gpu" and (block < 16 or block & (block - 1)):
        raise ValueError(f"the block must be a power of two of at least 16 (Triton's matmul tiles), got {block}")
    if backend.kind == "tpu" and block % 8:
        raise ValueError(f"the block must be a multiple of 8 (Mosaic's sublanes), got {block}")
    sinks = None if sink_logits is None else sink_logits.astype(jnp.float32)

    def attend(q, k, v, sinks, k_pos, k_seg, q_pos, q_seg):
        return (_decode(backend, q, k, v, sinks, k_pos, k_seg, q_pos, q_seg, scale=scale, window=window,
                        sink_tokens=sink_tokens, block=block, splits=splits),)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return attend(q, k, v, sinks, *ints)[0]
    rules = nn.get_logical_axis_rules() or LOGICAL_RULES
    rows, _, head_axes, _ = logical_to_spec(("batch", "length", "heads", None), (batch, 1, heads, width), mesh, rules)
    head_split = 1
    for axis in (head_axes,) if isinstance(head_axes, str) else head_axes or ():
        head_split *= dict(zip(mesh.axis_names, mesh.axis_sizes))[axis]
    if kv_heads % head_split:  # the key heads cannot follow the query heads' split: give every query head its own
        k, v = jnp.repeat(k, heads // kv_heads, axis=2), jnp.repeat(v, heads // kv_heads, axis=2)
    cache = P(rows, None, head_axes, None)
    shard = jax.shard_map(attend, mesh=mesh, check_vma=False,
                          in_specs=(P(rows, head_axes, None), cache, cache, None if sinks is None else P(head_axes),
                                    P(rows, None), P(rows, None), P(rows), P(rows)),
                          out_specs=(P(rows, head_axes, None),))
    return shard(q, k, v, sinks, *ints)[0]


def _decode(backend, q, k, v, sinks, k_pos, k_seg, q_pos, q_seg, *, scale, window, sink_tokens, block, splits):
    batch, heads, width = q.shape
    slots, kv_heads = k.shape[1:3]
    groups, dv, dtype = heads // kv_heads, v.shape[-1], v.dtype
    # One past the last slot holding a token: the walk stops there (a full cache is filled from slot 0).
    used = jnp.max(jnp.where(k_pos >= 0, jnp.arange(1, slots + 1, dtype=jnp.int32), 0), axis=1)
    q = q.astype(dtype).reshape(batch, kv_heads, groups, width)
    k = k.astype(dtype)
    kernel = dict(scale=scale, window=window, sink_tokens=sink_tokens, interpret=backend.interpret)
    if backend.kind == "tpu":
        padded = -(-slots // block) * block
        if padded != slots:  # Mosaic's blocks tile the cache exactly (a copy; allocate caches in whole blocks)
            k, v = pad_axis(k, 1, padded), pad_axis(v, 1, padded)
            k_pos, k_seg = pad_axis(k_pos, 1, padded, -1), pad_axis(k_seg, 1, padded, -1)
        partial, lse = tpu.decode_attention(q, k, v, k_pos, k_seg, q_pos, q_seg, used, block=block, splits=splits or 1,
                                            **kernel)
    else:
        block = min(block, max(16, 1 << (slots.bit_length() - 1)))  # no longer than the cache
        if slots < block or triton_width(width) != width or triton_width(dv) != dv:
            # Triton's tiles: a cache shorter than 16 slots or head dims off powers of two are padded (a copy).
            slots_padded = max(slots, block)
            k = pad_axis(pad_axis(k, 1, slots_padded), 3, triton_width(width))
            v = pad_axis(pad_axis(v, 1, slots_padded), 3, triton_width(dv))
            k_pos, k_seg = pad_axis(k_pos, 1, slots_padded, -1), pad_axis(k_seg, 1, slots_padded, -1)
            q = pad_axis(q, 3, triton_width(width))
        blocks = -(-k.shape[1] // block)
        split_len = -(-blocks // (splits or default_splits(batch * kv_heads, blocks * block, block))) * block
        partial, lse = gpu.decode_attention(pad_axis(q, 2, triton_width(groups)), k, v, k_pos, k_seg, q_pos, q_seg,
                                            used, block=block, splits=-(-blocks * block // split_len),
                                            split_len=split_len, **kernel)
        partial, lse = partial[:, :, :, :groups, :dv], lse[:, :, :, :groups]
    out = combine_splits(partial.reshape(*partial.shape[:2], heads, dv), lse.reshape(*lse.shape[:2], heads), sinks)
    return out.astype(dtype)
