"""GQA -> MLA / TPLA conversion (zoo.mla_conversion): exact where the method is exact, decodable, and refused
where the source has what MLA cannot express."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from zoo.cli import main as zoo_main
from zoo.config import LayerConfig, ModelConfig
from zoo.errors import ConfigError
from zoo.layers.attention import AttentionConfig
from zoo.mla_conversion import MLAConversion, convert_model
from zoo.model import DecoderLM, init_cache, init_params
from zoo.train.checkpoint import load_model

# Float32 rounding through the reordered products (q scale folded, keys rebuilt from the SVD factors).
FLOAT32_TOLERANCE = 2e-5
FIXTURES_LLAMA = __import__("pathlib").Path(__file__).parent / "fixtures" / "hf" / "llama"


def model(rng, **attention):
    layer = LayerConfig("attention", AttentionConfig(4, 2, 16, **attention))
    config = ModelConfig(vocab_size=64, d_model=32, mlp_hidden=48, layers=(layer, layer), max_seq_len=64)
    params = jax.tree.map(np.array, init_params(config, jax.random.key(int(rng.integers(2**31)))))
    for i in range(config.n_layers):  # norms away from 1, so their mapping is exercised
        params[f"layer_{i}"]["mixer_norm"]["scale"] += 0.3 * rng.standard_normal(32).astype(np.float32)
    return config, params


def logits(config, params, ids):
    return np.asarray(DecoderLM(config).apply({"params": params}, ids)[0])


def relative_error(ours, reference):
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


@pytest.mark.parametrize("keep, scaling", [("high", None), ("norm", {"kind": "yarn", "factor": 4.0,
                                                                     "original_max_position": 16})],
                         ids=["high-plain", "norm-yarn"])
def test_full_rank_with_every_rope_pair_is_exact(keep, scaling, rng):
    config, params = model(rng, rotary_dim=8, rope_scaling=scaling)  # 4 rotated pairs + 8 unrotated features
    mla_config, mla_params, reports = convert_model(config, params, MLAConversion(rope_pairs=4, keep=keep))
    assert [l.mixer for l in mla_config.layers] == ["mla", "mla"]
    assert all(r["kv_energy_kept"] == pytest.approx(1.0) and r["cache_per_token"] == 32 + 16 for r in reports)
    ids = rng.integers(0, 64, (2, 20))
    assert relative_error(logits(mla_config, mla_params, ids), logits(config, params, ids)) <= FLOAT32_TOLERANCE


def test_kept_pairs_are_exact_whichever_each_group_keeps(rng):
    """Dropped pairs only lose their rotation; where the queries give them no weight the conversion is exact, and
    keep="norm" must find each group's live pairs."""
    config, params = model(rng)
    live = {}
    for i in range(config.n_layers):
        wq = params[f"layer_{i}"]["mixer"]["q_proj"]
        for group in range(2):
            live[i, group] = np.sort(rng.choice(8, 3, replace=False))
            dead = np.setdiff1d(np.arange(8), live[i, group])
            wq[:, 2 * group:2 * group + 2][..., np.concatenate([dead, dead + 8])] = 0.0
    mla_config, mla_params, reports = convert_model(config, params, MLAConversion(rope_pairs=3, keep="norm"))
    assert [r["rope_pairs"] for r in reports] == [[live[i, g].tolist() for g in range(2)] for i in range(2)]
    ids = rng.integers(0, 64, (2, 20))
    assert relative_error(logits(mla_config, mla_params, ids), logits(config, params, ids)) <= FLOAT32_TOLERANCE


def test_converted_model_decodes_as_it_prefills(rng):
    config, params = model(rng)
    mla_config, mla_params, _ = convert_model(config, params, MLAConversion(rank=16, rope_pairs=2))
    mla_config = mla_config.with_kernel_impl("xla")
    ids = rng.integers(0, 64, (2, 12))
    full = logits(mla_config, mla_params, ids)
    cache, steps = init_cache(mla_config, 2, 12), []
    apply = jax.jit(lambda p, tok, pos, c: DecoderLM(mla_config).apply({"params": p}, tok, positions=pos, cache=c))
    for t in range(12):
        out, cache = apply(mla_params, ids[:, t:t + 1], np.full((2, 1), t, np.int32), cache)
        steps.append(np.asarray(out[:, 0]))
    assert relative_error(np.stack(steps, 1), full) <= FLOAT32_TOLERANCE
    restored = ModelConfig.from_json(mla_config.to_json())  # rope_frequencies round-trip JSON, stay hashable
    assert restored == mla_config and hash(restored) == hash(mla_config)


def test_tpla_conversion_shares_the_mla_weights(rng):
    """TPLA loads MLA weights unchanged and prefills in MLA form (its decode approximates, per latent shard)."""
    config, params = model(rng)
    conversion = MLAConversion(rank=16, rope_pairs=2)
    mla_config, mla_params, _ = convert_model(config, params, conversion)
    tpla_config, tpla_params, _ = convert_model(config, params, MLAConversion(rank=16, rope_pairs=2, tp=2))
    assert [l.mixer for l in tpla_config.layers] == ["tpla", "tpla"]
    assert tpla_config.layers[0].mixer_config.tp == 2
    jax.tree.map(np.testing.assert_array_equal, tpla_params, mla_params)
    ids = rng.integers(0, 64, (2, 12))
    np.testing.assert_array_equal(logits(tpla_config, tpla_params, ids), logits(mla_config, mla_params, ids))


@pytest.mark.parametrize("attention, conversion, message", [
    ({"window": 8}, {}, r"layers\[0\]: has a sliding window"),
    ({"qkv_bias": True}, {}, r"layers\[0\]: has q/k/v biases"),
    ({}, {"rope_pairs": 9}, r"rope_pairs: layer 0 has only 8 RoPE pairs"),
    ({}, {"rope_pairs": 8}, r"leaves no no-RoPE features"),
    ({}, {"rank": 1000}, r"rank: layer 0's joint K/V matrix has rank at most 32"),
    ({}, {"keep": "random"}, r"keep: must be one of"),
])
def test_refuses_what_mla_cannot_express(attention, conversion, message, rng):
    config, params = model(rng, **attention)
    with pytest.raises(ConfigError, match=message):
        convert_model(config, params, MLAConversion(**conversion))


def test_cli_converts_a_hugging_face_checkpoint_to_mla(tmp_path):
    assert zoo_main(["convert", str(FIXTURES_LLAMA), "--out", str(tmp_path / "mla"), "--mla-rank", "12",
                     "--rope-pairs", "2"]) == 0
    loaded = load_model(tmp_path / "mla")
    assert [l.mixer for l in loaded.config.layers] == ["mla", "mla"] and loaded.origin is None
    assert loaded.config.layers[0].mixer_config.kv_lora_rank == 12
    reports = json.loads((tmp_path / "mla" / "mla_conversion.json").read_text())
    assert [r["cache_per_token"] for r in reports] == [12 + 2 * 2 * 2] * 2
