"""MLA decode on Hopper GPUs (Pallas Mosaic GPU): split-K flash-decoding with wgmma, for many heads a GPU.

With all 128 heads of DeepSeek-V2/V3 on one GPU the step is compute-bound (2 * 128 * (2R + P) flops per
slot read, R = 512, P = 64), and Triton's matmuls on 32-head tiles stay near a third of the tensor cores'
peak (gpu.py). Here a program owns 64 heads (one wgmma M) of one row and one split of its slots, with
FlashMLA's "seesaw" schedule: the latent accumulator [64, R] float32 does not fit one warpgroup's
registers, so two compute warpgroups each hold half of its columns, and they take pages in turns. Page t
lives in stage t % 2 and warpgroup t % 2 computes its scores [64, PAGE] (q_lat c^T + q_pe k_pe^T into one
accumulator) and its step of the online softmax, from the running max the other warpgroup published for
page t - 1; it publishes the probabilities (16-bit, in the page's RoPE-key buffer, spent by then), their
rescale factor and the new max. Each warpgroup adds every page, in order, to its half of the output
(acc * rescale + probs @ c[:, its half]), and keeps the softmax sum of the pages it scored. So one
warpgroup's softmax runs while the other's matmuls keep the tensor cores busy, and the work is even.

A memory warpgroup streams the pages named by the block table with TMA, each page as three parts (the two
latent halves and the RoPE keys) with barriers of their own: a part is reloaded as soon as its last reader
is done with it (the owner's half after its own product, the other half after the other warpgroup's), so
the next pages load while this pair is still being computed. The programs of a row's head groups run in
pairs as a cluster, which loads each page once and multicasts it to both.

Slots at or past the row's length are masked in the last page; pages past it are never read, except that
an odd count of pages ends with a repeat of the last one, fully masked, so that pages come in pairs.
Outputs are each split's normalised latent output and log-sum-exp (splits.split_result's convention),
combined in ops.py.
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
STAGES = 2  # one page per compute warpgroup: page t lives in stage t % 2, scored by warpgroup t % 2
LATENT, ROPE_PART = (0, 1), 2  # a page's parts: the latent halves (one per warpgroup's columns), the RoPE keys
COMPILER_PARAMS = {"approx_math": True}  # bench/mla_decode_profile.py adds the on-device profiler's


def _shared_bytes(rank, rope, itemsize):
    queries = HEADS * (rank + rope)
    stage = PAGE * (rank + rope)
    return itemsize * (queries + STAGES * stage) + 4 * 3 * STAGES * HEADS


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
    lengths [B] int32 (clipped to the table); block_table [B, M] int32 (valid pool indices); split_len a
    multiple of PAGE. Returns per split the normalised output [B, splits, H, R] float32 and log-sum-exp
    [B, splits, H]."""
    batch, heads, rank = q_lat.shape
    rope, dtype = q_pe.shape[-1], c.dtype
    half = rank // 2
    score_scale = scale * LOG2E
    # The head groups of a row read the same pages: pairs of them run as a 2-program cluster that loads each
    # page once and multicasts it to both. GPU interpret mode has no cluster barriers: there every program
    # loads its own pages (the same walk, synchronised by plain barriers).
    cluster = 2 if heads // HEADS % 2 == 0 and not interpret else 1
    shared = "cluster" if cluster > 1 else None

    def release_barrier(arrivals, count):  # page parts freed by their readers (in every program they reach)
        if cluster > 1:
            return plgpu.ClusterBarrier(collective_axes=("cluster",), num_arrivals=arrivals, num_barriers=count)
        return plgpu.Barrier(num_arrivals=arrivals, num_barriers=count)

    def kernel(lengths_ref, table_ref, q_lat_ref, q_pe_ref, c_ref, k_pe_ref, o_ref, lse_ref):
        split, row = lax.axis_index("splits"), lax.axis_index("rows")
        group = lax.axis_index("groups") * cluster + (lax.axis_index("cluster") if cluster > 1 else 0)
        start = split * split_len
        stop = jnp.minimum(start + split_len, lengths_ref[row])
        count = lax.div(jnp.maximum(stop - start, 0) + PAGE - 1, jnp.int32(PAGE))
        pairs = lax.div(count + 1, jnp.int32(2))
        heads_here = pl.ds(group * HEADS, HEADS)
        columns = [pl.ds(0, half), pl.ds(half, half)]

        def scoped(q_lat_smem, q_pe_smem, c_smem, pe_smem, rescale_smem, max_smem, totals_smem, q_bar, part_loaded,
                   part_free, probs_free, published, totals_ready):
            wg = lax.axis_index("wg")
            part = lambda p, slot: p * STAGES + slot  # noqa: E731 - a (part, stage) barrier's index

            def scores(t, slot):
                """Page t's scores in base 2, masked past the row's length, as its parts arrive."""
                def run(acc_ref):
                    for p in (*LATENT, ROPE_PART):
                        with jax.named_scope("wait_page"):
                            plgpu.barrier_wait(part_loaded.at[part(p, slot)])
                        if p == ROPE_PART:
                            plgpu.wgmma(acc_ref, q_pe_smem, pe_smem.at[slot].T)
                        else:
                            plgpu.wgmma(acc_ref, q_lat_smem.at[p], c_smem.at[p, slot].T)
                    return acc_ref[...]

                with jax.named_scope("scores"):
                    s = pl.run_scoped(run, plgpu.ACC((HEADS, PAGE), F32))
                slots = start + t * PAGE + plgpu.broadcasted_iota(jnp.int32, (HEADS, PAGE), 1,
                                                                   layout=plgpu.Layout.WGMMA)
                return jnp.where(slots < stop, s * score_scale, -jnp.inf)

            @jax.named_scope("softmax")
            def softmax_step(s, running_max, slot):
                """Publish page `slot`'s probabilities, rescale factor and new max; returns those and the row sums."""
                new_max = jnp.maximum(running_max, s.max(axis=1))
                rescale = jnp.exp2(running_max - new_max)
                probs = jnp.exp2(s - lax.broadcast_in_dim(new_max, s.shape, [0]))
                # The page's RoPE keys are spent: their buffer takes the probabilities (the same [64, 64] 16-bit
                # tile), freed when both warpgroups have added the page.
                pe_smem.at[slot][...] = probs.astype(dtype)
                rescale_smem.at[slot][...] = rescale
                max_smem.at[slot][...] = new_max
                plgpu.commit_smem()
                plgpu.barrier_arrive(published.at[slot])
                return new_max, rescale, probs.sum(axis=1)

            @jax.named_scope("add_page")
            def add_page(acc, t, rescale):  # acc * rescale + page t's probs @ c[:, this warpgroup's half]
                acc = acc * lax.broadcast_in_dim(rescale, acc.shape, [0])
                slot = t % STAGES  # traced, as run_state needs its indices (and so is wg)
                acc = accumulate(acc, pe_smem.at[slot], c_smem.at[wg, slot], interpret)
                plgpu.barrier_arrive(part_free.at[wg * STAGES + slot])
                plgpu.barrier_arrive(probs_free.at[slot])
                return acc

            @jax.named_scope("wait_published")
            def other_page(slot):
                plgpu.barrier_wait(published.at[slot])
                return plgpu.load(rescale_smem.at[slot], layout=ROWS), plgpu.load(max_smem.at[slot], layout=ROWS)

            def first_of_pair(j, carry):  # warpgroup 0: page 2j, then warpgroup 1's page 2j + 1
                acc, running_max, total = carry
                s = scores(2 * j, 0)
                running_max, rescale, sums = softmax_step(s, running_max, 0)
                acc = add_page(acc, 2 * j, rescale)
                total = total * rescale + sums
                rescale, running_max = other_page(1)
                return add_page(acc, 2 * j + 1, rescale), running_max, total * rescale

            def second_of_pair(j, carry):  # warpgroup 1: page 2j + 1 (after page 2j's max), then adds 2j first
                acc, _, total = carry
                s = scores(2 * j + 1, 1)
                rescale_first, first_max = other_page(0)
                running_max, rescale, sums = softmax_step(s, first_max, 1)
                acc = add_page(acc, 2 * j, rescale_first)
                acc = add_page(acc, 2 * j + 1, rescale)
                return acc, running_max, total * rescale_first * rescale + sums

            def compute(w):
                plgpu.set_max_registers(232, action="increase")
                plgpu.barrier_wait(q_bar)
                acc = plgpu.layout_cast(jnp.zeros((HEADS, half), F32), plgpu.Layout.WGMMA)
                running_max = plgpu.layout_cast(jnp.full((HEADS,), MASKED, F32), ROWS)
                total = plgpu.layout_cast(jnp.zeros((HEADS,), F32), ROWS)
                acc, running_max, total = lax.fori_loop(0, pairs, (first_of_pair, second_of_pair)[w],
                                                        (acc, running_max, total))
                # Both warpgroups end on the last page's max; the softmax sum is theirs together.
                totals_smem.at[w][...] = total
                plgpu.commit_smem()
                plgpu.barrier_arrive(totals_ready)
                plgpu.barrier_wait(totals_ready)
                total = plgpu.load(totals_smem.at[0], layout=ROWS) + plgpu.load(totals_smem.at[1], layout=ROWS)
                scale_rows, lse = softmax_finish(running_max, total)
                o_ref.at[row, split, heads_here, columns[w]][...] = acc * lax.broadcast_in_dim(scale_rows, acc.shape, [0])
                if w == 0:
                    max_smem.at[0][...] = lse  # spent: the last page was published long ago
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(max_smem.at[0], lse_ref.at[row, split, heads_here])
                    plgpu.wait_smem_to_gmem(0)

            @pl.when(wg == 0)
            def _():
                compute(0)

            @pl.when(wg == 1)
            def _():
                compute(1)

            @pl.when(wg == 2)
            def _memory():
                plgpu.set_max_registers(40, action="decrease")
                for p in LATENT:
                    plgpu.copy_gmem_to_smem(q_lat_ref.at[row, heads_here, columns[p]], q_lat_smem.at[p], q_bar)
                plgpu.copy_gmem_to_smem(q_pe_ref.at[row, heads_here], q_pe_smem, q_bar)
                first = lax.div(start, jnp.int32(PAGE))

                @pl.loop(0, pairs)
                def _(j):
                    for slot in range(STAGES):
                        page = table_ref[row, first + jnp.minimum(2 * j + slot, count - 1)]  # read before the waits
                        for p in LATENT:
                            @pl.when(j > 0)
                            @jax.named_scope("wait_free")
                            def _():
                                plgpu.barrier_wait(part_free.at[part(p, slot)])

                            plgpu.copy_gmem_to_smem(c_ref.at[page, :, columns[p]], c_smem.at[p, slot],
                                                    part_loaded.at[part(p, slot)], collective_axes=shared)

                        @pl.when(j > 0)
                        @jax.named_scope("wait_free")
                        def _():
                            plgpu.barrier_wait(probs_free.at[slot])

                        plgpu.copy_gmem_to_smem(k_pe_ref.at[page], pe_smem.at[slot],
                                                part_loaded.at[part(ROPE_PART, slot)], collective_axes=shared)

                @pl.when(pairs > 0)  # the last releases: every barrier phase is waited for once
                def _():
                    for slot in range(STAGES):
                        for p in LATENT:
                            plgpu.barrier_wait(part_free.at[part(p, slot)])
                        plgpu.barrier_wait(probs_free.at[slot])

        pl.run_scoped(
            scoped,
            plgpu.SMEM((2, HEADS, half), dtype, transforms=TILE),
            plgpu.SMEM((HEADS, rope), dtype, transforms=TILE),
            plgpu.SMEM((2, STAGES, PAGE, half), dtype, transforms=TILE),
            plgpu.SMEM((STAGES, PAGE, rope), dtype, transforms=TILE),  # RoPE keys, then the page's probabilities
            plgpu.SMEM((STAGES, HEADS), F32),  # a page's rescale factor
            plgpu.SMEM((STAGES, HEADS), F32),  # ... and running max after it
            plgpu.SMEM((2, HEADS), F32),  # each warpgroup's softmax sum
            plgpu.Barrier(num_arrivals=3),  # the queries (latent halves and RoPE part)
            plgpu.Barrier(num_barriers=STAGES * 3),  # a page part loaded
            release_barrier(1, STAGES * 2),  # a page's latent half freed by the warpgroup whose half it is
            release_barrier(2, STAGES),  # ... its probabilities (in the RoPE-key buffer) by both
            plgpu.Barrier(num_barriers=STAGES),  # a page's probabilities, rescale and max published
            plgpu.Barrier(num_arrivals=2),  # both softmax sums published
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
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(**COMPILER_PARAMS),
        interpret=interpret_params(interpret),
    )
    return run(lengths, block_table, q_lat, q_pe, c, k_pe)
