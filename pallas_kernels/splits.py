"""Split-K (flash-decoding) shared by the decode kernels: how many programs share a row's slots, and how
their partial softmaxes are combined."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zoo.pallas_kernels.tiles import MASKED


def default_splits(rows: int, slots: int, block: int, target_programs: int = 264) -> int:
    """Enough splits that rows x splits reach ~2 per streaming multiprocessor of an H100 (132) when rows
    alone do not, without splits shorter than 8 blocks. rows: the caches read independently (batch rows,
    times key heads where each has its own cache)."""
    return max(1, min(target_programs // max(rows, 1), slots // (8 * block)))


def combine_splits(partial, lse, sink_logits=None):
    """Splits' normalised outputs [B, splits, H, D] weighted by their share of the softmax mass
    (log-sum-exp [B, splits, H]); sink_logits [H] join the softmax as a zero-valued entry of each row."""
    if partial.shape[1] == 1 and sink_logits is None:  # one split: its weight is 1 (an empty row's output is 0)
        return partial[:, 0]
    if sink_logits is not None:
        sinks = jnp.broadcast_to(sink_logits.astype(jnp.float32)[None, None, :], (lse.shape[0], 1, lse.shape[2]))
        weights = jax.nn.softmax(jnp.concatenate([lse, sinks], axis=1), axis=1)[:, :-1]
    else:
        weights = jax.nn.softmax(lse, axis=1)
    return jnp.einsum("bsh,bshd->bhd", weights, partial)


def split_result(acc, running_max, total):
    """A split's online softmax finished in the kernel: (normalised output, log-sum-exp). A split that saw no
    slot gives zeros and MASKED (no weight in combine_splits). running_max and total are [rows] or broadcast
    against acc as they are (the TPU kernels keep them [rows, 1])."""
    empty = total == 0.0
    safe_total = jnp.where(empty, 1.0, total)
    column = (lambda x: x) if total.ndim == acc.ndim else (lambda x: x[:, None])
    out = jnp.where(column(empty), 0.0, acc / column(safe_total))
    return out, jnp.where(empty, MASKED, running_max + jnp.log(safe_total))
