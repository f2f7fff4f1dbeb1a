"""RetNet multi-scale retention (Sun et al. 2023, arXiv 2307.08621).

    Q = RoPE(X W_Q),  K = RoPE(X W_K) / sqrt(d_k),  V = X W_V         (value width value_factor * d_k)
    head h decays by gamma_h = 1 - 2^(-5 - h)
    parallel:   Retention(X) = (Q K^T * D) V,  D_nm = gamma^(n - m) for n >= m
    recurrent:  S_n = gamma S_{n-1} + K_n^T V_n,  Retention(X_n) = Q_n S_n
    chunkwise:  the parallel form inside chunks, the recurrent one across them
    MSR(X) = (swish(X W_G) * GroupNorm_h(head_1..head_h)) W_O

Retention is the scalar-decay recurrence of ssd.py with a constant log decay; the parallel form is
the chunkwise one with a single chunk (chunk_size >= length). The relative position enters as
rotary (the reference implementation's theta_shift, without xPos's length extrapolation scale).
GroupNorm normalises each head separately (mean and variance over its value features) with a
learned per-feature scale, as in the paper.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.errors import ConfigError
from zoo.layers.params import constrain, weight
from zoo.layers.recurrent import RecurrentCache, recur, require_impl, require_positive
from zoo.layers.rope import apply_rope
from zoo.layers.ssd import ssd_step
from zoo.pallas_kernels.ssd_scan import ops as scan_ops  # a module: zoo.layers and the kernels import each other


@dataclass(frozen=True)
class RetNetConfig:
    num_heads: int
    head_dim: int  # query / key width per head
    value_factor: int = 2
    rope_base: float = 10000.0
    chunk_size: int = 64
    norm_eps: float = 1e-6
    impl: str = "auto"  # the chunked scan: "auto" (Pallas on GPU/TPU), "xla", "pallas", "interpret"

    def validate(self, field: str) -> None:
        require_positive(self, field, "num_heads", "head_dim", "value_factor", "chunk_size")
        require_impl(self, field)
        if self.head_dim % 2:
            raise ConfigError(f"{field}.head_dim", f"must be even for rotary, got {self.head_dim}")

    @property
    def value_dim(self) -> int:
        return self.value_factor * self.head_dim

    def log_decays(self) -> jax.Array:
        """log gamma_h, gamma_h = 1 - 2^(-5 - h)."""
        return jnp.asarray([math.log1p(-(2.0 ** (-5 - h))) for h in range(self.num_heads)], jnp.float32)


def group_norm(y: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """Per-head normalisation: y [B,T,H,V] over V; scale [H,V]."""
    y = y.astype(jnp.float32)
    centred = y - jnp.mean(y, axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps) * scale.astype(jnp.float32)


def retnet_init_cache(config: RetNetConfig, batch: int, max_len: int, dtype) -> RecurrentCache:
    del max_len
    c = config
    return RecurrentCache.create(
        batch, state={"retention": ((c.num_heads, c.head_dim, c.value_dim), ("heads", "head_dim", None))}, dtype=dtype
    )


class Retention(nn.Module):
    config: RetNetConfig
    d_model: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    form: str = "chunked"

    @nn.compact
    def __call__(self, x, *, positions, segment_ids, cache=None):
        c = self.config
        heads, dk, dv = c.num_heads, c.head_dim, c.value_dim
        pd = self.param_dtype
        x = x.astype(self.dtype)

        def project(name, width):
            w = weight(self, name, (self.d_model, heads, width), ("embed", "heads", None), dtype=pd)
            return jnp.einsum("btd,dhk->bthk", x, w.astype(self.dtype))

        q = apply_rope(project("q_proj", dk), positions, base=c.rope_base).astype(jnp.float32)
        k = apply_rope(project("k_proj", dk), positions, base=c.rope_base).astype(jnp.float32) * dk**-0.5
        v = constrain(project("v_proj", dv).astype(jnp.float32), ("batch", "length", "heads", None))
        log_decay = jnp.broadcast_to(c.log_decays(), (*x.shape[:2], heads))

        state = jnp.zeros((x.shape[0], heads, dk, dv), jnp.float32) if cache is None else cache.state["retention"]
        last = None if cache is None else cache.last_segment
        scan = functools.partial(scan_ops.ssd_scan, impl=c.impl, dtype=self.dtype)
        y, state = recur(self.form, ssd_step, scan, (q, k, v, log_decay), segment_ids, state, last, c.chunk_size)
        scale = weight(self, "group_norm", (heads, dv), ("heads", None), init=nn.initializers.ones, dtype=pd)
        gate = project("g_proj", dv).astype(jnp.float32)
        y = (jax.nn.silu(gate) * group_norm(y, scale, c.norm_eps)).astype(self.dtype)
        o_proj = weight(self, "o_proj", (heads, dv, self.d_model), ("heads", None, "embed"), fan_in_axes=2, dtype=pd)
        out = jnp.einsum("bthv,hvd->btd", y, o_proj.astype(self.dtype))
        if cache is not None:
            cache = cache.advance({"retention": state}, {}, segment_ids)
        return out, cache

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        return retnet_init_cache(self.config, batch, max_len, dtype)
