"""What every recurrent mixer (Mamba-2, S4D, Gated DeltaNet, RetNet, xLSTM) shares: the decode cache,
document boundaries, the causal short convolution, the naive scan driver and chunking.

Documents. A recurrent state never crosses a document boundary: token t continues the state left by
token t-1 only when both carry the same segment id, otherwise it starts from the zero state. This
is the recurrent counterpart of the attention mask (packed rows and left-padded prompts both work).
The cache remembers the segment ids of the last tokens it saw, so a later call knows whether its
first token continues them.

Three forms. Each mixer writes its recurrence once as a one-token `step(state, inputs_t, carry_t)`.
`naive_scan` runs that step token by token: the specification. The chunked form (each mixer's own,
in plain JAX) is the fast training form, and single-token decode calls `step` directly. Tests
assert the three agree.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from zoo.errors import ConfigError
from zoo.layers.params import weight
from zoo.pallas_kernels.dispatch import IMPLS

NO_SEGMENT = -1  # segment id of "no token": nothing continues it
NEG_LOG = -1e30  # log of a zero weight; finite so that max / exp / gradients stay NaN-free


@struct.dataclass
class RecurrentCache:
    """Fixed-size decode state of one recurrent layer; its size does not depend on context length."""

    state: dict[str, jax.Array]  # the recurrence's state, float32 (e.g. {"ssm": [B, heads, state, head_dim]})
    conv: dict[str, jax.Array]  # each [B, conv_width - 1, ...]: the last inputs of a short convolution
    segments: jax.Array  # [B, history] segment ids of the most recent tokens, newest last; NO_SEGMENT if none
    state_axes: tuple = struct.field(pytree_node=False, default=())  # ((name, logical axes), ...)
    conv_axes: tuple = struct.field(pytree_node=False, default=())

    @classmethod
    def create(cls, batch: int, *, state: dict[str, tuple[tuple, tuple]], conv: dict[str, tuple[tuple, tuple]] | None = None,
               conv_width: int = 1, dtype=jnp.float32):
        """`state` and `conv` map a name to (per-row shape, logical axes). Recurrent state is float32
        whatever `dtype` is (it accumulates over the whole context); conv inputs use `dtype`."""
        conv = conv or {}
        history = max(conv_width - 1, 1)
        return cls(
            state={n: jnp.zeros((batch, *s), jnp.float32) for n, (s, _) in state.items()},
            conv={n: jnp.zeros((batch, conv_width - 1, *s), dtype) for n, (s, _) in conv.items()},
            segments=jnp.full((batch, history), NO_SEGMENT, jnp.int32),
            state_axes=tuple((n, ("cache_batch", *a)) for n, (_, a) in state.items()),
            conv_axes=tuple((n, ("cache_batch", None, *a)) for n, (_, a) in conv.items()),
        )

    def logical_axes(self) -> "RecurrentCache":
        """The same pytree with each array replaced by its logical axis names (for NamedSharding)."""
        return self.replace(state=dict(self.state_axes), conv=dict(self.conv_axes), segments=("cache_batch", None))

    @property
    def last_segment(self) -> jax.Array:
        return self.segments[:, -1]

    def advance(self, state: dict, conv: dict, segment_ids: jax.Array) -> "RecurrentCache":
        history = self.segments.shape[1]
        segments = jnp.concatenate([self.segments, segment_ids.astype(jnp.int32)], axis=1)[:, -history:]
        return self.replace(state=state, conv=conv, segments=segments)


def continues(segment_ids: jax.Array, last_segment: jax.Array | None) -> jax.Array:
    """[B, T] bool: token t carries on the state of the token before it (same document)."""
    segment_ids = segment_ids.astype(jnp.int32)
    if last_segment is None:
        last_segment = jnp.full(segment_ids.shape[:1], NO_SEGMENT, jnp.int32)
    previous = jnp.concatenate([last_segment[:, None].astype(jnp.int32), segment_ids[:, :-1]], axis=1)
    return segment_ids == previous


def short_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, segment_ids: jax.Array,
               past: jax.Array | None = None, past_segments: jax.Array | None = None):
    """Causal depthwise convolution y_t = sum_j kernel[j] x_{t-W+1+j} (+ bias), never across documents.

    x [B, T, ...channels], kernel [W, ...channels]; `past` [B, W-1, ...] are the inputs before x with
    their segment ids (zeros / NO_SEGMENT when starting fresh). Returns y (float32) and the new `past`.
    """
    width = kernel.shape[0]
    batch, length = x.shape[:2]
    if past is None:
        past = jnp.zeros((batch, width - 1, *x.shape[2:]), x.dtype)
        past_segments = jnp.full((batch, width - 1), NO_SEGMENT, jnp.int32)
    inputs = jnp.concatenate([past.astype(x.dtype), x], axis=1)
    segments = jnp.concatenate([past_segments[:, -(width - 1):].astype(jnp.int32), segment_ids.astype(jnp.int32)], axis=1)
    extra = (1,) * (x.ndim - 2)
    y = jnp.zeros(x.shape, jnp.float32)
    for j in range(width):
        same = (segments[:, j : j + length] == segment_ids).reshape(batch, length, *extra)
        y = y + jnp.where(same, inputs[:, j : j + length].astype(jnp.float32), 0.0) * kernel[j].astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y, inputs[:, length:]


def naive_scan(step: Callable, state, inputs: tuple, carry: jax.Array):
    """Run `step(state, inputs_t, carry_t) -> (state, output_t)` over time. inputs: arrays [B, T, ...];
    carry [B, T]. Returns (outputs [B, T, ...], final state)."""
    time_major = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), (inputs, carry))
    state, outputs = jax.lax.scan(lambda s, xs: step(s, *xs[0], xs[1]), state, time_major)
    return jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), outputs), state


class ChunkMasks(NamedTuple):
    """Document structure of a chunked sequence (N chunks of C tokens)."""

    same: jax.Array  # [B, N, C, C] token s (column) is visible to token t (row): s <= t, same document
    from_prev: jax.Array  # [B, N, C] token t continues the state entering its chunk
    to_last: jax.Array  # [B, N, C] token s is in the document of the chunk's last token
    keep: jax.Array  # [B, N] the state entering the chunk survives to its end


def chunk(x: jax.Array, size: int, pad_value=0) -> jax.Array:
    """[B, T, ...] -> [B, N, size, ...], padding T up to a multiple of size.

    pad_value="edge" repeats the last entry (segment ids: padding continues the last document, so
    padded tokens with zero inputs and zero log-decay leave the final state untouched)."""
    pad = -x.shape[1] % size
    widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x, widths, mode="edge") if pad_value == "edge" else jnp.pad(x, widths, constant_values=pad_value)
    return x.reshape(x.shape[0], x.shape[1] // size, size, *x.shape[2:])


def unchunk(x: jax.Array, length: int) -> jax.Array:
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def chunk_masks(segments: jax.Array, last_segment: jax.Array | None) -> ChunkMasks:
    """segments: chunked segment ids [B, N, C]; last_segment [B] (the token before the sequence)."""
    batch, n, c = segments.shape
    if last_segment is None:
        last_segment = jnp.full((batch,), NO_SEGMENT, jnp.int32)
    prev = jnp.concatenate([last_segment[:, None].astype(jnp.int32), segments[:, :-1, -1]], axis=1)  # [B, N]
    causal = jnp.tril(jnp.ones((c, c), bool))
    same = (segments[:, :, :, None] == segments[:, :, None, :]) & causal
    last = segments[:, :, -1:]
    return ChunkMasks(same, segments == prev[:, :, None], segments == last, last[:, :, 0] == prev)


def chunk_size_for(length: int, chunk_size: int) -> int:
    """Chunks never exceed the sequence: a short call (decode, small prefill) is one exact chunk."""
    return max(1, min(chunk_size, length))


FORMS = ("chunked", "naive")


def recur(form: str, step: Callable, chunked: Callable, inputs: tuple, segment_ids, state, last_segment, chunk_size: int):
    """Run a recurrence in the requested form. A one-token call always runs `step` (decode)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if form == "naive" or segment_ids.shape[1] == 1:
        return naive_scan(step, state, inputs, continues(segment_ids, last_segment))
    return chunked(*inputs, segment_ids, state, last_segment, chunk_size)


