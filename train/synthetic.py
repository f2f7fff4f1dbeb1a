"""Training on MQAR (zoo.eval.recall.mqar_batch): the Zoology setup in which an architecture's recall is
measured by training it on the task itself, not on text.

Each batch mixes several pair counts, padded with zero-weight tokens to one length, so that one compiled step
serves them all; the loss is the cross-entropy of the queried values only. `mqar_accuracy` scores a trained
model without a tokenizer (zoo.eval.recall.mqar scores a checkpoint)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from zoo.config import ModelConfig
from zoo.eval.recall import TokenRange, mqar_batch
from zoo.model import DecoderLM, init_params


def mixed_batch(rng: np.random.Generator, rows: int, pair_counts: tuple[int, ...], tokens: TokenRange,
                length: int) -> dict[str, np.ndarray]:
    """`rows` sequences split evenly over `pair_counts`, right-padded to `length` tokens (weight 0)."""
    if rows % len(pair_counts):
        raise ValueError(f"{rows} rows do not split evenly over the pair counts {pair_counts}")
    parts = [mqar_batch(rng, rows // len(pair_counts), n, tokens) for n in pair_counts]
    if max(p["inputs"].shape[1] for p in parts) > length:
        raise ValueError(f"{max(pair_counts)} pairs need {4 * max(pair_counts) - 1} tokens, more than {length}")
    return {k: np.concatenate([np.pad(p[k], ((0, 0), (0, length - p[k].shape[1]))) for p in parts])
            for k in parts[0]}


def _loss(config: ModelConfig, params, batch):
    logits = DecoderLM(config).apply({"params": params}, batch["inputs"])[0].astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], axis=-1)[..., 0]
    return jnp.sum(nll * batch["weights"]) / jnp.sum(batch["weights"])


@functools.cache
def jitted_step(loss, config: ModelConfig, optimizer):
    """One compiled optimizer step on `loss(config, params, batch)`, per (loss, config, optimizer)."""
    @jax.jit
    def step(params, opt_state, batch):
        value, grads = jax.value_and_grad(functools.partial(loss, config))(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


def train_mqar(config: ModelConfig, *, pair_counts: tuple[int, ...], steps: int, batch_size: int = 64,
               learning_rate: float = 3e-3, warmup: int = 100, seed: int = 0, tokens: TokenRange | None = None,
               progress: bool = True, every: int = 0, callback=None):
    """Params of `config` trained on MQAR with the given pair counts (AdamW, linear warmup, cosine decay);
    keys and values are drawn from the whole vocabulary unless `tokens` says otherwise. `callback(step,
    params)` runs every `every` steps."""
    tokens = tokens or TokenRange(0, config.vocab_size)
    length = 4 * max(pair_counts) - 1
    params = init_params(config, jax.random.key(seed))
    optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(warmup, steps // 2), steps), weight_decay=0.1)
    opt_state = optimizer.init(params)
    step = jitted_step(_loss, config, optimizer)
    rng = np.random.default_rng(seed)
    bar = tqdm(range(steps), desc="mqar training", unit="step", disable=not progress)
    for i in bar:
        params, opt_state, loss = step(params, opt_state, mixed_batch(rng, batch_size, pair_counts, tokens, length))
        if progress and i % 100 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
        if every and callback and (i + 1) % every == 0:
            callback(i + 1, params)
    return params


@functools.cache
def _argmax_right(config: ModelConfig):
    def right(params, batch):
        logits = DecoderLM(config).apply({"params": params}, batch["inputs"])[0]
        return jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * batch["weights"])

    return jax.jit(right)


def mqar_accuracy(config: ModelConfig, params, pairs: int, *, examples: int = 256, seed: int = 1,
                  tokens: TokenRange | None = None) -> float:
    """The fraction of queried values that argmax predicts, over `examples` fresh sequences."""
    tokens = tokens or TokenRange(0, config.vocab_size)
    batch = mqar_batch(np.random.default_rng([seed, pairs]), examples, pairs, tokens)
    return float(_argmax_right(config)(params, batch)) / (examples * pairs)
