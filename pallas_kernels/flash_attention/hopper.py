"""Flash attention on Hopper GPUs (Pallas Mosaic GPU): the forward in FlashAttention-3's warp-specialised
schedule over ops.py's block lists, and the backward's two kernels (dq; dk and dv) in the same layout.

Each program owns 2 x 64 query rows of one head: two compute warpgroups (64 rows each, the M of one wgmma)
and a memory warpgroup that streams the key / value blocks of the query block's list into a ring of
shared-memory stages with TMA. The compute warpgroups take turns on the tensor cores (a shared schedule
barrier): while one computes its scores, the other runs its softmax. Scores are a sum of parts, one
wgmma per (q_i, k_i) pair into the same accumulator, so MLA's shared RoPE key is never broadcast.

The list's first blocks are seen whole and walked without a mask; the next ones lie within one document of
real tokens and are masked by position alone (masking.visible_in_document), the rest element by element
with masking.visible, from the slot positions and segment ids the memory warpgroup copies next to each key
block. Learned sink logits start the online softmax (running max = sink, sum = 1), as in
gpu.py, so the log-sum-exp the backward reads includes them. Scores are kept in base 2 (exp2 with
the scale and log2(e) folded into one multiply); the log-sum-exp is written in base e.

This is the GPU forward where it applies (hopper.supports: an sm90 GPU, 16-bit inputs, widths that
are multiples of 64 and fit shared memory); gpu.py (Triton) runs everything else. Its backward follows it
where that fits shared memory (supports_backward), else Triton's: on an H200 the two kernels here took 27-36%
less time than Triton's two, and on an H100 forward + backward took 21-28% less at full causal (BENCHMARKS.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from zoo.pallas_kernels import mosaic_gpu
from zoo.pallas_kernels.flash_attention import gpu
from zoo.pallas_kernels.flash_attention.masking import visible, visible_in_document
from zoo.pallas_kernels.mosaic_gpu import COLUMNS, LOG2E, ROWS, TILE, accumulate, interpret_params, softmax_finish
from zoo.pallas_kernels.tiles import F32, MASKED

BLOCK_Q = 64  # query rows per compute warpgroup: one wgmma's M
COMPUTE_WARPGROUPS = 2
PROGRAM_ROWS = BLOCK_Q * COMPUTE_WARPGROUPS  # query rows per program: ops.py's forward query block
BLOCK_K = 128
STAGES = 2  # key / value blocks in flight
BACKWARD_STAGES = 2


# The backward's streamed (query, key) blocks, best first: 64-query blocks to the dk / dv kernel and 128-key blocks
# to the dq kernel won on an H200 for MHA and GQA; MLA's wider rows fit shared memory at 64 / 64 only
# (bench/flash_attention.py --backward-sweep, BENCHMARKS.md).
BACKWARD_BLOCKS = ((64, 128), (64, 64))


def default_blocks(qs, ks, v):
    """(forward q, forward k, backward q, backward k): this kernel's forward tiles (128-slot key blocks won for
    full and windowed layouts alike: bench/flash_attention.py --mosaic-sweep), and the first BACKWARD_BLOCKS
    its backward takes, else Triton's backward blocks."""
    backward = next((b for b in BACKWARD_BLOCKS if supports_backward(qs, ks, v, b) is None),
                    (gpu.BACKWARD_BLOCK_Q, gpu.BACKWARD_BLOCK_K))
    return (PROGRAM_ROWS, BLOCK_K, *backward)


def _shared_bytes(q_widths, dv, itemsize, block_k, stages, own_o):
    q = PROGRAM_ROWS * sum(q_widths)
    out = PROGRAM_ROWS * dv if own_o else 0  # else o goes out through the first query part's buffer
    stage = block_k * (sum(q_widths) + dv)  # a key block's parts and its value block
    meta = 4 * 2 * (PROGRAM_ROWS + stages * block_k) + 4 * PROGRAM_ROWS  # positions, segments; log-sum-exp
    return itemsize * (q + out + stages * stage) + meta


def supports(qs, ks, v, block_k: int = BLOCK_K) -> str | None:
    """None when this kernel takes the inputs, else why not (gpu.py's Triton kernel runs them)."""
    dtypes = {x.dtype for x in (*qs, *ks, v)}
    if len(dtypes) != 1 or dtypes.pop() not in (jnp.bfloat16, jnp.float16):
        return "wgmma takes bfloat16 / float16 inputs of one dtype"
    widths = [q.shape[-1] for q in qs]
    if any(w % 64 for w in (*widths, v.shape[-1])) or v.shape[-1] > 128:
        return "feature widths must be multiples of 64 (128-byte swizzled rows) and the value width at most 128"
    if block_k % 64:
        return f"key blocks must be multiples of 64, got {block_k}"
    # o may go out through the first query part's buffer when the widths agree
    needed = _shared_bytes(widths, v.shape[-1], v.dtype.itemsize, block_k, STAGES, own_o=widths[0] != v.shape[-1])
    if needed > mosaic_gpu.SHARED_MEMORY:
        return f"needs {needed} bytes of shared memory, more than {mosaic_gpu.SHARED_MEMORY}"
    return None


