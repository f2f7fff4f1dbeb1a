"""Mamba-2 (Dao & Gu 2024, "Transformers are SSMs", arXiv 2405.21060), as in state-spaces/mamba's
Mamba2 module.

    z, x, B, C, dt = in_proj(u)                 x: heads x head_dim; B, C: groups x state
    x, B, C = SiLU(causal_conv1d(x, B, C))      depthwise, width 4, with bias
    dt = softplus(dt + dt_bias);  A = -exp(A_log)   (scalar times identity per head)
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T;  y_t = h_t^T C_t + D x_t
    out = out_proj(RMSNorm_grouped(y * SiLU(z)))

The in_proj is stored as five named projections (same product as the fused matrix, but each with
its own logical axes). Initialisation follows the reference: A uniform in [1, 16], dt log-uniform
in [dt_min, dt_max] (floored) with dt_bias its inverse softplus, D = 1, PyTorch conv defaults.
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
from zoo.layers.recurrent import RecurrentCache, conv_silu, recur, require_impl, require_positive
from zoo.layers.ssd import ssd_step
from zoo.pallas_kernels.ssd_scan import ops as scan_ops  # a module: zoo.layers and the kernels import each other


@dataclass(frozen=True)
class Mamba2Config:
    num_heads: int  # d_inner = num_heads * head_dim (the reference's expand * d_model)
    head_dim: int = 64
    state_dim: int = 128
    num_groups: int = 1  # B and C are shared by num_heads / num_groups heads
    conv_width: int = 4
    chunk_size: int = 64
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_floor: float = 1e-4
    a_min: float = 1.0
    a_max: float = 16.0
    norm_eps: float = 1e-5
    impl: str = "auto"  # the chunked scan: "auto" (Pallas on GPU/TPU), "xla", "pallas", "interpret"

    def validate(self, field: str) -> None:
        require_positive(self, field, "num_heads", "head_dim", "state_dim", "num_groups", "chunk_size")
        require_impl(self, field)
        if self.num_heads % self.num_groups:
            raise ConfigError(f"{field}.num_groups", f"must divide num_heads={self.num_heads}, got {self.num_groups}")
        if self.conv_width < 2:
            raise ConfigError(f"{field}.conv_width", f"must be >= 2, got {self.conv_width}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError(f"{field}.dt_min", f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        if not 0 < self.a_min <= self.a_max:
            raise ConfigError(f"{field}.a_min", f"need 0 < a_min <= a_max, got {self.a_min}, {self.a_max}")


def dt_bias_init(dt_min: float, dt_max: float, floor: float):
    """dt ~ log-uniform [dt_min, dt_max], floored; the bias is softplus^-1(dt) so softplus(bias) = dt."""

    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def a_log_init(low: float, high: float):
    def init(key, shape, dtype=jnp.float32):
        return jnp.log(jax.random.uniform(key, shape, jnp.float32, low, high)).astype(dtype)

    return init


def grouped_rms_norm(y: jax.Array, scale: jax.Array, groups: int, eps: float) -> jax.Array:
    """RMSNorm over each group of heads' features jointly. y [B,T,H,P] float32, scale [H,P]."""
    batch, length, heads, dim = y.shape
    grouped = y.reshape(batch, length, groups, heads // groups * dim)
    grouped = grouped * jax.lax.rsqrt(jnp.mean(grouped * grouped, axis=-1, keepdims=True) + eps)
    return grouped.reshape(y.shape) * scale.astype(jnp.float32)


def mamba2_init_cache(config: Mamba2Config, batch: int, max_len: int, dtype) -> RecurrentCache:
    del max_len  # constant-size state
    c = config
    group = ((c.num_groups, c.state_dim), (None, "state"))
    return RecurrentCache.create(
        batch,
        state={"ssm": ((c.num_heads, c.state_dim, c.head_dim), ("heads", "state", "head_dim"))},
        conv={"x": ((c.num_heads, c.head_dim), ("heads", "head_dim")), "b": group, "c": group},
        conv_width=c.conv_width, dtype=dtype,
    )


class Mamba2(nn.Module):
    """The mixer protocol; `form` picks the training form ("chunked", or "naive" for tests)."""

    config: Mamba2Config
    d_model: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    form: str = "chunked"

    @nn.compact
    def __call__(self, u, *, positions, segment_ids, cache=None):
        del positions  # order is the array order; documents come from segment_ids
        c = self.config
        heads, dim, groups, state_dim = c.num_heads, c.head_dim, c.num_groups, c.state_dim
        pd = self.param_dtype
        u = u.astype(self.dtype)

        def project(name, shape, axes):
            w = weight(self, name, (self.d_model, *shape), ("embed", *axes), dtype=pd)
            return jnp.einsum("btd,d...->bt...", u, w.astype(self.dtype))

        z = project("z_proj", (heads, dim), ("heads", "head_dim"))
        x = project("x_proj", (heads, dim), ("heads", "head_dim"))
        b = project("b_proj", (groups, state_dim), (None, "state"))
        cm = project("c_proj", (groups, state_dim), (None, "state"))
        dt = project("dt_proj", (heads,), ("heads",))
        conv = dict(width=c.conv_width, bias=True, segment_ids=segment_ids, cache=cache)
        x, past_x = conv_silu(self, "x", x, ("heads", "head_dim"), **conv)
        b, past_b = conv_silu(self, "b", b, (None, "state"), **conv)
        cm, past_c = conv_silu(self, "c", cm, (None, "state"), **conv)
        x = constrain(x, ("batch", "length", "heads", "head_dim"))

        dt_bias = weight(self, "dt_bias", (heads,), ("heads",), init=dt_bias_init(c.dt_min, c.dt_max, c.dt_floor), dtype=pd)
        a_log = weight(self, "A_log", (heads,), ("heads",), init=a_log_init(c.a_min, c.a_max), dtype=pd)
        skip = weight(self, "D", (heads,), ("heads",), init=nn.initializers.ones, dtype=pd)
        dt = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias.astype(jnp.float32))  # [B,T,H]
        log_decay = -jnp.exp(a_log.astype(jnp.float32)) * dt
        x32 = x.astype(jnp.float32)
        v = x32 * dt[..., None]

        def grouped_step(state, q, k, v, log_decay, carry):
            return ssd_step(state, *(jnp.repeat(a, heads // groups, axis=1) for a in (q, k)), v, log_decay, carry)

        scan = functools.partial(scan_ops.ssd_scan, impl=c.impl, dtype=self.dtype)
        state = jnp.zeros((u.shape[0], heads, state_dim, dim), jnp.float32) if cache is None else cache.state["ssm"]
        last = None if cache is None else cache.last_segment
        inputs = (cm.astype(jnp.float32), b.astype(jnp.float32), v, log_decay)  # q = C, k = B: [B,T,G,N]
        y, state = recur(self.form, grouped_step, scan, inputs, segment_ids, state, last, c.chunk_size)
        y = y.astype(jnp.float32)
        y = y + skip.astype(jnp.float32)[:, None] * x32
        y = y * jax.nn.silu(z.astype(jnp.float32))
        norm = weight(self, "norm", (heads, dim), ("heads", "head_dim"), init=nn.initializers.ones, dtype=pd)
        y = grouped_rms_norm(y, norm, groups, c.norm_eps).astype(self.dtype)
        out_proj = weight(self, "out_proj", (heads, dim, self.d_model), ("heads", "head_dim", "embed"), fan_in_axes=2, dtype=pd)
        out = jnp.einsum("bthp,hpd->btd", y, out_proj.astype(self.dtype))
        if cache is not None:
            cache = cache.advance({"ssm": state}, {"x": past_x, "b": past_b, "c": past_c}, segment_ids)
        return out, cache

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        return mamba2_init_cache(self.config, batch, max_len, dtype)
