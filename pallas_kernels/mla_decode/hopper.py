"""MLA decode on Hopper GPUs (Pallas Mosaic GPU): split-K flash-decoding with wgmma, for many heads a GPU.

With all 128 heads of DeepSeek-V2/V3 on one GPU the step is compute-bound (2 * 128 * (2R + P) flops per
slot read, R = 512, P = 64), and Triton's matmuls on 32-head tiles stay near a third of the tensor cores'
peak (gpu.py). Here a program owns 64 heads (one wgmma M) of one row and one split of its slots, as in
FlashMLA: the latent accumulator [64, R] float32 does not fit one warpgroup's registers, so two compute
warpgroups split its columns. The first computes each step's scores [64, PAGE] (q_lat c^T + q_pe k_pe^T,
two wgmma into one accumulator) and the online softmax, and publishes in shared memory the probabilities
(bf16, in the page's RoPE-key buffer, spent by then) and the rescale factors; both then add
probs @ c[:, their half] to their half of the output. A memory warpgroup streams the pages named by the block
table into a ring of stages with TMA; the programs of a row's head groups run in pairs as a cluster, which
loads each page once and multicasts it to both.

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
PIECE = 64  # columns of a page (and of the queries) per TMA copy and per matmul
STAGES = 2
WARPGROUPS = 3  # scores, softmax and one output half; the other half; memory
COMPILER_PARAMS = {"approx_math": True}  # bench/mla_decode_profile.py adds the on-device profiler's


def _shared_bytes(rank, rope, itemsize):
    queries = HEADS * (rank + rope)
    stage = PAGE * (rank + rope)
    return itemsize * (queries + STAGES * stage) + 4 * (STAGES + 3) * HEADS


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
    dtype = c.dtype
    half = rank // 2
    latent = rank // PIECE  # latent pieces; piece `latent` is the RoPE part
    pieces, per_half = latent + 1, latent // 2
    score_scale = scale * LOG2E
    cluster = 2 if heads // HEADS % 2 == 0 and not interpret else 1
    shared = "cluster" if cluster > 1 else None

    def release_barrier(count):  # a stage's part freed by its one reader (in every program it is multicast to)
        if cluster > 1:
            return plgpu.ClusterBarrier(collective_axes=("cluster",), num_arrivals=1, num_barriers=count)
        return plgpu.Barrier(num_arrivals=1, num_barriers=count)

    def kernel(lengths_ref, table_ref, q_lat_ref, q_pe_ref, c_ref, k_pe_ref, o_ref, lse_ref):
        split, row = lax.axis_index("splits"), lax.axis_index("rows")
        group = lax.axis_index("groups") * cluster + (lax.axis_index("cluster") if cluster > 1 else 0)
        start = split * split_len
        stop = jnp.minimum(start + split_len, lengths_ref[row])
        count = lax.div(jnp.maximum(stop - start, 0) + PAGE - 1, jnp.int32(PAGE))
        pairs = lax.div(count + 1, jnp.int32(2))
        heads_here = pl.ds(group * HEADS, HEADS)

        def scoped(q_smem, kv_smem, rescale_smem, max_smem, totals_smem, q_bar, loaded, half_free, probs_free,
                   max_ready, published, scaled_ready, totals_ready):
            wg = lax.axis_index("wg")
            probs_piece = lambda slot: kv_smem.at[slot, latent]  # noqa: E731 - RoPE keys, then probabilities

            def scores(t, slot):
                """Page t's scores in base 2 (masked past the row's length), each piece's matmul issued as it lands."""
                def run(acc_ref):
                    for p in range(pieces):
                        with jax.named_scope("wait_page"):
                            plgpu.barrier_wait(loaded.at[slot * pieces + p])
                        plgpu.wgmma(acc_ref, q_smem.at[p], kv_smem.at[slot, p].T)
                    return acc_ref[...]

                with jax.named_scope("scores"):
                    s = pl.run_scoped(run, plgpu.ACC((HEADS, PAGE), F32)) * score_scale

                def mask(s):
                    slots = start + t * PAGE + plgpu.broadcasted_iota(jnp.int32, (HEADS, PAGE), 1,
                                                                       layout=plgpu.Layout.WGMMA)
                    return jnp.where(slots < stop, s, -jnp.inf)

                return lax.cond(start + (t + 1) * PAGE > stop, mask, lambda s: s, s)

            def publish(ref, value, barrier):
                ref[...] = value
                plgpu.commit_smem()
                plgpu.barrier_arrive(barrier)

            @jax.named_scope("add_page")
            def add_half(acc, probs, slot):
                """acc + probs @ this warpgroup's half of the page's latent columns, a matmul per piece (probs in
                registers; GPU interpret mode has no register operands, so there they are the stored ones)."""
                operand = probs_piece(slot) if interpret else probs
                if interpret:
                    parts = [accumulate(jnp.zeros((HEADS, PIECE), F32), operand, kv_smem.at[slot, wg * per_half + i],
                                        True) for i in range(per_half)]
                    return acc + jnp.concatenate(parts, axis=1)

                def body(acc_ref):
                    for i in range(per_half):
                        plgpu.wgmma(acc_ref.at[:, pl.ds(i * PIECE, PIECE)], operand, kv_smem.at[slot, wg * per_half + i])

                return pl.run_state(body)(plgpu.ACC.init(acc))

            def rows(value):
                return lax.broadcast_in_dim(value, (HEADS, PAGE), [0])

            def first(j, carry):
                """Warpgroup 0, pages 2j (its own, slot 0) and 2j + 1 (warpgroup 1's, slot 1), FlashMLA's seesaw:
                it publishes its max before its exponentials, so that the other's softmax can start."""
                acc, running_max, total = carry
                s = scores(2 * j, 0)
                new_max = jnp.maximum(running_max, s.max(axis=1))
                publish(max_smem.at[0], new_max, max_ready)
                rescale = jnp.exp2(running_max - new_max)
                probs = jnp.exp2(s - rows(new_max))
                total = total * rescale + probs.sum(axis=1)  # here, so that only the 16-bit probabilities live on
                probs = probs.astype(dtype)
                if interpret:
                    probs_piece(0)[...] = probs
                acc = add_half(acc * lax.broadcast_in_dim(rescale, acc.shape, [0]), probs, 0)
                plgpu.barrier_arrive(half_free.at[0 * 2 + 0])
                with jax.named_scope("wait_published"):
                    plgpu.barrier_wait(published)
                other_rescale = plgpu.load(rescale_smem, layout=ROWS)
                new_max = plgpu.load(max_smem.at[1], layout=ROWS)  # read before page 2j + 1's release
                # Page 2j's probabilities for warpgroup 1, already on page 2j + 1's max.
                publish(probs_piece(0), (probs.astype(F32) * rows(other_rescale)).astype(dtype), scaled_ready)
                other_probs = probs_piece(1) if interpret else plgpu.load(probs_piece(1), layout=plgpu.Layout.WGMMA)
                acc = add_half(acc * lax.broadcast_in_dim(other_rescale, acc.shape, [0]), other_probs, 1)
                plgpu.barrier_arrive(half_free.at[1 * 2 + 0])
                plgpu.barrier_arrive(probs_free.at[1])
                return acc, new_max, total * other_rescale

            def second(j, carry):
                """Warpgroup 1, pages 2j + 1 (its own, slot 1) and 2j (slot 0)."""
                acc, running_max, total = carry
                s = scores(2 * j + 1, 1)
                with jax.named_scope("wait_published"):
                    plgpu.barrier_wait(max_ready)
                first_max = plgpu.load(max_smem.at[0], layout=ROWS)
                first_rescale = jnp.exp2(running_max - first_max)
                new_max = jnp.maximum(first_max, s.max(axis=1))
                rescale = jnp.exp2(first_max - new_max)
                probs = jnp.exp2(s - rows(new_max))
                total = total * (first_rescale * rescale) + probs.sum(axis=1)
                probs = probs.astype(dtype)
                probs_piece(1)[...] = probs
                rescale_smem[...] = rescale
                publish(max_smem.at[1], new_max, published)
                acc = add_half(acc * lax.broadcast_in_dim(first_rescale * rescale, acc.shape, [0]), probs, 1)
                plgpu.barrier_arrive(half_free.at[1 * 2 + 1])
                with jax.named_scope("wait_published"):
                    plgpu.barrier_wait(scaled_ready)
                first_probs = probs_piece(0) if interpret else plgpu.load(probs_piece(0), layout=plgpu.Layout.WGMMA)
                acc = add_half(acc, first_probs, 0)
                plgpu.barrier_arrive(half_free.at[0 * 2 + 1])
                plgpu.barrier_arrive(probs_free.at[0])
                return acc, new_max, total

            def compute(w):
                plgpu.set_max_registers(232, action="increase")
                plgpu.barrier_wait(q_bar)
                acc = plgpu.layout_cast(jnp.zeros((HEADS, half), F32), plgpu.Layout.WGMMA)
                running_max = plgpu.layout_cast(jnp.full((HEADS,), MASKED, F32), ROWS)
                total = plgpu.layout_cast(jnp.zeros((HEADS,), F32), ROWS)
                acc, running_max, total = lax.fori_loop(0, pairs, (first, second)[w], (acc, running_max, total))
                # Both warpgroups end on the last page's max; the softmax sum is theirs together.
                totals_smem.at[w][...] = total
                plgpu.commit_smem()
                plgpu.barrier_arrive(totals_ready)
                plgpu.barrier_wait(totals_ready)
                total = plgpu.load(totals_smem.at[0], layout=ROWS) + plgpu.load(totals_smem.at[1], layout=ROWS)
                scale_rows, lse = softmax_finish(running_max, total)
                o_ref.at[row, split, heads_here, pl.ds(w * half, half)][...] = acc * lax.broadcast_in_dim(
                    scale_rows, acc.shape, [0])
                if w == 0:
                    rescale_smem[...] = lse  # spent: the last page was published long ago
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(rescale_smem, lse_ref.at[row, split, heads_here])
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
                for p in range(latent):
                    plgpu.copy_gmem_to_smem(q_lat_ref.at[row, heads_here, pl.ds(p * PIECE, PIECE)], q_smem.at[p], q_bar)
                plgpu.copy_gmem_to_smem(q_pe_ref.at[row, heads_here], q_smem.at[latent], q_bar)
                first_page = lax.div(start, jnp.int32(PAGE))

                @pl.loop(0, pairs)
                def _(j):
                    for slot in range(STAGES):
                        # The page past an odd count is the last one again: its scores are all masked.
                        page = table_ref[row, first_page + jnp.minimum(2 * j + slot, count - 1)]
                        for h in range(2):
                            @pl.when(j > 0)
                            @jax.named_scope("wait_free")
                            def _():
                                plgpu.barrier_wait(half_free.at[slot * 2 + h])

                            for i in range(per_half):
                                p = h * per_half + i
                                plgpu.copy_gmem_to_smem(c_ref.at[page, :, pl.ds(p * PIECE, PIECE)], kv_smem.at[slot, p],
                                                        loaded.at[slot * pieces + p], collective_axes=shared)

                        @pl.when(j > 0)
                        @jax.named_scope("wait_free")
                        def _():
                            plgpu.barrier_wait(probs_free.at[slot])

                        plgpu.copy_gmem_to_smem(k_pe_ref.at[page], kv_smem.at[slot, latent],
                                                loaded.at[slot * pieces + latent], collective_axes=shared)

                @pl.when(pairs > 0)  # the last releases: every barrier phase is waited for once
                def _():
                    for slot in range(STAGES):
                        for h in range(2):
                            plgpu.barrier_wait(half_free.at[slot * 2 + h])
                        plgpu.barrier_wait(probs_free.at[slot])

        pl.run_scoped(
            scoped,
            plgpu.SMEM((pieces, HEADS, PIECE), dtype, transforms=TILE),
            plgpu.SMEM((STAGES, pieces, PAGE, PIECE), dtype, transforms=TILE),
            plgpu.SMEM((HEADS,), F32),  # page 2j + 1's rescale factor (then the log-sum-exp)
            plgpu.SMEM((STAGES, HEADS), F32),  # the running max after page 2j, after 2j + 1
            plgpu.SMEM((2, HEADS), F32),  # each warpgroup's softmax sum
            plgpu.Barrier(num_arrivals=pieces),  # the queries
            plgpu.Barrier(num_barriers=STAGES * pieces),  # a page piece loaded
            # A stage's latent half freed by the warpgroup whose half it is (its last reader: that warpgroup's
            # product waits for the scores), and its probabilities by the warpgroup that reads them from there.
            release_barrier(STAGES * 2),
            release_barrier(STAGES),
            plgpu.Barrier(),  # page 2j's max published
            plgpu.Barrier(),  # page 2j + 1's probabilities, rescale factor and max published
            plgpu.Barrier(),  # page 2j's probabilities, rescaled to page 2j + 1's max, published
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
        num_threads=WARPGROUPS,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(**COMPILER_PARAMS),
        interpret=interpret_params(interpret),
    )
    return run(lengths, block_table, q_lat, q_pe, c, k_pe)