def _walk(step, interior, documents_end, count, carry):
    """step(t, carry, mask) over a walk's blocks: those seen whole unmasked, then those within one document
    masked by position ("positions"), then the rest masked element by element ("all")."""
    carry = lax.fori_loop(0, interior, functools.partial(step, mask=None), carry)
    carry = lax.fori_loop(interior, documents_end, functools.partial(step, mask="positions"), carry)
    return lax.fori_loop(documents_end, count, functools.partial(step, mask="all"), carry)


def _load_meta(meta_smem, mask, layout):
    """A block's (positions, segment ids) from its [2, n] metadata buffer, as far as `mask` needs them."""
    positions = plgpu.load(meta_smem.at[0], layout=layout) if mask else None
    segments = plgpu.load(meta_smem.at[1], layout=layout) if mask == "all" else None
    return positions, segments


def _mask_scores(s, mask, queries, keys, *, keys_as_rows, window, sink_tokens):
    """Scores with the pairs masking.visible rejects set to -inf. queries / keys: (positions, segment ids) of
    the tile's rows and columns (keys_as_rows: the transposed [keys, queries] tiles of the backward);
    mask None (seen whole), "positions" (one document of real tokens: the position tests alone) or "all"."""
    if not mask:
        return s
    by_row = lambda x: lax.broadcast_in_dim(x, s.shape, [0])  # noqa: E731
    by_column = lambda x: lax.broadcast_in_dim(x, s.shape, [1])  # noqa: E731
    for_q, for_k = (by_column, by_row) if keys_as_rows else (by_row, by_column)
    (q_pos, q_seg), (k_pos, k_seg) = queries, keys
    if mask == "all":
        seen = visible(for_q(q_pos), for_q(q_seg), for_k(k_pos), for_k(k_seg), window=window, sink_tokens=sink_tokens)
    else:
        seen = visible_in_document(for_q(q_pos), for_k(k_pos), window=window, sink_tokens=sink_tokens)
    return jnp.where(seen, s, -jnp.inf)


def _programs(tiles: int, interpret: bool) -> int:
    """One persistent program per SM (a few in interpret mode, so each walks several tiles)."""
    if interpret:
        return min(tiles, 3)
    return min(tiles, getattr(jax.devices()[0], "core_count", 132))


