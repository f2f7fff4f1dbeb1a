"""Flash attention on TPUs (Pallas Mosaic): forward, and the backward as a dq kernel and a dk/dv kernel.

The same walk as gpu.py, expressed as a grid: (batch row, query head, own block, step), the step axis
sequential ("arbitrary") over the own block's list (ops.block_lists, scalar-prefetched into SMEM). The
other side's blocks come through index maps that read the list, clamped to its last entry, so steps past
a block's count keep the previous block index and Mosaic's pipeline fetches nothing new for them; the
first `interior` steps skip the element mask, the rest mask with masking.visible. Running max, sum and
accumulators live in float32 VMEM scratch across the steps.

Arrays are heads-major ([B, H, T, D], ops.py transposes) so every block's last two dims are (block
length, full feature width); positions and segment ids come as query columns [B, T, 1] and key rows
[B, 1, S], so key blocks are multiples of 128 (lanes) and query blocks of 8 (sublanes). Sink logits are
read from SMEM.

VMEM at 128 x 128 tiles, D 128, bf16 (the default): q/k/v/o blocks 32 KiB each, double-buffered; the
accumulator 64 KiB; the [128, 128] float32 scores and probabilities 64 KiB each; the dk/dv kernel's two
float32 accumulators 128 KiB. Well under 2 MiB, inside the 16 MiB default scoped VMEM of v5e and later.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from zoo.pallas_kernels.flash_attention.masking import visible
from zoo.pallas_kernels.tiles import F32, MASKED, dot, dot_nt, dot_tn, where_visible

BLOCKS = (128, 128, 128, 128)  # forward (q, k), backward (q, k); untuned: no TPU has run these kernels yet


def _other(b, own, t, counts, entries, *, owns, width):
    """The other side's block at step t of own block `own` in row b, clamped to the list's last entry (the
    lists are flat in SMEM: [B * owns] counts, [B * owns * width] entries)."""
    row = b * owns + own
    return entries[row * width + jnp.minimum(t, jnp.maximum(counts[row] - 1, 0))]


def _run_steps(step, counts_ref, interiors_ref, b, own, owns):
    t = pl.program_id(3)
    count, interior = counts_ref[b * owns + own], interiors_ref[b * owns + own]
    pl.when(t < interior)(functools.partial(step, masked=False))
    pl.when((t >= interior) & (t < count))(functools.partial(step, masked=True))


def _mask(q_pos_ref, q_seg_ref, k_pos_ref, k_seg_ref, window, sink_tokens, masked):
    if not masked:
        return None
    return visible(q_pos_ref[...], q_seg_ref[...], k_pos_ref[...], k_seg_ref[...], window=window,
                   sink_tokens=sink_tokens)


def _forward_kernel(counts_ref, interiors_ref, lists_ref, sink_ref, q_pos_ref, q_seg_ref, k_pos_ref, k_seg_ref,
                    *refs, parts, scale, window, sink_tokens, has_sink):
    q_refs, k_refs = refs[:parts], refs[parts:2 * parts]
    v_ref, o_ref, lse_ref, max_ref, sum_ref, acc_ref = refs[2 * parts:]
    b, h, i, t = (pl.program_id(axis) for axis in range(4))

    @pl.when(t == 0)
    def _():
        if has_sink:  # the sink's logit starts the running max with weight exp(0) = 1 and a zero value
            max_ref[...] = jnp.full(max_ref.shape, sink_ref[h], F32)
            sum_ref[...] = jnp.ones(sum_ref.shape, F32)
        else:
            max_ref[...] = jnp.full(max_ref.shape, MASKED, F32)
            sum_ref[...] = jnp.zeros(sum_ref.shape, F32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, F32)

    def step(masked):
        mask = _mask(q_pos_ref, q_seg_ref, k_pos_ref, k_seg_ref, window, sink_tokens, masked)
        scores = where_visible(mask, sum(dot_nt(q[...], k[...]) for q, k in zip(q_refs, k_refs)) * scale, MASKED)
        running_max = max_ref[...]
        new_max = jnp.maximum(running_max, jnp.max(scores, axis=1, keepdims=True))
        probs = where_visible(mask, jnp.exp(scores - new_max), 0.0)
        rescale = jnp.exp(running_max - new_max)
        v = v_ref[...]
        acc_ref[...] = acc_ref[...] * rescale + dot(probs.astype(v.dtype), v)
        sum_ref[...] = sum_ref[...] * rescale + jnp.sum(probs, axis=1, keepdims=True)
        max_ref[...] = new_max

    _run_steps(step, counts_ref, interiors_ref, b, i, pl.num_programs(2))

    @pl.when(t == pl.num_programs(3) - 1)
    def _():
        total = sum_ref[...]
        empty = total == 0.0  # no visible key (a padding row): output 0
        safe_total = jnp.where(empty, 1.0, total)
        o_ref[...] = jnp.where(empty, 0.0, acc_ref[...] / safe_total).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, MASKED, max_ref[...] + jnp.log(safe_total))


def _dq_kernel(counts_ref, interiors_ref, lists_ref, q_pos_ref, q_seg_ref, k_pos_ref, k_seg_ref, lse_ref, delta_ref,
               do_ref, v_ref, *refs, parts, scale, window, sink_tokens):
    q_refs, k_refs = refs[:parts], refs[parts:2 * parts]
    dq_refs, acc_refs = refs[2 * parts:3 * parts], refs[3 * parts:]
    b, _, i, t = (pl.program_id(axis) for axis in range(4))

    @pl.when(t == 0)
    def _():
        for acc in acc_refs:
            acc[...] = jnp.zeros(acc.shape, F32)

    def step(masked):
        mask = _mask(q_pos_ref, q_seg_ref, k_pos_ref, k_seg_ref, window, sink_tokens, masked)
        scores = sum(dot_nt(q[...], k[...]) for q, k in zip(q_refs, k_refs)) * scale
        probs = where_visible(mask, jnp.exp(scores - lse_ref[...]), 0.0)
        dscores = probs * (dot_nt(do_ref[...], v_ref[...]) - delta_ref[...])
        for acc, k in zip(acc_refs, k_refs):
            acc[...] += dot(dscores.astype(k.dtype), k[...])

    _run_steps(step, counts_ref, interiors_ref, b, i, pl.num_programs(2))

    @pl.when(t == pl.num_programs(3) - 1)
    def _():
        for dq, acc in zip(dq_refs, acc_refs):
            dq[...] = (acc[...] * scale).astype(dq.dtype)


def _dkv_kernel(counts_ref, interiors_ref, lists_ref, q_pos_ref, q_seg_ref, k_pos_ref, k_seg_ref, lse_ref, delta_ref,
                do_ref, v_ref, *refs, parts, scale, window, sink_tokens):
    q_refs, k_refs = refs[:parts], refs[parts:2 * parts]
    dv_ref, dk_refs = refs[2 * parts], refs[2 * parts + 1:3 * parts + 1]
    dv_acc, dk_accs = refs[3 * parts + 1], refs[3 * parts + 2:]
    b, _, j, t = (pl.program_id(axis) for axis in range(4))

    @pl.when(t == 0)
    def _():
        for acc in (dv_acc, *dk_accs):
            acc[...] = jnp.zeros(acc.shape, F32)

    def step(masked):
        mask = _mask(q_pos_ref, q_seg_ref, k_pos_ref, k_seg_ref, window, sink_tokens, masked)
        q_blocks = [q[...] for q in q_refs]
        scores = sum(dot_nt(q, k[...]) for q, k in zip(q_blocks, k_refs)) * scale
        probs = where_visible(mask, jnp.exp(scores - lse_ref[...]), 0.0)
        do = do_ref[...]
        dv_acc[...] += dot_tn(probs.astype(do.dtype), do)
        dscores = (probs * (dot_nt(do, v_ref[...]) - delta_ref[...])).astype(do.dtype)
        for acc, q in zip(dk_accs, q_blocks):
            acc[...] += dot_tn(dscores, q)

    _run_steps(step, counts_ref, interiors_ref, b, j, pl.num_programs(2))

    @pl.when(t == pl.num_programs(3) - 1)
    def _():
        dv_ref[...] = dv_acc[...]
        for dk, acc in zip(dk_refs, dk_accs):
            dk[...] = acc[...] * scale


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, interpret, name):
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=3, grid=grid, in_specs=in_specs,
                                               out_specs=out_specs, scratch_shapes=scratch),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False, name=name,
    )


def _specs(heads, block_q, block_k, own_is_query, owns, width):
    """BlockSpec makers for the query side and the key side: the own side's block is the grid's third
    index, the other side's comes from the scalar-prefetched list."""
    def other(b, i, t, refs):
        counts, _, entries = refs
        return _other(b, i, t, counts, entries, owns=owns, width=width)

    def own(b, i, t, refs):
        return i

    q_index, k_index = (own, other) if own_is_query else (other, own)

    def by_head(x, rows, index):  # heads-major [B, heads_x, L, D]; query head h reads head h // (H / heads_x)
        groups = heads // x.shape[1]
        return pl.BlockSpec((None, None, rows, x.shape[-1]),
                            lambda b, h, i, t, *refs: (b, h // groups, index(b, i, t, refs), 0))

    q_col = pl.BlockSpec((None, block_q, 1), lambda b, h, i, t, *refs: (b, q_index(b, i, t, refs), 0))
    k_row = pl.BlockSpec((None, 1, block_k), lambda b, h, i, t, *refs: (b, 0, k_index(b, i, t, refs)))
    per_q_head = pl.BlockSpec((None, None, block_q, 1), lambda b, h, i, t, *refs: (b, h, q_index(b, i, t, refs), 0))
    return (lambda x: by_head(x, block_q, q_index)), (lambda x: by_head(x, block_k, k_index)), q_col, k_row, per_q_head


def _flat(walk):
    counts, interiors, lists = walk.counts, walk.interiors, walk.lists
    return counts.reshape(-1), interiors.reshape(-1), lists.reshape(-1), lists.shape[1], lists.shape[2]


def forward(qs, ks, v, sinks, q_pos, q_seg, k_pos, k_seg, walk, *, scale, window, sink_tokens, has_sink,
            block_q, block_k, interpret):
    """Heads-major qs [B, H, T, D_i], ks [B, KV_i, S, D_i], v [B, KV, S, Dv]; sinks [H] float32; q_pos / q_seg
    [B, T, 1] and k_pos / k_seg [B, 1, S] int32; walk: ops.block_lists per query block. Returns o
    [B, H, T, Dv] (v's dtype) and the log-sum-exp [B, H, T, 1] float32."""
    batch, heads, length, _ = qs[0].shape
    dv = v.shape[-1]
    counts, interiors, lists, owns, width = _flat(walk)
    q_part, k_part, q_col, k_row, per_q_head = _specs(heads, block_q, block_k, True, owns, width)
    kernel = functools.partial(_forward_kernel, parts=len(qs), scale=scale, window=window, sink_tokens=sink_tokens,
                               has_sink=has_sink)
    return _call(
        kernel, (batch, heads, owns, width),
        [pl.BlockSpec(memory_space=pltpu.SMEM), q_col, q_col, k_row, k_row, *map(q_part, qs), *map(k_part, ks),
         k_part(v)],
        [q_part(jax.ShapeDtypeStruct((batch, heads, length, dv), v.dtype)), per_q_head],
        [jax.ShapeDtypeStruct((batch, heads, length, dv), v.dtype), jax.ShapeDtypeStruct((batch, heads, length, 1), F32)],
        [pltpu.VMEM((block_q, 1), F32), pltpu.VMEM((block_q, 1), F32), pltpu.VMEM((block_q, dv), F32)],
        interpret, "flash_attention_forward",
    )(counts, interiors, lists, sinks, q_pos, q_seg, k_pos, k_seg, *qs, *ks, v)


def backward(qs, ks, v, do, lse, delta, q_pos, q_seg, k_pos, k_seg, q_walk, k_walk, *, scale, window, sink_tokens,
             block_q, block_k, interpret):
    """Gradients given heads-major dO [B, H, T, Dv], the forward's lse and delta = rowsum(dO * O) [B, H, T, 1]
    float32; q_walk per query block, k_walk per key block (ops.block_lists). Returns (dqs, dks, dv): dq parts
    like qs; dk parts and dv per query head [B, H, S, D_i] float32 (ops.py sums each key head's group)."""
    batch, heads, length, _ = qs[0].shape
    slots, dv_width = v.shape[2], v.shape[-1]
    common = dict(parts=len(qs), scale=scale, window=window, sink_tokens=sink_tokens)

    *q_walk, owns, width = _flat(q_walk)
    q_part, k_part, q_col, k_row, per_q_head = _specs(heads, block_q, block_k, True, owns, width)
    dqs = _call(
        functools.partial(_dq_kernel, **common), (batch, heads, owns, width),
        [q_col, q_col, k_row, k_row, per_q_head, per_q_head, q_part(do), k_part(v), *map(q_part, qs),
         *map(k_part, ks)],
        [q_part(q) for q in qs], [jax.ShapeDtypeStruct(q.shape, q.dtype) for q in qs],
        [pltpu.VMEM((block_q, q.shape[-1]), F32) for q in qs], interpret, "flash_attention_dq",
    )(*q_walk, q_pos, q_seg, k_pos, k_seg, lse, delta, do, v, *qs, *ks)

    *k_walk, owns, width = _flat(k_walk)
    q_part, k_part, q_col, k_row, per_q_head = _specs(heads, block_q, block_k, False, owns, width)
    per_head = lambda width: pl.BlockSpec((None, None, block_k, width), lambda b, h, j, t, *_: (b, h, j, 0))  # noqa: E731
    dv, *dks = _call(
        functools.partial(_dkv_kernel, **common), (batch, heads, owns, width),
        [q_col, q_col, k_row, k_row, per_q_head, per_q_head, q_part(do), k_part(v), *map(q_part, qs),
         *map(k_part, ks)],
        [per_head(dv_width), *[per_head(k.shape[-1]) for k in ks]],
        [jax.ShapeDtypeStruct((batch, heads, slots, dv_width), F32),
         *[jax.ShapeDtypeStruct((batch, heads, slots, k.shape[-1]), F32) for k in ks]],
        [pltpu.VMEM((block_k, dv_width), F32), *[pltpu.VMEM((block_k, k.shape[-1]), F32) for k in ks]],
        interpret, "flash_attention_dkv",
    )(*k_walk, q_pos, q_seg, k_pos, k_seg, lse, delta, do, v, *qs, *ks)
    return tuple(dqs), tuple(dks), dv
