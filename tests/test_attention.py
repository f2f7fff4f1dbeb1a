"""GQA / MQA / MHA, sliding window with sinks, MixAttention sharing: forward vs the naive reference,
decode vs forward, and cache sizes. Tolerances: tests/reference.py TOLERANCE (fp32 1e-5, bf16 4e-2,
relative to the output's max magnitude)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from inputs import decode_in_chunks, forward, init, packed_batch, randomize, single_document
from zoo.layers.attention import Attention, AttentionConfig
from zoo.layers.kv_cache import EmptyCache, SlotCache
from zoo.model import cache_bytes

D_MODEL = 32
VARIANTS = {
    "mha": AttentionConfig(4, 4, 8),
    "gqa": AttentionConfig(4, 2, 8, qkv_bias=True),
    "mqa": AttentionConfig(4, 1, 8),
    "partial-rope": AttentionConfig(4, 2, 8, rotary_dim=4, rope_base=500.0),
    "window": AttentionConfig(4, 2, 8, window=5),
    "window-sink-tokens": AttentionConfig(4, 2, 8, window=5, sink_tokens=2),
    "window-sink-logits": AttentionConfig(4, 2, 8, window=4, sink_logits=True),
    "window-both-sinks": AttentionConfig(4, 1, 8, window=3, sink_tokens=3, sink_logits=True),
}
DTYPES = ["float32", "bfloat16"]


def make(cfg, dtype):
    return Attention(cfg, D_MODEL, dtype=jnp.dtype(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_matches_reference(variant, dtype, rng):
    cfg = VARIANTS[variant]
    x, positions, segments = packed_batch(rng, 2, 20, D_MODEL)
    module = make(cfg, dtype)
    params = randomize(init(module, x, positions, segments, seed=int(rng.integers(1 << 30))), rng)
    out = forward(module, params, x, positions, segments)
    expected = reference.attention(params, x, positions, segments, cfg)
    assert reference.relative_error(out, expected) < reference.TOLERANCE[dtype]


@pytest.mark.parametrize("variant", ["gqa", "window-both-sinks"])
def test_packed_documents_do_not_see_each_other(variant, rng):
    cfg = VARIANTS[variant]
    x, positions, segments = packed_batch(rng, 2, 20, D_MODEL)
    module = make(cfg, "float32")
    params = randomize(init(module, x, positions, segments), rng)
    first_doc = segments[0] == 1
    changed = x.copy()
    changed[0, first_doc] = rng.standard_normal(changed[0, first_doc].shape)
    before = forward(module, params, x, positions, segments)
    after = forward(module, params, changed, positions, segments)
    np.testing.assert_array_equal(np.asarray(before)[0, ~first_doc], np.asarray(after)[0, ~first_doc])
    assert not np.allclose(np.asarray(before)[0, first_doc], np.asarray(after)[0, first_doc])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_decode_matches_forward(variant, dtype, rng):
    """Token by token, and a 7-token prefill chunk then tokens; 24 tokens outrun every window here,
    so the ring buffer wraps several times (and the chunk is longer than the ring)."""
    cfg = VARIANTS[variant]
    x = rng.standard_normal((2, 24, D_MODEL)).astype(np.float32)
    positions, segments = single_document(x)
    module = make(cfg, dtype)
    params = randomize(init(module, x, positions, segments), rng)
    full = np.asarray(forward(module, params, x, positions, segments), np.float64)
    for chunks in ([1] * 24, [7] + [1] * 17):
        out, _ = decode_in_chunks(module, params, x, positions, segments, chunks, max_len=32, dtype=jnp.dtype(dtype))
        assert reference.relative_error(out, full) < reference.TOLERANCE[dtype], chunks


@pytest.mark.parametrize("variant", ["window-sink-tokens", "window-sink-logits", "window-both-sinks"])
def test_ring_buffer_memory_is_constant(variant):
    """StreamingLLM's promise: sink + window slots, whatever max_len or however many tokens."""
    cfg = VARIANTS[variant]
    module = make(cfg, "float32")
    slots = cfg.window + cfg.sink_tokens
    per_slot = 2 * cfg.num_kv_heads * cfg.head_dim * 4 + 2 * 4  # k and v in fp32, position and segment int32
    for max_len in (16, 4096, 1 << 20):
        cache = module.init_cache(3, max_len, jnp.float32)
        assert cache.num_slots == slots
        assert cache_bytes(cache) == 3 * slots * per_slot


def test_global_cache_size():
    cfg = VARIANTS["gqa"]
    cache = make(cfg, "float32").init_cache(2, 64, jnp.bfloat16)
    assert cache.entries["k"].shape == (2, 64, cfg.num_kv_heads, cfg.head_dim)
    assert cache_bytes(cache) == 2 * 64 * (2 * cfg.num_kv_heads * cfg.head_dim * 2 + 8)


