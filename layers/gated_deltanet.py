"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, arXiv 2412.06464), as in flash-linear-attention's
GatedDeltaNet layer.

    q, k, v = SiLU(short_conv(x W_q)), SiLU(short_conv(x W_k)), SiLU(short_conv(x W_v))
    q, k = L2norm(q) / sqrt(d_k), L2norm(k)
    beta_t = sigmoid(x W_b);  alpha_t = exp(-exp(A_log) * softplus(x W_a + dt_bias))   (Mamba-2 gate)
    S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,   o_t = S_t q_t
    out = W_o (RMSNorm(o) * SiLU(x W_g))   per head

(Written here with S in [K, V] layout: S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T.)

Chunked form (the paper's section 3.3, after Yang et al. 2024's DeltaNet chunking): inside a chunk
the per-token corrections delta_t = beta_t (v_t - alpha-decayed S_{t-1}^T k_t) solve a unit
lower-triangular system (the UT transform of the WY representation),
    (I + A) Delta = diag(beta) V - diag(beta Gamma) K S_0,   A_ts = beta_t Gamma_t/Gamma_s k_t.k_s (s < t),
so Delta = U - W S_0 with U, W computed for all chunks at once; only S_0 passes between chunks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.errors import ConfigError
from zoo.layers.mamba2 import a_log_init, dt_bias_init
from zoo.layers.norms import rms_norm
from zoo.layers.params import constrain, weight
from zoo.layers.recurrent import (
    RecurrentCache, chunk, chunk_masks, chunk_size_for, conv_silu, recur, require_impl, require_positive, unchunk,
)
from zoo.pallas_kernels.delta_scan import ops as delta_ops  # a module: zoo.layers and the kernels import each other


@dataclass(frozen=True)
class GatedDeltaNetConfig:
    num_heads: int
    head_dim: int  # key / query width per head
    expand_v: int = 2  # value width = expand_v * head_dim (fla default)
    conv_width: int = 4
    chunk_size: int = 64
    norm_eps: float = 1e-5
    impl: str = "auto"  # the chunked scan: "auto" (Pallas on GPU/TPU), "xla", "pallas", "interpret"

    @property
    def value_dim(self) -> int:
        return self.expand_v * self.head_dim

    def validate(self, field: str) -> None:
        require_positive(self, field, "num_heads", "head_dim", "expand_v", "chunk_size")
        require_impl(self, field)
        if self.conv_width < 2:
            raise ConfigError(f"{field}.conv_width", f"must be >= 2, got {self.conv_width}")


def delta_step(state, q, k, v, log_alpha, beta, carry):
    """One token. state [B,H,K,V]; q, k [B,H,K]; v [B,H,V]; log_alpha, beta [B,H]; carry [B]."""
    alpha = jnp.where(carry[:, None], jnp.exp(log_alpha), 0.0)
    state = alpha[..., None, None] * state
    predicted = jnp.einsum("bhk,bhkv->bhv", k, state)
    state = state + (beta[..., None] * k)[..., :, None] * (v - predicted)[..., None, :]
    return state, jnp.einsum("bhk,bhkv->bhv", q, state)


def delta_chunked(q, k, v, log_alpha, beta, segment_ids, state, last_segment, chunk_size: int):
    """q, k [B,T,H,K]; v [B,T,H,V]; log_alpha, beta [B,T,H]; state [B,H,K,V]. Returns (o, final state)."""
    length = q.shape[1]
    size = chunk_size_for(length, chunk_size)

    def heads_first(a):  # [B,T,H,...] -> [B,N,H,C,...]
        return jnp.swapaxes(chunk(a.astype(jnp.float32), size), 2, 3)

    q, k, v, g, beta = (heads_first(a) for a in (q, k, v, log_alpha, beta))
    masks = chunk_masks(chunk(segment_ids, size, "edge"), last_segment)
    cum = jnp.cumsum(g, axis=-1)  # [B,N,H,C]
    same = masks.same[:, :, None]  # [B,N,1,t,s]
    decay = jnp.where(same, jnp.exp(jnp.where(same, cum[..., :, None] - cum[..., None, :], 0.0)), 0.0)
    strictly_before = 1.0 - jnp.eye(size, dtype=jnp.float32)
    lower = beta[..., :, None] * decay * strictly_before * jnp.einsum("bnhtk,bnhsk->bnhts", k, k)
    system = jnp.eye(size, dtype=jnp.float32) + lower
    read = jnp.where(masks.from_prev[:, :, None], jnp.exp(cum), 0.0)  # Gamma_t where t continues S_0
    solve = lambda rhs: jax.scipy.linalg.solve_triangular(system, rhs, lower=True, unit_diagonal=True)
    u = solve(beta[..., None] * v)  # [B,N,H,C,V]
    w = solve((beta * read)[..., None] * k)  # [B,N,H,C,K]
    scores = jnp.einsum("bnhtk,bnhsk->bnhts", q, k) * decay
    q_read = q * read[..., None]
    to_end = jnp.where(masks.to_last[:, :, None], jnp.exp(cum[..., -1:] - cum), 0.0)
    k_end = k * to_end[..., None]
    survive = jnp.where(masks.keep[:, :, None], jnp.exp(cum[..., -1]), 0.0)  # [B,N,H]

    def pass_chunk(entering, xs):
        u, w, scores, q_read, k_end, survive = xs
        delta = u - jnp.einsum("bhck,bhkv->bhcv", w, entering)
        out = jnp.einsum("bhck,bhkv->bhcv", q_read, entering) + jnp.einsum("bhts,bhsv->bhtv", scores, delta)
        leaving = survive[..., None, None] * entering + jnp.einsum("bhck,bhcv->bhkv", k_end, delta)
        return leaving, out

    per_chunk = tuple(jnp.moveaxis(a, 1, 0) for a in (u, w, scores, q_read, k_end, survive))
    final, out = jax.lax.scan(pass_chunk, state.astype(jnp.float32), per_chunk)  # out [N,B,H,C,V]
    out = jnp.moveaxis(jnp.swapaxes(out, 2, 3), 0, 1)  # [B,N,C,H,V]
    return unchunk(out, length), final


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def gated_deltanet_init_cache(config: GatedDeltaNetConfig, batch: int, max_len: int, dtype) -> RecurrentCache:
    del max_len
    c = config
    keys = ((c.num_heads, c.head_dim), ("heads", "head_dim"))
    return RecurrentCache.create(
        batch,
        state={"delta": ((c.num_heads, c.head_dim, c.value_dim), ("heads", "head_dim", None))},
        conv={"q": keys, "k": keys, "v": ((c.num_heads, c.value_dim), ("heads", None))},
        conv_width=c.conv_width, dtype=dtype,
    )


