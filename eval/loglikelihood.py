"""Batched, sharded log-likelihoods of continuations given contexts: the one scorer behind the multiple-choice
tasks, LAMBADA and the lm-evaluation-harness adapter.

A request is (context tokens, continuation tokens). Its score is the sum over the continuation of
log p(token | everything before it) and whether greedy decoding would have produced the whole continuation
(lm-evaluation-harness's `is_greedy`). Each request is one row: the context and the continuation concatenated,
right-padded with zero-weight tokens to a bucketed width (powers of two, so a task compiles a handful of
programs, not one per length). Rows are sorted by length so that a batch pads little; results come back in
request order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from zoo.config import ModelConfig
from zoo.errors import ConfigError
from zoo.model import DecoderLM
from zoo.train.mesh import LOGICAL_RULES, data_parallel_size, host_array, local_rows
from zoo.train.step import put_batch, token_losses

MIN_WIDTH = 16


@dataclass(frozen=True)
class Request:
    context: tuple[int, ...]  # may be empty only if the continuation has two or more tokens
    continuation: tuple[int, ...]


@dataclass(frozen=True)
class Score:
    logprob: float  # sum of log p over the continuation (nats)
    is_greedy: bool  # argmax decoding reproduces the continuation
    tokens: int  # continuation tokens scored
    truncated: bool  # the oldest context tokens were dropped to fit the model


def too_long(what: str, tokens: int, limit: int, hint: str = "") -> ConfigError:
    return ConfigError(what, f"{tokens} tokens is longer than the model supports (max_seq_len {limit}, so at most "
                             f"{limit + 1} tokens a row){hint}")


@functools.cache
def compiled_token_scores(config: ModelConfig):
    """(log p of each target, target == argmax) [B, L] per config: one compile per config and width."""

    def scores(params, batch):
        logits = DecoderLM(config).apply({"params": params}, batch["inputs"], positions=batch["positions"],
                                         segment_ids=batch["segment_ids"])[0]
        greedy = jnp.argmax(logits, axis=-1) == batch["targets"]
        return -token_losses(logits, batch["targets"])[0], greedy

    return jax.jit(scores)


def encode_pair(tokenizer, context: str, continuation: str) -> Request:
    """lm-evaluation-harness's split of a (context, continuation) pair into tokens: trailing spaces of the
    context move to the continuation, the pair is encoded whole, and the continuation is whatever follows the
    context's own tokens (so a tokenizer that merges across the boundary scores what it would have generated).
    The context starts with BOS where the tokenizer has one, as `zoo train` packs documents."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    bos = getattr(tokenizer, "bos_id", None) is not None
    whole = tokenizer.encode(context + continuation, bos=bos)
    head = len(tokenizer.encode(context, bos=bos))
    return Request(tuple(whole[:head]), tuple(whole[head:]))


def bucket_width(length: int, limit: int) -> int:
    width = MIN_WIDTH
    while width < length:
        width *= 2
    return min(width, limit)


def fit(request: Request, limit: int, truncate: bool, what: str = "request") -> tuple[list[int], int]:
    """(token row, number of continuation tokens) with at most limit + 1 tokens: the model reads `limit` of them
    and predicts the last `limit`. Too long: an error, or with `truncate` the oldest tokens dropped (the
    continuation is kept whole; one longer than the model's context is an error either way)."""
    row = list(request.context) + list(request.continuation)
    n = len(request.continuation)
    if n == 0:
        raise ValueError(f"{what}: an empty continuation has no likelihood to score")
    if len(row) < 2 or n > len(row) - 1:
        raise ValueError(f"{what}: the first token has no history; give a context (or a tokenizer with BOS)")
    if len(row) > limit + 1:
        if not truncate or n > limit:
            raise too_long(what, len(row), limit, "" if truncate else "; pass --truncate to drop the oldest context "
                           "tokens instead, as lm-evaluation-harness does")
        row = row[-(limit + 1):]
    return row, n


def token_scores(config: ModelConfig, params, rows: list[list[int]], *, mesh: Mesh, batch_size: int = 8,
                 progress: bool = True, desc: str = "scoring") -> list[tuple[np.ndarray, np.ndarray]]:
    """For each token row (at most max_seq_len + 1 tokens): log p of tokens 1.. given those before them, and
    whether each is the argmax ([len - 1] each). Batches of `batch_size` rows split over the mesh's data and
    fsdp axes."""
    if batch_size % data_parallel_size(mesh):
        raise ConfigError("batch_size", f"{batch_size} must split over the data x fsdp axes "
                                        f"({data_parallel_size(mesh)} devices)")
    limit = config.max_seq_len
    for i, row in enumerate(rows):
        if len(row) > limit + 1:
            raise too_long(f"row {i}", len(row), limit)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out: list = [None] * len(rows)
    fn = compiled_token_scores(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch",
                          disable=not progress or jax.process_index() > 0):
            chosen = order[start:start + batch_size]
            width = bucket_width(max(len(rows[i]) - 1 for i in chosen), limit)
            batch = _batch([rows[i] for i in chosen], width, batch_size)
            logprob, greedy = (host_array(a) for a in fn(params, put_batch(local_rows(batch, batch_size), mesh)))
            for slot, i in enumerate(chosen):
                out[i] = logprob[slot, :len(rows[i]) - 1], greedy[slot, :len(rows[i]) - 1]
    return out


def score_requests(config: ModelConfig, params, requests: list[Request], *, mesh: Mesh, batch_size: int = 8,
                   truncate: bool = False, progress: bool = True, desc: str = "scoring",
                   names: list[str] | None = None) -> list[Score]:
    """One Score per request, in order; `names[i]` says where request i came from in errors (e.g.
    "arc_easy.jsonl line 12")."""
    fitted = [fit(r, config.max_seq_len, truncate, names[i] if names else f"request {i}")
              for i, r in enumerate(requests)]
    per_token = token_scores(config, params, [row for row, _ in fitted], mesh=mesh, batch_size=batch_size,
                             progress=progress, desc=desc)
    return [Score(logprob=float(np.sum(logprob[-n:], dtype=np.float64)), is_greedy=bool(np.all(greedy[-n:])),
                  tokens=n, truncated=len(row) < len(r.context) + n)
            for (row, n), (logprob, greedy), r in zip(fitted, per_token, requests, strict=True)]


def _batch(rows: list[list[int]], width: int, batch_size: int) -> dict[str, np.ndarray]:
    """Right-padded rows; padding is segment 0, which nothing attends to or carries state from."""
    batch = {k: np.zeros((batch_size, width), np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
    for slot, row in enumerate(rows):
        length = len(row) - 1
        batch["inputs"][slot, :length] = row[:-1]
        batch["targets"][slot, :length] = row[1:]
        batch["positions"][slot, :length] = np.arange(length)
        batch["segment_ids"][slot, :length] = 1
    return batch