def forward(qs, ks, v, sinks, q_meta, k_meta, walk, *, scale, window, sink_tokens, has_sink, block_k, interpret):
    """qs/ks: tuples of parts [B, T, H, D_i] / [B, S, KV_i, D_i]; v [B, S, KV, Dv]; sinks [H] float32; q_meta
    [B, 2, T] / k_meta [B, 2, S] int32: positions and segment ids (T a multiple of PROGRAM_ROWS, S of block_k);
    walk: ops.Walk per PROGRAM_ROWS query rows. Returns o [B, T, H,
    Dv] (v's dtype) and the log-sum-exp [B, H, T] float32 (base e)."""
    batch, length, heads, _ = qs[0].shape
    dv, dtype, parts = v.shape[-1], v.dtype, len(qs)
    counts, interiors, documents, lists = walk
    score_scale = scale * LOG2E
    masking = dict(window=window, sink_tokens=sink_tokens)
    kv_heads = [k.shape[2] for k in ks] + [v.shape[2]]
    # o gets its own buffer where shared memory allows: then a tile's query buffer is handed back after its last
    # score matmul and the next tile's queries load during this one's softmax and output store.
    needed = _shared_bytes([q.shape[-1] for q in qs], dv, v.dtype.itemsize, block_k, STAGES, own_o=True)
    own_o = needed <= mosaic_gpu.SHARED_MEMORY
    q_tiles = length // PROGRAM_ROWS
    tiles = batch * heads * q_tiles
    programs = _programs(tiles, interpret)

    def position(n):  # the program's place in round n: rounds alternate direction to even out the work
        program = lax.axis_index("programs")
        return jnp.where(n % 2 == 0, program, programs - 1 - program)

    def tile_of(n):
        """The program's n-th tile as (head, query tile, row). Tiles are ordered row, head, then query tile from
        the last (longest lists) down, so the programs in flight share a few heads' keys in L2."""
        index = n * programs + position(n)
        pair, q_tile = lax.div(index, jnp.int32(q_tiles)), q_tiles - 1 - lax.rem(index, jnp.int32(q_tiles))
        return lax.rem(pair, jnp.int32(heads)), q_tile, lax.div(pair, jnp.int32(heads))

    def tile_count():  # how many tiles this program walks: the full rounds, and a place in the last one
        rounds = tiles // programs
        return rounds + (position(jnp.int32(rounds)) < tiles % programs).astype(jnp.int32)

    def kernel(counts_ref, interiors_ref, documents_ref, lists_ref, sinks_ref, q_meta_ref, k_meta_ref, *refs):
        q_refs, k_refs = refs[:parts], refs[parts:2 * parts]
        v_ref, o_ref, lse_ref = refs[2 * parts:]

        def scoped(q_smems, o_smem, k_smems, v_smem, q_meta_smem, k_meta_smem, lse_smem, p_smem, q_bar, q_free, k_bar,
                   v_bar, k_free, v_free, schedule):
            o_smem = o_smem if own_o else q_smems[0]
            wg = lax.axis_index("wg")

            def take_turn():  # the compute warpgroups alternate on the tensor cores
                plgpu.barrier_arrive(schedule)
                plgpu.barrier_wait(schedule)

            @pl.when(wg < COMPUTE_WARPGROUPS)
            def _compute():
                plgpu.set_max_registers(232, action="increase")

                def tile_body(n, walked):  # walked: key blocks this program consumed before this tile
                    head, q_tile, row = tile_of(n)
                    count, interior = counts_ref[row, q_tile], interiors_ref[row, q_tile]
                    documents_end = documents_ref[row, q_tile]
                    rows = pl.ds(q_tile * PROGRAM_ROWS + wg * BLOCK_Q, BLOCK_Q)
                    plgpu.barrier_wait(q_bar.at[wg])
                    q_pos = plgpu.load(q_meta_smem.at[wg, 0], layout=ROWS)
                    q_seg = plgpu.load(q_meta_smem.at[wg, 1], layout=ROWS)
                    # A sink logit is a zero-valued key seen by every row: it starts the running max, weight 1.
                    start_max = sinks_ref[head] * LOG2E if has_sink else jnp.float32(MASKED)
                    running_max = plgpu.layout_cast(jnp.full((BLOCK_Q,), start_max, F32), ROWS)
                    total = plgpu.layout_cast(jnp.full((BLOCK_Q,), 1.0 if has_sink else 0.0, F32), ROWS)
                    acc = plgpu.layout_cast(jnp.zeros((BLOCK_Q, dv), F32), plgpu.Layout.WGMMA)

                    @pl.when(count > 0)
                    def _():
                        plgpu.barrier_wait(k_bar.at[lax.rem(walked, STAGES)])

                    pl.when(wg == 1)(take_turn)

                    def step(t, carry, mask):  # mask: None, "positions" or "all"
                        acc, running_max, total = carry
                        slot = lax.rem(walked + t, STAGES)

                        def scores(acc_ref):
                            for q_smem, k_smem in zip(q_smems, k_smems):
                                plgpu.wgmma(acc_ref, q_smem.at[wg], k_smem.at[slot].T)
                            take_turn()
                            return acc_ref[...]

                        s = pl.run_scoped(scores, plgpu.ACC((BLOCK_Q, block_k), F32))
                        if own_o:
                            @pl.when(t == count - 1)  # the last score matmul: the queries may be replaced
                            def _():
                                plgpu.barrier_arrive(q_free.at[wg])
                        # read the slots' positions before the stage is handed back
                        k_pos, k_seg = _load_meta(k_meta_smem.at[slot], mask, COLUMNS)
                        plgpu.barrier_arrive(k_free.at[slot])
                        s = _mask_scores(s, mask, (q_pos, q_seg), (k_pos, k_seg), keys_as_rows=False, **masking)
                        new_max = jnp.maximum(running_max, s.max(axis=1) * score_scale)
                        rescale = jnp.exp2(running_max - new_max)
                        probs = jnp.exp2(s * score_scale - lax.broadcast_in_dim(new_max, s.shape, [0]))
                        acc = acc * lax.broadcast_in_dim(rescale, acc.shape, [0])
                        total = total * rescale + probs.sum(axis=1)
                        probs = probs.astype(dtype)
                        acc, total, new_max, probs = lax.optimization_barrier((acc, total, new_max, probs))
                        plgpu.barrier_arrive(schedule)  # softmax done: the other warpgroup may take the tensor cores
                        plgpu.barrier_wait(v_bar.at[slot])
                        plgpu.barrier_wait(schedule)

                        def then_wait_next():  # overlaps the next key block's wait with this matmul
                            @pl.when(t + 1 < count)
                            def _():
                                plgpu.barrier_wait(k_bar.at[lax.rem(walked + t + 1, STAGES)])

                        if interpret:  # the interpreter's wgmma reads its left operand from shared memory only
                            p_smem.at[wg][...] = probs
                            plgpu.commit_smem()
                            probs = p_smem.at[wg]
                        acc = accumulate(acc, probs, v_smem.at[slot], interpret, then_wait_next)
                        plgpu.barrier_arrive(v_free.at[slot])
                        return acc, new_max, total

                    acc, running_max, total = _walk(step, interior, documents_end, count, (acc, running_max, total))
                    pl.when(wg == 0)(take_turn)
                    if own_o:
                        @pl.when(count == 0)
                        def _():
                            plgpu.barrier_arrive(q_free.at[wg])

                    scale_rows, lse = softmax_finish(running_max, total)  # a padding row: output 0
                    out = (acc * lax.broadcast_in_dim(scale_rows, acc.shape, [0])).astype(dtype)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's stores have read o / lse
                    o_smem.at[wg][...] = out
                    lse_smem.at[wg][...] = lse
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[row, rows, head])
                    plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[row, head, rows])
                    if not own_o:  # o went out through the query buffer: hand it back once the store has read it
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        plgpu.barrier_arrive(q_free.at[wg])
                    return walked + count

                lax.fori_loop(0, tile_count(), tile_body, jnp.int32(0))
                plgpu.wait_smem_to_gmem(0)

            @pl.when(wg == COMPUTE_WARPGROUPS)
            def _memory():
                plgpu.set_max_registers(40, action="decrease")

                def tile_body(n, fetched):  # fetched: key blocks this program fetched before this tile
                    head, q_tile, row = tile_of(n)
                    kv_head = [lax.div(head, jnp.int32(heads // kv)) for kv in kv_heads]
                    for w in range(COMPUTE_WARPGROUPS):
                        @pl.when(n > 0)
                        def _():
                            plgpu.barrier_wait(q_free.at[w])

                        rows = pl.ds(q_tile * PROGRAM_ROWS + w * BLOCK_Q, BLOCK_Q)
                        for q_ref, q_smem in zip(q_refs, q_smems):
                            plgpu.copy_gmem_to_smem(q_ref.at[row, rows, head], q_smem.at[w], q_bar.at[w])
                        plgpu.copy_gmem_to_smem(q_meta_ref.at[row, :, rows], q_meta_smem.at[w], q_bar.at[w])

                    @pl.loop(0, counts_ref[row, q_tile])
                    def _(t):
                        step = fetched + t
                        slot = lax.rem(step, STAGES)
                        slots = pl.ds(lists_ref[row, q_tile, t] * block_k, block_k)  # read before the waits

                        @pl.when(step >= STAGES)
                        def _():
                            plgpu.barrier_wait(k_free.at[slot])

                        for k_ref, k_smem, head_k in zip(k_refs, k_smems, kv_head):
                            plgpu.copy_gmem_to_smem(k_ref.at[row, slots, head_k], k_smem.at[slot], k_bar.at[slot])
                        plgpu.copy_gmem_to_smem(k_meta_ref.at[row, :, slots], k_meta_smem.at[slot], k_bar.at[slot])

                        @pl.when(step >= STAGES)
                        def _():
                            plgpu.barrier_wait(v_free.at[slot])

                        plgpu.copy_gmem_to_smem(v_ref.at[row, slots, kv_head[-1]], v_smem.at[slot], v_bar.at[slot])

                    return fetched + counts_ref[row, q_tile]

                fetched = lax.fori_loop(0, tile_count(), tile_body, jnp.int32(0))
                # Wait for the last releases too: every barrier phase is waited for once.
                for w in range(COMPUTE_WARPGROUPS):
                    plgpu.barrier_wait(q_free.at[w])
                for t in range(STAGES):
                    @pl.when(fetched - STAGES + t >= 0)
                    def _():
                        slot = lax.rem(fetched - STAGES + t, STAGES)
                        plgpu.barrier_wait(k_free.at[slot])
                        plgpu.barrier_wait(v_free.at[slot])

        per_program = lambda width: plgpu.SMEM((COMPUTE_WARPGROUPS, BLOCK_Q, width), dtype, transforms=TILE)  # noqa: E731
        per_stage = lambda width: plgpu.SMEM((STAGES, block_k, width), dtype, transforms=TILE)  # noqa: E731
        pl.run_scoped(
            scoped,
            [per_program(q.shape[-1]) for q in qs],
            per_program(dv) if own_o else None,
            [per_stage(k.shape[-1]) for k in ks],
            per_stage(dv),
            plgpu.SMEM((COMPUTE_WARPGROUPS, 2, BLOCK_Q), jnp.int32),
            plgpu.SMEM((STAGES, 2, block_k), jnp.int32),
            plgpu.SMEM((COMPUTE_WARPGROUPS, BLOCK_Q), F32),
            per_program(block_k) if interpret else None,
            plgpu.Barrier(num_arrivals=parts + 1, num_barriers=COMPUTE_WARPGROUPS),  # a tile's queries loaded
            plgpu.Barrier(num_barriers=COMPUTE_WARPGROUPS),  # ... and released
            plgpu.Barrier(num_arrivals=parts + 1, num_barriers=STAGES),  # a key block (its parts and slot positions)
            plgpu.Barrier(num_barriers=STAGES),  # a value block
            plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=STAGES),  # key stage free
            plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=STAGES),  # value stage free
            plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS),  # the tensor-core schedule
            collective_axes="wg",
        )

    run = plgpu.kernel(
        kernel,
        out_type=[jax.ShapeDtypeStruct((batch, length, heads, dv), dtype),
                  jax.ShapeDtypeStruct((batch, heads, length), F32)],
        grid=(programs,),
        grid_names=("programs",),
        num_threads=COMPUTE_WARPGROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(interpret),
    )
    return run(counts, interiors, documents, lists, sinks, q_meta, k_meta, *qs, *ks, v)


