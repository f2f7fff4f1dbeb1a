"""ListOps (train/listops.py): the generator's labels against an independent evaluator, its lengths and tokens
against LRA's settings, and the classifier it trains."""

from __future__ import annotations

import dataclasses
import statistics

import jax
import numpy as np
import pytest

from zoo.classifier import SequenceClassifier
from zoo.config import LayerConfig, ModelConfig
from zoo.layers.attention import AttentionConfig
from zoo.layers.s4d import S4DConfig
from zoo.train.listops import VOCAB, draw_expression, encode, make_split, train_classifier, accuracy

REDUCE = {"[MIN": min, "[MAX": max, "[SM": lambda v: sum(v) % 10,
          "[MED": lambda v: int(statistics.median(v))}  # as LRA: int(np.median), the mean of the middle two floored


def evaluate(tokens: list[str]) -> int:
    """Evaluates a token list with an explicit stack (the generator evaluates its tree recursively)."""
    stack: list = []
    for token in tokens:
        if token == "]":
            args = []
            while not isinstance(stack[-1], str):
                args.append(stack.pop())
            stack.append(REDUCE[stack.pop()](args[::-1]))
        else:
            stack.append(token if token.startswith("[") else int(token))
    assert len(stack) == 1, tokens
    return stack[0]


def test_labels_agree_with_an_independent_evaluator(rng):
    ops = set()
    for _ in range(300):
        tokens, value = draw_expression(rng, min_length=5, max_length=300, max_depth=6, max_args=6)
        assert evaluate(tokens) == value
        assert 5 <= len(tokens) <= 300
        ops |= {t for t in tokens if t.startswith("[")}
    assert ops == {"[MIN", "[MAX", "[MED", "[SM"}


def test_lra_lengths_and_depth(rng):
    for _ in range(3):
        tokens, value = draw_expression(rng)  # LRA: 500..2000 tokens, depth 10, 10 arguments
        assert 500 <= len(tokens) <= 2000 and evaluate(tokens) == value
        depth = deepest = 0
        for t in tokens:
            depth += t.startswith("[") - (t == "]")
            deepest = max(deepest, depth)
        assert deepest <= 10


def test_split_is_padded_and_independent_of_workers(rng):
    seed = int(rng.integers(1 << 30))
    one = make_split(seed, 300, min_length=20, max_length=64, workers=1)
    two = make_split(seed, 300, min_length=20, max_length=64, workers=2)
    np.testing.assert_array_equal(one["inputs"], two["inputs"])
    np.testing.assert_array_equal(one["labels"], two["labels"])
    for row, label in zip(one["inputs"], one["labels"]):
        real = row[row != 0]
        assert 20 <= len(real) and np.all(row[len(real):] == 0)  # right padding only
        assert evaluate([VOCAB[i] for i in real]) == label
    assert len(set(one["labels"].tolist())) > 3


def classifier_config(mixer: str) -> ModelConfig:
    layer = (LayerConfig("s4d", S4DConfig(state_dim=16, chunk_size=16), mlp=False) if mixer == "s4d"
             else LayerConfig("attention", AttentionConfig(2, 2, 16)))
    return ModelConfig(vocab_size=len(VOCAB), d_model=32, mlp_hidden=64, layers=(layer, layer), max_seq_len=64)


@pytest.mark.parametrize("mixer", ["s4d", "attention"])
def test_padding_changes_no_logit(mixer, rng):
    """f32: the pooled mean over 1 vs 3 rows of padding differs only by rounding (1e-5)."""
    config = classifier_config(mixer)
    tokens = encode(draw_expression(rng, min_length=10, max_length=30)[0])
    model = SequenceClassifier(config, 10)
    params = model.init(jax.random.key(int(rng.integers(1 << 30))), tokens[None])["params"]
    apply = jax.jit(model.apply)
    short = np.zeros((1, 32), np.int32)
    long = np.zeros((1, 48), np.int32)
    short[0, :len(tokens)] = long[0, :len(tokens)] = tokens
    np.testing.assert_allclose(apply({"params": params}, short), apply({"params": params}, long),
                               rtol=1e-5, atol=1e-5)


def test_s4d_fft_form_gives_the_chunked_logits(rng):
    """A ListOps row is one sequence then padding, so the FFT form (which ignores the padding boundary) and the
    chunked form (which resets there) give the same logits: padding is left out of the pooled mean (f32: 1e-5)."""
    config = classifier_config("s4d")
    fft_layer = dataclasses.replace(config.layers[0], mixer_config=dataclasses.replace(
        config.layers[0].mixer_config, convolution="fft"))
    fft_config = dataclasses.replace(config, layers=(fft_layer,) * config.n_layers)
    tokens = np.zeros((3, 64), np.int32)
    for row in tokens:
        expression = encode(draw_expression(rng, min_length=10, max_length=60)[0])
        row[:len(expression)] = expression
    params = SequenceClassifier(config, 10).init(jax.random.key(int(rng.integers(1 << 30))), tokens)["params"]
    chunked = SequenceClassifier(config, 10).apply({"params": params}, tokens)
    fft = SequenceClassifier(fft_config, 10).apply({"params": params}, tokens)
    np.testing.assert_allclose(fft, chunked, rtol=1e-5, atol=1e-5)


def test_s4d_classifier_fits_a_small_split(rng):
    """Training works end to end: S4D fits 64 short expressions (training accuracy) far above the 10% of chance."""
    config = classifier_config("s4d")
    train = make_split(int(rng.integers(1 << 30)), 64, min_length=3, max_length=32, max_depth=2, max_args=4, workers=1)
    params, _ = train_classifier(config, train, steps=150, batch_size=16, learning_rate=1e-2, warmup=10,
                              seed=int(rng.integers(1 << 30)), progress=False)
    assert accuracy(config, params, train, batch_size=16) >= 0.5
