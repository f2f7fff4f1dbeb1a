"""xLSTM (Beck et al. 2024, arXiv 2405.04517): the mLSTM and sLSTM layers in the reference's
(NX-AI/xlstm) block layouts.

mLSTM (matrix memory, pre up-projection block; the layer owns its projections, so its model layer
has no MLP):
    x_m, z = split(up_proj(x))                          up-projection by inner_dim / d_model (2)
    x_c = SiLU(causal_conv1d(x_m));  q, k = blockdiag(x_c);  v = blockdiag(x_m)   (4x4 blocks)
    i~, f~ = W_i [q,k,v] + b_i, W_f [q,k,v] + b_f           per head
    C_t = f_t C_{t-1} + i_t v_t k_t^T,  n_t = f_t n_{t-1} + i_t k_t,  f_t = sigmoid(f~), i_t = exp(i~)
    h_t = C_t q_t / max(|n_t^T q_t|, 1)        (q scaled by 1/sqrt(head_dim))
    out = down_proj((GroupNorm(h) + skip * x_c) * SiLU(z))
  Max-state stabiliser: m_t = max(log f_t + m_{t-1}, i~_t); the state is stored as (C, n) / exp(m)
  and the bound 1 becomes exp(-m_t). The chunkwise form computes the same m_t as the running max
  over every source's log weight, so all three forms share one stabiliser exactly.

mLSTM, dense layout (xLSTM 7B, Beck et al. 2025, arXiv 2503.13427; `layout="dense"`; its model layer keeps
the MLP): the same cell on dense projections of x, no convolution, no skip:
    q, k, v = W_q x, W_k x, W_v x   (heads x head_dim each);   i~, f~ = cap(W_i x + b_i), cap(W_f x + b_f)
    out = W_down (GroupNorm(h) * sigmoid(W_o x))          cap(a) = 15 tanh(a / 15), the gates' soft cap
  Its projections have the shapes of an attention layer's, which is what distillation from attention
  initialises (zoo/recurrent_init.py). Input-gate bias -10 and forget-gate bias linspace(3, 6), as in xLSTM 7B.

sLSTM (scalar memory, post up-projection block: its model layer keeps the MLP, which plays the
block's gated feed-forward):
    i~, f~ from SiLU(causal_conv1d(x)); z~, o~ from x; each plus R_h h_{t-1} + b (head-wise R)
    m_t = max(log sigmoid(f~) + m_{t-1}, i~),  i = exp(i~ - m_t),  f = exp(log sigmoid(f~) + m_{t-1} - m_t)
    c_t = f c_{t-1} + i tanh(z~),  n_t = f n_{t-1} + i,  h_t = sigmoid(o~) c_t / n_t
    out = GroupNorm(h)
  The recurrence is non-linear in h (memory mixing), so it has no parallel form: training runs the
  sequential scan (the "chunked" and "naive" forms are the same scan).

Initialisation follows the reference: gate weights zero, input-gate bias N(0, 0.1), mLSTM
forget-gate bias linspace(3, 6), sLSTM forget-gate bias the power law of the first block, sLSTM
recurrent weights zero, skip = 1.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.errors import ConfigError
from zoo.layers.params import constrain, weight
from zoo.layers.recurrent import (
    NEG_LOG, RecurrentCache, chunk, chunk_masks, chunk_size_for, conv_silu, recur, require_impl, require_positive, unchunk,
)
from zoo.pallas_kernels.ssd_scan import mlstm as mlstm_kernel  # a module: zoo.layers and the kernels import each other

EPS = 1e-6  # the reference's epsilon in the normaliser's denominator
LAYOUTS = ("block", "dense")


@dataclass(frozen=True)
class MLSTMConfig:
    num_heads: int
    inner_dim: int  # up-projected width (proj_factor 2 in the reference: 2 * d_model)
    qkv_block: int = 4
    conv_width: int = 4
    chunk_size: int = 64
    norm_eps: float = 1e-5
    impl: str = "auto"  # the chunked scan: "auto" (Pallas on GPU/TPU), "xla", "pallas", "interpret"
    layout: str = "block"  # "block": the xLSTM paper's pre up-projection block; "dense": the xLSTM 7B layer
    gate_soft_cap: float = 15.0  # dense layout only

    def validate(self, field: str) -> None:
        require_positive(self, field, "num_heads", "inner_dim", "qkv_block", "chunk_size")
        require_impl(self, field)
        if self.layout not in LAYOUTS:
            raise ConfigError(f"{field}.layout", f"must be one of {LAYOUTS}, got {self.layout!r}")
        for name in ("num_heads", "qkv_block"):
            if self.inner_dim % getattr(self, name):
                raise ConfigError(f"{field}.inner_dim", f"must be divisible by {name}={getattr(self, name)}, got {self.inner_dim}")
        if self.conv_width < 2:
            raise ConfigError(f"{field}.conv_width", f"must be >= 2, got {self.conv_width}")

    @property
    def head_dim(self) -> int:
        return self.inner_dim // self.num_heads


@dataclass(frozen=True)
class SLSTMConfig:
    num_heads: int  # the cell's width num_heads * head_dim must equal d_model (no projections)
    head_dim: int
    conv_width: int = 4
    norm_eps: float = 1e-5

    def validate(self, field: str) -> None:
        require_positive(self, field, "num_heads", "head_dim")
        if self.conv_width < 2:
            raise ConfigError(f"{field}.conv_width", f"must be >= 2, got {self.conv_width}")


# --- mLSTM -------------------------------------------------------------------------------------------

def mlstm_step(state, q, k, v, log_i, log_f, carry):
    """One token. state {C [B,H,K,V], n [B,H,K], m [B,H]}; q, k [B,H,K]; v [B,H,V]; log_i, log_f [B,H]."""
    m_prev = jnp.where(carry[:, None], state["m"], NEG_LOG)
    m = jnp.maximum(log_f + m_prev, log_i)
    forget, inp = jnp.exp(log_f + m_prev - m), jnp.exp(log_i - m)
    c = forget[..., None, None] * state["C"] + inp[..., None, None] * k[..., :, None] * v[..., None, :]
    n = forget[..., None] * state["n"] + inp[..., None] * k
    numerator = jnp.einsum("bhk,bhkv->bhv", q, c)
    denominator = jnp.maximum(jnp.abs(jnp.einsum("bhk,bhk->bh", q, n)), jnp.exp(-m)) + EPS
    return {"C": c, "n": n, "m": m}, numerator / denominator[..., None]


def _last_axis_max(x):
    """jnp.max(x, axis=-1) whose gradient goes to the arg-max entry through a gather. jnp.max's own gradient divides
    by the count of entries equal to the max; when XLA recomputes x in another fusion and rounds it differently
    (seen on the CPU without LLVM's optimisations), that count is 0 and the gradient NaN."""
    return jnp.take_along_axis(x, jnp.argmax(x, axis=-1)[..., None], axis=-1)[..., 0]


def mlstm_chunked(q, k, v, log_i, log_f, segment_ids, state, last_segment, chunk_size: int):
    """Chunkwise mLSTM: quadratic inside chunks with the exact row-max stabiliser, (C, n, m) across."""
    length = q.shape[1]
    size = chunk_size_for(length, chunk_size)

    def heads_first(a, pad_value=0.0):  # [B,T,H,...] -> [B,N,H,C,...]
        return jnp.swapaxes(chunk(a.astype(jnp.float32), size, pad_value), 2, 3)

    q, k, v, log_f = (heads_first(a) for a in (q, k, v, log_f))
    # Padding writes nothing: a zero input gate (log 0), so it cannot raise the final max-state m.
    log_i = heads_first(log_i, NEG_LOG)
    masks = chunk_masks(chunk(segment_ids, size, "edge"), last_segment)
    cum = jnp.cumsum(log_f, axis=-1)  # [B,N,H,C]
    same = masks.same[:, :, None]
    log_weights = jnp.where(same, cum[..., :, None] - cum[..., None, :] + log_i[..., None, :], NEG_LOG)
    scores = jnp.einsum("bnhtk,bnhsk->bnhts", q, k)
    log_to_end = jnp.where(masks.to_last[:, :, None], cum[..., -1:] - cum + log_i, NEG_LOG)  # [B,N,H,C]
    from_prev = masks.from_prev[:, :, None]  # [B,N,1,C]
    keep = masks.keep[:, :, None]  # [B,N,1]

    def pass_chunk(entering, xs):
        log_weights, scores, q, k, v, cum, log_to_end, from_prev, keep = xs
        log_read = jnp.where(from_prev, cum + entering["m"][..., None], NEG_LOG)  # [B,H,C]
        m = jnp.maximum(_last_axis_max(log_weights), log_read)
        weights = jnp.exp(log_weights - m[..., None]) * scores
        read = jnp.exp(log_read - m)
        numerator = jnp.einsum("bhts,bhsv->bhtv", weights, v) + read[..., None] * jnp.einsum("bhtk,bhkv->bhtv", q, entering["C"])
        denominator = jnp.sum(weights, axis=-1) + read * jnp.einsum("bhtk,bhk->bht", q, entering["n"])
        out = numerator / (jnp.maximum(jnp.abs(denominator), jnp.exp(-m)) + EPS)[..., None]

        log_survive = jnp.where(keep, cum[..., -1] + entering["m"], NEG_LOG)  # [B,H]
        m_end = jnp.maximum(_last_axis_max(log_to_end), log_survive)
        added = jnp.exp(log_to_end - m_end[..., None])
        survive = jnp.exp(log_survive - m_end)
        leaving = {
            "C": survive[..., None, None] * entering["C"] + jnp.einsum("bhc,bhck,bhcv->bhkv", added, k, v),
            "n": survive[..., None] * entering["n"] + jnp.einsum("bhc,bhck->bhk", added, k),
            "m": m_end,
        }
        return leaving, out

    per_chunk = tuple(
        jnp.moveaxis(a, 1, 0) for a in (log_weights, scores, q, k, v, cum, log_to_end, from_prev, keep)
    )
    final, out = jax.lax.scan(pass_chunk, state, per_chunk)  # out [N,B,H,C,V]
    out = jnp.moveaxis(jnp.swapaxes(out, 2, 3), 0, 1)
    return unchunk(out, length), final


def head_norm(y: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """The reference's MultiHeadLayerNorm: LayerNorm over each head's features, weight only.
    y [B,T,H,D] float32; scale [H*D]. Returns [B,T,H*D] float32."""
    centred = y - jnp.mean(y, axis=-1, keepdims=True)
    normed = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    return normed.reshape(*y.shape[:2], -1) * scale.astype(jnp.float32)


def forget_gate_bias(key, shape, dtype=jnp.float32):
    """The reference's mLSTM forget-gate bias: linspace(3, 6) over the heads (slow forgetting at the start)."""
    del key
    return jnp.linspace(3.0, 6.0, shape[0], dtype=dtype)


def blockdiag_init(key, shape, dtype=jnp.float32):
    """The reference's small_init for head-wise (block-diagonal) projections: std sqrt(2 / (5 * block))."""
    return jax.random.normal(key, shape, dtype) * (2.0 / (5.0 * shape[-1])) ** 0.5


def mlstm_init_cache(config: MLSTMConfig, batch: int, max_len: int, dtype) -> RecurrentCache:
    del max_len
    c = config
    h, d = c.num_heads, c.head_dim
    return RecurrentCache.create(
        batch,
        state={"C": ((h, d, d), ("heads", "head_dim", None)), "n": ((h, d), ("heads", "head_dim")), "m": ((h,), ("heads",))},
        conv={"x": ((c.inner_dim,), ("mlp",))} if c.layout == "block" else None,
        conv_width=c.conv_width if c.layout == "block" else 1, dtype=dtype,
    )


class MLSTM(nn.Module):
    config: MLSTMConfig
    d_model: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    form: str = "chunked"

    @nn.compact
    def __call__(self, x, *, positions, segment_ids, cache=None):
        del positions
        c = self.config
        heads, dim = c.num_heads, c.head_dim
        batch = x.shape[0]
        x = x.astype(self.dtype)
        if c.layout == "dense":
            (q, k, v, log_i, log_f), finish, past = self._dense(x), self._dense_output(x), {}
        else:
            (q, k, v, log_i, log_f), finish, past = self._block(x, segment_ids, cache)

        if cache is None:
            state = {"C": jnp.zeros((batch, heads, dim, dim)), "n": jnp.zeros((batch, heads, dim)), "m": jnp.zeros((batch, heads))}
            last = None
        else:
            state, last = cache.state, cache.last_segment
        scan = functools.partial(mlstm_kernel.mlstm_scan, impl=c.impl, dtype=self.dtype, eps=EPS)
        h, state = recur(self.form, mlstm_step, scan, (q * dim**-0.5, k, v, log_i, log_f), segment_ids, state, last, c.chunk_size)
        out = finish(h)
        if cache is not None:
            cache = cache.advance(state, past, segment_ids)
        return out, cache

    def _block(self, x, segment_ids, cache):
        """The pre up-projection block: (q, k, v, log_i, log_f), the output path, the convolution's past."""
        c = self.config
        heads, dim, inner, block = c.num_heads, c.head_dim, c.inner_dim, c.qkv_block
        pd = self.param_dtype
        batch, length = x.shape[:2]
        up = weight(self, "up_proj", (self.d_model, 2, inner), ("embed", None, "mlp"), dtype=pd)
        x_m, z = jnp.moveaxis(jnp.einsum("btd,dgi->btgi", x, up.astype(self.dtype)), 2, 0)
        x_m = constrain(x_m, ("batch", "length", "mlp"))
        x_c, past = conv_silu(self, "x", x_m, ("mlp",), width=c.conv_width, bias=True, segment_ids=segment_ids, cache=cache)

        def blockdiag(name, inputs):
            w = weight(self, name, (inner // block, block, block), ("mlp", None, None), init=blockdiag_init, dtype=pd)
            blocks = inputs.astype(jnp.float32).reshape(batch, length, inner // block, block)
            return jnp.einsum("btnj,nji->btni", blocks, w.astype(jnp.float32)).reshape(batch, length, heads, dim)

        q = blockdiag("q_proj", x_c).astype(jnp.float32)
        k = blockdiag("k_proj", x_c).astype(jnp.float32)
        v = blockdiag("v_proj", x_m).astype(jnp.float32)
        gate_in = jnp.concatenate([a.reshape(batch, length, inner) for a in (q, k, v)], axis=-1)

        def gate(name, bias_init):
            w = weight(self, f"{name}_gate", (3 * inner, heads), (None, "heads"), init=nn.initializers.zeros, dtype=pd)
            b = weight(self, f"{name}_gate_bias", (heads,), ("heads",), init=bias_init, dtype=pd)
            return gate_in @ w.astype(jnp.float32) + b.astype(jnp.float32)

        log_i = gate("input", nn.initializers.normal(0.1))
        log_f = jax.nn.log_sigmoid(gate("forget", forget_gate_bias))
        norm = weight(self, "out_norm", (inner,), ("mlp",), init=nn.initializers.ones, dtype=pd)
        skip = weight(self, "skip", (inner,), ("mlp",), init=nn.initializers.ones, dtype=pd)
        down = weight(self, "down_proj", (inner, self.d_model), ("mlp", "embed"), dtype=pd)

        def finish(h):
            h = head_norm(h, norm, c.norm_eps) + skip.astype(jnp.float32) * x_c.astype(jnp.float32)
            h = (h * jax.nn.silu(z.astype(jnp.float32))).astype(self.dtype)
            return h @ down.astype(self.dtype)

        return (q, k, v, log_i, log_f), finish, {"x": past}

    def _dense(self, x):
        """The xLSTM 7B layer's inputs to the cell: (q, k, v, log_i, log_f)."""
        c = self.config
        pd = self.param_dtype

        def project(name):
            w = weight(self, name, (self.d_model, c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), dtype=pd)
            return jnp.einsum("btd,dhk->bthk", x, w.astype(self.dtype)).astype(jnp.float32)

        def gate(name, bias_init):
            w = weight(self, f"{name}_gate", (self.d_model, c.num_heads), ("embed", "heads"), dtype=pd)
            b = weight(self, f"{name}_gate_bias", (c.num_heads,), ("heads",), init=bias_init, dtype=pd)
            pre = x.astype(jnp.float32) @ w.astype(jnp.float32) + b.astype(jnp.float32)
            return c.gate_soft_cap * jnp.tanh(pre / c.gate_soft_cap)

        q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
        log_i = gate("input", nn.initializers.constant(-10.0))
        log_f = jax.nn.log_sigmoid(gate("forget", forget_gate_bias))
        return q, k, v, log_i, log_f

    def _dense_output(self, x):
        """The xLSTM 7B layer's output path, h -> out."""
        c = self.config
        pd = self.param_dtype
        out_gate = weight(self, "out_gate", (self.d_model, c.inner_dim), ("embed", "mlp"), dtype=pd)
        norm = weight(self, "out_norm", (c.inner_dim,), ("mlp",), init=nn.initializers.ones, dtype=pd)
        down = weight(self, "down_proj", (c.num_heads, c.head_dim, self.d_model), ("heads", "head_dim", "embed"), dtype=pd)
        gate = jax.nn.sigmoid((x @ out_gate.astype(self.dtype)).astype(jnp.float32))

        def finish(h):
            h = (head_norm(h, norm, c.norm_eps) * gate).astype(self.dtype)
            return jnp.einsum("bthk,hkd->btd", h.reshape(h.shape[:2] + (c.num_heads, c.head_dim)), down.astype(self.dtype))

        return finish

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        return mlstm_init_cache(self.config, batch, max_len, dtype)


# --- sLSTM -------------------------------------------------------------------------------------------

def slstm_step(state, recurrent_kernel, gates_x, carry):
    """One token. state {h, c, n, m} each [B,H,D]; recurrent_kernel [H, D, 4, D]; gates_x [B,4,H,D]
    (input contributions plus bias for gates i, f, z, o)."""
    live = carry[:, None, None]
    h_prev = jnp.where(live, state["h"], 0.0)
    raw = gates_x + jnp.einsum("bhd,hdge->bghe", h_prev, recurrent_kernel)
    i_raw, f_raw, z_raw, o_raw = raw[:, 0], raw[:, 1], raw[:, 2], raw[:, 3]
    log_f = jax.nn.log_sigmoid(f_raw)
    m_prev = jnp.where(live, state["m"], NEG_LOG)
    m = jnp.maximum(log_f + m_prev, i_raw)
    forget, inp = jnp.exp(log_f + m_prev - m), jnp.exp(i_raw - m)
    c = forget * jnp.where(live, state["c"], 0.0) + inp * jnp.tanh(z_raw)
    n = forget * jnp.where(live, state["n"], 0.0) + inp
    h = jax.nn.sigmoid(o_raw) * c / n
    return {"h": h, "c": c, "n": n, "m": m}, h


def slstm_forget_bias(key, shape, dtype=jnp.float32):
    """The reference's power-law forget-gate bias (block-dependent; this is its first-block curve)."""
    heads, dim = shape
    ramp = (jnp.arange(dim, dtype=jnp.float32) / max(dim - 1, 1)) ** 0.3
    return jnp.broadcast_to(-(-5.0 + 12.0 * ramp), shape).astype(dtype)


def slstm_init_cache(config: SLSTMConfig, batch: int, max_len: int, dtype) -> RecurrentCache:
    del max_len
    per = ((config.num_heads, config.head_dim), ("heads", "head_dim"))
    width = ((config.num_heads * config.head_dim,), ("embed",))
    return RecurrentCache.create(
        batch, state={"h": per, "c": per, "n": per, "m": per}, conv={"x": width},
        conv_width=config.conv_width, dtype=dtype,
    )


class SLSTM(nn.Module):
    config: SLSTMConfig
    d_model: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    form: str = "chunked"  # accepted for the protocol; both forms are the sequential scan

    @nn.compact
    def __call__(self, x, *, positions, segment_ids, cache=None):
        del positions
        c = self.config
        heads, dim = c.num_heads, c.head_dim
        if heads * dim != self.d_model:
            raise ConfigError("num_heads", f"sLSTM num_heads * head_dim = {heads * dim} must equal d_model={self.d_model}")
        pd = self.param_dtype
        batch, length = x.shape[:2]
        x = x.astype(self.dtype)
        x_c, past = conv_silu(self, "x", x, ("embed",), width=c.conv_width, bias=True, segment_ids=segment_ids, cache=cache)

        def headwise(name, inputs):
            w = weight(self, name, (heads, dim, dim), ("heads", None, None), init=blockdiag_init, dtype=pd)
            return jnp.einsum("bthj,hji->bthi", inputs.astype(jnp.float32).reshape(batch, length, heads, dim), w.astype(jnp.float32))

        gates_x = jnp.stack(
            [headwise("i_proj", x_c), headwise("f_proj", x_c), headwise("z_proj", x), headwise("o_proj", x)], axis=2
        ).astype(jnp.float32)  # [B,T,4,H,D]

        def zero_bias_except_forget(key, shape, dtype=jnp.float32):
            return jnp.zeros(shape, dtype).at[1].set(slstm_forget_bias(key, shape[1:], dtype))

        bias = weight(self, "gate_bias", (4, heads, dim), (None, "heads", None), init=zero_bias_except_forget, dtype=pd)
        recurrent = weight(self, "recurrent_kernel", (heads, dim, 4, dim), ("heads", None, None, None),
                           init=nn.initializers.zeros, dtype=pd)
        gates_x = gates_x + bias.astype(jnp.float32)
        if cache is None:
            state = {name: jnp.zeros((batch, heads, dim)) for name in ("h", "c", "n", "m")}
            last = None
        else:
            state, last = cache.state, cache.last_segment

        kernel = recurrent.astype(jnp.float32)
        step = lambda s, g, carry: slstm_step(s, kernel, g, carry)
        h, state = recur("naive", step, None, (gates_x,), segment_ids, state, last, 1)
        norm = weight(self, "out_norm", (self.d_model,), ("embed",), init=nn.initializers.ones, dtype=pd)
        out = head_norm(h, norm, c.norm_eps).astype(self.dtype)
        if cache is not None:
            cache = cache.advance(state, {"x": past}, segment_ids)
        return out, cache

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        return slstm_init_cache(self.config, batch, max_len, dtype)
