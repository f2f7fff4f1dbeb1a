"""`zoo demo`: train a tiny byte-level model on the embedded default corpus (the Python standard
library's source) on CPU, report held-out loss, save a checkpoint and generate a sample.

A deliberately small loop; the sharded training loop (train/) is its own piece of work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from zoo import checkpoint
from zoo.corpus import load_stdlib_corpus
from zoo.generate import Generator, Sampling
from zoo.model import DecoderLM, count_params, init_params
from zoo.presets import get_preset
from zoo.tokenizer import ByteTokenizer


@dataclass(frozen=True)
class DemoSettings:
    preset: str = "gqa-tiny"
    steps: int = 600
    batch_size: int = 32
    seq_len: int = 128
    learning_rate: float = 3e-3
    warmup_steps: int = 100  # capped at steps // 10 for short runs
    eval_windows: int = 128
    seed: int = 0
    prompt: str = "def "
    sample_tokens: int = 200


def next_token_loss(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _windows(data: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    return np.stack([data[s : s + length + 1] for s in starts]).astype(np.int32)


def run_demo(settings: DemoSettings, out_dir: str | Path, log=print) -> dict:
    out_dir = Path(out_dir)
    tokenizer = ByteTokenizer()
    config = get_preset(settings.preset)
    if config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"preset {settings.preset} has vocab {config.vocab_size}; the byte tokenizer needs 259")
    config = config.replace(max_seq_len=max(config.max_seq_len, settings.seq_len + settings.sample_tokens + 16))

    corpus = load_stdlib_corpus()
    log(
        f"corpus: Python {corpus.root} -> {corpus.train.size / 1e6:.1f} MB train ({corpus.train_files} modules), "
        f"{corpus.heldout.size / 1e6:.2f} MB held out ({corpus.heldout_files} other modules)"
    )
    log(f"model: {settings.preset}, {count_params(config):,} parameters")

    model = DecoderLM(config)
    params = init_params(config, jax.random.key(settings.seed))
    warmup = min(settings.warmup_steps, max(1, settings.steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, settings.learning_rate, warmup, max(settings.steps, warmup + 1), settings.learning_rate * 0.1
    )
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.95, weight_decay=0.1))
    opt_state = optimizer.init(params)

    def loss_fn(params, batch):
        logits, _ = model.apply({"params": params}, batch[:, :-1])
        return next_token_loss(logits, batch[:, 1:])

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    eval_loss = jax.jit(loss_fn)
    stride = settings.seq_len + 1
    count = min(settings.eval_windows, (corpus.heldout.size - 1) // stride)
    # Spread over the whole held-out stream, so every held-out module is represented.
    starts = np.linspace(0, corpus.heldout.size - stride, count).astype(np.int64)
    heldout = jnp.asarray(_windows(corpus.heldout, starts, settings.seq_len))

    def heldout_loss(params) -> float:
        return float(np.mean([eval_loss(params, heldout[i : i + 32]) for i in range(0, count, 32)]))

    rng = np.random.default_rng(settings.seed)
    initial = heldout_loss(params)
    tokens_per_step = settings.batch_size * settings.seq_len
    start = time.perf_counter()
    bar = tqdm(range(settings.steps), desc="training", unit="step", dynamic_ncols=True)
    for step in bar:
        starts = rng.integers(0, corpus.train.size - stride, settings.batch_size)
        params, opt_state, loss = train_step(params, opt_state, jnp.asarray(_windows(corpus.train, starts, settings.seq_len)))
        loss.block_until_ready()  # so the bar's rate and ETA measure compute, not dispatch
        if step % 25 == 0 or step == settings.steps - 1:
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{float(loss):.3f}", tok_s=f"{tokens_per_step * (step + 1) / elapsed:,.0f}")
    bar.close()
    if not np.isfinite(float(loss)):
        raise FloatingPointError(f"training diverged: loss {float(loss)} at the last step; nothing was saved")
    final = heldout_loss(params)
    log(f"held-out loss: {initial:.3f} -> {final:.3f} nats/byte ({final / np.log(2):.3f} bits/byte)")

    ckpt = checkpoint.save(out_dir / "checkpoint", params, config,
                           metadata={"steps": settings.steps, "heldout_loss": final, "preset": settings.preset})
    log(f"checkpoint: {ckpt}")

    generator = Generator(config, params, pad_id=tokenizer.pad_id)
    prompt = tokenizer.encode(settings.prompt)
    sample = generator([prompt], settings.sample_tokens, Sampling(temperature=0.8, top_k=40), seed=settings.seed)[0]
    text = settings.prompt + tokenizer.decode(sample)
    log("sample (temperature 0.8, top-k 40):\n" + text)
    return {"initial_loss": initial, "heldout_loss": final, "checkpoint": str(ckpt), "sample": text}
