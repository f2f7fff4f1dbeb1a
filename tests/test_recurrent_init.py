"""Attention -> recurrent initialisation (zoo.recurrent_init): the mapped weights land where the mapping says,
every other weight of the model is kept, and the hybrid runs."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from zoo.config import LayerConfig, ModelConfig
from zoo.errors import ConfigError
from zoo.layers.attention import AttentionConfig
from zoo.model import DecoderLM, init_params
from zoo.recurrent_init import hybrid_from_attention, layout_from_pattern


def teacher(rng, n_layers=4):
    layer = LayerConfig("attention", AttentionConfig(4, 2, 8))
    config = ModelConfig(vocab_size=48, d_model=32, mlp_hidden=48, layers=(layer,) * n_layers, max_seq_len=64)
    return config, init_params(config, jax.random.key(int(rng.integers(2**31))))


def test_mapping_and_kept_weights(rng):
    config, params = teacher(rng, n_layers=5)
    hybrid, new, replaced = hybrid_from_attention(config, params, layout_from_pattern("MGRXS", 5), jax.random.key(0),
                                                  window=16)
    assert [l.mixer for l in hybrid.layers] == ["mamba2", "gated_deltanet", "retnet", "mlstm", "attention"]
    assert replaced == [0, 1, 2, 3] and hybrid.layers[4].mixer_config.window == 16
    source = [params[f"layer_{i}"]["mixer"] for i in range(5)]
    group_of = np.array([0, 0, 1, 1])  # 4 query heads over 2 KV heads
    mamba, delta, retention, mlstm = (new[f"layer_{i}"]["mixer"] for i in range(4))
    np.testing.assert_array_equal(mamba["c_proj"], np.asarray(source[0]["q_proj"]) * 8**-0.5)
    np.testing.assert_array_equal(mamba["b_proj"], np.asarray(source[0]["k_proj"])[:, group_of])
    np.testing.assert_array_equal(mamba["x_proj"], np.asarray(source[0]["v_proj"])[:, group_of])
    np.testing.assert_array_equal(mamba["out_proj"], source[0]["o_proj"])
    assert np.all(mamba["D"] == 0) and np.all(mamba["x_conv"][-1] == 1) and np.all(mamba["x_conv"][:-1] == 0)
    for mapped, i in ((delta, 1), (retention, 2), (mlstm, 3)):
        np.testing.assert_array_equal(mapped["q_proj"], source[i]["q_proj"])
        np.testing.assert_array_equal(mapped["k_proj"], np.asarray(source[i]["k_proj"])[:, group_of])
        np.testing.assert_array_equal(mapped["v_proj"], np.asarray(source[i]["v_proj"])[:, group_of])
        np.testing.assert_array_equal(mapped.get("o_proj", mapped.get("down_proj")), source[i]["o_proj"])
    assert np.all(delta["k_conv"][:-1] == 0) and np.all(delta["k_conv"][-1] == 1)
    assert hybrid.layers[3].mixer_config.layout == "dense"
    assert np.all(mlstm["out_gate"] == 0) and np.all(mlstm["out_norm"] == 2)  # sigmoid(0) * 2 = 1
    replaced_names = {f"layer_{i}" for i in range(4)}
    kept = {k: v for k, v in params.items() if k not in replaced_names}
    jax.tree.map(np.testing.assert_array_equal, {k: new[k] for k in kept}, kept)
    for i in range(4):  # MLPs and norms of replaced layers stay
        jax.tree.map(np.testing.assert_array_equal, new[f"layer_{i}"]["mlp"], params[f"layer_{i}"]["mlp"])
    logits = jax.jit(lambda p, x: DecoderLM(hybrid).apply({"params": p}, x)[0])(new, rng.integers(0, 48, (2, 12)))
    assert np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.parametrize("pattern, message", [("AZ", "'Z' unknown"), ("AMA", "3 letters do not tile 4 layers"),
                                              ("AS", "no window was given")])
def test_bad_patterns(pattern, message, rng):
    config, params = teacher(rng)
    with pytest.raises(ConfigError, match=message):
        hybrid_from_attention(config, params, layout_from_pattern(pattern, 4), jax.random.key(0))