def kernel_parts(qs, ks, v, block_k: int = BLOCK_K):
    """The query / key parts' shapes (jax.ShapeDtypeStruct) as this kernel gets them: the first part cut in
    two at v's width where only that lets the forward fit shared memory (cut_at_value_width), else as given.
    Shapes only, so that judging the inputs copies nothing."""
    def shape(x, width=None):
        return jax.ShapeDtypeStruct((*x.shape[:-1], width or x.shape[-1]), x.dtype)

    given = tuple(tuple(shape(x) for x in parts) for parts in (qs, ks))
    width, dv = qs[0].shape[-1], v.shape[-1]
    if width <= dv or supports(*given, v, block_k) is None:
        return given
    cut = tuple((shape(x[0], dv), shape(x[0], width - dv), *x[1:]) for x in given)
    return cut if supports(*cut, v, block_k) is None else given


def cut_at_value_width(qs, ks, v, block_k: int = BLOCK_K):
    """(qs, ks), with the first query / key part cut in two at v's width where kernel_parts says so: o then
    goes out through the first part's buffer. DeepSeek's unsplit 192-wide queries and keys with 128-wide
    values (one part) run as MLA's 128 + 64 parts do, not on Triton. The scores are unchanged: q . k is the
    sum of the two halves' products."""
    if len(kernel_parts(qs, ks, v, block_k)[0]) == len(qs):
        return qs, ks
    dv = v.shape[-1]
    return tuple((x[0][..., :dv], x[0][..., dv:], *x[1:]) for x in (qs, ks))


