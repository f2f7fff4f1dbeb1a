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
from zoo.pallas_kernels.splits import combine_splits
from zoo.pallas_kernels.tiles import F32, MASKED

HEADS = 64  # heads per program: one wgmma M
PAGE = 64  # slots per step: the page size of the cache this kernel reads
STAGES = 2
WARPGROUPS = 3  # scores, softmax and one output half; the other half; memory
MERGE_COLUMNS = 64  # columns of the partial outputs that merge reads at a time
COMPILER_PARAMS = {"approx_math": True}  # bench/mla_decode_profile.py adds the on-device profiler's


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


def default_workers(batch, heads) -> int | None:
    """Programs of the balanced schedule (each heads / 64 CTAs, as a cluster where it pairs head groups), which
    deals all rows' pages out evenly: one CTA per SM, so that no SM idles through a last, partial wave (128
    rows x 2 head groups on 132 SMs leave 8 idle for the second of two waves: 3% of the step). A row split
    between two programs is merged in the kernel by the last of them to finish. None where rows are fewer than
    programs (a row would straddle more than two): there rows are split evenly instead (default_splits) and the
    splits combined by XLA."""
    groups = heads // HEADS
    sms = getattr(jax.devices()[0], "core_count", 132) if mosaic_gpu.available() else 132
    workers = max(1, sms // groups)
    return workers if batch >= workers else None


def mla_decode(q_lat, q_pe, c, k_pe, lengths, block_table, *, scale, splits=1, split_len=None, workers=None,
               interpret):
    """q_lat [B, H, R], q_pe [B, H, P] (the cache's dtype); page pools c [N, PAGE, R], k_pe [N, PAGE, P];
    lengths [B] int32; block_table [B, M] int32, or None for a contiguous cache (row b owns pool pages
    b * N / B onwards, in order). Lengths are clipped to the row's slots and table entries to the pool here, in
    the kernel: no XLA op runs before it. Returns the latent output [B, H, R] float32.

    The schedule: `workers` programs that deal the B * M pages out evenly (default_workers; rows straddling
    programs are merged in the kernel), or, with workers None, `splits` programs a row walking split_len slots
    each (a multiple of PAGE), whose partial outputs combine_splits weighs by their log-sum-exp."""
    batch, heads, rank = q_lat.shape
    rope, dtype = q_pe.shape[-1], c.dtype
    pool_pages = c.shape[0]
    row_pages = pool_pages // batch if block_table is None else block_table.shape[1]
    half = rank // 2
    score_scale = scale * LOG2E
    balanced = workers is not None
    if balanced:
        splits, programs, all_pages = 1, workers, batch * row_pages
        if not 1 <= workers <= batch:
            raise ValueError(f"workers must be 1 .. {batch} (the rows: each program's range then spans a whole "
                             f"row's pages, so that a row is split between two programs at most), got {workers}")
    else:
        programs, split_pages = batch * splits, split_len // PAGE
    groups = heads // HEADS
    # The head groups of a row read the same pages: pairs of them run as a 2-program cluster that loads each
    # page once and multicasts it to both. GPU interpret mode has no cluster barriers: there every program
    # loads its own pages (the same walk, synchronised by plain barriers).
    cluster = 2 if groups % 2 == 0 and not interpret else 1
    shared = "cluster" if cluster > 1 else None

    def kernel(lengths_ref, *refs):
        table_ref, refs = (None, refs) if block_table is None else (refs[0], refs[1:])
        q_lat_ref, q_pe_ref, c_ref, k_pe_ref, o_ref, *more = refs
        lse_ref, (ws_o_ref, ws_lse_ref) = (None, more) if balanced else (more[0], (None, None))
        program = lax.axis_index("programs")
        group = lax.axis_index("groups") * cluster + (lax.axis_index("cluster") if cluster > 1 else 0)
        heads_here = pl.ds(group * HEADS, HEADS)

        def page_range(w):  # program w's pages [start, end) of the B * M, row-major
            if balanced:
                return lax.div(w * all_pages, workers), lax.div((w + 1) * all_pages, workers)
            row, split = lax.div(w, splits), lax.rem(w, splits)
            return (row * row_pages + jnp.minimum(split * split_pages, row_pages),
                    row * row_pages + jnp.minimum((split + 1) * split_pages, row_pages))

        def owner(page):  # the program whose range holds a page (balanced)
            return lax.div((page + 1) * workers - 1, all_pages)

        start, end = page_range(program)
        # A split always walks its row (perhaps no page of it: it still writes its empty result); balanced
        # ranges are never empty (workers <= B).
        first_row = lax.div(start, row_pages) if balanced else lax.div(program, splits)
        last_row = lax.div(end - 1, row_pages) if balanced else first_row

        def piece(row):  # this program's part of a row: (first slot, slot it stops at, pages)
            first = jnp.maximum(start - row * row_pages, 0) * PAGE
            stop = jnp.minimum(jnp.minimum(end - row * row_pages, row_pages) * PAGE,
                               jnp.clip(lengths_ref[row], 0, row_pages * PAGE))
            return first, stop, lax.div(jnp.maximum(stop - first, 0) + PAGE - 1, jnp.int32(PAGE))

        def scoped(q_lat_smem, q_pe_smem, c_smem, pe_smem, rescale_smem, norm_smem, lse_smem, q_bar, page_bar,
                   page_free, probs_ready, norm_ready, norm_free):
            wg = lax.axis_index("wg")

            def c_half(slot):  # this warpgroup's half of the slot's latent columns
                return c_smem.at[slot, :, pl.ds(wg * half, half)]

            def rescale_rows(acc, rescale):
                return acc * lax.broadcast_in_dim(rescale, acc.shape, [0])

            def write(row, acc, scale_rows, lse, half_index):
                """This warpgroup's half of the row's output: to o directly for a split or a row that lies
                in this program's range; else a partial output, which the last of the row's two programs to
                write its own merges with the other's."""
                columns = pl.ds(half_index * half, half)
                out = acc * lax.broadcast_in_dim(scale_rows, acc.shape, [0])
                if not balanced:
                    o_ref.at[row, lax.rem(program, splits), heads_here, columns][...] = out
                    return
                first_owner, last_owner = owner(row * row_pages), owner((row + 1) * row_pages - 1)

                @pl.when(first_owner == last_owner)
                def _():
                    o_ref.at[row, 0, heads_here, columns][...] = out

                @pl.when(first_owner != last_owner)
                def _():
                    end_index = (row != first_row).astype(jnp.int32)  # the range's first row or its last
                    ws_o_ref.at[program, end_index, heads_here, columns][...] = out
                    ws_lse_ref.at[program, end_index, half_index, heads_here][...] = lax.broadcast_in_dim(
                        lse, (HEADS, MERGE_COLUMNS), [0])
                    if interpret:  # programs run one after another, in order
                        last = program == last_owner
                    else:
                        arrivals = semaphores.at[(group * batch + row) * 2 + half_index]
                        plgpu.semaphore_signal(arrivals, 1, memory_scope="gpu")
                        # Its warpgroup barrier makes the increment above performed for every thread of the
                        # warpgroup before any reads the count: the last to arrive then sees all of them.
                        plgpu.semaphore_signal(arrivals, 0, memory_scope="gpu")
                        last = pl.semaphore_read(arrivals) == 2

                    @pl.when(last)
                    def _():
                        merge(row, first_owner, half_index)

            def merge(row, first_owner, half_index):
                """The row's output from its two programs' partial outputs, weighted by their share of the
                softmax mass. Every operand has the same [HEADS, MERGE_COLUMNS] register layout: all of it is
                elementwise, so threads that read the count before the last arrival (and skip this) and
                programs that both see it (and both write the same) need no agreement."""
                def parts(w):
                    end_index = (row != lax.div(page_range(w)[0], row_pages)).astype(jnp.int32)
                    return ws_o_ref.at[w, end_index, heads_here], ws_lse_ref.at[w, end_index, half_index, heads_here]

                def load(ref):
                    return plgpu.load(ref, layout=plgpu.Layout.WGMMA, optimized=False)

                (o_a, lse_a), (o_b, lse_b) = parts(first_owner), parts(first_owner + 1)
                lse_a, lse_b = load(lse_a), load(lse_b)
                top = jnp.maximum(lse_a, lse_b)
                weight_a, weight_b = jnp.exp(lse_a - top), jnp.exp(lse_b - top)
                mass = weight_a + weight_b
                weight_a, weight_b = weight_a / mass, weight_b / mass
                for k in range(half // MERGE_COLUMNS):
                    columns = pl.ds(half_index * half + k * MERGE_COLUMNS, MERGE_COLUMNS)
                    o_ref.at[row, 0, heads_here, columns][...] = (load(o_a.at[:, columns]) * weight_a
                                                                  + load(o_b.at[:, columns]) * weight_b)

            @pl.when(wg == 0)
            def _scores_and_half():
                plgpu.set_max_registers(240, action="increase")

                def row_step(row, walked):
                    first, stop, count = piece(row)
                    plgpu.copy_gmem_to_smem(q_lat_ref.at[row, heads_here], q_lat_smem, q_bar)
                    plgpu.copy_gmem_to_smem(q_pe_ref.at[row, heads_here], q_pe_smem, q_bar)
                    plgpu.barrier_wait(q_bar)

                    def step(t, carry):
                        acc, running_max, total = carry
                        slot = lax.rem(walked + t, STAGES)
                        with jax.named_scope("wait_page"):
                            plgpu.barrier_wait(page_bar.at[slot])

                        def scores(acc_ref):
                            plgpu.wgmma(acc_ref, q_lat_smem, c_smem.at[slot].T)
                            plgpu.wgmma(acc_ref, q_pe_smem, pe_smem.at[slot].T)
                            return acc_ref[...]

                        with jax.named_scope("scores"):
                            s = pl.run_scoped(scores, plgpu.ACC((HEADS, PAGE), F32))

                        def mask(s):
                            slots = first + t * PAGE + plgpu.broadcasted_iota(jnp.int32, (HEADS, PAGE), 1,
                                                                              layout=plgpu.Layout.WGMMA)
                            return jnp.where(slots < stop, s, -jnp.inf)

                        with jax.named_scope("softmax"):
                            s = lax.cond(first + (t + 1) * PAGE > stop, mask, lambda s: s, s)  # the last page only
                            new_max = jnp.maximum(running_max, s.max(axis=1) * score_scale)
                            rescale = jnp.exp2(running_max - new_max)
                            acc = rescale_rows(acc, rescale)  # ahead of the exponentials, whose unit it does not use
                            probs = jnp.exp2(s * score_scale - lax.broadcast_in_dim(new_max, s.shape, [0]))
                            probs_16 = probs.astype(dtype)

                        def publish():
                            # The slot's RoPE keys are spent: its buffer takes the probabilities (the same [64, 64]
                            # 16-bit tile), so no buffer of their own is needed and the stage ring orders their
                            # reuse.
                            pe_smem.at[slot][...] = probs_16
                            rescale_smem.at[slot][...] = rescale
                            plgpu.commit_smem()
                            plgpu.barrier_arrive(probs_ready.at[slot])

                        # This half's product takes the probabilities from registers and is in flight while they
                        # are published for the other half: neither the stores nor their fence are on this path.
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

                    @pl.when(row > first_row)
                    def _():  # the other half has read the previous row's
                        plgpu.barrier_wait(norm_free)

                    norm_smem[...] = scale_rows  # the other half's normalisation
                    lse_smem[...] = lse
                    plgpu.commit_smem()
                    plgpu.barrier_arrive(norm_ready)
                    if not balanced:
                        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[row, lax.rem(program, splits), heads_here])
                    write(row, acc, scale_rows, lse, 0)
                    return walked + count

                lax.fori_loop(first_row, last_row + 1, row_step, jnp.int32(0))
                plgpu.barrier_wait(norm_free)  # the last row's: every barrier phase is waited for once
                if not balanced:
                    plgpu.wait_smem_to_gmem(0)

            @pl.when(wg == 1)
            def _other_half():
                plgpu.set_max_registers(240, action="increase")

                def row_step(row, walked):
                    count = piece(row)[2]

                    def step(t, acc):
                        slot = lax.rem(walked + t, STAGES)
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
                    scale_rows = plgpu.load(norm_smem, layout=ROWS)
                    lse = plgpu.load(lse_smem, layout=ROWS) if balanced else None
                    plgpu.barrier_arrive(norm_free)
                    write(row, acc, scale_rows, lse, 1)
                    return walked + count

                lax.fori_loop(first_row, last_row + 1, row_step, jnp.int32(0))

            @pl.when(wg == 2)
            def _memory():
                plgpu.set_max_registers(24, action="decrease")

                def row_step(row, walked):
                    first, _, count = piece(row)

                    @pl.loop(0, count)
                    def _(t):
                        slot = lax.rem(walked + t, STAGES)
                        index = lax.div(first, jnp.int32(PAGE)) + t
                        if table_ref is None:
                            page = row * row_pages + index
                        else:  # read before the wait
                            page = jnp.clip(table_ref[row, index], 0, pool_pages - 1)

                        @pl.when(walked + t >= STAGES)
                        def _():
                            with jax.named_scope("wait_free"):
                                plgpu.barrier_wait(page_free.at[slot])

                        plgpu.copy_gmem_to_smem(c_ref.at[page], c_smem.at[slot], page_bar.at[slot],
                                                collective_axes=shared)
                        plgpu.copy_gmem_to_smem(k_pe_ref.at[page], pe_smem.at[slot], page_bar.at[slot],
                                                collective_axes=shared)

                    return walked + count

                walked = lax.fori_loop(first_row, last_row + 1, row_step, jnp.int32(0))
                for t in range(STAGES):  # the last releases: every barrier phase is waited for once
                    @pl.when(walked - STAGES + t >= 0)
                    def _():
                        plgpu.barrier_wait(page_free.at[lax.rem(walked - STAGES + t, STAGES)])

        semaphores = (pl.get_global(plgpu.SemaphoreType.REGULAR((groups * batch * 2,)))
                      if balanced and not interpret else None)
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
            plgpu.Barrier(),  # a row's normalisation published
            plgpu.Barrier(),  # ... and read by the other half
            collective_axes="wg",
        )

    outputs = [jax.ShapeDtypeStruct((batch, splits, heads, rank), F32)]
    if balanced:  # partial outputs (and log-sum-exps, as merge reads them) of each program's first and last rows
        outputs += [jax.ShapeDtypeStruct((workers, 2, heads, rank), F32),
                    jax.ShapeDtypeStruct((workers, 2, 2, heads, MERGE_COLUMNS), F32)]
    else:
        outputs.append(jax.ShapeDtypeStruct((batch, splits, heads), F32))
    run = plgpu.kernel(
        kernel,
        out_type=outputs,
        grid=(groups // cluster, programs),
        grid_names=("groups", "programs"),
        cluster=(cluster,) if cluster > 1 else (),
        cluster_names=("cluster",) if cluster > 1 else (),
        num_threads=WARPGROUPS,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(**COMPILER_PARAMS),
        interpret=interpret_params(interpret),
    )
    out, *rest = run(lengths, *([] if block_table is None else [block_table]), q_lat, q_pe, c, k_pe)
    return out[:, 0] if balanced else combine_splits(out, rest[0])
