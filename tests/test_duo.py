"""DuoAttention conversion and retrieval-head identification (zoo.train.duo, `zoo convert --duo`): the converted
model with every head retrieval is the transformer; the passkey data marks the key's positions; the gate
training drives heads that do not affect the output to 0 and keeps those that do; the CLI writes a loadable
checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from zoo.cli import main as zoo_main
from zoo.config import LayerConfig, ModelConfig
from zoo.layers.attention import AttentionConfig
from zoo.model import DecoderLM, init_params
from zoo.tokenizer import ByteTokenizer
from zoo.train.checkpoint import load_model
from zoo.train.duo import choose_retrieval_heads, duo_config, identify_retrieval_heads, passkey_batch

FIXTURES_LLAMA = Path(__file__).parent / "fixtures" / "hf" / "llama"
KV_HEADS = 4


def transformer(rng):
    layer = LayerConfig("attention", AttentionConfig(8, KV_HEADS, 8))
    window = LayerConfig("attention", AttentionConfig(8, KV_HEADS, 8, window=16))  # not converted: already streaming
    config = ModelConfig(vocab_size=260, d_model=32, mlp_hidden=64, layers=(layer, window, layer), max_seq_len=256)
    return config, jax.tree.map(np.array, init_params(config, jax.random.key(int(rng.integers(1 << 30)))))


def test_all_retrieval_heads_is_the_transformer(rng):
    config, params = transformer(rng)
    duo = duo_config(config, window=8, sink_tokens=2, retrieval_heads={0: tuple(range(KV_HEADS)), 2: tuple(range(KV_HEADS))})
    assert [l.mixer for l in duo.layers] == ["duo_attention", "attention", "duo_attention"]
    tokens = rng.integers(0, 260, (2, 40))
    ours = np.asarray(jax.jit(DecoderLM(duo).apply)({"params": params}, tokens)[0])
    theirs = np.asarray(jax.jit(DecoderLM(config).apply)({"params": params}, tokens)[0])
    assert np.max(np.abs(ours - theirs)) <= 1e-5 * np.max(np.abs(theirs))  # float32


def test_passkey_batch_weights_the_positions_before_each_key_token(rng):
    tokenizer = ByteTokenizer()
    batch = passkey_batch(tokenizer, rng, 3, 200)
    for tokens, weights in zip(batch["tokens"], batch["weights"]):
        marked = np.flatnonzero(weights)
        key = tokenizer.decode(tokens[marked + 1].tolist())
        assert key.startswith(" ") and key[1:].isdigit() and len(key) == 6, key
        assert f"The pass key is {key[1:]}." in tokenizer.decode(tokens[:marked[0]].tolist())


def test_gates_fall_for_heads_that_change_nothing_and_stay_for_those_that_do(rng):
    """Layer 0's KV heads 1 and 3 have their output projections zeroed: no distillation gradient reaches their
    gates, and the L1 term takes them to 0. The other heads' streaming output differs from their full output on
    200-token sequences with a window of 8, so their gates stay above."""
    config, params = transformer(rng)
    o_proj = params["layer_0"]["mixer"]["o_proj"]
    for head in (1, 3):
        o_proj[2 * head:2 * head + 2] = 0  # the two query heads of KV head `head`
    gates = identify_retrieval_heads(config, params, ByteTokenizer(), window=8, sink_tokens=2, steps=40,
                                     batch_size=2, length=200, learning_rate=0.05, l1=0.002,
                                     seed=int(rng.integers(1 << 30)), progress=False)
    assert sorted(gates) == [0, 2] and all(np.all((g >= 0) & (g <= 1)) for g in gates.values())
    silent = gates[0][[1, 3]]
    active = np.concatenate([gates[0][[0, 2]], gates[2]])
    assert np.all(silent == 0) and np.min(active) > np.max(silent), gates
    chosen = choose_retrieval_heads(gates, fraction=6 / 8)
    assert chosen == {0: (0, 2), 2: (0, 1, 2, 3)}, gates
    assert choose_retrieval_heads(gates, threshold=0.0) == chosen


def test_cli_converts_a_hugging_face_checkpoint_to_duo_attention(tmp_path):
    out = tmp_path / "duo"
    assert zoo_main(["convert", str(FIXTURES_LLAMA), "--out", str(out), "--duo", "--duo-steps", "3",
                     "--duo-length", "96", "--duo-batch", "1", "--duo-window", "8", "--duo-sinks", "2",
                     "--duo-retrieval", "0.5"]) == 0
    loaded = load_model(out)
    report = json.loads((out / "duo_heads.json").read_text())
    layers = loaded.config.layers
    assert {l.mixer for l in layers} == {"duo_attention"} and loaded.origin is None
    assert sum(len(l.mixer_config.retrieval_heads) for l in layers) == report["retrieval_kv_heads"]
    assert report["retrieval_kv_heads"] == round(0.5 * report["kv_heads"])
    assert all(l.mixer_config.window == 8 and l.mixer_config.sink_tokens == 2 for l in layers)
