"""Prefill + decode generation with jit-compiled steps: greedy, temperature, top-k and top-p.

Prompts of different lengths are left-padded; padding gets position -1 and segment 0, so it is
never cached and never attended to. The prefill is one jitted call; the decode loop is one jitted
`lax.while_loop` that stops when every row has produced EOS or the token budget is spent.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from zoo.config import ModelConfig
from zoo.model import DecoderLM, init_cache
from zoo.pallas_kernels.decode_attention.ops import BLOCKS

CACHE_BLOCK = BLOCKS["tpu"]  # slots a decode cache is allocated in


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables (nucleus sampling)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """Temperature, then top-k, then top-p; removed tokens get -inf. logits [B, V] float32."""
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        sorted_logits = jnp.where(mass_before >= sampling.top_p, -jnp.inf, sorted_logits)  # keeps the top token
        logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return logits


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)


def _left_pad(prompts: list[list[int]], pad_id: int, multiple: int = 8):
    longest = max(len(p) for p in prompts)
    width = -(-longest // multiple) * multiple  # bucketed, to bound recompilation
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    positions = np.full((len(prompts), width), -1, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = prompt
        positions[row, width - len(prompt):] = np.arange(len(prompt))
    return jnp.asarray(tokens), jnp.asarray(positions)


class Generator:
    """`Generator(config, params)(prompts, max_new_tokens, sampling, seed)` -> new tokens per row."""

    def __init__(self, config: ModelConfig, params, *, eos_id: int | None = None, pad_id: int = 0):
        self.config, self.params, self.eos_id, self.pad_id = config, params, eos_id, pad_id
        self.model = DecoderLM(config)

    @partial(jax.jit, static_argnums=(0, 5, 6))
    def _run(self, params, tokens, positions, key, max_new_tokens: int, sampling: Sampling):
        batch, width = tokens.shape
        segments = (positions >= 0).astype(jnp.int32)
        # Whole decode blocks: the TPU decode kernels then tile the caches without a padded copy each step.
        cache = init_cache(self.config, batch, -(-(width + max_new_tokens) // CACHE_BLOCK) * CACHE_BLOCK)
        logits, cache = self.model.apply({"params": params}, tokens, positions=positions, segment_ids=segments, cache=cache)
        next_position = jnp.max(positions, axis=1) + 1
        key, sub = jax.random.split(key)
        first = sample(logits[:, -1], sub, sampling)
        out = jnp.full((batch, max_new_tokens), self.pad_id, jnp.int32).at[:, 0].set(first)
        eos = -1 if self.eos_id is None else self.eos_id
        state = (1, first, next_position, first == eos, cache, out, key)

        def keep_going(state):
            step, _, _, done, *_ = state
            return (step < max_new_tokens) & ~jnp.all(done)

        def decode(state):
            step, token, position, done, cache, out, key = state
            logits, cache = self.model.apply(
                {"params": params}, token[:, None], positions=position[:, None],
                segment_ids=jnp.ones((batch, 1), jnp.int32), cache=cache,
            )
            key, sub = jax.random.split(key)
            token = jnp.where(done, self.pad_id, sample(logits[:, -1], sub, sampling))
            out = out.at[:, step].set(token)
            return step + 1, token, position + 1, done | (token == eos), cache, out, key

        return jax.lax.while_loop(keep_going, decode, state)[5]

    def __call__(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(), seed: int = 0):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        longest = max(len(p) for p in prompts) + max_new_tokens
        if longest > self.config.max_seq_len:
            raise ValueError(
                f"prompt + max_new_tokens = {longest} tokens exceeds the model's max_seq_len={self.config.max_seq_len}"
            )
        tokens, positions = _left_pad(prompts, self.pad_id)
        out = np.asarray(self._run(self.params, tokens, positions, jax.random.key(seed), max_new_tokens, sampling))
        rows = []
        for row in out:
            row = row.tolist()
            if self.eos_id is not None and self.eos_id in row:
                row = row[: row.index(self.eos_id) + 1]
            rows.append(row)
        return rows
