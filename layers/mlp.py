"""SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.layers.params import constrain, weight


class SwiGLU(nn.Module):
    hidden: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d_model = x.shape[-1]
        gate = weight(self, "gate", (d_model, self.hidden), ("embed", "mlp"), dtype=self.param_dtype)
        up = weight(self, "up", (d_model, self.hidden), ("embed", "mlp"), dtype=self.param_dtype)
        down = weight(self, "down", (self.hidden, d_model), ("mlp", "embed"), dtype=self.param_dtype)
        x = x.astype(self.dtype)
        h = nn.silu(x @ gate.astype(self.dtype)) * (x @ up.astype(self.dtype))
        h = constrain(h, ("batch", "length", "mlp"))
        return h @ down.astype(self.dtype)
