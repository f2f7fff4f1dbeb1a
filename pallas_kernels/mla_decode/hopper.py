"""MLA decode on Hopper GPUs (Pallas Mosaic GPU): split-K flash-decoding with wgmma, for many heads a GPU.

With all 128 heads of DeepSeek-V2/V3 on one GPU the step is compute-bound (2 * 128 * (2R + P) flops per
slot read, R = 512, P = 64), and Triton's matmuls on 32-head tiles stay near a third of the tensor cores'
peak (gpu.py). Here a program owns 64 heads (one wgmma M) of one row and one split of its slots, as in
FlashMLA: the latent accumulator [64, R] float32 does not fit one warpgroup's registers, so two compute
warpgroups split its columns. The first computes each step's scores [64, PAGE] (q_lat c^T + q_pe k_pe^T,
two wgmma into one accumulator) and the online softmax, adds probs @ c[:, its half] with the probabilities
as the matmul's register operand, and while that runs publishes them in shared memory (bf16, in the page's
RoPE-key buffer, spent by then) with the rescale factors, for the second to add probs @ c[:, its half]. A
memory warpgroup streams the pages named by the block table into a ring of stages with TMA; the programs of a
row's head groups run in pairs as a cluster, which loads each page once and multicasts it to both.

Slots at or past the row's length are masked in the last page; pages past it are never read. Outputs are
each split's normalised latent output and log-sum-exp (splits.split_result's convention), combined in
ops.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from zoo.pallas_kernels import mosaic_gpu
from zoo.pallas_kernels.mosaic_gpu import LOG2E, ROWS, TILE, accumulate, interpret_params, softmax_finish
from zoo.pallas_kernels.tiles import F32, MASKED

HEADS = 64  # heads per program: one wgmma M
PAGE = 64  # slots per step: the page size of the cache this kernel reads
STAGES = 2
WARPGROUPS = 3  # scores, softmax and one output half; the other half; memory
# Mosaic GPU puts a warpgroup barrier before and after every shared-memory store unless told not to: four a page
# here, where none is needed. Each thread's own fence and barrier arrival order its stores for their reader; the
# buffer they overwrite was last read by the scores' wgmma, complete for the whole warpgroup once any thread's
# wait returns (what the page release, one thread arriving for the warpgroup, already relies on, as CUTLASS's
# pipelines do). bench/mla_decode_profile.py adds the on-device profiler's parameters.
COMPILER_PARAMS = {"approx_math": True, "unsafe_no_auto_barriers": True}


def _shared_bytes(rank, rope, itemsize):
    queries = HEADS * (rank + rope)
    stage = PAGE * (rank + rope)
    return itemsize * (queries + STAGES * stage) + 4 * (STAGES + 2) * HEADS


def supports(heads, rank, rope, page, dtype) -> str | None:
    """None when this kernel takes the shapes, else why not (gpu.py's Triton kernel runs them)."""
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return "wgmma takes bfloat16 / float16 caches"
    if heads % HEADS:
        return f"heads must be a multiple of {HEADS}, got {heads}"
    if rank % 128 or rope != PAGE:
        return (f"the latent rank must be a multiple of 128 (two halves of 64-wide tiles) and the RoPE width {PAGE} "
                f"(its key buffer takes a page's [{HEADS}, {PAGE}] probabilities), got {rank}, {rope}")
    if page != PAGE:
        return f"pages must hold {PAGE} slots, got {page}"
    needed = _shared_bytes(rank, rope, jnp.dtype(dtype).itemsize)
    if needed > mosaic_gpu.SHARED_MEMORY:
        return f"needs {needed} bytes of shared memory, more than {mosaic_gpu.SHARED_MEMORY}"
    return None


def default_splits(batch, heads, slots, rank, rope) -> int:
    """Splits of each row's slots that make the step quickest by a bandwidth count: one program per SM (shared
    memory allows no more) runs in waves, and a wave lasts as long as its programs' share of the cache; more
    than one split adds the partial outputs written and read back by ops.py's combine (float32 [H, R] each,
    and the combined output). No split shorter than 8 pages."""
    programs = batch * heads // HEADS
    sms = getattr(jax.devices()[0], "core_count", 132) if mosaic_gpu.available() else 132

    def traffic(splits):
        waves = -(-programs * splits // sms)
        cache = waves * sms * -(-slots // splits) * (rank + rope) * 2
        return cache + (splits > 1) * batch * heads * rank * 4 * (2 * splits + 1)

    return min(range(1, max(1, slots // (8 * PAGE)) + 1), key=traffic)


def mla_decode(q_lat, q_pe, c, k_pe, lengths, block_table, *, scale, splits, split_len, interpret):
    """q_lat [B, H, R], q_pe [B, H, P] (the cache's dtype); page pools c [N, PAGE, R], k_pe [N, PAGE, P];
    lengths [B] int32; block_table [B, M] int32, or None for a contiguous cache (row b owns pool pages
    b * N / B onwards, in order); split_len a multiple of PAGE. Lengths are clipped to the row's slots and table
    entries to the pool here, in the kernel: no XLA op runs before it. Returns per split the normalised output
    [B, splits, H, R] float32 and log-sum-exp [B, splits, H]."""
    batch, heads, rank = q_lat.shape
    rope, dtype = q_pe.shape[-1], c.dtype
    pool_pages = c.shape[0]
    row_pages = pool_pages // batch if block_table is None else block_table.shape[1]
    half = rank // 2
    score_scale = scale * LOG2E
    # The head groups of a row read the same pages: pairs of them run as a 2-program cluster that loads each
    # page once and multicasts it to both. GPU interpret mode has no cluster barriers: there every program
    # loads its own pages (the same walk, synchronised by plain barriers).
    cluster = 2 if heads // HEADS % 2 == 0 and not interpret else 1
    shared = "cluster" if cluster > 1 else None

    def kernel(lengths_ref, *refs):
        table_ref, (q_lat_ref, q_pe_ref, c_ref, k_pe_ref, o_ref, lse_ref) = (
            (None, refs) if block_table is None else (refs[0], refs[1:]))
        split, row = lax.axis_index("splits"), lax.axis_index("rows")
        group = lax.axis_index("groups") * cluster + (lax.axis_index("cluster") if cluster > 1 else 0)
        start = split * split_len
        stop = jnp.minimum(start + split_len, jnp.clip(lengths_ref[row], 0, row_pages * PAGE))
        count = lax.div(jnp.maximum(stop - start, 0) + PAGE - 1, jnp.int32(PAGE))
        heads_here = pl.ds(group * HEADS, HEADS)

        def scoped(q_lat_smem, q_pe_smem, c_smem, pe_smem, rescale_smem, norm_smem, lse_smem, q_bar, page_bar,
                   page_free, probs_ready, norm_ready):
            wg = lax.axis_index("wg")

            def c_half(slot):  # this warpgroup's half of the slot's latent columns
                return c_smem.at[slot, :, pl.ds(wg * half, half)]

            def rescale_rows(acc, rescale):
                return acc * lax.broadcast_in_dim(rescale, acc.shape, [0])

            def finish(acc, scale_rows):
                o_ref.at[row, split, heads_here, pl.ds(wg * half, half)][...] = acc * lax.broadcast_in_dim(
                    scale_rows, acc.shape, [0])

            @pl.when(wg == 0)
            def _scores_and_half():
                plgpu.set_max_registers(240, action="increase")
                plgpu.copy_gmem_to_smem(q_lat_ref.at[row, heads_here], q_lat_smem, q_bar)
                plgpu.copy_gmem_to_smem(q_pe_ref.at[row, heads_here], q_pe_smem, q_bar)
                plgpu.barrier_wait(q_bar)

                def step(t, carry):
                    acc, running_max, total = carry
                    slot = lax.rem(t, STAGES)
                    with jax.named_scope("wait_page"):
                        plgpu.barrier_wait(page_bar.at[slot])

                    def scores(acc_ref):
                        plgpu.wgmma(acc_ref, q_lat_smem, c_smem.at[slot].T)
                        plgpu.wgmma(acc_ref, q_pe_smem, pe_smem.at[slot].T)
                        return acc_ref[...]

                    with jax.named_scope("scores"):
                        s = pl.run_scoped(scores, plgpu.ACC((HEADS, PAGE), F32))

                    def mask(s):
                        slots = start + t * PAGE + plgpu.broadcasted_iota(jnp.int32, (HEADS, PAGE), 1,
                                                                           layout=plgpu.Layout.WGMMA)
                        return jnp.where(slots < stop, s, -jnp.inf)

                    with jax.named_scope("softmax"):
                        s = lax.cond(start + (t + 1) * PAGE > stop, mask, lambda s: s, s)  # the last page only
                        new_max = jnp.maximum(running_max, s.max(axis=1) * score_scale)
                        rescale = jnp.exp2(running_max - new_max)
                        acc = rescale_rows(acc, rescale)  # ahead of the exponentials, whose unit it does not use
                        probs = jnp.exp2(s * score_scale - lax.broadcast_in_dim(new_max, s.shape, [0]))
                        probs_16 = probs.astype(dtype)

                    def publish():
                        # The slot's RoPE keys are spent: its buffer takes the probabilities (the same [64, 64]
                        # 16-bit tile), so no buffer of their own is needed and the stage ring orders their reuse.
                        pe_smem.at[slot][...] = probs_16
                        rescale_smem.at[slot][...] = rescale
                        plgpu.commit_smem()
                        plgpu.barrier_arrive(probs_ready.at[slot])

                    # This half's product takes the probabilities from registers and is in flight while they are
                    # published for the other half: neither the stores nor their fence are on this path.
                    with jax.named_scope("product"):
                        if interpret:
                            publish()
                            acc = accumulate(acc, pe_smem.at[slot], c_half(slot), interpret)
                        else:
                            acc = accumulate(acc, probs_16, c_half(slot), interpret, during=publish)
                    total = total * rescale + probs.sum(axis=1)
                    plgpu.barrier_arrive(page_free.at[slot])
                    return acc, new_max, total

                acc = plgpu.layout_cast(jnp.zeros((HEADS, half), F32), plgpu.Layout.WGMMA)
                running_max = plgpu.layout_cast(jnp.full((HEADS,), MASKED, F32), ROWS)
                total = plgpu.layout_cast(jnp.zeros((HEADS,), F32), ROWS)
                acc, running_max, total = lax.fori_loop(0, count, step, (acc, running_max, total))
                scale_rows, lse = softmax_finish(running_max, total)
                norm_smem[...] = scale_rows  # the other half's normalisation
                lse_smem[...] = lse
                plgpu.commit_smem()
                plgpu.barrier_arrive(norm_ready)
                plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[row, split, heads_here])
                finish(acc, scale_rows)
                plgpu.wait_smem_to_gmem(0)

            @pl.when(wg == 1)
            def _other_half():
                plgpu.set_max_registers(240, action="increase")

                def step(t, acc):
                    slot = lax.rem(t, STAGES)
                    with jax.named_scope("wait_published"):
                        plgpu.barrier_wait(probs_ready.at[slot])
                    acc = rescale_rows(acc, plgpu.load(rescale_smem.at[slot], layout=ROWS))
                    with jax.named_scope("product"):
                        acc = accumulate(acc, pe_smem.at[slot], c_half(slot), interpret)
                    plgpu.barrier_arrive(page_free.at[slot])
                    return acc

                acc = plgpu.layout_cast(jnp.zeros((HEADS, half), F32), plgpu.Layout.WGMMA)
                acc = lax.fori_loop(0, count, step, acc)
                plgpu.barrier_wait(norm_ready)
                finish(acc, plgpu.load(norm_smem, layout=ROWS))

            @pl.when(wg == 2)
            def _memory():
                plgpu.set_max_registers(24, action="decrease")

                @pl.loop(0, count)
                def _(t):
                    slot = lax.rem(t, STAGES)
                    index = lax.div(start, jnp.int32(PAGE)) + t
                    if table_ref is None:
                        page = row * row_pages + index
                    else:  # read before the wait
                        page = jnp.clip(table_ref[row, index], 0, pool_pages - 1)

                    @pl.when(t >= STAGES)
                    def _():
                        with jax.named_scope("wait_free"):
                            plgpu.barrier_wait(page_free.at[slot])

                    plgpu.copy_gmem_to_smem(c_ref.at[page], c_smem.at[slot], page_bar.at[slot], collective_axes=shared)
                    plgpu.copy_gmem_to_smem(k_pe_ref.at[page], pe_smem.at[slot], page_bar.at[slot],
                                            collective_axes=shared)

                for t in range(STAGES):  # the last releases: every barrier phase is waited for once
                    @pl.when(count - STAGES + t >= 0)
                    def _():
                        plgpu.barrier_wait(page_free.at[lax.rem(count - STAGES + t, STAGES)])

        pl.run_scoped(
            scoped,
            plgpu.SMEM((HEADS, rank), dtype, transforms=TILE),
            plgpu.SMEM((HEADS, rope), dtype, transforms=TILE),
            plgpu.SMEM((STAGES, PAGE, rank), dtype, transforms=TILE),
            plgpu.SMEM((STAGES, PAGE, rope), dtype, transforms=TILE),
            plgpu.SMEM((STAGES, HEADS), F32),
            plgpu.SMEM((HEADS,), F32),
            plgpu.SMEM((HEADS,), F32),
            plgpu.Barrier(num_arrivals=2),  # the queries
            plgpu.Barrier(num_arrivals=2, num_barriers=STAGES),  # a page (latent and RoPE parts)
            # ... released by both compute warpgroups (of every program that the page is multicast to)
            plgpu.ClusterBarrier(collective_axes=("cluster",), num_arrivals=2, num_barriers=STAGES) if cluster > 1
            else plgpu.Barrier(num_arrivals=2, num_barriers=STAGES),
            plgpu.Barrier(num_barriers=STAGES),  # a page's probabilities and rescale published
            plgpu.Barrier(),  # the final normalisation published
            collective_axes="wg",
        )

    run = plgpu.kernel(
        kernel,
        out_type=[jax.ShapeDtypeStruct((batch, splits, heads, rank), F32),
                  jax.ShapeDtypeStruct((batch, splits, heads), F32)],
        grid=(heads // HEADS // cluster, splits, batch),
        grid_names=("groups", "splits", "rows"),
        cluster=(cluster,) if cluster > 1 else (),
        cluster_names=("cluster",) if cluster > 1 else (),
        num_threads=WARPGROUPS,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(**COMPILER_PARAMS),
        interpret=interpret_params(interpret),
    )
    return run(lengths, *([] if block_table is None else [block_table]), q_lat, q_pe, c, k_pe)
