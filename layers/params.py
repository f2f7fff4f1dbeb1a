"""Parameter creation with logical axis names, and activation sharding constraints.

Every weight in zoo is created here so that each one carries logical axis names (DESIGN.md,
"Layers are pure functions"); the training issue maps those names to mesh axes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Truncated normal on [-2, 2] has this standard deviation; dividing by it restores unit variance.
_TRUNCATED_STD = 0.87962566103423978


def fan_in_init(fan_in_axes: int, scale: float = 1.0):
    """Truncated normal with variance scale / fan_in, fan_in = product of the leading axes."""

    def init(key, shape, dtype=jnp.float32):
        fan_in = math.prod(shape[:fan_in_axes])
        std = math.sqrt(scale / fan_in) / _TRUNCATED_STD
        return std * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)

    return init


def weight(
    module: nn.Module,
    name: str,
    shape: Sequence[int],
    axes: Sequence[str | None],
    *,
    fan_in_axes: int = 1,
    init=None,
    dtype=jnp.float32,
):
    """A named parameter with logical axes; the default init is fan-in scaled over `fan_in_axes`."""
    if len(shape) != len(axes):
        raise ValueError(f"{name}: shape {tuple(shape)} and axes {tuple(axes)} differ in rank")
    init = init if init is not None else fan_in_init(fan_in_axes)
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding by logical names (a no-op outside a mesh / rules context)."""
    return nn.with_logical_constraint(x, tuple(axes))
