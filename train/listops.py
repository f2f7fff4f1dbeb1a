"""ListOps as Long Range Arena builds it (Nangia & Bowman 2018; Tay et al. 2021, "Long Range Arena"), and a
classifier trained on it (zoo.classifier), for comparing mixers on long hierarchical sequences.

The grammar: an expression is a digit 0-9 or `[OP e1 ... ek ]` with 2 <= k <= max_args sub-expressions, OP one
of MIN, MAX, MED (the median, rounded down when k is even: LRA's int(np.median)) and SM (the sum modulo 10).
LRA's generator makes a node an operator with probability 0.25 (a digit otherwise, always at max_depth = 10),
up to max_args = 10, and keeps drawing whole trees until one has min_length..max_length tokens (500..2000);
its parentheses (a binary-tree print) are dropped, as the S4 and LRA input pipelines drop them. The label is
the expression's value: ten classes.

A tree that passes max_length while it is drawn is abandoned at once: it would be rejected anyway, so the
accepted trees are distributed exactly as LRA's, at a fraction of the cost of finishing the huge ones."""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from zoo.classifier import SequenceClassifier
from zoo.config import ModelConfig
from zoo.train.synthetic import jitted_step

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VOCAB = ("<pad>", *"0123456789", *OPERATORS, END)  # token id = index; <pad> is 0
TOKEN_IDS = {token: i for i, token in enumerate(VOCAB)}
NUM_CLASSES = 10
OPERATOR_P = 0.25  # LRA's VALUE_P: a node below max_depth is an operator with this probability


def apply_operator(operator: str, values: list[int]) -> int:
    if operator == "[MIN":
        return min(values)
    if operator == "[MAX":
        return max(values)
    if operator == "[MED":
        ordered = sorted(values)
        middle = len(ordered) // 2
        return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) // 2
    if operator == "[SM":
        return sum(values) % 10
    raise ValueError(f"unknown ListOps operator {operator!r}; known: {OPERATORS}")


class _TooLong(Exception):
    pass


def _draw_tree(rng: np.random.Generator, depth: int, max_depth: int, max_args: int, tokens: list[str],
               max_length: int) -> int:
    """Appends one expression's tokens to `tokens`; returns its value."""
    if depth >= max_depth or rng.random() >= OPERATOR_P:
        digit = int(rng.integers(10))
        tokens.append(str(digit))
        return digit
    operator_at = len(tokens)
    tokens.append("")  # the operator is drawn after its arguments, as in LRA
    values = []
    for _ in range(int(rng.integers(2, max_args + 1))):
        values.append(_draw_tree(rng, depth + 1, max_depth, max_args, tokens, max_length))
        if len(tokens) > max_length:
            raise _TooLong
    operator = OPERATORS[int(rng.integers(len(OPERATORS)))]
    tokens[operator_at] = operator
    tokens.append(END)
    return apply_operator(operator, values)


def draw_expression(rng: np.random.Generator, *, min_length: int = 500, max_length: int = 2000, max_depth: int = 10,
                    max_args: int = 10) -> tuple[list[str], int]:
    """(tokens, value) of one tree with min_length..max_length tokens."""
    if not 1 <= min_length <= max_length:
        raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")
    while True:
        tokens: list[str] = []
        try:
            value = _draw_tree(rng, 0, max_depth, max_args, tokens, max_length)
        except _TooLong:
            continue
        if min_length <= len(tokens) <= max_length:
            return tokens, value


def encode(tokens: list[str]) -> np.ndarray:
    return np.array([TOKEN_IDS[t] for t in tokens], np.int32)


def _draw_rows(seed: tuple[int, ...], rows: int, length: int, kwargs: dict) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    inputs = np.zeros((rows, length), np.int32)
    labels = np.zeros(rows, np.int32)
    for i in range(rows):
        tokens, labels[i] = draw_expression(rng, **kwargs)
        inputs[i, : len(tokens)] = encode(tokens)
    return inputs, labels


