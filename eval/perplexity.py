"""Perplexity and bits per byte of a model on text, by sliding-window evaluation.

A text longer than the model's context is scored in windows of `context` tokens that start `stride` tokens
apart (the "strided" evaluation of fixed-length models, as in Hugging Face's perplexity guide): each window
scores only the targets that no earlier window scored, so every token is scored exactly once, and all but the
first `context` of them with at least `context - stride` tokens of history. stride == context is plain
non-overlapping chunking (fast, each chunk starts cold); a smaller stride costs context / stride times the
compute and gets closer to the model's full-context perplexity.

The text is one document: it starts with the tokenizer's BOS token where it has one (as `zoo train` packs
documents), so that its first token is scored too. Bits per byte = total negative log-likelihood / (ln 2 x the
UTF-8 bytes scored), comparable across tokenizers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from zoo.config import ModelConfig
from zoo.errors import ConfigError
from zoo.eval.loglikelihood import compiled_token_scores
from zoo.tokenizer import Tokenizer
from zoo.train.mesh import LOGICAL_RULES, data_parallel_size, host_array, local_rows
from zoo.train.step import put_batch


@dataclass(frozen=True)
class Window:
    begin: int  # first input token
    end: int  # one past the last input token; targets are ids[begin + 1 : end + 1]
    first_scored: int  # targets before this index (into ids) were scored by an earlier window


def sliding_windows(n_targets: int, context: int, stride: int) -> list[Window]:
    """Windows over ids[0 : n_targets + 1] that score targets 1..n_targets, each exactly once."""
    if context < 1 or not 1 <= stride <= context:
        raise ConfigError("stride", f"must be between 1 and the context ({context}), got {stride}")
    windows, scored_to = [], 1  # target index (into ids) up to which scores exist
    begin = 0
    while scored_to <= n_targets:
        end = min(begin + context, n_targets)
        windows.append(Window(begin, end, scored_to))
        scored_to = end + 1
        begin += stride
    return windows


@dataclass(frozen=True)
class PerplexityResult:
    source: str
    tokens: int  # targets scored
    bytes: int  # UTF-8 bytes those targets cover
    nll: float  # total negative log-likelihood, nats
    perplexity: float  # exp(nll / tokens)
    bits_per_byte: float
    context: int
    stride: int
    windows: int

    def to_dict(self) -> dict:
        return asdict(self)


def _window_batch(ids: np.ndarray, windows: list[Window], context: int, rows: int) -> dict[str, np.ndarray]:
    """`rows` rows of `context` tokens: one per window, zero-weight padding for the rest (and past a short
    window's end)."""
    batch = {k: np.zeros((rows, context), np.int32) for k in ("inputs", "targets", "positions")}
    batch["segment_ids"] = np.zeros((rows, context), np.int32)
    batch["weights"] = np.zeros((rows, context), np.float32)
    for row, w in enumerate(windows):
        length = w.end - w.begin
        batch["inputs"][row, :length] = ids[w.begin:w.end]
        batch["targets"][row, :length] = ids[w.begin + 1:w.end + 1]
        batch["positions"][row, :length] = np.arange(length)
        batch["segment_ids"][row, :length] = 1
        batch["weights"][row, w.first_scored - w.begin - 1:length] = 1.0
    return batch


def perplexity(config: ModelConfig, params, tokenizer: Tokenizer, text: str, *, mesh: Mesh, source: str = "<text>",
               context: int | None = None, stride: int | None = None, batch_size: int = 8,
               progress: bool = True) -> PerplexityResult:
    """Sliding-window perplexity and bits per byte of `text` (see the module docstring). `context` defaults to
    the model's max_seq_len, `stride` to half the context; batches of `batch_size` windows are split over the
    mesh's data and fsdp axes."""
    context = context or config.max_seq_len
    stride = stride or max(1, context // 2)
    if context > config.max_seq_len:
        raise ConfigError("context", f"{context} tokens is longer than the model supports (max_seq_len "
                                     f"{config.max_seq_len})")
    if batch_size % data_parallel_size(mesh):
        raise ConfigError("batch_size", f"{batch_size} must split over the data x fsdp axes "
                                        f"({data_parallel_size(mesh)} devices)")
    if not text:
        raise ValueError(f"{source}: no text to score")
    bos = getattr(tokenizer, "bos_id", None)
    ids = np.asarray(tokenizer.encode(text, bos=bos is not None), np.int32)
    if len(ids) < 2:
        raise ValueError(f"{source}: {len(ids)} token(s); perplexity needs at least two")
    scored_bytes = len(text.encode("utf-8"))
    if bos is None:  # the first token has no history to be scored from
        scored_bytes -= len(tokenizer.decode(ids[:1].tolist()).encode("utf-8"))
    windows = sliding_windows(len(ids) - 1, context, stride)
    scores = compiled_token_scores(config)
    total = 0.0
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        for start in tqdm(range(0, len(windows), batch_size), desc=f"perplexity {source}", unit="batch",
                          disable=not progress or jax.process_index() > 0):
            batch = _window_batch(ids, windows[start:start + batch_size], context, batch_size)
            local = local_rows(batch, batch_size)
            logprob = host_array(scores(params, put_batch(local, mesh))[0])
            total -= float(np.sum(logprob * batch["weights"], dtype=np.float64))
    tokens = len(ids) - 1
    return PerplexityResult(source=source, tokens=tokens, bytes=scored_bytes, nll=total,
                            perplexity=math.exp(total / tokens), bits_per_byte=total / (math.log(2) * scored_bytes),
                            context=context, stride=stride, windows=len(windows))

