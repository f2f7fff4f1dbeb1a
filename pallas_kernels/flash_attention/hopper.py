"""Flash attention forward on Hopper GPUs (Pallas Mosaic GPU): FlashAttention-3's warp-specialised
schedule over ops.py's block lists.

Each program owns 2 x 64 query rows of one head: two compute warpgroups (64 rows each, the M of one wgmma)
and a memory warpgroup that streams the key / value blocks of the query block's list into a ring of
shared-memory stages with TMA. The compute warpgroups take turns on the tensor cores (a shared schedule
barrier): while one computes its scores, the other runs its softmax. Scores are a sum of parts, one
wgmma per (q_i, k_i) pair into the same accumulator, so MLA's shared RoPE key is never broadcast.

The list's first blocks are seen whole and walked without a mask; the next ones lie within one document of
real tokens and are masked by position alone (masking.visible_in_document), the rest element by element
with masking.visible, from the slot positions and segment ids the memory warpgroup copies next to each key
block. Learned sink logits start the online softmax (running max = sink, sum = 1), as in
gpu.py, so the log-sum-exp the Triton backward reads includes them. Scores are kept in base 2 (exp2 with
the scale and log2(e) folded into one multiply); the log-sum-exp is written in base e.

This is the GPU forward where it applies (hopper.supports: an sm90 GPU, 16-bit inputs, widths that
are multiples of 64 and fit shared memory); gpu.py (Triton) runs everything else and every backward.
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


def default_blocks(window):
    """(forward q, forward k, backward q, backward k): this kernel's forward tiles, Triton's backward ones."""
    del window  # 128-slot key blocks won for full and windowed layouts alike (bench/flash_attention.py --mosaic-sweep)
    return (PROGRAM_ROWS, BLOCK_K, gpu.BACKWARD_BLOCK_Q, gpu.BACKWARD_BLOCK_K)


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
                        if mask:  # read the slots' positions before the stage is handed back
                            k_pos = plgpu.load(k_meta_smem.at[slot, 0], layout=COLUMNS)
                        if mask == "all":
                            k_seg = plgpu.load(k_meta_smem.at[slot, 1], layout=COLUMNS)
                        plgpu.barrier_arrive(k_free.at[slot])
                        if mask:
                            shape = (BLOCK_Q, block_k)
                            by_row = lambda x: lax.broadcast_in_dim(x, shape, [0])  # noqa: E731
                            by_column = lambda x: lax.broadcast_in_dim(x, shape, [1])  # noqa: E731
                            if mask == "all":
                                seen = visible(by_row(q_pos), by_row(q_seg), by_column(k_pos), by_column(k_seg),
                                               window=window, sink_tokens=sink_tokens)
                            else:  # one document of real tokens: the position tests alone
                                seen = visible_in_document(by_row(q_pos), by_column(k_pos), window=window,
                                                           sink_tokens=sink_tokens)
                            s = jnp.where(seen, s, -jnp.inf)
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

                    carry = (acc, running_max, total)
                    carry = lax.fori_loop(0, interior, functools.partial(step, mask=None), carry)
                    carry = lax.fori_loop(interior, documents_end, functools.partial(step, mask="positions"), carry)
                    acc, running_max, total = lax.fori_loop(documents_end, count, functools.partial(step, mask="all"),
                                                            carry)
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
