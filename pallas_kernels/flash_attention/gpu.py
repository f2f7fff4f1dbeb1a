"""Flash attention on GPUs (Pallas Triton): forward, and the backward as a dq kernel and a dk/dv kernel.
(On sm90 GPUs hopper.py runs the forward for 16-bit inputs with widths that are multiples of 64.)

Scores are a sum of "parts": q_i k_i^T over pairs (q_i [B, T, H, D_i], k_i [B, S, KV_i, D_i]), so MLA's
prefill scores its 128 no-RoPE features against per-head keys and its 64 RoPE features against one
shared key without broadcasting that key to every head or padding 192 features to 256; GQA is one part.
Each part's key heads divide the query heads (grouped: query head h reads key head h // (H / KV_i)).

Which key blocks a query block visits comes from a list (ops.py builds it from the blocks' position and
segment ranges): causal, sliding-window and packed-document layouts skip the blocks nothing sees, and
sink blocks are visited alongside the window's band. The list starts with the blocks seen whole (below
the diagonal, inside the window and one document), walked with no mask; the rest are masked element by
element with masking.visible. The forward keeps the online softmax in registers and writes o and the row's
log-sum-exp; learned sink logits enter as the softmax's starting point (running max = sink, sum = 1), so
the log-sum-exp and the backward include them with no extra work.

Backward (FlashAttention-2): delta = rowsum(dO * O) comes from ops.py; the dq kernel walks a query
block's key list; the dk/dv kernel walks a key block's query list (the transposed list), one program per
query head, so a grouped key's gradient is summed over its heads in ops.py. Block shapes are powers of
two (Triton); ops.py pads lengths to the blocks and features to powers of two of at least 16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from zoo.pallas_kernels.flash_attention.masking import visible
from zoo.pallas_kernels.tiles import F32, MASKED, dot, dot_nt, where_visible

# Tiles, warps, pipeline stages: `python bench/flash_attention.py --sweep` (H100, B8 T4096 H16 D128 bf16, causal,
# with the unmasked interior walk; bench/results/flash_attention_sweep_h100.jsonl): forward 128 x 128 tiles at
# 8 warps 1.71 ms (128 x 64 at 4 warps 1.83, 64 x 32 1.90); fwd+bwd with the backward at 64 x 64, 4 warps,
# 6.78-6.83 ms (at 8 warps 12+). With a 512 window (bench/results/flash_attention_h100.jsonl) small tiles
# waste less of the band's edges: 64 x 32 0.62 ms, 128 x 128 0.75. The backward's tiles on the H200
# (`--backward-sweep mha,gqa`, bench/results/flash_backward_sweep_h200.jsonl): 64 x 64 at 4 warps and 3 stages
# is still the quickest for both kernels (fwd+bwd 5.10 ms at MHA; every other tile 7.3 ms or more but 2 stages).
FULL_BLOCKS, WINDOW_BLOCKS = (128, 128), (64, 32)  # forward (q, k) without / with a sliding window
BACKWARD_BLOCK_Q, BACKWARD_BLOCK_K, BACKWARD_WARPS = 64, 64, 4
WARPS = None  # forward warps; None: 8 for tiles of 128 x 128 or more, else 4 (the sweep's best for each)
STAGES = 3


def default_blocks(window):
    """(forward q, forward k, backward q, backward k) tile lengths for a layout."""
    return (*(FULL_BLOCKS if window is None else WINDOW_BLOCKS), BACKWARD_BLOCK_Q, BACKWARD_BLOCK_K)


def forward_warps(block_q, block_k):
    return WARPS or (8 if block_q * block_k >= 128 * 128 else 4)


def _rows(index, size):
    return pl.ds(pl.multiple_of(index * size, size), size)


def _scores(q_blocks, k_refs, rows, scale):
    return sum(dot_nt(q, k_ref[rows, :]) for q, k_ref in zip(q_blocks, k_refs)) * scale


def _walk(body, interior_ref, count_ref, init):
    """body(t, carry, masked) over a list's entries: the blocks seen whole (no element mask) come first."""
    carry = jax.lax.fori_loop(0, interior_ref[...], functools.partial(body, masked=False), init)
    return jax.lax.fori_loop(interior_ref[...], count_ref[...], functools.partial(body, masked=True), carry)


