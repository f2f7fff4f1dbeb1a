"""DuoAttention (Xiao et al. 2024, "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and
Streaming Heads", arXiv 2410.10819): inside one attention layer, each KV head is either a retrieval head, which
attends over the whole context and keeps every token's K/V, or a streaming head, which attends only to the
sink tokens and a recent window (StreamingLLM) and keeps a constant sink_tokens + window slots.

The parameters are the attention layer's own (q/k/v/o projections, same names and shapes), so a transformer
layer becomes a DuoAttention layer by changing its config alone. Two modes:
- `retrieval_heads=None` (identification): every head computes both outputs and mixes them with a learned gate
  per KV head, alpha = clip(duo_gate, 0, 1): out = alpha * full + (1 - alpha) * streaming. The gates are trained
  to reproduce the full-attention model (zoo.train.duo) and thresholded into
- `retrieval_heads=(...)` (inference): the KV heads listed attend in full, the rest stream. The decode cache
  (DuoCache) holds full-length K/V for the retrieval heads only and a ring buffer for the streaming heads.
As in the paper, the choice is per KV head: the query heads of a GQA group share their KV head's kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import struct

from zoo.errors import ConfigError
from zoo.layers.attention import Attention, AttentionConfig
from zoo.layers.kv_cache import SlotCache
from zoo.layers.params import constrain, weight
from zoo.pallas_kernels.decode_attention import decode_attention
from zoo.pallas_kernels.flash_attention import flash_attention


@dataclass(frozen=True)
class DuoAttentionConfig(AttentionConfig):
    """`window` and `sink_tokens` are the streaming heads' (a window is required); `retrieval_heads` lists the
    KV heads that attend in full, or is None to train the per-head gates."""

    retrieval_heads: tuple[int, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.retrieval_heads is not None:  # JSON gives a list; a frozen config must stay hashable
            object.__setattr__(self, "retrieval_heads", tuple(sorted(int(h) for h in self.retrieval_heads)))

    def validate(self, field: str) -> None:
        super().validate(field)
        if self.window is None:
            raise ConfigError(f"{field}.window", "DuoAttention's streaming heads need a window")
        if self.shared_kv_source is not None:
            raise ConfigError(f"{field}.shared_kv_source", "DuoAttention layers keep their own K/V")
        heads = self.retrieval_heads
        if heads is not None and (len(set(heads)) != len(heads) or any(not 0 <= h < self.num_kv_heads for h in heads)):
            raise ConfigError(f"{field}.retrieval_heads",
                              f"must be distinct KV head indices in [0, {self.num_kv_heads}), got {list(heads)}")

    @property
    def streaming_heads(self) -> tuple[int, ...]:
        return tuple(h for h in range(self.num_kv_heads) if h not in (self.retrieval_heads or ()))


@struct.dataclass
class DuoCache:
    """Full-length K/V of the retrieval heads and a sink + window ring buffer of the streaming heads (either may
    hold zero heads)."""

    retrieval: SlotCache
    streaming: SlotCache

    def logical_axes(self) -> "DuoCache":
        return self.replace(retrieval=self.retrieval.logical_axes(), streaming=self.streaming.logical_axes())


def duo_init_cache(config: DuoAttentionConfig, batch: int, max_len: int, dtype) -> DuoCache:
    if config.retrieval_heads is None:
        raise ValueError("a DuoAttention layer decodes once its retrieval heads are chosen (retrieval_heads is None: "
                         "the layer is in gate-training mode)")
    axes = ("kv_heads", "head_dim")

    def part(heads: int, **ring):
        shape = (heads, config.head_dim)
        return SlotCache.create(batch, max_len, {"k": shape, "v": shape}, dtype, axes={"k": axes, "v": axes}, **ring)

    return DuoCache(retrieval=part(len(config.retrieval_heads)),
                    streaming=part(len(config.streaming_heads), window=config.window, sink_tokens=config.sink_tokens))


class DuoAttention(Attention):
    """The mixer protocol: `__call__(x, *, positions, segment_ids, cache=None) -> (y, cache)`."""

    config: DuoAttentionConfig

    def _attend(self, q, k, v, positions, segment_ids, k_positions, k_segments, sinks, *, streaming: bool,
                decoding: bool = False):
        cfg = self.config
        masking = dict(scale=cfg.head_dim**-0.5, window=cfg.window if streaming else None,
                       sink_tokens=cfg.sink_tokens if streaming else 0, sink_logits=sinks)
        if decoding:  # over the written cache in place, in its own dtype (as Attention's decode)
            return decode_attention(q[:, 0], k, v, k_positions, k_segments, positions[:, 0], segment_ids[:, 0],
                                    impl=cfg.impl, **masking)[:, None].astype(self.dtype)
        return flash_attention(q, k.astype(self.dtype), v.astype(self.dtype), positions, segment_ids, k_positions,
                               k_segments, impl=cfg.impl if q.shape[1] > 1 else "xla", **masking)

    @nn.compact
    def __call__(self, x, *, positions, segment_ids, cache=None):
        cfg = self.config
        x = x.astype(self.dtype)
        q = constrain(self._rope(self._project("q_proj", x, cfg.num_heads, "heads"), positions),
                      ("batch", "length", "heads", "head_dim"))
        k = constrain(self._rope(self._project("k_proj", x, cfg.num_kv_heads, "kv_heads"), positions),
                      ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(self._project("v_proj", x, cfg.num_kv_heads, "kv_heads"), ("batch", "length", "kv_heads", "head_dim"))
        sinks = None
        if cfg.sink_logits:
            sinks = weight(self, "sink_logits", (cfg.num_heads,), ("heads",), init=nn.initializers.zeros, dtype=self.param_dtype)
        groups = cfg.num_heads // cfg.num_kv_heads
        decoding = cache is not None and x.shape[1] == 1

        if cfg.retrieval_heads is None:
            if cache is not None:
                raise ValueError("a DuoAttention layer in gate-training mode (retrieval_heads=None) has no decode cache")
            full, streaming = (self._attend(q, k, v, positions, segment_ids, positions, segment_ids, sinks, streaming=s)
                               for s in (False, True))
            gate = weight(self, "duo_gate", (cfg.num_kv_heads,), ("kv_heads",), init=nn.initializers.ones,
                          dtype=self.param_dtype)
            alpha = jnp.repeat(jnp.clip(gate.astype(jnp.float32), 0.0, 1.0), groups)[:, None]  # [H, 1]
            out = (alpha * full.astype(jnp.float32) + (1.0 - alpha) * streaming.astype(jnp.float32)).astype(full.dtype)
            new_cache = None
        else:
            parts, new_parts = [], {}
            for kind, kv_heads in (("retrieval", cfg.retrieval_heads), ("streaming", cfg.streaming_heads)):
                if not kv_heads:
                    new_parts[kind] = None if cache is None else getattr(cache, kind)
                    continue
                kv_index = np.array(kv_heads)
                q_index = np.array([h * groups + g for h in kv_heads for g in range(groups)])
                kh, vh = k[:, :, kv_index], v[:, :, kv_index]
                if cache is None:
                    view_k, view_v, view_pos, view_seg = kh, vh, positions, segment_ids
                else:
                    part = getattr(cache, kind)
                    new_parts[kind] = part.write({"k": kh, "v": vh}, positions, segment_ids)
                    if decoding:  # written first, read in place (Attention's decode)
                        written = new_parts[kind]
                        view_k, view_v = written.entries["k"], written.entries["v"]
                        view_pos, view_seg = written.positions, written.segment_ids
                    else:
                        entries, view_pos, view_seg = part.view({"k": kh, "v": vh}, positions, segment_ids)
                        view_k, view_v = entries["k"], entries["v"]
                out_part = self._attend(q[:, :, q_index], view_k, view_v, positions, segment_ids, view_pos, view_seg,
                                        None if sinks is None else sinks[q_index], streaming=kind == "streaming",
                                        decoding=decoding)
                parts.append((q_index, out_part))
            order = np.concatenate([index for index, _ in parts])
            out = jnp.concatenate([o for _, o in parts], axis=2)[:, :, np.argsort(order)]
            new_cache = None if cache is None else DuoCache(**new_parts)
        o_proj = weight(self, "o_proj", (cfg.num_heads, cfg.head_dim, self.d_model), ("heads", "head_dim", "embed"),
                        fan_in_axes=2, dtype=self.param_dtype)
        return jnp.einsum("bthk,hkd->btd", out, o_proj.astype(self.dtype)), new_cache

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        return duo_init_cache(self.config, batch, max_len, dtype)