def make_split(seed: int, rows: int, *, min_length: int = 500, max_length: int = 2000, max_depth: int = 10,
               max_args: int = 10, workers: int | None = None, progress: bool = False) -> dict[str, np.ndarray]:
    """`rows` expressions right-padded with <pad> (0) to max_length: {"inputs" [rows, max_length] int32, "labels"
    [rows] int32}. Drawn in blocks of 256 rows over `workers` processes (default: every core); the result depends
    on the seed only, not on the number of workers."""
    kwargs = dict(min_length=min_length, max_length=max_length, max_depth=max_depth, max_args=max_args)
    blocks = [(seed, start) for start in range(0, rows, 256)]
    sizes = [min(256, rows - start) for _, start in blocks]
    workers = workers or os.cpu_count() or 1
    draw = functools.partial(_draw_rows, length=max_length, kwargs=kwargs)
    bar = tqdm(total=rows, desc="drawing ListOps", unit="row", disable=not progress)
    parts = []
    if workers == 1 or len(blocks) == 1:
        for block, size in zip(blocks, sizes):
            parts.append(draw(block, size))
            bar.update(size)
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:  # JAX's threads forbid fork
            for part, size in zip(pool.map(draw, blocks, sizes), sizes):
                parts.append(part)
                bar.update(size)
    bar.close()
    return {"inputs": np.concatenate([p[0] for p in parts]), "labels": np.concatenate([p[1] for p in parts])}


def _loss(config: ModelConfig, params, batch):
    logits = SequenceClassifier(config, NUM_CLASSES).apply({"params": params}, batch["inputs"])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["labels"][:, None], axis=-1)
    return jnp.mean(nll)


@functools.cache
def _predict(config: ModelConfig):
    return jax.jit(lambda params, inputs: jnp.argmax(SequenceClassifier(config, NUM_CLASSES).apply({"params": params}, inputs), -1))


def accuracy(config: ModelConfig, params, split: dict[str, np.ndarray], batch_size: int = 64) -> float:
    """Argmax accuracy over the whole split (the last batch padded with repeated rows, which are not counted)."""
    rows = len(split["labels"])
    right = 0
    for start in range(0, rows, batch_size):
        inputs = split["inputs"][start:start + batch_size]
        size = len(inputs)
        inputs = np.concatenate([inputs, np.repeat(inputs[-1:], batch_size - size, axis=0)])
        right += int(np.sum(np.asarray(_predict(config)(params, inputs))[:size] == split["labels"][start:start + size]))
    return right / rows


def _learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then cosine decay to 0 at `total`."""
    if step < warmup:
        return peak * step / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train_classifier(config: ModelConfig, train: dict[str, np.ndarray], *, steps: int, seconds: float | None = None,
                     batch_size: int = 32, learning_rate: float = 1e-3, weight_decay: float = 0.05, warmup: int = 500,
                     seed: int = 0, progress: bool = True, every: int = 0, callback=None):
    """(params of SequenceClassifier(config, 10) trained on `train`, steps taken): AdamW with gradients clipped
    to norm 1, linear warmup then cosine decay, shuffled epochs. With `seconds`, the run is shortened to end in
    about that time: the step rate is measured from step 10 (at step 40, then every 200 steps) and the schedule
    decays to 0 at the step the time allows. `callback(step, params, loss)` runs every `every` steps."""
    warmup = min(warmup, steps // 2)
    params = nn.unbox(SequenceClassifier(config, NUM_CLASSES).init(jax.random.key(seed), train["inputs"][:1])["params"])
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=weight_decay))
    opt_state = optimizer.init(params)
    step = jitted_step(_loss, config, optimizer)
    rng = np.random.default_rng(seed)
    order = np.empty(0, np.int64)
    started = time.perf_counter()
    total, i = steps, 0
    bar = tqdm(total=total, desc="listops training", unit="step", disable=not progress)
    while i < total:
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(len(train["labels"]))])
        rows, order = order[:batch_size], order[batch_size:]
        opt_state[1].hyperparams["learning_rate"] = jnp.asarray(_learning_rate(i, total, learning_rate, warmup))
        params, opt_state, loss = step(params, opt_state, {k: v[rows] for k, v in train.items()})
        i += 1
        bar.update()
        if i == 10:
            jax.block_until_ready(loss)
            timed_from = time.perf_counter()
        if seconds is not None and (i == 40 or (i > 40 and i % 200 == 0)):  # re-measured: other jobs may share
            jax.block_until_ready(loss)                                      # the device, and start after us
            per_step = (time.perf_counter() - timed_from) / (i - 10)
            total = max(i, min(steps, i + int((seconds - (time.perf_counter() - started)) / per_step)))
            bar.total = total
        if progress and i % 50 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
        if every and callback and i % every == 0:
            callback(i, params, float(loss))
    bar.close()
    return params, total