def _forward_kernel(count_ref, interior_ref, list_ref, sink_ref, q_pos_ref, q_seg_ref, k_pos_ref, k_seg_ref, *refs, parts,
                    block_k, scale, window, sink_tokens, has_sink):
    q_refs, k_refs = refs[:parts], refs[parts:2 * parts]
    v_ref, o_ref, lse_ref = refs[2 * parts:]
    q_blocks = [ref[...] for ref in q_refs]
    q_pos, q_seg = q_pos_ref[...][:, None], q_seg_ref[...][:, None]
    rows_q = q_pos.shape[0]

    def body(t, carry, masked):
        running_max, total, acc = carry
        rows = _rows(list_ref[t], block_k)
        mask = visible(q_pos, q_seg, k_pos_ref[rows][None, :], k_seg_ref[rows][None, :], window=window,
                       sink_tokens=sink_tokens) if masked else None
        scores = where_visible(mask, _scores(q_blocks, k_refs, rows, scale), MASKED)
        new_max = jnp.maximum(running_max, jnp.max(scores, axis=1))
        probs = where_visible(mask, jnp.exp(scores - new_max[:, None]), 0.0)
        rescale = jnp.exp(running_max - new_max)
        v = v_ref[rows, :]
        acc = acc * rescale[:, None] + dot(probs.astype(v.dtype), v)
        return new_max, total * rescale + jnp.sum(probs, axis=1), acc

    if has_sink:  # the sink's logit starts the running max with weight exp(0) = 1 and a zero value
        init_max, init_total = jnp.full((rows_q,), sink_ref[...], F32), jnp.ones((rows_q,), F32)
    else:
        init_max, init_total = jnp.full((rows_q,), MASKED, F32), jnp.zeros((rows_q,), F32)
    init = (init_max, init_total, jnp.zeros((rows_q, v_ref.shape[1]), F32))
    running_max, total, acc = _walk(body, interior_ref, count_ref, init)
    empty = total == 0.0  # no visible key (a padding row): output 0
    safe_total = jnp.where(empty, 1.0, total)
    o_ref[...] = jnp.where(empty[:, None], 0.0, acc / safe_total[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, MASKED, running_max + jnp.log(safe_total))


def _dq_kernel(count_ref, interior_ref, list_ref, q_pos_ref, q_seg_ref, k_pos_ref, k_seg_ref, lse_ref, delta_ref, do_ref, v_ref,
               *refs, parts, block_k, scale, window, sink_tokens):
    q_refs, k_refs, dq_refs = refs[:parts], refs[parts:2 * parts], refs[2 * parts:]
    q_blocks = [ref[...] for ref in q_refs]
    q_pos, q_seg = q_pos_ref[...][:, None], q_seg_ref[...][:, None]
    lse, delta, do = lse_ref[...][:, None], delta_ref[...][:, None], do_ref[...]

    def body(t, grads, masked):
        rows = _rows(list_ref[t], block_k)
        mask = visible(q_pos, q_seg, k_pos_ref[rows][None, :], k_seg_ref[rows][None, :], window=window,
                       sink_tokens=sink_tokens) if masked else None
        probs = where_visible(mask, jnp.exp(_scores(q_blocks, k_refs, rows, scale) - lse), 0.0)
        dscores = probs * (dot_nt(do, v_ref[rows, :]) - delta)
        return tuple(g + dot(dscores.astype(k_ref.dtype), k_ref[rows, :]) for g, k_ref in zip(grads, k_refs))

    init = tuple(jnp.zeros(q.shape, F32) for q in q_blocks)
    grads = _walk(body, interior_ref, count_ref, init)
    for dq_ref, g in zip(dq_refs, grads):
        dq_ref[...] = (g * scale).astype(dq_ref.dtype)


def _dkv_kernel(count_ref, interior_ref, list_ref, q_pos_ref, q_seg_ref, k_pos_ref, k_seg_ref, lse_ref, delta_ref, do_ref, v_ref,
                *refs, parts, block_q, scale, window, sink_tokens):
    q_refs, k_refs = refs[:parts], refs[parts:2 * parts]
    dv_ref, dk_refs = refs[2 * parts], refs[2 * parts + 1:]
    k_blocks = [ref[...] for ref in k_refs]
    k_pos, k_seg = k_pos_ref[...][:, None], k_seg_ref[...][:, None]
    v = v_ref[...]

    # Transposed scores [keys, queries] (as Triton's fused-attention tutorial), so that dv and dk are plain
    # products: probs^T @ dO from [queries, keys] probabilities would transpose them in registers every step.
    def body(t, carry, masked):
        dv, dks = carry
        rows = _rows(list_ref[t], block_q)
        mask = visible(q_pos_ref[rows][None, :], q_seg_ref[rows][None, :], k_pos, k_seg, window=window,
                       sink_tokens=sink_tokens) if masked else None
        q_blocks = [ref[rows, :] for ref in q_refs]
        scores = sum(dot_nt(k, q) for q, k in zip(q_blocks, k_blocks)) * scale
        probs = where_visible(mask, jnp.exp(scores - lse_ref[rows][None, :]), 0.0)
        do = do_ref[rows, :]
        dv = dv + dot(probs.astype(do.dtype), do)
        dscores = (probs * (dot_nt(v, do) - delta_ref[rows][None, :])).astype(do.dtype)
        return dv, tuple(dk + dot(dscores, q) for dk, q in zip(dks, q_blocks))

    init = (jnp.zeros(v.shape, F32), tuple(jnp.zeros(k.shape, F32) for k in k_blocks))
    dv, dks = _walk(body, interior_ref, count_ref, init)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    for dk_ref, dk in zip(dk_refs, dks):
        dk_ref[...] = (dk * scale).astype(dk_ref.dtype)


def _params(warps):
    return plgpu.CompilerParams(num_warps=warps, num_stages=STAGES)


def _head_of(heads, kv_heads):
    groups = heads // kv_heads
    return lambda h: h // groups


def forward(qs, ks, v, sinks, q_pos, q_seg, k_pos, k_seg, walk, *, scale, window, sink_tokens, has_sink,
            block_q, block_k, interpret):
    """qs/ks: tuples of parts [B, T, H, D_i] / [B, S, KV_i, D_i]; v [B, S, KV, Dv]; sinks [H] float32;
    positions / segments int32 [B, T] / [B, S] (T, S multiples of the blocks); walk: ops.Walk per
    query block (the key blocks it visits, the ones it sees whole first; the others are all masked here). Returns o [B, T, H, Dv] (v's dtype) and
    the log-sum-exp [B, H, T] float32."""
    batch, length, heads, _ = qs[0].shape
    slots, dv = v.shape[1], v.shape[-1]
    counts, interiors, lists = walk.counts, walk.interiors, walk.lists
    q_block = lambda width: pl.BlockSpec((None, block_q, None, width), lambda h, i, b: (b, i, h, 0))  # noqa: E731

    def k_row(x):
        head_of = _head_of(heads, x.shape[2])
        return pl.BlockSpec((None, slots, None, x.shape[-1]), lambda h, i, b: (b, 0, head_of(h), 0))

    per_q_block = pl.BlockSpec((None, None), lambda h, i, b: (b, i))
    key_row = pl.BlockSpec((None, slots), lambda h, i, b: (b, 0))
    q_rows = pl.BlockSpec((None, block_q), lambda h, i, b: (b, i))
    kernel = functools.partial(_forward_kernel, parts=len(qs), block_k=block_k, scale=scale, window=window,
                               sink_tokens=sink_tokens, has_sink=has_sink)
    return pl.pallas_call(
        kernel,
        grid=(heads, length // block_q, batch),
        in_specs=[per_q_block, per_q_block, pl.BlockSpec((None, None, lists.shape[-1]), lambda h, i, b: (b, i, 0)),
                  pl.BlockSpec((None,), lambda h, i, b: (h,)), q_rows, q_rows, key_row, key_row,
                  *[q_block(q.shape[-1]) for q in qs], *map(k_row, ks), k_row(v)],
        out_specs=[q_block(dv), pl.BlockSpec((None, None, block_q), lambda h, i, b: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct((batch, length, heads, dv), v.dtype),
                   jax.ShapeDtypeStruct((batch, heads, length), F32)],
        compiler_params=_params(forward_warps(block_q, block_k)), interpret=interpret, name="flash_attention_forward",
    )(counts, interiors, lists, sinks, q_pos, q_seg, k_pos, k_seg, *qs, *ks, v)


def backward(qs, ks, v, do, lse, delta, q_pos, q_seg, k_pos, k_seg, q_walk, k_walk, *, scale, window, sink_tokens,
             block_q, block_k, interpret):
    """Gradients given dO [B, T, H, Dv], the forward's lse and delta = rowsum(dO * O) [B, H, T] float32;
    q_walk as forward's walk (per query block of `block_q`), k_walk the same per key block of `block_k` over
    the query blocks that see it. Returns (dqs, dks, dv): dq parts like
    qs; dk parts and dv per query head [B, S, H, D_i]: float32 where key heads are shared (ops.py sums each key
    head's group), else in the keys' dtype (one query head a key head: nothing to sum)."""
    batch, length, heads, _ = qs[0].shape
    slots, dv_width = v.shape[1], v.shape[-1]
    common = dict(parts=len(qs), scale=scale, window=window, sink_tokens=sink_tokens)
    q_counts, q_interiors, q_lists = q_walk.counts, q_walk.interiors, q_walk.lists
    k_counts, k_interiors, k_lists = k_walk.counts, k_walk.interiors, k_walk.lists

    def by_head(x, rows, index):  # x's head for query head h, rows given by index(i)
        head_of = _head_of(heads, x.shape[2])
        return pl.BlockSpec((None, rows, None, x.shape[-1]), lambda h, i, b: (b, index(i), head_of(h), 0))

    lse_block = pl.BlockSpec((None, None, block_q), lambda h, i, b: (b, h, i))
    dq_kernel = functools.partial(_dq_kernel, block_k=block_k, **common)
    dqs = pl.pallas_call(
        dq_kernel,
        grid=(heads, length // block_q, batch),
        in_specs=[pl.BlockSpec((None, None), lambda h, i, b: (b, i)), pl.BlockSpec((None, None), lambda h, i, b: (b, i)),
                  pl.BlockSpec((None, None, q_lists.shape[-1]), lambda h, i, b: (b, i, 0)),
                  pl.BlockSpec((None, block_q), lambda h, i, b: (b, i)), pl.BlockSpec((None, block_q), lambda h, i, b: (b, i)),
                  pl.BlockSpec((None, slots), lambda h, i, b: (b, 0)), pl.BlockSpec((None, slots), lambda h, i, b: (b, 0)),
                  lse_block, lse_block, by_head(do, block_q, lambda i: i), by_head(v, slots, lambda i: 0),
                  *[by_head(q, block_q, lambda i: i) for q in qs], *[by_head(k, slots, lambda i: 0) for k in ks]],
        out_specs=[by_head(q, block_q, lambda i: i) for q in qs],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype) for q in qs],
        compiler_params=_params(BACKWARD_WARPS), interpret=interpret, name="flash_attention_dq",
    )(q_counts, q_interiors, q_lists, q_pos, q_seg, k_pos, k_seg, lse, delta, do, v, *qs, *ks)

    whole_row = pl.BlockSpec((None, None, length), lambda h, j, b: (b, h, 0))
    per_head = lambda width: pl.BlockSpec((None, block_k, None, width), lambda h, j, b: (b, j, h, 0))  # noqa: E731
    dkv_kernel = functools.partial(_dkv_kernel, block_q=block_q, **common)
    grad_dtype = lambda x: x.dtype if x.shape[2] == heads else F32  # noqa: E731
    dv, *dks = pl.pallas_call(
        dkv_kernel,
        grid=(heads, slots // block_k, batch),
        in_specs=[pl.BlockSpec((None, None), lambda h, j, b: (b, j)), pl.BlockSpec((None, None), lambda h, j, b: (b, j)),
                  pl.BlockSpec((None, None, k_lists.shape[-1]), lambda h, j, b: (b, j, 0)),
                  pl.BlockSpec((None, length), lambda h, j, b: (b, 0)), pl.BlockSpec((None, length), lambda h, j, b: (b, 0)),
                  pl.BlockSpec((None, block_k), lambda h, j, b: (b, j)), pl.BlockSpec((None, block_k), lambda h, j, b: (b, j)),
                  whole_row, whole_row, by_head(do, length, lambda j: 0), by_head(v, block_k, lambda j: j),
                  *[by_head(q, length, lambda j: 0) for q in qs], *[by_head(k, block_k, lambda j: j) for k in ks]],
        out_specs=[per_head(dv_width), *[per_head(k.shape[-1]) for k in ks]],
        out_shape=[jax.ShapeDtypeStruct((batch, slots, heads, dv_width), grad_dtype(v)),
                   *[jax.ShapeDtypeStruct((batch, slots, heads, k.shape[-1]), grad_dtype(k)) for k in ks]],
        compiler_params=_params(BACKWARD_WARPS), interpret=interpret, name="flash_attention_dkv",
    )(k_counts, k_interiors, k_lists, q_pos, q_seg, k_pos, k_seg, lse, delta, do, v, *qs, *ks)
    return tuple(dqs), tuple(dks), dv