def test_ring_buffer_keeps_sinks_and_recent_window(rng):
    cfg = VARIANTS["window-sink-tokens"]
    module = make(cfg, "float32")
    x = rng.standard_normal((1, 30, D_MODEL)).astype(np.float32)
    positions, segments = single_document(x)
    params = init(module, x, positions, segments)
    _, cache = decode_in_chunks(module, params, x, positions, segments, [1] * 30, max_len=64)
    assert sorted(np.asarray(cache.positions[0]).tolist()) == [0, 1, 25, 26, 27, 28, 29]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 4])
def test_shared_kv_layer_attends_over_source_kv(window, dtype, rng):
    """MixAttention: the sharing layer has no K/V weights, an empty cache, and its output is the
    reference attention of its own queries over the source layer's keys and values."""
    source_cfg = AttentionConfig(4, 2, 8, window=window)
    sharer_cfg = AttentionConfig(4, 2, 8, window=window, shared_kv_source=0)
    x, positions, segments = packed_batch(rng, 2, 16, D_MODEL)
    x_sharer = rng.standard_normal(x.shape).astype(np.float32)
    source, sharer = make(source_cfg, dtype), make(sharer_cfg, dtype)
    source_params = init(source, x, positions, segments, seed=1)
    _, _, view = source.apply({"params": source_params}, jnp.asarray(x), positions=positions, segment_ids=segments,
                              return_kv=True)
    sharer_params = nn.unbox(sharer.init(jax.random.key(2), jnp.asarray(x_sharer), positions=positions,
                                         segment_ids=segments, shared_kv=view)["params"])
    assert set(sharer_params) == {"q_proj", "o_proj"}
    out, cache = sharer.apply({"params": sharer_params}, jnp.asarray(x_sharer), positions=positions,
                              segment_ids=segments, shared_kv=view)
    merged = {**sharer_params, "k_proj": source_params["k_proj"], "v_proj": source_params["v_proj"]}
    # The source's K/V are those of x, the sharer's queries those of x_sharer.
    p = reference.f64(merged)
    q = reference.rope(np.einsum("btd,dhk->bthk", np.float64(x_sharer), p["q_proj"]), positions, 10000.0)
    k = reference.rope(np.einsum("btd,dhk->bthk", np.float64(x), p["k_proj"]), positions, 10000.0)
    v = np.einsum("btd,dhk->bthk", np.float64(x), p["v_proj"])
    attended = reference.softmax_attend(q, k, v, positions, segments, scale=8**-0.5, window=window)
    expected = np.einsum("bthk,hkd->btd", attended, p["o_proj"])
    assert reference.relative_error(out, expected) < reference.TOLERANCE[dtype]
    empty = sharer.init_cache(2, 64, jnp.float32)
    assert isinstance(empty, EmptyCache) and jax.tree.leaves(empty) == [] and cache_bytes(empty) == 0
    assert isinstance(source.init_cache(2, 64, jnp.float32), SlotCache)


def test_a_chunk_writing_one_slot_twice_keeps_its_last_token(rng):
    """Packed documents restart positions and a ring buffer wraps within a chunk, so two new tokens can map
    to one slot; a scatter with repeated indices may land either (GPUs pick any), so the write drops all but
    the last. Checked on the slot assignment itself, since the CPU's scatter happens to land the last."""
    from zoo.layers.kv_cache import last_writer_only

    slots = 6
    slot = rng.integers(0, slots + 1, (3, 20)).astype(np.int32)  # slots == 6: already dropped
    kept = np.asarray(last_writer_only(jnp.asarray(slot), slots))
    for row, kept_row in zip(slot, kept):
        for t, s in enumerate(row):
            later = s < slots and s in row[t + 1:]
            assert kept_row[t] == (slots if later else s)
    # Through the cache: a packed chunk (positions 0..4, then 0..2) leaves the second document in slots 0..2.
    cache = SlotCache.create(1, 8, {"k": (1,)}, jnp.float32)
    positions = jnp.asarray([[0, 1, 2, 3, 4, 0, 1, 2]])
    segments = jnp.asarray([[1, 1, 1, 1, 1, 2, 2, 2]])
    cache = cache.write({"k": jnp.arange(8, dtype=jnp.float32).reshape(1, 8, 1)}, positions, segments)
    assert np.asarray(cache.segment_ids[0, :5]).tolist() == [2, 2, 2, 1, 1]
    assert np.asarray(cache.entries["k"][0, :5, 0]).tolist() == [5, 6, 7, 3, 4]
