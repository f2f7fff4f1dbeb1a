"""Pallas attention kernels against their references: MLA absorbed decode, TPLA decode under a mesh, GQA
decode over full and ring-buffer caches, flash attention forward and backward (interpret mode on CPU; the compiled kernels where the tests run on a GPU)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inputs import impl_for
from reference import TOLERANCE, relative_error
from zoo.pallas_kernels.decode_attention import decode_attention
from zoo.pallas_kernels.decode_attention.reference import decode_attention_reference
from zoo.pallas_kernels import mosaic_gpu
from zoo.pallas_kernels.flash_attention import flash_attention, hopper
from zoo.pallas_kernels.flash_attention.ops import gpu_kernel as flash_gpu_kernel
from zoo.pallas_kernels.flash_attention.reference import flash_attention_reference
from zoo.pallas_kernels.mla_decode import hopper as mla_hopper, latent_decode, mla_decode
from zoo.pallas_kernels.mla_decode.ops import gpu_kernel as mla_gpu_kernel, split_walk
from zoo.pallas_kernels.splits import default_splits
from zoo.pallas_kernels.mla_decode.reference import mla_decode_reference

BLOCK = 16


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_mla_decode_matches_reference(rng, platform, dtype, splits):
    """Ragged rows (one slot, all slots, random), a cache length that is not a multiple of the block or
    the splits (so rows end inside blocks and splits, and some splits of short rows are empty), head
    count and latent / RoPE widths that need padding."""
    batch, heads = 4, int(rng.choice([2, 5]))
    rank, rope, slots = int(rng.choice([24, 32])), int(rng.choice([8, 16])), int(rng.integers(70, 140))
    lengths = np.concatenate([[1, slots], rng.integers(1, slots + 1, batch - 2)]).astype(np.int32)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32).astype(dtype)

    q_lat, q_pe, c, k_pe = normal(batch, heads, rank), normal(batch, heads, rope), normal(batch, slots, rank), \
        normal(batch, slots, rope)
    scale = (rank + rope) ** -0.5
    run = jax.jit(lambda *a: mla_decode(*a, scale=scale, impl=impl_for(platform), platform=platform, block=BLOCK,
                                        splits=splits))
    out = run(q_lat, q_pe, c, k_pe, jnp.asarray(lengths))
    with jax.default_matmul_precision("float32"):
        expected = mla_decode_reference(q_lat, q_pe, c, k_pe, jnp.asarray(lengths), scale=scale)
    assert out.shape == (batch, heads, rank) and out.dtype == jnp.float32
    # bf16: the kernel's probabilities enter the value matmul in bf16, as the XLA layer's do.
    assert relative_error(out, expected) < TOLERANCE[dtype]
    # A row of length 1 attends to its only slot: its output is that slot's latent.
    np.testing.assert_allclose(np.asarray(out[0]), np.broadcast_to(np.asarray(c[0, 0], np.float32), (heads, rank)),
                               rtol=1e-6, atol=1e-6)


def test_mla_decode_rejects_mismatched_shapes():
    q = jnp.zeros((2, 4, 32))
    with pytest.raises(ValueError, match="must agree"):
        mla_decode(q, jnp.zeros((2, 4, 16)), jnp.zeros((2, 64, 32)), jnp.zeros((2, 64, 16)), jnp.ones((3,), jnp.int32),
                   scale=1.0)


def test_default_splits_fill_the_gpu_without_tiny_splits():
    assert default_splits(rows=128, slots=8192, block=64) == 2
    assert default_splits(rows=1, slots=32768, block=64) == 64  # 32768 / (8 * 64) = 64 < 264
    assert default_splits(rows=4, slots=256, block=64) == 1


def test_gpu_kernel_choice_names_what_is_missing():
    """The one rule ops.py and the benches share: Triton unless the Mosaic GPU kernel applies on an sm90 GPU;
    platform="mosaic_gpu" forces it (interpret mode runs it anywhere) or says why it cannot run."""
    hopper_here = mosaic_gpu.available()
    mla = functools.partial(mla_gpu_kernel, rank=512, rope=64, block=64, dtype=jnp.bfloat16)
    assert mla(128) == ("mosaic_gpu" if hopper_here else "gpu")
    assert mla(128, platform="gpu") == "gpu" and mla(48) == "gpu"
    assert mla(128, platform="mosaic_gpu", interpret=True) == "mosaic_gpu"
    with pytest.raises(ValueError, match="heads must be a multiple of 64"):
        mla(48, platform="mosaic_gpu", interpret=True)
    q, k, v = (jnp.zeros((1, 128, 2, 64), jnp.bfloat16) for _ in range(3))
    assert flash_gpu_kernel((q,), (k,), v) == ("mosaic_gpu" if hopper_here else "gpu")
    assert flash_gpu_kernel((q.astype(jnp.float32),), (k.astype(jnp.float32),), v.astype(jnp.float32)) == "gpu"
    with pytest.raises(ValueError, match="bfloat16 / float16 inputs of one dtype"):
        flash_gpu_kernel((q.astype(jnp.float32),), (k,), v, platform="mosaic_gpu", interpret=True)
    if not hopper_here:
        with pytest.raises(ValueError, match="sm90"):
            mla(128, platform="mosaic_gpu")
        with pytest.raises(ValueError, match="sm90"):
            flash_gpu_kernel((q,), (k,), v, platform="mosaic_gpu")


def test_hopper_mla_splits_fill_whole_waves_and_skip_the_combine():
    """One program a GPU's SM (132 here, no GPU): 128 rows x 2 head groups already fill two waves, so one split
    (no partial outputs to combine); 8 rows fill one wave with 8 splits (16 would take two); one row takes the
    most splits that keep 8 pages each."""
    assert mla_hopper.default_splits(batch=128, heads=128, slots=8192, rank=512, rope=64) == 1
    assert mla_hopper.default_splits(batch=8, heads=128, slots=8192, rank=512, rope=64) == 8
    assert mla_hopper.default_splits(batch=1, heads=128, slots=32768, rank=512, rope=64) == 64


def test_split_walk_takes_whole_blocks_and_each_kernels_default():
    """Splits walk whole blocks, so 5 blocks asked for 3 splits walk 2 each and the last one is short, and 4
    asked for 3 give 2 splits; without a count, each kernel's own rule (one split at batch 128 on Hopper,
    Triton's ~264 programs: 2)."""
    assert split_walk(4, 8, 64, 16, blocks=5, block=64, splits=3, kernel="gpu") == (3, 128)
    assert split_walk(4, 8, 64, 16, blocks=4, block=64, splits=3, kernel="mosaic_gpu") == (2, 128)
    assert split_walk(128, 128, 512, 64, blocks=128, block=64, splits=None, kernel="mosaic_gpu") == (1, 8192)
    assert split_walk(128, 128, 512, 64, blocks=128, block=64, splits=None, kernel="gpu") == (2, 4096)


