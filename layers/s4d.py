"""S4D: diagonal state spaces (Gu, Gupta, Goel & Re 2022, "On the Parameterization and
Initialization of Diagonal State Space Models", arXiv 2206.11893), as in state-spaces/s4's S4D layer.

Each of the d_model channels is an independent SSM with a diagonal complex state of state_dim / 2
modes (conjugate pairs folded, hence the factor 2 on the real part):
    x'(t) = A x(t) + B u(t),  y(t) = 2 Re(C x(t)) + D u(t),   A = -exp(log_a_real) + i a_imag, B = 1
    S4D-Lin:  a_imag_n = pi n        S4D-Inv:  a_imag_n = (N / pi) (N / (2n + 1) - 1)
discretised with a learned step dt = exp(log_dt) (log-uniform in [dt_min, dt_max] at init):
    ZOH:       A_bar = exp(dt A),                 B_bar = (exp(dt A) - 1) / A
    bilinear:  A_bar = (1 + dt A/2) / (1 - dt A/2), B_bar = dt / (1 - dt A/2)
    h_t = A_bar h_{t-1} + B_bar u_t,  y_t = 2 Re(C h_t) + D u_t
The layer is y -> GELU -> Linear(d_model, 2 d_model) -> GLU, as in the reference's S4Block.

Training form: the convolution kernel K_j = 2 Re(sum_n C_n B_bar_n A_bar_n^j) is a Vandermonde
product; it is applied as a causal Toeplitz matrix inside chunks of `chunk_size` tokens (masked at
document boundaries), and the complex state carries between chunks. With chunk_size >= the length
this is exactly the reference's full-length kernel convolution. The SSM runs in complex64.

convolution="fft" is the reference's own training form: the full-length kernel applied by FFT in O(T log T). It
treats each row as one sequence from a zero state, ignoring document boundaries, so it is for rows that hold one
sequence (classification, Long Range Arena; trailing padding may follow, as it only sees the tokens before it).
With a cache (prefill, decode) the layer runs the chunked form, which resets at boundaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.errors import ConfigError
from zoo.layers.params import weight
from zoo.layers.recurrent import RecurrentCache, chunk, chunk_masks, chunk_size_for, recur, require_positive, unchunk

INITS = ("inv", "lin")
DISCRETISATIONS = ("zoh", "bilinear")
CONVOLUTIONS = ("chunked", "fft")


@dataclass(frozen=True)
class S4DConfig:
    state_dim: int = 64  # N: N / 2 complex modes per channel
    init: str = "inv"
    discretisation: str = "zoh"
    dt_min: float = 1e-3
    dt_max: float = 0.1
    chunk_size: int = 64
    convolution: str = "chunked"  # "fft": one sequence per row, see the module docstring

    def validate(self, field: str) -> None:
        require_positive(self, field, "state_dim", "chunk_size")
        if self.state_dim % 2:
            raise ConfigError(f"{field}.state_dim", f"must be even (conjugate pairs), got {self.state_dim}")
        if self.init not in INITS:
            raise ConfigError(f"{field}.init", f"must be one of {INITS}, got {self.init!r}")
        if self.discretisation not in DISCRETISATIONS:
            raise ConfigError(f"{field}.discretisation", f"must be one of {DISCRETISATIONS}, got {self.discretisation!r}")
        if self.convolution not in CONVOLUTIONS:
            raise ConfigError(f"{field}.convolution", f"must be one of {CONVOLUTIONS}, got {self.convolution!r}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError(f"{field}.dt_min", f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")


def discretise(log_dt, log_a_real, a_imag, discretisation: str):
    """-> (log A_bar, B_bar), complex64 [H, N/2]."""
    a = -jnp.exp(log_a_real) + 1j * a_imag
    dt_a = jnp.exp(log_dt)[:, None] * a
    if discretisation == "zoh":
        return dt_a, (jnp.exp(dt_a) - 1.0) / a
    return jnp.log((1.0 + dt_a / 2) / (1.0 - dt_a / 2)), jnp.exp(log_dt)[:, None] / (1.0 - dt_a / 2)


def s4d_step(state, u, carry, *, log_a_bar, b_bar, c):
    """One token. state complex [B,H,N/2]; u [B,H] float32; carry [B]."""
    state = jnp.where(carry[:, None, None], jnp.exp(log_a_bar) * state, 0.0) + b_bar * u[..., None]
    return state, 2.0 * jnp.real(jnp.sum(c * state, axis=-1))


def convolution_kernel(length: int, *, log_a_bar, b_bar, c):
    """K_j = 2 Re(sum_n C_n B_bar_n A_bar_n^j) for j < length: the Vandermonde product, [length, H] float32."""
    powers = jnp.exp(jnp.arange(length, dtype=jnp.float32)[:, None, None] * log_a_bar)  # A_bar^j  [T,H,N/2]
    return 2.0 * jnp.real(jnp.einsum("hn,jhn->jh", c * b_bar, powers))


def s4d_chunked(u, segment_ids, state, last_segment, chunk_size: int, *, log_a_bar, b_bar, c):
    """u [B,T,H] float32; state complex [B,H,N/2]. Returns (y [B,T,H] without the D term, final state).

    A ragged tail runs as its own shorter chunk: padding is not free here (every step decays the state)."""
    length = u.shape[1]
    size = chunk_size_for(length, chunk_size)
    body = length - length % size
    if body < length:
        y, state = s4d_chunked(u[:, :body], segment_ids[:, :body], state, last_segment, size,
                               log_a_bar=log_a_bar, b_bar=b_bar, c=c)
        tail, state = s4d_chunked(u[:, body:], segment_ids[:, body:], state, segment_ids[:, body - 1], size,
                                  log_a_bar=log_a_bar, b_bar=b_bar, c=c)
        return jnp.concatenate([y, tail], axis=1), state

    u = chunk(u, size)  # [B,N,C,H]
    masks = chunk_masks(chunk(segment_ids, size), last_segment)
    lags = jnp.arange(size, dtype=jnp.float32)
    kernel = convolution_kernel(size, log_a_bar=log_a_bar, b_bar=b_bar, c=c)  # [C,H]
    gap = jnp.arange(size)[:, None] - jnp.arange(size)[None, :]
    toeplitz = kernel[jnp.clip(gap, 0)]  # [t,s,H]; s > t is removed by the mask
    y = jnp.einsum("tsh,bnts,bnsh->bnth", toeplitz, masks.same.astype(jnp.float32), u)

    to_end = jnp.exp((size - 1 - lags)[:, None, None] * log_a_bar) * b_bar  # [C,H,N/2]
    added = jnp.einsum("bns,bnsh,shk->bnhk", masks.to_last.astype(jnp.float32), u, to_end)
    survive = jnp.where(masks.keep[..., None, None], jnp.exp(size * log_a_bar), 0.0)  # [B,N,H,N/2]

    def pass_state(entering, xs):
        chunk_added, chunk_survive = xs
        return chunk_survive * entering + chunk_added, entering

    final, entering = jax.lax.scan(pass_state, state, (jnp.moveaxis(added, 1, 0), jnp.moveaxis(survive, 1, 0)))
    entering = jnp.moveaxis(entering, 0, 1)  # [B,N,H,N/2]
    read = jnp.exp((lags + 1)[:, None, None] * log_a_bar) * c  # C A_bar^(t+1)  [C,H,N/2]
    carried = 2.0 * jnp.real(jnp.einsum("thk,bnhk->bnth", read, entering))
    y = y + jnp.where(masks.from_prev[..., None], carried, 0.0)
    return unchunk(y, length), final


def s4d_fft(u, *, log_a_bar, b_bar, c):
    """u [B,T,H] float32 -> y [B,T,H] (without the D term): the causal convolution with the full-length kernel
    K_j = 2 Re(sum_n C_n B_bar_n A_bar_n^j), by FFT zero-padded to 2T (no wrap-around), from a zero state."""
    length = u.shape[1]
    size = 2 * length
    kernel = convolution_kernel(length, log_a_bar=log_a_bar, b_bar=b_bar, c=c)
    spectrum = jnp.fft.rfft(u, size, axis=1) * jnp.fft.rfft(kernel, size, axis=0)
    return jnp.fft.irfft(spectrum, size, axis=1)[:, :length]


def _log_dt_init(dt_min, dt_max):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, math.log(dt_min), math.log(dt_max))

    return init


def _a_imag_init(kind: str):
    def init(key, shape, dtype=jnp.float32):
        channels, modes = shape
        n = jnp.arange(modes, dtype=jnp.float32)
        state_dim = 2 * modes
        imag = math.pi * n if kind == "lin" else state_dim / math.pi * (state_dim / (2 * n + 1) - 1)
        return jnp.broadcast_to(imag, shape).astype(dtype)

    return init


class S4D(nn.Module):
    config: S4DConfig
    d_model: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    form: str = "chunked"

    @nn.compact
    def __call__(self, x, *, positions, segment_ids, cache=None):
        del positions
        c = self.config
        channels, modes = self.d_model, c.state_dim // 2
        pd = self.param_dtype
        log_dt = weight(self, "log_dt", (channels,), ("embed",), init=_log_dt_init(c.dt_min, c.dt_max), dtype=pd)
        log_a_real = weight(self, "log_a_real", (channels, modes), ("embed", "state"),
                            init=nn.initializers.constant(math.log(0.5)), dtype=pd)
        a_imag = weight(self, "a_imag", (channels, modes), ("embed", "state"), init=_a_imag_init(c.init), dtype=pd)
        c_parts = weight(self, "C", (channels, modes, 2), ("embed", "state", None),
                         init=nn.initializers.normal(math.sqrt(0.5)), dtype=pd)
        skip = weight(self, "D", (channels,), ("embed",), init=nn.initializers.normal(1.0), dtype=pd)
        f32 = lambda a: a.astype(jnp.float32)
        log_a_bar, b_bar = discretise(f32(log_dt), f32(log_a_real), f32(a_imag), c.discretisation)
        c_complex = f32(c_parts[..., 0]) + 1j * f32(c_parts[..., 1])

        u = x.astype(jnp.float32)
        if cache is None:
            state, last = jnp.zeros((x.shape[0], channels, modes), jnp.complex64), None
        else:
            state, last = jax.lax.complex(cache.state["h"][..., 0], cache.state["h"][..., 1]), cache.last_segment
        ssm = dict(log_a_bar=log_a_bar, b_bar=b_bar, c=c_complex)
        step = lambda s, u_t, carry: s4d_step(s, u_t, carry, **ssm)
        chunked = lambda u, seg, s, last, size: s4d_chunked(u, seg, s, last, size, **ssm)
        if c.convolution == "fft" and cache is None and self.form == "chunked":
            y = s4d_fft(u, **ssm)
        else:
            y, state = recur(self.form, step, chunked, (u,), segment_ids, state, last, c.chunk_size)
        y = jax.nn.gelu(y + f32(skip) * u, approximate=False).astype(self.dtype)

        out_proj = weight(self, "out_proj", (channels, 2, self.d_model), ("embed", None, None), dtype=pd)
        out_bias = weight(self, "out_bias", (2, self.d_model), (None, None), init=nn.initializers.zeros, dtype=pd)
        value, gate = jnp.moveaxis(jnp.einsum("bth,hgd->btgd", y, out_proj.astype(self.dtype)) + out_bias.astype(self.dtype), 2, 0)
        out = value * jax.nn.sigmoid(gate)
        if cache is not None:
            cache = cache.advance({"h": jnp.stack([jnp.real(state), jnp.imag(state)], axis=-1)}, {}, segment_ids)
        return out, cache

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        """The complex state as (real, imag) float32 pairs [B, d_model, state_dim/2, 2]."""
        del max_len
        modes = ((self.d_model, self.config.state_dim // 2, 2), ("embed", "state", None))
        return RecurrentCache.create(batch, state={"h": modes}, dtype=dtype)