def require_impl(config, field: str) -> None:
    """The `impl` field of a mixer config: which scan implementation its training form runs."""
    if config.impl not in IMPLS:
        raise ConfigError(f"{field}.impl", f"must be one of {IMPLS}, got {config.impl!r}")


def require_positive(config, field: str, *names: str) -> None:
    for name in names:
        if getattr(config, name) <= 0:
            raise ConfigError(f"{field}.{name}", f"must be positive, got {getattr(config, name)}")


def conv_uniform_init(width: int):
    """PyTorch's Conv1d default for a depthwise conv (fan_in = width): U(-1/sqrt(width), 1/sqrt(width))."""
    bound = width**-0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv_silu(module, name: str, x: jax.Array, axes: tuple, *, width: int, bias: bool, segment_ids, cache):
    """A named short convolution followed by SiLU (the Mamba / DeltaNet / xLSTM input path).

    Creates `{name}_conv` [width, ...channels] (and `{name}_conv_bias`); returns (y in float32: it
    feeds the recurrence and its gates, which amplify rounding; past inputs in x's dtype)."""
    init = conv_uniform_init(width)
    channels = x.shape[2:]
    kernel = weight(module, f"{name}_conv", (width, *channels), (None, *axes), init=init, dtype=module.param_dtype)
    b = weight(module, f"{name}_conv_bias", channels, axes, init=init, dtype=module.param_dtype) if bias else None
    past, past_segments = (None, None) if cache is None else (cache.conv[name], cache.segments)
    y, past = short_conv(x, kernel, b, segment_ids, past, past_segments)
    return jax.nn.silu(y), past
