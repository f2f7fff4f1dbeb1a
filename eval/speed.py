"""Generation throughput and decode-state memory versus context length, and their plot for several models.

For each context length L: the prefill of a batch of L-token prompts into the cache (tokens/s = batch x L /
the median time), then `decode_tokens` greedy decode steps from that cache in one jitted loop (tokens/s =
batch x decode_tokens / the median time), and the bytes of the decode state that a cache for L tokens holds
(attention's KV grows with L, a recurrent layer's state does not). Times are medians over `repeats` calls
after one compiling call; the prompts are random tokens (speed does not depend on them). A decode call starts
from the prefilled cache without donating it, so its time includes one copy of the cache (small against
`decode_tokens` steps that each read all of it).
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from zoo.config import ModelConfig
from zoo.model import DecoderLM, init_cache


def cache_bytes(config: ModelConfig, batch: int, length: int) -> int:
    shapes = jax.eval_shape(lambda: init_cache(config, batch, length))
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes)))


@functools.cache
def _programs(config: ModelConfig, decode_tokens: int):
    model = DecoderLM(config)

    @jax.jit
    def prefill(params, tokens):
        batch, length = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
        cache = init_cache(config, batch, length + decode_tokens)
        logits, cache = model.apply({"params": params}, tokens, positions=positions,
                                    segment_ids=jnp.ones_like(tokens), cache=cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    @jax.jit
    def decode(params, token, position, cache):
        def step(i, carry):
            token, cache = carry
            logits, cache = model.apply({"params": params}, token[:, None], positions=(position + i)[:, None],
                                        segment_ids=jnp.ones((token.shape[0], 1), jnp.int32), cache=cache)
            return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

        return jax.lax.fori_loop(0, decode_tokens, step, (token, cache))[0]

    return prefill, decode


def _median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(config: ModelConfig, params, *, lengths: list[int], batch: int = 1, decode_tokens: int = 32,
            repeats: int = 5, seed: int = 0, progress: bool = True) -> list[dict]:
    """One row per context length: prefill and decode tokens/s, and the decode state's bytes."""
    for length in lengths:
        if length + decode_tokens > config.max_seq_len:
            raise ValueError(f"speed: {length} context + {decode_tokens} decoded tokens is longer than the model "
                             f"supports (max_seq_len {config.max_seq_len})")
    prefill, decode = _programs(config, decode_tokens)
    rng = np.random.default_rng(seed)
    rows = []
    for length in tqdm(lengths, desc="speed", unit="length", disable=not progress):
        tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch, length)), jnp.int32)
        prefill_s = _median_seconds(lambda t=tokens: prefill(params, t), repeats)
        token, cache = prefill(params, tokens)
        position = jnp.full((batch,), length, jnp.int32)
        decode_s = _median_seconds(lambda: decode(params, token, position, cache), repeats)
        rows.append({"context": length, "batch": batch, "prefill_seconds": prefill_s,
                     "prefill_tokens_per_s": batch * length / prefill_s, "decode_tokens": decode_tokens,
                     "decode_seconds": decode_s, "decode_tokens_per_s": batch * decode_tokens / decode_s,
                     "cache_bytes": cache_bytes(config, batch, length)})
    return rows


def plot(results: dict[str, list[dict]], path, title: str = "") -> None:
    """Prefill tokens/s, decode tokens/s and decode-state MiB against context, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("prefill_tokens_per_s", "prefill tokens/s"), ("decode_tokens_per_s", "decode tokens/s"),
              ("cache_bytes", "decode state (MiB)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for name, rows in results.items():
            scale = 2**-20 if key == "cache_bytes" else 1.0
            ax.plot([r["context"] for r in rows], [r[key] * scale for r in rows], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
