"""Softmax attention family: GQA / MQA / MHA with RoPE, sliding window with attention sinks, and
MixAttention KV sharing across layers.

- GQA (Ainslie et al. 2023): `num_kv_heads` divides `num_heads`; MQA is num_kv_heads=1, MHA equal.
- Sliding window (Beltagy et al. 2020) with attention sinks of two kinds, combinable:
  StreamingLLM sink tokens (Xiao et al. 2023): the first `sink_tokens` positions stay visible to
  every query; learned sink logits (as in gpt-oss): a per-head logit that joins the softmax
  denominator with a zero value, so a head can attend "nowhere".
  Decode keeps a ring buffer of sink_tokens + window slots (see kv_cache.py). Positions are the
  text positions (no re-indexing inside the cache), so decode equals the training forward.
- MixAttention (Rajput et al. 2024, after Character.AI): a layer with `shared_kv_source=j` has no
  K/V projections and no cache of its own; it attends its own queries over layer j's keys/values.

Causality, windows, sinks and document boundaries are all decided from positions and segment ids
(zoo.pallas_kernels.flash_attention.masking): packed documents must restart positions at 0 and carry
distinct segment ids. Training and prefill run zoo.pallas_kernels.flash_attention; single-token decode
writes the token into the cache and runs zoo.pallas_kernels.decode_attention over the cache in place
(`impl`: "auto" is the Pallas kernels on GPUs and TPUs and this file's dense softmax elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from zoo.errors import ConfigError
from zoo.layers.kv_cache import EmptyCache, SlotCache
from zoo.layers.params import constrain, weight
from zoo.layers.rope import RopeScaling, apply_rope
from zoo.pallas_kernels.decode_attention import decode_attention
from zoo.pallas_kernels.dispatch import IMPLS
from zoo.pallas_kernels.flash_attention import flash_attention
from zoo.pallas_kernels.flash_attention.masking import visible

MASKED = -1e30  # finite, so a row with nothing visible stays NaN-free


@dataclass(frozen=True)
class AttentionConfig:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_base: float = 10000.0
    rotary_dim: int | None = None  # partial RoPE: rotate only this many leading features
    rope_scaling: RopeScaling | None = None  # long-context frequency scaling (linear, llama3, yarn)
    window: int | None = None  # sliding window length (query sees positions p-window+1 .. p)
    sink_tokens: int = 0  # StreamingLLM: first positions every query keeps seeing
    sink_logits: bool = False  # learned per-head sink logit in the softmax denominator
    shared_kv_source: int | None = None  # MixAttention: reuse this earlier layer's K/V
    qkv_bias: bool = False
    impl: str = "auto"  # training / prefill attention: "auto" (Pallas on GPUs), "xla", "pallas", "interpret"

    def __post_init__(self):
        object.__setattr__(self, "rope_scaling", RopeScaling.coerce(self.rope_scaling))

    def validate(self, field: str) -> None:
        for name in ("num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{field}.{name}", f"must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{field}.num_heads",
                f"{self.num_heads} heads are not divisible by num_kv_heads={self.num_kv_heads}",
            )
        if self.window is not None and self.window <= 0:
            raise ConfigError(f"{field}.window", f"must be a positive length or null, got {self.window}")
        if self.sink_tokens < 0:
            raise ConfigError(f"{field}.sink_tokens", f"must be >= 0, got {self.sink_tokens}")
        if self.sink_tokens and self.window is None:
            raise ConfigError(f"{field}.sink_tokens", "sink tokens only make sense with a sliding window")
        if self.impl not in IMPLS:
            raise ConfigError(f"{field}.impl", f"must be one of {IMPLS}, got {self.impl!r}")
        rotary = self.head_dim if self.rotary_dim is None else self.rotary_dim
        if not 0 < rotary <= self.head_dim or rotary % 2:
            raise ConfigError(f"{field}.rotary_dim", f"must be even and in (0, {self.head_dim}], got {rotary}")
        if self.rope_scaling is not None:
            self.rope_scaling.validate(f"{field}.rope_scaling")

    def kv_layout(self) -> dict:
        """What a layer reading this layer's K/V must agree with: cache shape, window, and the RoPE
        its (already rotated) keys carry."""
        names = ("num_kv_heads", "head_dim", "window", "sink_tokens", "rope_base", "rotary_dim", "rope_scaling")
        return {name: getattr(self, name) for name in names}


@struct.dataclass
class KVView:
    """The keys and values one attention call attended over, with their positions and segments."""

    k: jax.Array  # [B, S, kv_heads, head_dim]
    v: jax.Array
    positions: jax.Array  # [B, S]
    segment_ids: jax.Array  # [B, S]


def attention_mask(q_pos, q_seg, k_pos, k_seg, *, window=None, sink_tokens=0) -> jax.Array:
    """[B, T, S] visibility: same document, causal by position, inside the window or a sink."""
    return visible(q_pos[:, :, None], q_seg[:, :, None], k_pos[:, None, :], k_seg[:, None, :], window=window,
                   sink_tokens=sink_tokens)


def dot_product_attention(q, k, v, mask, *, scale: float, sink_logits=None) -> jax.Array:
    """Grouped softmax attention. q [B,T,H,D], k [B,S,KV,D], v [B,S,KV,Dv], mask [B,T,S].

    Logits and softmax in float32; `sink_logits` [H] adds exp(sink) to each row's denominator.
    """
    batch, length, heads, _ = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    q = q.reshape(batch, length, kv_heads, groups, q.shape[-1])
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None, None], logits, MASKED)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    if sink_logits is not None:
        sink = sink_logits.astype(jnp.float32).reshape(1, kv_heads, groups, 1, 1)
        row_max = jnp.maximum(row_max, sink)
    # The softmax does not depend on the subtracted max; without its gradient, none can be NaN (jnp.max's
    # gradient divides by the count of entries equal to the max, 0 if XLA rounds a recomputed logit differently).
    row_max = jax.lax.stop_gradient(row_max)
    unnormalised = jnp.exp(logits - row_max)
    denominator = jnp.sum(unnormalised, axis=-1, keepdims=True)
    if sink_logits is not None:
        denominator = denominator + jnp.exp(sink - row_max)
    probs = (unnormalised / denominator).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(batch, length, heads, v.shape[-1])


def attention_init_cache(config: AttentionConfig, batch: int, max_len: int, dtype) -> SlotCache | EmptyCache:
    if config.shared_kv_source is not None:
        return EmptyCache()
    per_token = (config.num_kv_heads, config.head_dim)
    axes = ("kv_heads", "head_dim")
    return SlotCache.create(
        batch, max_len, {"k": per_token, "v": per_token}, dtype, window=config.window, sink_tokens=config.sink_tokens,
        axes={"k": axes, "v": axes},
    )


class Attention(nn.Module):
    """`__call__(x, *, positions, segment_ids, cache=None) -> (y, cache)`, the mixer protocol.

    Two keywords serve MixAttention only: `return_kv=True` also returns the KVView this layer
    attended over, and a sharing layer receives that view as `shared_kv`.
    """

    config: AttentionConfig
    d_model: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _project(self, name: str, x, heads: int, heads_axis: str):
        cfg = self.config
        kernel = weight(
            self, name, (self.d_model, heads, cfg.head_dim), ("embed", heads_axis, "head_dim"), dtype=self.param_dtype
        )
        y = jnp.einsum("btd,dhk->bthk", x, kernel.astype(self.dtype))
        if cfg.qkv_bias:
            bias = weight(
                self, f"{name}_bias", (heads, cfg.head_dim), (heads_axis, "head_dim"),
                init=nn.initializers.zeros, dtype=self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y

    def _rope(self, x, positions):
        cfg = self.config
        return apply_rope(x, positions, base=cfg.rope_base, rotary_dim=cfg.rotary_dim, scaling=cfg.rope_scaling)

    @nn.compact
    def __call__(self, x, *, positions, segment_ids, cache=None, shared_kv: KVView | None = None, return_kv=False):
        cfg = self.config
        x = x.astype(self.dtype)
        q = self._rope(self._project("q_proj", x, cfg.num_heads, "heads"), positions)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        decoding = cache is not None and x.shape[1] == 1

        if cfg.shared_kv_source is not None:
            if shared_kv is None:
                raise ValueError(f"this layer reads layer {cfg.shared_kv_source}'s KV but no shared_kv was passed")
            view, new_cache = shared_kv, cache
        else:
            k = self._rope(self._project("k_proj", x, cfg.num_kv_heads, "kv_heads"), positions)
            v = self._project("v_proj", x, cfg.num_kv_heads, "kv_heads")
            k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
            v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
            if cache is None:
                view, new_cache = KVView(k, v, positions, segment_ids), None
            elif decoding:  # one token cannot overwrite a slot it sees: write it, then read the cache in place
                new_cache = cache.write({"k": k, "v": v}, positions, segment_ids)
                view = KVView(new_cache.entries["k"], new_cache.entries["v"], new_cache.positions, new_cache.segment_ids)
            else:  # a chunk's later tokens may overwrite ring slots its earlier tokens see: attend, then write
                entries, view_pos, view_seg = cache.view({"k": k, "v": v}, positions, segment_ids)
                view = KVView(entries["k"], entries["v"], view_pos, view_seg)
                new_cache = cache.write({"k": k, "v": v}, positions, segment_ids)

        sinks = None
        if cfg.sink_logits:
            sinks = weight(self, "sink_logits", (cfg.num_heads,), ("heads",), init=nn.initializers.zeros, dtype=self.param_dtype)
        masking = dict(scale=cfg.head_dim**-0.5, window=cfg.window, sink_tokens=cfg.sink_tokens, sink_logits=sinks)
        if decoding:  # the cache in its own dtype: a cast would copy all of it every step
            out = decode_attention(q[:, 0], view.k, view.v, view.positions, view.segment_ids, positions[:, 0],
                                   segment_ids[:, 0], impl=cfg.impl, **masking)[:, None].astype(self.dtype)
        else:
            out = flash_attention(q, view.k.astype(self.dtype), view.v.astype(self.dtype), positions, segment_ids,
                                  view.positions, view.segment_ids, impl=cfg.impl if x.shape[1] > 1 else "xla", **masking)
        o_proj = weight(
            self, "o_proj", (cfg.num_heads, cfg.head_dim, self.d_model), ("heads", "head_dim", "embed"),
            fan_in_axes=2, dtype=self.param_dtype,
        )
        y = jnp.einsum("bthk,hkd->btd", out, o_proj.astype(self.dtype))
        return (y, new_cache, view) if return_kv else (y, new_cache)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        return attention_init_cache(self.config, batch, max_len, dtype)