class GatedDeltaNet(nn.Module):
    config: GatedDeltaNetConfig
    d_model: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    form: str = "chunked"

    @nn.compact
    def __call__(self, x, *, positions, segment_ids, cache=None):
        del positions
        c = self.config
        heads, dk, dv = c.num_heads, c.head_dim, c.value_dim
        pd = self.param_dtype
        x = x.astype(self.dtype)

        def project(name, shape, axes):
            w = weight(self, name, (self.d_model, *shape), ("embed", *axes), dtype=pd)
            return jnp.einsum("btd,d...->bt...", x, w.astype(self.dtype))

        conv = dict(width=c.conv_width, bias=False, segment_ids=segment_ids, cache=cache)
        q, past_q = conv_silu(self, "q", project("q_proj", (heads, dk), ("heads", "head_dim")), ("heads", "head_dim"), **conv)
        k, past_k = conv_silu(self, "k", project("k_proj", (heads, dk), ("heads", "head_dim")), ("heads", "head_dim"), **conv)
        v, past_v = conv_silu(self, "v", project("v_proj", (heads, dv), ("heads", None)), ("heads", None), **conv)
        q = l2_normalize(q) * dk**-0.5
        k = l2_normalize(k)
        v = constrain(v.astype(jnp.float32), ("batch", "length", "heads", None))
        beta = jax.nn.sigmoid(project("b_proj", (heads,), ("heads",)).astype(jnp.float32))
        dt_bias = weight(self, "dt_bias", (heads,), ("heads",), init=dt_bias_init(1e-3, 0.1, 1e-4), dtype=pd)
        a_log = weight(self, "A_log", (heads,), ("heads",), init=a_log_init(1e-4, 16.0), dtype=pd)
        gate_in = project("a_proj", (heads,), ("heads",)).astype(jnp.float32) + dt_bias.astype(jnp.float32)
        log_alpha = -jnp.exp(a_log.astype(jnp.float32)) * jax.nn.softplus(gate_in)

        state = jnp.zeros((x.shape[0], heads, dk, dv), jnp.float32) if cache is None else cache.state["delta"]
        last = None if cache is None else cache.last_segment
        scan = functools.partial(delta_ops.delta_scan, impl=c.impl, dtype=self.dtype)
        o, state = recur(self.form, delta_step, scan, (q, k, v, log_alpha, beta), segment_ids, state, last, c.chunk_size)
        o = o.astype(jnp.float32)
        norm = weight(self, "o_norm", (dv,), (None,), init=nn.initializers.ones, dtype=pd)
        gate = project("g_proj", (heads, dv), ("heads", None)).astype(jnp.float32)
        o = (rms_norm(o, norm, c.norm_eps) * jax.nn.silu(gate)).astype(self.dtype)
        o_proj = weight(self, "o_proj", (heads, dv, self.d_model), ("heads", None, "embed"), fan_in_axes=2, dtype=pd)
        out = jnp.einsum("bthv,hvd->btd", o, o_proj.astype(self.dtype))
        if cache is not None:
            cache = cache.advance({"delta": state}, {"q": past_q, "k": past_k, "v": past_v}, segment_ids)
        return out, cache

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        return gated_deltanet_init_cache(self.config, batch, max_len, dtype)
