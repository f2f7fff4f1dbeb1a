"""Position-indexed decode caches shared by the attention family (GQA, sliding window, MLA, TPLA).

A cache row holds one sequence. Token at position p goes to slot p (full-context attention) or, with a
sliding window, to a ring buffer of `sink_tokens + window` slots: positions below `sink_tokens`
keep their own slot forever (StreamingLLM's attention sinks) and the rest rotate through the
`window` remaining slots. Memory is therefore constant however long decoding runs.
Empty slots have position -1 and are masked out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class SlotCache:
    entries: dict[str, jax.Array]  # each [batch, slots, ...]
    positions: jax.Array  # [batch, slots] int32, -1 where empty
    segment_ids: jax.Array  # [batch, slots] int32
    window: int | None = struct.field(pytree_node=False, default=None)
    sink_tokens: int = struct.field(pytree_node=False, default=0)
    # Logical axis names of each entry's trailing (per-token) dims, e.g. (("k", ("kv_heads", "head_dim")),).
    entry_axes: tuple = struct.field(pytree_node=False, default=())

    @classmethod
    def create(cls, batch: int, max_len: int, shapes: dict[str, tuple], dtype, *, window=None, sink_tokens=0,
               axes: dict[str, tuple] | None = None):
        """`shapes` maps entry name to its per-token shape, e.g. {"k": (kv_heads, head_dim)};
        `axes` gives the logical names of those dims (unsharded where omitted)."""
        slots = max_len if window is None else sink_tokens + window
        axes = axes or {}
        return cls(
            entries={name: jnp.zeros((batch, slots, *shape), dtype) for name, shape in shapes.items()},
            positions=jnp.full((batch, slots), -1, jnp.int32),
            segment_ids=jnp.zeros((batch, slots), jnp.int32),
            window=window,
            sink_tokens=sink_tokens,
            entry_axes=tuple((name, tuple(axes.get(name, (None,) * len(shape)))) for name, shape in shapes.items()),
        )

    def logical_axes(self) -> "SlotCache":
        """The same pytree with each array replaced by its logical axis names (for NamedSharding)."""
        per_entry = dict(self.entry_axes)
        return self.replace(
            entries={name: ("cache_batch", "cache_length", *per_entry[name]) for name in self.entries},
            positions=("cache_batch", "cache_length"),
            segment_ids=("cache_batch", "cache_length"),
        )

    @property
    def num_slots(self) -> int:
        return self.positions.shape[1]

    def view(self, new_entries: dict[str, jax.Array], positions: jax.Array, segment_ids: jax.Array):
        """Keys visible to the new tokens: every cached slot followed by the new tokens themselves.

        Attending over this view and only then writing keeps a multi-token chunk exact even when
        the ring buffer overwrites slots that earlier tokens of the chunk still see.
        """
        entries = {
            name: jnp.concatenate([self.entries[name], new_entries[name].astype(self.entries[name].dtype)], axis=1)
            for name in self.entries
        }
        return (
            entries,
            jnp.concatenate([self.positions, positions.astype(jnp.int32)], axis=1),
            jnp.concatenate([self.segment_ids, segment_ids.astype(jnp.int32)], axis=1),
        )

    def write(self, new_entries: dict[str, jax.Array], positions: jax.Array, segment_ids: jax.Array) -> "SlotCache":
        positions = positions.astype(jnp.int32)
        keep = positions >= 0
        if self.window is None:
            slot = positions
        else:
            newest = jnp.max(positions, axis=1, keepdims=True)
            keep &= (positions < self.sink_tokens) | (positions > newest - self.window)
            slot = jnp.where(
                positions < self.sink_tokens,
                positions,
                self.sink_tokens + (positions - self.sink_tokens) % self.window,
            )
        slot = jnp.where(keep, slot, self.num_slots)  # out of range: dropped by mode="drop"
        if slot.shape[1] > 1:  # one new token per row (decode) cannot collide with itself
            slot = last_writer_only(slot, self.num_slots)

        def put(buffer, index, values):
            return jax.vmap(lambda b, i, v: b.at[i].set(v.astype(b.dtype), mode="drop"))(buffer, index, values)

        return self.replace(
            entries={name: put(self.entries[name], slot, new_entries[name]) for name in self.entries},
            positions=put(self.positions, slot, positions),
            segment_ids=put(self.segment_ids, slot, segment_ids.astype(jnp.int32)),
        )


def last_writer_only(slot: jax.Array, num_slots: int) -> jax.Array:
    """slot [batch, T] in [0, num_slots] -> the same with num_slots (dropped) for every token that a later
    token of its row writes over. Several new tokens can map to one slot (packed documents restart their
    positions; a ring buffer wraps within a chunk), and a scatter with repeated indices leaves which one
    lands unspecified (GPUs pick any): the last one must, as if the tokens were written one by one."""
    order = jnp.broadcast_to(jnp.arange(slot.shape[1], dtype=jnp.int32), slot.shape)
    last = jax.vmap(lambda s, o: jnp.full((num_slots + 1,), -1, jnp.int32).at[s].max(o))(slot, order)
    return jnp.where(jnp.take_along_axis(last, slot, axis=1) == order, slot, num_slots)


@struct.dataclass
class EmptyCache:
    """The cache of a layer that reads another layer's KV (MixAttention sharing): it holds nothing."""
