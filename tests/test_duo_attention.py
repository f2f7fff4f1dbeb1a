"""DuoAttention (layers/duo_attention.py) against the attention layer it is made from: all heads retrieval is
full attention, all heads streaming is the sliding window with sinks, a mix is each head's own kind (checked by
silencing the other heads' output projections), the gate mixes the two linearly; decode equals the forward;
the cache holds full-length K/V for retrieval heads only. Tolerances: tests/reference.py TOLERANCE (fp32 1e-5,
bf16 4e-2, relative to the output's max magnitude)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import reference
from inputs import decode_in_chunks, forward, impl_for, init, packed_batch, randomize, single_document
from zoo.config import LayerConfig, ModelConfig
from zoo.errors import ConfigError
from zoo.layers.attention import Attention, AttentionConfig
from zoo.layers.duo_attention import DuoAttention, DuoAttentionConfig
from zoo.model import cache_bytes

D_MODEL = 32
HEADS, KV_HEADS, HEAD_DIM, WINDOW, SINKS = 6, 3, 8, 4, 2
FULL = AttentionConfig(HEADS, KV_HEADS, HEAD_DIM, sink_logits=True)
STREAMING = AttentionConfig(HEADS, KV_HEADS, HEAD_DIM, window=WINDOW, sink_tokens=SINKS, sink_logits=True)


def duo(retrieval_heads):
    return DuoAttentionConfig(HEADS, KV_HEADS, HEAD_DIM, window=WINDOW, sink_tokens=SINKS, sink_logits=True,
                              retrieval_heads=retrieval_heads)


def duo_params(rng, x, positions, segments, config):
    module = DuoAttention(config, D_MODEL)
    return module, randomize(init(module, x, positions, segments, seed=int(rng.integers(1 << 30))), rng)


def attention_out(config, params, x, positions, segments):
    params = {k: v for k, v in params.items() if k != "duo_gate"}
    return np.asarray(forward(Attention(config, D_MODEL), params, x, positions, segments), np.float64)


def silence(params, kv_heads):
    """The output projection rows of the query heads of `kv_heads` set to zero."""
    o_proj = np.array(params["o_proj"])
    groups = HEADS // KV_HEADS
    for h in kv_heads:
        o_proj[h * groups:(h + 1) * groups] = 0
    return {**params, "o_proj": o_proj}


@pytest.mark.parametrize("retrieval, expected", [((0, 1, 2), FULL), ((), STREAMING)])
def test_all_retrieval_is_full_attention_and_all_streaming_is_the_window(retrieval, expected, rng):
    x, positions, segments = packed_batch(rng, 2, 20, D_MODEL)
    module, params = duo_params(rng, x, positions, segments, duo(retrieval))
    out = forward(module, params, x, positions, segments)
    assert reference.relative_error(out, attention_out(expected, params, x, positions, segments)) < 1e-5


def test_each_head_attends_as_its_kind(rng):
    x, positions, segments = packed_batch(rng, 2, 20, D_MODEL)
    module, params = duo_params(rng, x, positions, segments, duo((1,)))
    for silenced, expected in (((0, 2), FULL), ((1,), STREAMING)):
        p = silence(params, silenced)
        out = forward(module, p, x, positions, segments)
        assert reference.relative_error(out, attention_out(expected, p, x, positions, segments)) < 1e-5, silenced


def test_gate_mixes_full_and_streaming_outputs(rng):
    x, positions, segments = packed_batch(rng, 2, 20, D_MODEL)
    module, params = duo_params(rng, x, positions, segments, duo(None))
    np.testing.assert_array_equal(params["duo_gate"], np.ones(KV_HEADS))  # identification starts from full
    full = attention_out(FULL, params, x, positions, segments)
    alpha = rng.uniform(-0.5, 1.5, KV_HEADS).astype(np.float32)  # clipped to [0, 1]
    out = forward(module, {**params, "duo_gate": alpha}, x, positions, segments)
    # per KV head the mix is linear, and so is the output projection: mix each head's share of the output
    shares = [attention_out(c, silence(params, [g for g in range(KV_HEADS) if g != h]), x, positions, segments)
              for c in (FULL, STREAMING) for h in range(KV_HEADS)]
    a = np.clip(alpha, 0, 1)
    expected = sum(a[h] * shares[h] + (1 - a[h]) * shares[KV_HEADS + h] for h in range(KV_HEADS))
    assert reference.relative_error(out, expected) < 1e-5
    assert reference.relative_error(out, full) > 1e-3  # the gates did move the output away from full attention


@pytest.mark.parametrize("dtype, impl", [("float32", "xla"), ("bfloat16", "xla"), ("float32", impl_for("gpu"))])
def test_decode_matches_forward(dtype, impl, rng):
    """Token by token, and a 7-token chunk then tokens: 24 tokens wrap the streaming ring several times; with
    the kernels, the prefill runs flash_attention and each token decode_attention over both caches."""
    x = rng.standard_normal((2, 24, D_MODEL)).astype(np.float32)
    positions, segments = single_document(x)
    config = dataclasses.replace(duo((0, 2)), impl=impl)
    module = DuoAttention(config, D_MODEL, dtype=jnp.dtype(dtype))
    params = randomize(init(module, x, positions, segments, seed=int(rng.integers(1 << 30))), rng)
    full = np.asarray(forward(module, params, x, positions, segments), np.float64)
    for chunks in ([1] * 24, [7] + [1] * 17):
        out, _ = decode_in_chunks(module, params, x, positions, segments, chunks, max_len=32, dtype=jnp.dtype(dtype))
        assert reference.relative_error(out, full) < reference.TOLERANCE[dtype], chunks


@pytest.mark.parametrize("retrieval", [(), (1,), (0, 1, 2)])
def test_cache_holds_full_context_for_retrieval_heads_only(retrieval):
    """Per KV head and token slot: k and v in bfloat16; per slot of each part: a position and a segment id."""
    module = DuoAttention(duo(retrieval), D_MODEL)
    per_head_slot = 2 * HEAD_DIM * 2
    for max_len in (64, 4096):
        cache = module.init_cache(3, max_len, jnp.bfloat16)
        assert cache.retrieval.entries["k"].shape == (3, max_len, len(retrieval), HEAD_DIM)
        assert cache.streaming.entries["k"].shape == (3, WINDOW + SINKS, KV_HEADS - len(retrieval), HEAD_DIM)
        expected = 3 * (max_len * (len(retrieval) * per_head_slot + 8)
                        + (WINDOW + SINKS) * ((KV_HEADS - len(retrieval)) * per_head_slot + 8))
        assert cache_bytes(cache) == expected


def test_config_errors_and_json_round_trip():
    with pytest.raises(ConfigError, match="window"):
        DuoAttentionConfig(4, 2, 8).validate("layers[0].mixer_config")
    with pytest.raises(ConfigError, match="retrieval_heads"):
        DuoAttentionConfig(4, 2, 8, window=4, retrieval_heads=(2,)).validate("layers[0].mixer_config")
    config = ModelConfig(vocab_size=16, d_model=D_MODEL, mlp_hidden=64, layers=(LayerConfig("duo_attention", duo([2, 0])),))
    assert ModelConfig.from_json(config.to_json()) == config
    assert config.layers[0].mixer_config.retrieval_heads == (0, 2)
    with pytest.raises(ValueError, match="gate-training"):
        DuoAttention(duo(None), D_MODEL).init_cache(1, 8, jnp.float32)
