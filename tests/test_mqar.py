"""MQAR (Zoology): the same two-layer model, its second layer attention or a small-state Gated DeltaNet, trained
on the task (train/synthetic.py) and scored on fresh sequences.

Attention keeps every pair and recalls all of them (~100%); the delta-rule layer's state (one head, keys of
width 8) holds a few associations, so its accuracy falls as the pairs grow. The first layer of both is
Mamba-2, whose short convolution hands each value the key before it: with attention in both layers, the
two-layer induction circuit takes far longer to form (bench/mqar_recipe.py measured 0.76 / 0.53 / 0.35 / 0.23
at 2 / 4 / 8 / 16 pairs after 3,000 steps on a CPU, against 100% at 750 steps for this model; other seeds need up to ~1,500). Slow: ~7 minutes on 2 CPU cores;
`make test-all` runs it."""

from __future__ import annotations

import numpy as np
import pytest

from zoo.config import LayerConfig, ModelConfig
from zoo.layers.attention import AttentionConfig
from zoo.layers.gated_deltanet import GatedDeltaNetConfig
from zoo.layers.mamba2 import Mamba2Config
from zoo.train.synthetic import mqar_accuracy, train_mqar

PAIRS = (2, 4, 8, 16)
D_MODEL = 64


def two_layers(second: LayerConfig) -> ModelConfig:
    first = LayerConfig("mamba2", Mamba2Config(num_heads=2, head_dim=16, state_dim=8, num_groups=1, chunk_size=32))
    return ModelConfig(vocab_size=64, d_model=D_MODEL, mlp_hidden=2 * D_MODEL, layers=(first, second),
                       max_seq_len=4 * max(PAIRS))


@pytest.mark.slow
def test_attention_recalls_every_pair_and_a_small_state_falls_behind(rng):
    seed = int(rng.integers(1 << 30))
    attention = two_layers(LayerConfig("attention", AttentionConfig(4, 4, 16)))
    recurrent = two_layers(LayerConfig("gated_deltanet", GatedDeltaNetConfig(num_heads=1, head_dim=8, chunk_size=32)))
    scores = {}
    for name, config in (("attention", attention), ("recurrent", recurrent)):
        params = train_mqar(config, pair_counts=PAIRS, steps=1500, learning_rate=3e-3, seed=seed, progress=False)
        scores[name] = np.array([mqar_accuracy(config, params, n, examples=256, seed=seed + 1) for n in PAIRS])
    print(scores)
    assert np.all(scores["attention"] >= 0.97), scores
    assert np.all(np.diff(scores["recurrent"]) < 0), scores  # every doubling of the pairs loses accuracy
    assert scores["recurrent"][-1] < 0.6 * scores["attention"][-1], scores