def test_mla_decode_rejects_a_block_the_kernels_cannot_tile():
    args = (jnp.zeros((1, 2, 32)), jnp.zeros((1, 2, 16)), jnp.zeros((1, 64, 32)), jnp.zeros((1, 64, 16)),
            jnp.ones((1,), jnp.int32))
    with pytest.raises(ValueError, match="power of two"):
        mla_decode(*args, scale=1.0, impl="interpret", platform="gpu", block=24)
    with pytest.raises(ValueError, match="multiple of 8"):
        mla_decode(*args, scale=1.0, impl="interpret", platform="tpu", block=12)


# --- flash attention -------------------------------------------------------------------------------------------

FLASH_BLOCKS = (16, 16, 16, 32)  # backward key blocks longer than its query blocks: the two lists differ
LAYOUTS = {
    # name: (window, sink_tokens, sink_logits, MLA-style second part)
    "causal_gqa": (None, 0, False, False),
    "window_sinks": (11, 3, True, False),  # window crosses 16-slot blocks; sink tokens and logits together
    "mla_parts": (None, 0, False, True),  # no-RoPE part per head + RoPE part on one shared key head
}


def packed_positions(rng, batch, length):
    """Row 0 packs two documents (positions restart, segment ids differ); the last row ends in padding
    (position -1), so padded keys and query rows with nothing visible are exercised."""
    positions = np.tile(np.arange(length), (batch, 1))
    segments = np.ones((batch, length), np.int64)
    split = int(rng.integers(length // 4, 3 * length // 4))
    positions[0, split:] = np.arange(length - split)
    segments[0, split:] = 2
    pad = int(rng.integers(1, 6))
    positions[-1, length - pad:], segments[-1, length - pad:] = -1, 0
    return jnp.asarray(positions, jnp.int32), jnp.asarray(segments, jnp.int32)


SMALL_WIDTHS = ((24, 32), (16, 20), 8)  # (query / key widths, value widths, RoPE width): some need padding


def flash_inputs(rng, layout, dtype, lengths=(37, 71), widths=SMALL_WIDTHS):
    window, sink_tokens, sink_logits, mla = LAYOUTS[layout]
    batch, heads = 2, 4
    kv_heads = heads if mla else int(rng.choice([1, 2]))  # MLA's no-RoPE keys and its values are per head
    length, dim, dim_v = int(rng.integers(*lengths)), int(rng.choice(widths[0])), int(rng.choice(widths[1]))

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32).astype(dtype)

    qs, ks = [normal(batch, length, heads, dim)], [normal(batch, length, kv_heads, dim)]
    if mla:
        qs.append(normal(batch, length, heads, widths[2]))
        ks.append(normal(batch, length, 1, widths[2]))
    inputs = dict(q=tuple(qs), k=tuple(ks), v=normal(batch, length, kv_heads, dim_v),
                  sink_logits=normal(heads).astype(jnp.float32) if sink_logits else None)
    options = dict(scale=float(rng.uniform(0.1, 0.4)), window=window, sink_tokens=sink_tokens)
    return inputs, options, packed_positions(rng, batch, length)


# Per platform: tiles, random lengths giving several query and key blocks, feature widths. TPU key blocks
# are multiples of 128 lanes, so that test runs longer rows; the Mosaic GPU kernels (Hopper) take 2 x 64
# rows per program, 16-bit inputs and widths that are multiples of 64, and the backward streams 64-row blocks.
FLASH_TILES = {"gpu": (FLASH_BLOCKS, (37, 71), SMALL_WIDTHS), "tpu": ((32, 128, 64, 128), (140, 250), SMALL_WIDTHS),
               "mosaic_gpu": ((128, 64, 64, 64), (140, 250), ((64,), (64,), 64))}
FLASH_CASES = [(platform, dtype, FLASH_TILES[platform][0]) for platform in FLASH_TILES
               for dtype in ("float32", "bfloat16") if platform != "mosaic_gpu" or dtype == "bfloat16"]
FLASH_CASES.append(("mosaic_gpu", "bfloat16", (128, 64, 128, 128)))  # the backward's 128-row streamed blocks


def flash_impl(platform):
    if platform == "mosaic_gpu":
        return "pallas" if mosaic_gpu.available() else "interpret"
    return impl_for(platform)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("platform, dtype, blocks", FLASH_CASES)
def test_flash_attention_matches_reference(rng, platform, layout, dtype, blocks):
    """Forward and the gradients of every differentiable input (q and k parts, v, sink logits) against the
    dense masked softmax of zoo.layers.attention, on random lengths that are not multiples of the blocks,
    packed documents, padding, grouped heads, windows crossing blocks."""
    _, lengths, widths = FLASH_TILES[platform]
    _check_flash_against_reference(rng, platform, layout, dtype, blocks, lengths, widths)


def test_the_mosaic_gpu_forward_cuts_queries_wider_than_the_values(rng, monkeypatch):
    """DeepSeek's unsplit MLA prefill (one 192-wide query / key part, 128-wide values) does not fit shared
    memory with an output buffer of its own at the default key blocks: it runs as 128 + 64 parts, o going out
    through the first part's buffer, and still matches the reference (forward and gradients)."""
    cuts = []

    def spy(qs, *args, run=hopper.forward, **kwargs):
        cuts.append(tuple(q.shape[-1] for q in qs))
        return run(qs, *args, **kwargs)
    monkeypatch.setattr(hopper, "forward", spy)
    blocks = (hopper.PROGRAM_ROWS, hopper.BLOCK_K, 64, 64)
    _check_flash_against_reference(rng, "mosaic_gpu", "window_sinks", "bfloat16", blocks, (140, 250),
                                   ((192,), (128,), 64))
    assert set(cuts) == {(128, 64)}


def _check_flash_against_reference(rng, platform, layout, dtype, blocks, lengths, widths):
    inputs, options, (positions, segments) = flash_inputs(rng, layout, dtype, lengths, widths)
    names = [name for name in inputs if inputs[name] is not None]
    weights = jnp.asarray(rng.normal(size=(*inputs["q"][0].shape[:3], inputs["v"].shape[-1])), jnp.float32)
    real_rows = (positions >= 0)[:, :, None, None]  # padding rows: the kernel gives 0, the dense softmax a mean

    def loss_and_grads(attend, inputs):
        def loss(*args):
            out = attend(**dict(zip(names, args)), **{n: None for n in inputs if n not in names})
            return jnp.sum(jnp.where(real_rows, out.astype(jnp.float32), 0.0) * weights), out
        (_, out), grads = jax.value_and_grad(loss, argnums=range(len(names)), has_aux=True)(*(inputs[n] for n in names))
        return jnp.where(real_rows, out.astype(jnp.float32), 0.0), grads

    def kernel(q, k, v, sink_logits):
        return flash_attention(q, k, v, positions, segments, positions, segments, sink_logits=sink_logits,
                               impl=flash_impl(platform), platform=platform, blocks=blocks, **options)

    def dense(q, k, v, sink_logits):
        return flash_attention_reference(q, k, v, positions, segments, positions, segments, sink_logits=sink_logits,
                                         **options)

    out, grads = jax.jit(lambda i: loss_and_grads(kernel, i))(inputs)
    upcast = jax.tree.map(lambda a: a.astype(jnp.float32), inputs)
    with jax.default_matmul_precision("float32"):
        expected, expected_grads = jax.jit(lambda i: loss_and_grads(dense, i))(upcast)
    assert out.shape == expected.shape
    assert relative_error(out, expected) < TOLERANCE[dtype]
    for name, got, want in zip(names, grads, expected_grads):
        for got_part, want_part in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert got_part.dtype == jnp.dtype(dtype) or name == "sink_logits"
            assert relative_error(got_part, want_part) < TOLERANCE[dtype], name


@pytest.mark.parametrize("window, sink_tokens", [(None, 0), (20, 0), (20, 5)])
def test_flash_block_lists_cover_every_visible_pair_and_skip_the_rest(rng, window, sink_tokens):
    """The key blocks each query block visits (and the transposed lists) include every block pair with a
    visible element, and the ones walked without a mask (listed first) have every pair visible, checked
    element by element with tests/reference.visible; with one document per row both are exact (nothing
    computed in vain, no whole block masked). The ones listed next (masked by position alone) are exactly
    the other visited pairs whose tokens are all real and of one document."""
    from reference import visible

    from zoo.pallas_kernels.flash_attention.ops import _Static, block_lists

    length, block = 96, 16
    positions, segments = packed_positions(rng, 2, length)
    static = _Static(1.0, window, sink_tokens, False, (block,) * 4, "gpu", True)
    q_walk, k_walk = block_lists(static, positions, segments, positions, segments, block, block)
    blocks = length // block

    def listed(walk, b):  # [own block, other block] -> visited / unmasked / one document, and the order
        counts, interiors, documents, lists = (np.asarray(x[b]) for x in walk)
        visits, whole, document = (np.zeros((blocks, blocks), bool) for _ in range(3))
        for i in range(blocks):
            entries = list(lists[i, :counts[i]])
            visits[i, entries] = True
            whole[i, entries[:interiors[i]]] = True
            document[i, entries[:documents[i]]] = True
            for group in (entries[:interiors[i]], entries[interiors[i]:documents[i]], entries[documents[i]:]):
                assert group == sorted(group)
        return visits, whole, document

    for b in range(2):
        pos, seg = np.asarray(positions[b]), np.asarray(segments[b])
        pairs = np.array([[visible(pos[t], seg[t], pos[s], seg[s], window, sink_tokens) for s in range(length)]
                          for t in range(length)])
        pairs = pairs.reshape(blocks, block, blocks, block)
        needed, full = pairs.any(axis=(1, 3)), pairs.all(axis=(1, 3))
        real, first = (pos >= 0).reshape(blocks, block), seg.reshape(blocks, block)[:, 0]
        one_document = (real.all(1) & (seg.reshape(blocks, block) == first[:, None]).all(1))
        one_document = one_document[:, None] & one_document[None, :] & (first[:, None] == first[None, :])
        visits, whole, document = listed(q_walk, b)
        assert all((x == y.T).all() for x, y in zip((visits, whole, document), listed(k_walk, b)))
        assert (visits >= needed).all() and (whole <= full).all()
        assert (document == visits & one_document).all()
        if b == 1:  # one document (then padding): block ranges are exact
            assert (visits == needed).all() and (whole == full).all()
    if window is not None and sink_tokens == 0:  # a band: at most ceil(window / block) + 1 key blocks
        assert int(q_walk[0][1].max()) <= -(-window // block) + 1


def test_flash_attention_rejects_bad_shapes_and_tiles():
    q, k = jnp.zeros((1, 32, 4, 16)), jnp.zeros((1, 32, 3, 16))
    pos = jnp.zeros((1, 32), jnp.int32)
    with pytest.raises(ValueError, match="KV_i dividing H"):
        flash_attention(q, k, k, pos, pos, pos, pos, scale=1.0)
    with pytest.raises(ValueError, match="powers of two"):
        flash_attention(q, q, q, pos, pos, pos, pos, scale=1.0, impl="interpret", platform="gpu", blocks=(16, 24, 16, 16))
    with pytest.raises(ValueError, match="key blocks of 128"):
        flash_attention(q, q, q, pos, pos, pos, pos, scale=1.0, impl="interpret", platform="tpu",
                        blocks=(32, 64, 32, 128))


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_mla_decode_reads_unsplit_tails_and_clips_lengths(rng, platform):
    """A cache whose slots are a multiple of the block but not of block x splits (the last split is short),
    and lengths outside [1, S]: 0 gives a zero row, more than S is S."""
    batch, heads, rank, rope, slots = 3, 2, 16, 16, 5 * BLOCK

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    q_lat, q_pe, c, k_pe = normal(batch, heads, rank), normal(batch, heads, rope), normal(batch, slots, rank), \
        normal(batch, slots, rope)
    lengths = jnp.asarray([0, slots + 7, 3 * BLOCK + 5], jnp.int32)
    out = mla_decode(q_lat, q_pe, c, k_pe, lengths, scale=0.2, impl=impl_for(platform), platform=platform,
                     block=BLOCK, splits=2)
    with jax.default_matmul_precision("float32"):
        expected = mla_decode_reference(q_lat, q_pe, c, k_pe, jnp.clip(lengths, 0, slots), scale=0.2)
    assert float(jnp.max(jnp.abs(out[0]))) == 0.0
    assert relative_error(out[1:], expected[1:]) < TOLERANCE["float32"]


def paginate(rng, caches, page, spare_pages):
    """Contiguous caches [B, S, ...] (S a multiple of page) -> the same slots scattered over a shuffled page
    pool with `spare_pages` pages of noise no row owns, and the block table [B, S / page]."""
    batch, slots = caches[0].shape[:2]
    owned = batch * slots // page
    where = rng.permutation(owned + spare_pages)[:owned]  # pool page of each row's i-th page
    pools = []
    for cache in caches:
        pool = rng.normal(size=(owned + spare_pages, page, *cache.shape[2:])).astype(np.float32)
        pool[where] = np.asarray(cache, np.float32).reshape(owned, page, *cache.shape[2:])
        pools.append(jnp.asarray(pool, cache.dtype))
    return pools, jnp.asarray(where.reshape(batch, slots // page), jnp.int32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_paged_mla_decode_matches_the_contiguous_cache(rng, platform, dtype):
    """A shuffled page pool with pages no row owns, ragged lengths ending inside pages, splits crossing
    pages, and table entries past a row's length pointing anywhere (-1, past the pool): the kernel equals
    the reference over the contiguous cache and the contiguous kernel."""
    batch, heads, rank, rope, pages_per_row = 3, 2, 32, 16, 5
    slots = pages_per_row * BLOCK

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32).astype(dtype)

    q_lat, q_pe, c, k_pe = normal(batch, heads, rank), normal(batch, heads, rope), normal(batch, slots, rank), \
        normal(batch, slots, rope)
    lengths = jnp.asarray([slots, 2 * BLOCK + 3, int(rng.integers(1, slots))], jnp.int32)
    (c_pool, pe_pool), table = paginate(rng, (c, k_pe), BLOCK, spare_pages=4)
    unread = jnp.arange(pages_per_row)[None, :] * BLOCK >= lengths[:, None]
    table = jnp.where(unread, jnp.asarray([[-1, 10**6, -1, 10**6, -1]]), table)
    run = functools.partial(mla_decode, scale=0.2, impl=impl_for(platform), platform=platform, splits=2)
    paged = run(q_lat, q_pe, c_pool, pe_pool, lengths, block_table=table)
    contiguous = run(q_lat, q_pe, c, k_pe, lengths, block=BLOCK)
    with jax.default_matmul_precision("float32"):
        expected = mla_decode_reference(q_lat, q_pe, c, k_pe, lengths, scale=0.2)
    assert relative_error(paged, expected) < TOLERANCE[dtype]
    np.testing.assert_array_equal(np.asarray(paged), np.asarray(contiguous))


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_tpla_decode_under_a_mesh_equals_one_device(rng, layout):
    """latent_decode with 4 latent shards on 8 fake CPU devices (data=2, tensor=4: each device one shard of
    the latent, the psum over "tensor" the all-reduce) equals the single-device call, with the kernel; a
    paged cache's pool is split by shard only (every row's pages may live anywhere in it)."""
    from zoo.train.mesh import make_mesh

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (the CPU run fakes them; a one-GPU run has one)")
    batch, heads, shards, rank, rope, slots, dim_v = 4, 2, 4, 16, 16, 3 * BLOCK, 8

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    q_lat, q_pe, c, k_pe = normal(batch, heads, shards, rank), normal(batch, heads, rope), \
        normal(batch, slots, shards, rank), normal(batch, slots, rope)
    lengths, v_up = jnp.asarray(rng.integers(1, slots + 1, batch), jnp.int32), normal(shards, rank, heads, dim_v)
    cache, table = ((c, k_pe), None) if layout == "contiguous" else paginate(rng, (c, k_pe), BLOCK, spare_pages=3)
    run = jax.jit(lambda *a, table: latent_decode(*a, scale=0.2, block_table=table, impl=impl_for("gpu"),
                                                  platform="gpu", block=BLOCK))
    single = run(q_lat, q_pe, *cache, lengths, v_up, table=table)
    with jax.set_mesh(make_mesh({"data": 2, "fsdp": 1, "tensor": 4})):
        sharded = run(q_lat, q_pe, *cache, lengths, v_up, table=table)
    assert relative_error(sharded, single) < TOLERANCE["float32"]
    with jax.default_matmul_precision("float32"):
        per_shard = sum(jnp.einsum("bhr,rhv->bhv", mla_decode_reference(q_lat[:, :, g], q_pe, c[:, :, g], k_pe, lengths,
                                                                       scale=0.2), v_up[g]) for g in range(shards))
    assert relative_error(single, per_shard) < TOLERANCE["float32"]


def decode_slots(rng, layout, batch, window, sink_tokens):
    """Slot positions / segments [B, S] of a decode cache as zoo.layers.kv_cache fills it, and each row's query
    position / segment [B] (the newest token, already written). "full": slot = position, rows filled to
    ragged lengths (S not a multiple of the block), row 1 holding two packed documents; "ring": sink_tokens
    + window slots, positions rotating through the window part, row 0 not yet wrapped (empty slots)."""
    if layout == "full":
        slots = int(rng.integers(40, 90))
        filled = np.concatenate([[slots, 1], rng.integers(1, slots + 1, batch - 2)])
        positions = np.where(np.arange(slots)[None] < filled[:, None], np.arange(slots)[None], -1)
        segments = np.ones((batch, slots), np.int64)
        first_document = int(rng.integers(1, slots - 1))
        positions[1], segments[1, first_document:] = np.arange(slots), 2
        positions[1, first_document:] -= first_document  # the second document restarts at 0
        filled[1] = slots
        query = positions[np.arange(batch), filled - 1]
        query_segment = segments[np.arange(batch), filled - 1]
    else:
        slots = sink_tokens + window
        query = np.concatenate([[int(rng.integers(sink_tokens, slots))], rng.integers(slots, 4 * slots, batch - 1)])
        ring = np.arange(window)[None]
        latest = query[:, None] - (query[:, None] - sink_tokens - ring) % window  # newest position in each ring slot
        positions = np.concatenate([np.tile(np.arange(sink_tokens), (batch, 1)), np.where(latest >= sink_tokens, latest, -1)], 1)
        segments, query_segment = np.ones((batch, slots), np.int64), np.ones(batch, np.int64)
    return tuple(jnp.asarray(x, jnp.int32) for x in (positions, segments, query, query_segment))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["full", "ring"])
@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_decode_attention_matches_reference(rng, platform, layout, dtype):
    """GQA (3 query heads per key head) over a cache read in place: a full cache filled to ragged lengths with
    two packed documents in one row and a row that sees nothing (zero output), or a sliding-window ring
    buffer with sink tokens and learned sink logits (a row not yet wrapped); head dims that Triton pads;
    3 splits, so short rows leave splits empty."""
    batch, kv_heads, groups, width, dv = 4, 2, 3, int(rng.choice([16, 24])), 16
    window, sink_tokens = (None, 0) if layout == "full" else (int(rng.integers(20, 50)), 4)
    k_pos, k_seg, q_pos, q_seg = decode_slots(rng, layout, batch, window or 0, sink_tokens)
    slots = k_pos.shape[1]
    blind = layout == "full"  # row 0's query is in a document no slot holds
    q_seg = q_seg.at[0].set(7) if blind else q_seg

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32).astype(dtype)

    q, k, v = normal(batch, kv_heads * groups, width), normal(batch, slots, kv_heads, width), normal(batch, slots, kv_heads, dv)
    sinks = None if layout == "full" else normal(kv_heads * groups).astype(jnp.float32)
    args = dict(scale=width**-0.5, window=window, sink_tokens=sink_tokens, sink_logits=sinks)
    out = jax.jit(lambda *a: decode_attention(*a, impl=impl_for(platform), platform=platform, block=BLOCK, splits=3,
                                              **args))(q, k, v, k_pos, k_seg, q_pos, q_seg)
    with jax.default_matmul_precision("float32"):
        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        expected = decode_attention_reference(f32(q), f32(k), f32(v), k_pos, k_seg, q_pos, q_seg, **args)
    assert out.shape == (batch, kv_heads * groups, dv) and out.dtype == v.dtype
    if blind:  # the dense reference averages the values of a row with nothing visible; the kernel gives zeros
        assert float(jnp.max(jnp.abs(out[0].astype(jnp.float32)))) == 0.0
        out, expected = out[1:], expected[1:]
    assert relative_error(out, expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_decode_attention_under_a_mesh_runs_per_shard_and_matches(rng, kv_heads):
    """Inside a mesh (data=2, fsdp=2, tensor=2 on 8 fake CPU devices) the kernel runs on each device's rows
    and heads: with 2 key heads the cache splits with the query heads; with 1 (MQA) it cannot, and is
    repeated to every query head. Equal to the single-device call, ring buffer and sink logits included."""
    from zoo.train.mesh import make_mesh

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (the CPU run fakes them; a one-GPU run has one)")
    batch, heads, width = 4, 4, 16
    k_pos, k_seg, q_pos, q_seg = decode_slots(rng, "ring", batch, window=24, sink_tokens=4)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    q, k, v, sinks = normal(batch, heads, width), normal(batch, 28, kv_heads, width), normal(batch, 28, kv_heads, width), \
        normal(heads)
    run = jax.jit(lambda *a: decode_attention(*a[:7], sink_logits=a[7], scale=0.25, window=24, sink_tokens=4,
                                              impl=impl_for("gpu"), platform="gpu", block=BLOCK))
    expected = run(q, k, v, k_pos, k_seg, q_pos, q_seg, sinks)
    with jax.set_mesh(make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
        sharded = run(q, k, v, k_pos, k_seg, q_pos, q_seg, sinks)
    assert relative_error(sharded, expected) < TOLERANCE["float32"]


def test_decode_attention_rejects_bad_shapes_and_blocks():
    q, k = jnp.zeros((2, 6, 16)), jnp.zeros((2, 32, 4, 16))
    pos = jnp.zeros((2, 32), jnp.int32)
    with pytest.raises(ValueError, match="KV dividing H"):
        decode_attention(q, k, k, pos, pos, pos[:, 0], pos[:, 0], scale=1.0)
    k = k[:, :, :3]
    with pytest.raises(ValueError, match="power of two"):
        decode_attention(q, k, k, pos, pos, pos[:, 0], pos[:, 0], scale=1.0, impl="interpret", platform="gpu", block=24)
    with pytest.raises(ValueError, match="multiple of 8"):
        decode_attention(q, k, k, pos, pos, pos[:, 0], pos[:, 0], scale=1.0, impl="interpret", platform="tpu", block=12)


@pytest.mark.parametrize("mixer", ["attention", "mla"])
def test_layers_with_the_flash_kernel_match_their_xla_form(rng, mixer):
    """The Attention layer (grouped heads, window 8 with 2 sink tokens and sink logits) and the MLA layer
    (expanded prefill: two score parts) with impl=the kernel equal impl="xla": outputs and parameter
    gradients, float32, packed documents; then the same through a cache in chunks (prefill over the cache's
    view, then single-token decode: decode_attention over the attention layer's ring buffer) against the
    layer's forward."""
    import dataclasses

    from inputs import decode_in_chunks, init, packed_batch, randomize
    from zoo.layers.attention import Attention, AttentionConfig
    from zoo.layers.mla import MLA, MLAConfig

    d_model = 32
    if mixer == "attention":
        config = AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16, window=8, sink_tokens=2, sink_logits=True)
        build = lambda cfg: Attention(cfg, d_model)  # noqa: E731
    else:
        config = MLAConfig(num_heads=2, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
        build = lambda cfg: MLA(cfg, d_model)  # noqa: E731
    x, positions, segments = packed_batch(rng, 2, 29, d_model)
    kernel, xla = build(dataclasses.replace(config, impl=impl_for("gpu"))), build(dataclasses.replace(config, impl="xla"))
    params = randomize(init(xla, x, positions, segments), rng)
    weights = jnp.asarray(rng.normal(size=(2, 29, d_model)), jnp.float32)

    def outputs_and_grads(module):  # the outputs themselves: a weighted sum of them may nearly cancel
        def apply(p):
            return module.apply({"params": p}, jnp.asarray(x), positions=positions, segment_ids=segments)[0]

        def run(p):
            out, pullback = jax.vjp(apply, p)
            return out, pullback(weights)[0]
        return jax.jit(run)

    with jax.default_matmul_precision("float32"):  # the XLA form's matmuls in full float32 on GPUs, not TF32
        (out, grads), (expected_out, expected_grads) = outputs_and_grads(kernel)(params), outputs_and_grads(xla)(params)
    assert relative_error(out, expected_out) < TOLERANCE["float32"]
    for name in expected_grads:
        assert relative_error(grads[name], expected_grads[name]) < TOLERANCE["float32"], name
    with jax.default_matmul_precision("float32"):
        full = xla.apply({"params": params}, jnp.asarray(x), positions=positions, segment_ids=segments)[0]
        chunked, _ = decode_in_chunks(kernel, params, x, positions, segments, [11, 1, 1, 16], 32)
    assert relative_error(chunked, full) < TOLERANCE["float32"]


def test_flash_attention_under_a_mesh_runs_per_shard_and_matches(rng):
    """Inside a mesh (data=2, fsdp=2, tensor=2 on 8 fake CPU devices) the kernel runs on each device's rows
    and heads; output and gradients (MLA-style parts, grouped heads, sink logits) equal the single-device
    call."""
    from zoo.train.mesh import make_mesh

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (the CPU run fakes them; a one-GPU run has one)")
    inputs, options, _ = flash_inputs(rng, "mla_parts", "float32")
    inputs["sink_logits"] = jnp.asarray(rng.normal(size=inputs["q"][0].shape[2]), jnp.float32)
    inputs = {name: jax.tree.map(lambda a: jnp.concatenate([a, a], axis=0) if a.ndim == 4 else a, value)
              for name, value in inputs.items()}  # 4 rows: two per data x fsdp pair of shards
    positions, segments = packed_positions(rng, 4, inputs["v"].shape[1])
    weights = jnp.asarray(rng.normal(size=(*inputs["q"][0].shape[:3], inputs["v"].shape[-1])), jnp.float32)

    def attend(inputs):
        out = flash_attention(inputs["q"], inputs["k"], inputs["v"], positions, segments, positions, segments,
                              sink_logits=inputs["sink_logits"], impl=impl_for("gpu"), platform="gpu",
                              blocks=FLASH_BLOCKS, **options)
        return jnp.where((positions >= 0)[:, :, None, None], out, 0.0)

    def outputs_and_grads(inputs):  # the output itself, not a weighted sum of it that may nearly cancel
        out, pullback = jax.vjp(attend, inputs)
        return out, pullback(weights)

    run = jax.jit(outputs_and_grads)
    expected = run(inputs)
    with jax.set_mesh(make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
        sharded = run(inputs)
    for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(expected)):
        assert relative_error(got, want) < TOLERANCE["float32"]


def test_mosaic_gpu_flash_forward_sends_o_through_the_query_buffer_when_memory_is_short(rng, monkeypatch):
    """Where a separate output buffer does not fit in shared memory (MLA's 192-wide queries at the default
    tiles), o goes out through the first query part's buffer, which is handed back only after the store."""
    blocks, lengths, widths = FLASH_TILES["mosaic_gpu"]
    inputs, options, (positions, segments) = flash_inputs(rng, "mla_parts", "bfloat16", lengths, widths)
    q_widths = [q.shape[-1] for q in inputs["q"]]
    tight = hopper._shared_bytes(q_widths, inputs["v"].shape[-1], 2, blocks[1], hopper.STAGES, own_o=False)
    monkeypatch.setattr(mosaic_gpu, "SHARED_MEMORY", tight)
    args = (inputs["q"], inputs["k"], inputs["v"], positions, segments, positions, segments)
    out = flash_attention(*args, sink_logits=inputs["sink_logits"], impl=flash_impl("mosaic_gpu"), platform="mosaic_gpu",
                          blocks=blocks, **options)
    expected = flash_attention_reference(*jax.tree.map(lambda a: a.astype(jnp.float32), args[:3]), *args[3:],
                                         sink_logits=inputs["sink_logits"], **options)
    real_rows = (positions >= 0)[:, :, None, None]
    assert relative_error(jnp.where(real_rows, out.astype(jnp.float32), 0.0), jnp.where(real_rows, expected, 0.0)) \
        < TOLERANCE["bfloat16"]


def _bf16(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.bfloat16)


def _flash_grad_at(length, q_widths, window, blocks=None):
    """Gradients of flash attention as impl="pallas" runs it on an sm90 GPU at a training shape: 2 rows,
    16 heads, one document per row; MLA's second part on one shared key head."""
    def loss(qs, ks, v):
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (2, length))
        segments = jnp.zeros_like(positions)
        out = flash_attention(qs, ks, v, positions, segments, positions, segments, scale=0.1, window=window,
                              impl="pallas", blocks=blocks)
        return out.astype(jnp.float32).sum()

    qs = tuple(_bf16(2, length, 16, w) for w in q_widths)
    ks = tuple(_bf16(2, length, 16 if i == 0 else 1, w) for i, w in enumerate(q_widths))
    return jax.grad(loss, argnums=(0, 1, 2)), (qs, ks, _bf16(2, length, 16, 128))


LOWERED_FOR_CUDA = {  # case: (function, argument shapes, Mosaic GPU kernels: forward, dq, dk / dv)
    "flash fwd+bwd, MHA causal": lambda: (*_flash_grad_at(1024, (128,), None), 3),
    "flash fwd+bwd, window 128": lambda: (*_flash_grad_at(1024, (128,), 128), 3),
    "flash fwd+bwd, MLA prefill 128 + 64": lambda: (*_flash_grad_at(1024, (128, 64), None), 3),
    "flash fwd+bwd, MLA prefill unsplit 192 / 128": lambda: (*_flash_grad_at(1024, (192,), None), 3),
    "flash fwd+bwd, MHA causal, 64-row backward blocks": lambda: (*_flash_grad_at(1024, (128,), None, (128, 128, 64, 64)), 3),
    "flash fwd+bwd, MHA causal, 128-row backward blocks": lambda: (*_flash_grad_at(1024, (128,), None, (128, 128, 128, 128)), 3),
    "MLA decode, 128 heads": lambda: (
        lambda *a: mla_decode(*a, scale=0.05, impl="pallas", platform="mosaic_gpu"),
        (_bf16(8, 128, 512), _bf16(8, 128, 64), _bf16(8, 2048, 512), _bf16(8, 2048, 64),
         jax.ShapeDtypeStruct((8,), jnp.int32)), 1),
}


@pytest.mark.parametrize("case", sorted(LOWERED_FOR_CUDA))
def test_mosaic_gpu_kernels_lower_for_cuda_at_full_size(case, monkeypatch):
    """The compiled (not interpreted) Mosaic GPU kernels at the real tiles and widths, lowered for CUDA on any
    machine: jax.export for platform "cuda" runs every Pallas -> Mosaic GPU lowering rule (layouts, wgmma and
    TMA shapes, barrier arities), so a kernel that cannot lower fails here, not in the GPU's device time.
    (ptxas and the run itself need the GPU: tests above, run there.)"""
    from jax import export

    from zoo.pallas_kernels import dispatch
    monkeypatch.setattr(mosaic_gpu, "available", lambda: True)  # as on an sm90 GPU
    monkeypatch.setattr(dispatch, "_PLATFORMS", {**dispatch._PLATFORMS, "cpu": "gpu"})
    fn, args, kernels = LOWERED_FOR_CUDA[case]()
    text = export.export(jax.jit(fn), platforms=["cuda"])(*args).mlir_module()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == kernels


@pytest.mark.parametrize("q_widths, blocks, backward", [
    ((128,), None, ("mosaic_gpu", (64, 128))), ((128, 64), None, ("mosaic_gpu", (64, 64))),
    ((128,), (128, 128, 128, 64), ("mosaic_gpu", (128, 64))), ((128,), (128, 128, 32, 64), ("gpu", (32, 64)))])
def test_the_mosaic_gpu_forward_is_followed_by_its_backward_where_that_applies(q_widths, blocks, backward, monkeypatch):
    """On an sm90 GPU impl="pallas" runs the Mosaic GPU backward after its forward, with the first of
    hopper.BACKWARD_BLOCKS that fits shared memory (MLA's wider rows: 64 / 64) or the blocks given, and Triton's
    backward where the Mosaic one does not take the blocks. (Shapes only: Triton needs a GPU to lower.)"""
    from zoo.pallas_kernels import dispatch
    from zoo.pallas_kernels.flash_attention import gpu
    monkeypatch.setattr(mosaic_gpu, "available", lambda: True)  # as on an sm90 GPU
    monkeypatch.setattr(dispatch, "_PLATFORMS", {**dispatch._PLATFORMS, "cpu": "gpu"})
    ran = []
    for name, module in (("gpu", gpu), ("mosaic_gpu", hopper)):
        def spy(*args, run=module.backward, name=name, **kwargs):
            ran.append((name, (kwargs["block_q"], kwargs["block_k"])))
            return run(*args, **kwargs)
        monkeypatch.setattr(module, "backward", spy)
    fn, args = _flash_grad_at(256, q_widths, None, blocks)
    grads = jax.eval_shape(fn, *args)
    assert ran == [backward]
    assert [g.shape for g in jax.tree.leaves(grads)] == [x.shape for x in jax.tree.leaves(args)]


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_mosaic_gpu_mla_decode_matches_reference(rng, layout, splits):
    """The Mosaic GPU (Hopper) MLA decode kernel: 64 heads a program with the latent output split over two
    warpgroups, two head groups (compiled: one 2-program cluster sharing each page), ragged lengths (one
    slot, a length ending inside a page, more than the cache: its whole, 0: a zero row), clipped in the
    kernel, one split (a walk round the stage ring) or 3 (some empty for short rows), a contiguous cache
    and the same cache as a shuffled page pool whose table entries past a row's length point anywhere."""
    batch, heads, rank, rope, page = 4, 128, 128, 64, mla_hopper.PAGE
    slots = 5 * page  # 3 splits of 2 pages: the last would walk past the cache but for the clipped length
    lengths = jnp.asarray([1, int(rng.integers(2 * page + 1, 3 * page)), slots + 9, 0], jnp.int32)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32).astype(jnp.bfloat16)

    q_lat, q_pe, c, k_pe = normal(batch, heads, rank), normal(batch, heads, rope), normal(batch, slots, rank), \
        normal(batch, slots, rope)
    impl = "pallas" if mosaic_gpu.available() else "interpret"
    run = functools.partial(mla_decode, scale=0.1, impl=impl, platform="mosaic_gpu", splits=splits)
    if layout == "paged":
        where = rng.permutation(batch * slots // page)
        pool = lambda x: jnp.zeros((len(where), page, x.shape[-1]), x.dtype).at[where].set(  # noqa: E731
            x.reshape(len(where), page, -1))
        table = jnp.asarray(where.reshape(batch, -1), jnp.int32)
        unread = jnp.arange(slots // page)[None, :] * page >= lengths[:, None]
        table = jnp.where(unread, jnp.asarray([[-1, 10**6, -1, 10**6, -1]]), table)
        out = run(q_lat, q_pe, pool(c), pool(k_pe), lengths, block_table=table)
    else:
        out = run(q_lat, q_pe, c, k_pe, lengths)
    upcast = [x.astype(jnp.float32) for x in (q_lat, q_pe, c, k_pe)]
    expected = mla_decode_reference(*upcast, jnp.clip(lengths, 1, slots), scale=0.1)
    assert out.shape == (batch, heads, rank) and out.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out[-1]))) == 0.0
    assert relative_error(out[:-1], expected[:-1]) < TOLERANCE["bfloat16"]