def supports_backward(qs, ks, v, blocks) -> str | None:
    """None when backward() takes the inputs with (backward q, backward k) blocks, else why not."""
    refusal = supports(qs, ks, v)
    if refusal:
        return refusal
    if any(b not in (64, 128) for b in blocks):
        return f"the Mosaic GPU backward streams blocks of 64 or 128 queries / keys, got {tuple(blocks)}"
    width = sum(q.shape[-1] for q in qs) + v.shape[-1]
    needed = v.dtype.itemsize * width * (PROGRAM_ROWS + BACKWARD_STAGES * max(blocks)) + 4096
    if needed > mosaic_gpu.SHARED_MEMORY:
        return f"the backward needs {needed} bytes of shared memory, more than {mosaic_gpu.SHARED_MEMORY}"
    return None


def backward(qs, ks, v, do, lse, delta, q_meta, k_meta, q_walk, k_walk, *, scale, window, sink_tokens, block_q, block_k,
             interpret):
    """Gradients as gpu.backward (same arguments and results), by two Mosaic GPU kernels in the forward's
    layout: 2 x 64 rows a program, one compute warpgroup per 64, a memory warpgroup streaming the walk's
    blocks of the other side with TMA. The dq kernel holds a query tile's q parts and dO and streams key and
    value blocks (q_walk per PROGRAM_ROWS queries over blocks of block_k keys); the dk / dv kernel holds a key
    tile's k parts and values and streams query blocks with their dO, log-sum-exp and delta (k_walk per
    PROGRAM_ROWS keys over blocks of block_q queries), on transposed scores [keys, queries] so that dv and dk
    are plain products with the probabilities as the register operand."""
    batch, length, heads, _ = qs[0].shape
    slots, dtype, parts = v.shape[1], v.dtype, len(qs)
    kv_heads = [k.shape[2] for k in ks] + [v.shape[2]]
    score_scale = scale * LOG2E
    masking = dict(window=window, sink_tokens=sink_tokens)
    grad_dtype = lambda x: x.dtype if x.shape[2] == heads else F32  # noqa: E731 (as gpu.backward)

    def kv_head_of(head):
        return [lax.div(head, jnp.int32(heads // kv)) for kv in kv_heads]

    def as_smem(x, smem, wg):
        """A register operand for wgmma; the interpreter's wgmma reads its left operand from shared memory."""
        if not interpret:
            return x
        smem.at[wg][...] = x
        plgpu.commit_smem()
        return smem.at[wg]

    def scores_and_dprobs(rows, columns, values_rows, values_columns, block):
        """sum_i rows_i @ columns_i^T and values_rows @ values_columns^T, [64, block] float32 each: the scores
        and dO V^T (dq kernel), or their transposes (dk / dv kernel); all their matmuls issued before one wait."""
        def products(acc_refs):
            s_ref, dp_ref = acc_refs
            for a, b in zip(rows, columns):
                plgpu.wgmma(s_ref, a, b.T)
            plgpu.wgmma(dp_ref, values_rows, values_columns.T)
            return s_ref[...], dp_ref[...]

        return pl.run_scoped(products, (plgpu.ACC((BLOCK_Q, block), F32),) * 2)

    def with_shared_memory(body, block, resident_widths, streamed_widths, resident_arrivals, streamed_arrivals):
        """body run with the shared memory both kernels use: per compute warpgroup its resident rows, per stage
        the streamed block, their [2, n] positions / segments (and for streamed queries their [2, n] statistics)."""
        pl.run_scoped(
            body,
            [plgpu.SMEM((COMPUTE_WARPGROUPS, BLOCK_Q, w), dtype, transforms=TILE) for w in resident_widths],
            [plgpu.SMEM((BACKWARD_STAGES, block, w), dtype, transforms=TILE) for w in streamed_widths],
            plgpu.SMEM((COMPUTE_WARPGROUPS, 2, BLOCK_Q), jnp.int32),
            plgpu.SMEM((BACKWARD_STAGES, 2, block), jnp.int32),
            plgpu.SMEM((COMPUTE_WARPGROUPS, 2, BLOCK_Q), F32),  # the dq kernel's rows' statistics
            plgpu.SMEM((BACKWARD_STAGES, 2, block), F32),  # the dk / dv kernel's streamed queries' statistics
            plgpu.SMEM((COMPUTE_WARPGROUPS, BLOCK_Q, block), dtype, transforms=TILE) if interpret else None,
            plgpu.Barrier(num_arrivals=resident_arrivals, num_barriers=COMPUTE_WARPGROUPS),  # resident rows loaded
            plgpu.Barrier(num_arrivals=streamed_arrivals, num_barriers=BACKWARD_STAGES),  # a block loaded
            plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=BACKWARD_STAGES),  # ... and released
            collective_axes="wg",
        )

    def stream(count, load, free):
        """The memory warpgroup's loop: block t of the walk into stage t % STAGES once its last use is released;
        then the last releases, so that every barrier phase is waited for once."""
        @pl.loop(0, count)
        def _(t):
            slot = lax.rem(t, BACKWARD_STAGES)

            @pl.when(t >= BACKWARD_STAGES)
            def _():
                plgpu.barrier_wait(free.at[slot])

            load(t, slot)

        for t in range(BACKWARD_STAGES):
            @pl.when(count - BACKWARD_STAGES + t >= 0)
            def _():
                plgpu.barrier_wait(free.at[lax.rem(count - BACKWARD_STAGES + t, BACKWARD_STAGES)])

    def launch(kernel, out_type, grid, args):
        return plgpu.kernel(
            kernel, out_type=out_type, grid=grid, grid_names=("heads", "tiles", "rows"),
            num_threads=COMPUTE_WARPGROUPS + 1, thread_name="wg",
            compiler_params=plgpu.CompilerParams(approx_math=True), interpret=interpret_params(interpret),
        )(*args)

    def dq_kernel(counts_ref, interiors_ref, documents_ref, lists_ref, q_meta_ref, k_meta_ref, lse_ref, delta_ref, *refs):
        q_refs, k_refs, (v_ref, do_ref), dq_refs = refs[:parts], refs[parts:2 * parts], refs[2 * parts:2 * parts + 2], \
            refs[2 * parts + 2:]
        head, tile, row = lax.axis_index("heads"), lax.axis_index("tiles"), lax.axis_index("rows")
        count, block = counts_ref[row, tile], block_k

        def body(resident, streamed, q_meta_smem, k_meta_smem, rows_stats_smem, _, operand_smem, q_bar, k_bar, k_free):
            q_smems, do_smem = resident[:parts], resident[parts]
            k_smems, v_smem = streamed[:parts], streamed[parts]
            wg = lax.axis_index("wg")
            rows = lambda w: pl.ds(tile * PROGRAM_ROWS + w * BLOCK_Q, BLOCK_Q)  # noqa: E731

            @pl.when(wg < COMPUTE_WARPGROUPS)
            def _compute():
                plgpu.set_max_registers(232, action="increase")
                plgpu.barrier_wait(q_bar.at[wg])
                queries = _load_meta(q_meta_smem.at[wg], "all", ROWS)
                lse = plgpu.load(rows_stats_smem.at[wg, 0], layout=ROWS) * LOG2E  # base 2, as the scores
                delta_rows = plgpu.load(rows_stats_smem.at[wg, 1], layout=ROWS)

                def step(t, grads, mask):
                    slot = lax.rem(t, BACKWARD_STAGES)
                    plgpu.barrier_wait(k_bar.at[slot])

                    s, dp = scores_and_dprobs([q.at[wg] for q in q_smems], [k.at[slot] for k in k_smems],
                                              do_smem.at[wg], v_smem.at[slot], block)
                    s = _mask_scores(s, mask, queries, _load_meta(k_meta_smem.at[slot], mask, COLUMNS),
                                     keys_as_rows=False, **masking)
                    probs = jnp.exp2(s * score_scale - lax.broadcast_in_dim(lse, s.shape, [0]))
                    dscores = (probs * (dp - lax.broadcast_in_dim(delta_rows, s.shape, [0]))).astype(dtype)
                    dscores = as_smem(dscores, operand_smem, wg)
                    grads = tuple(accumulate(g, dscores, k_smem.at[slot], interpret) for g, k_smem in zip(grads, k_smems))
                    plgpu.barrier_arrive(k_free.at[slot])
                    return grads

                zeros = tuple(plgpu.layout_cast(jnp.zeros((BLOCK_Q, q.shape[-1]), F32), plgpu.Layout.WGMMA) for q in qs)
                grads = _walk(step, interiors_ref[row, tile], documents_ref[row, tile], count, zeros)
                for dq_ref, g in zip(dq_refs, grads):
                    dq_ref.at[row, rows(wg), head][...] = (g * scale).astype(dq_ref.dtype)

            @pl.when(wg == COMPUTE_WARPGROUPS)
            def _memory():
                plgpu.set_max_registers(40, action="decrease")
                for w in range(COMPUTE_WARPGROUPS):
                    for ref, smem in zip((*q_refs, do_ref), resident):
                        plgpu.copy_gmem_to_smem(ref.at[row, rows(w), head], smem.at[w], q_bar.at[w])
                    plgpu.copy_gmem_to_smem(q_meta_ref.at[row, :, rows(w)], q_meta_smem.at[w], q_bar.at[w])
                    for i, ref in enumerate((lse_ref, delta_ref)):
                        plgpu.copy_gmem_to_smem(ref.at[row, head, rows(w)], rows_stats_smem.at[w, i], q_bar.at[w])
                kv_head = kv_head_of(head)

                def load(t, slot):
                    keys = pl.ds(lists_ref[row, tile, t] * block, block)
                    for ref, smem, h in zip((*k_refs, v_ref), streamed, kv_head):
                        plgpu.copy_gmem_to_smem(ref.at[row, keys, h], smem.at[slot], k_bar.at[slot])
                    plgpu.copy_gmem_to_smem(k_meta_ref.at[row, :, keys], k_meta_smem.at[slot], k_bar.at[slot])

                stream(count, load, k_free)

        widths = [q.shape[-1] for q in qs] + [v.shape[-1]]
        with_shared_memory(body, block, widths, widths, parts + 4, parts + 2)

    def dkv_kernel(counts_ref, interiors_ref, documents_ref, lists_ref, q_meta_ref, k_meta_ref, lse_ref, delta_ref, *refs):
        q_refs, k_refs, (v_ref, do_ref) = refs[:parts], refs[parts:2 * parts], refs[2 * parts:2 * parts + 2]
        dv_ref, dk_refs = refs[2 * parts + 2], refs[2 * parts + 3:]
        head, tile, row = lax.axis_index("heads"), lax.axis_index("tiles"), lax.axis_index("rows")
        count, block = counts_ref[row, tile], block_q

        def body(resident, streamed, k_meta_smem, q_meta_smem, _, stats_smem, operand_smem, k_bar, q_bar, q_free):
            k_smems, v_smem = resident[:parts], resident[parts]
            q_smems, do_smem = streamed[:parts], streamed[parts]
            wg = lax.axis_index("wg")
            rows = lambda w: pl.ds(tile * PROGRAM_ROWS + w * BLOCK_Q, BLOCK_Q)  # noqa: E731

            @pl.when(wg < COMPUTE_WARPGROUPS)
            def _compute():
                plgpu.set_max_registers(232, action="increase")
                plgpu.barrier_wait(k_bar.at[wg])
                keys = _load_meta(k_meta_smem.at[wg], "all", ROWS)

                def step(t, carry, mask):
                    dv, dks = carry
                    slot = lax.rem(t, BACKWARD_STAGES)
                    plgpu.barrier_wait(q_bar.at[slot])

                    s, dp = scores_and_dprobs([k.at[wg] for k in k_smems], [q.at[slot] for q in q_smems],
                                              v_smem.at[wg], do_smem.at[slot], block)
                    s = _mask_scores(s, mask, _load_meta(q_meta_smem.at[slot], mask, COLUMNS), keys, keys_as_rows=True,
                                     **masking)
                    lse = plgpu.load(stats_smem.at[slot, 0], layout=COLUMNS) * LOG2E
                    delta_columns = plgpu.load(stats_smem.at[slot, 1], layout=COLUMNS)
                    probs = jnp.exp2(s * score_scale - lax.broadcast_in_dim(lse, s.shape, [1]))
                    dv = accumulate(dv, as_smem(probs.astype(dtype), operand_smem, wg), do_smem.at[slot], interpret)
                    dscores = (probs * (dp - lax.broadcast_in_dim(delta_columns, s.shape, [1]))).astype(dtype)
                    dscores = as_smem(dscores, operand_smem, wg)
                    dks = tuple(accumulate(g, dscores, q_smem.at[slot], interpret) for g, q_smem in zip(dks, q_smems))
                    plgpu.barrier_arrive(q_free.at[slot])
                    return dv, dks

                zeros = lambda width: plgpu.layout_cast(jnp.zeros((BLOCK_Q, width), F32), plgpu.Layout.WGMMA)  # noqa: E731
                dv, dks = _walk(step, interiors_ref[row, tile], documents_ref[row, tile], count,
                                (zeros(v.shape[-1]), tuple(zeros(k.shape[-1]) for k in ks)))
                dv_ref.at[row, rows(wg), head][...] = dv.astype(dv_ref.dtype)
                for dk_ref, g in zip(dk_refs, dks):
                    dk_ref.at[row, rows(wg), head][...] = (g * scale).astype(dk_ref.dtype)

            @pl.when(wg == COMPUTE_WARPGROUPS)
            def _memory():
                plgpu.set_max_registers(40, action="decrease")
                for w in range(COMPUTE_WARPGROUPS):
                    for ref, smem, h in zip((*k_refs, v_ref), resident, kv_head_of(head)):
                        plgpu.copy_gmem_to_smem(ref.at[row, rows(w), h], smem.at[w], k_bar.at[w])
                    plgpu.copy_gmem_to_smem(k_meta_ref.at[row, :, rows(w)], k_meta_smem.at[w], k_bar.at[w])

                def load(t, slot):
                    queries = pl.ds(lists_ref[row, tile, t] * block, block)
                    for ref, smem in zip((*q_refs, do_ref), streamed):
                        plgpu.copy_gmem_to_smem(ref.at[row, queries, head], smem.at[slot], q_bar.at[slot])
                    plgpu.copy_gmem_to_smem(q_meta_ref.at[row, :, queries], q_meta_smem.at[slot], q_bar.at[slot])
                    for i, ref in enumerate((lse_ref, delta_ref)):
                        plgpu.copy_gmem_to_smem(ref.at[row, head, queries], stats_smem.at[slot, i], q_bar.at[slot])

                stream(count, load, q_free)

        widths = [k.shape[-1] for k in ks] + [v.shape[-1]]
        with_shared_memory(body, block, widths, [q.shape[-1] for q in qs] + [do.shape[-1]], parts + 2, parts + 4)

    walk_args = lambda walk: (walk.counts, walk.interiors, walk.documents, walk.lists)  # noqa: E731
    dqs = launch(dq_kernel, [jax.ShapeDtypeStruct(q.shape, q.dtype) for q in qs],
                 (heads, length // PROGRAM_ROWS, batch), (*walk_args(q_walk), q_meta, k_meta, lse, delta, *qs, *ks, v, do))
    dv, *dks = launch(dkv_kernel,
                      [jax.ShapeDtypeStruct((batch, slots, heads, x.shape[-1]), grad_dtype(x)) for x in (v, *ks)],
                      (heads, slots // PROGRAM_ROWS, batch),
                      (*walk_args(k_walk), q_meta, k_meta, lse, delta, *qs, *ks, v, do))
    return tuple(dqs), tuple(dks), dv
