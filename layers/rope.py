"""Rotary position embeddings (Su et al. 2021), rotate-half layout as in GPT-NeoX / Llama.

`rotary_dim < head_dim` rotates only the leading `rotary_dim` features (partial RoPE, as in
GPT-NeoX's rotary_pct); MLA's decoupled RoPE is this function applied to its separate rope part.

`RopeScaling` stretches the frequencies for contexts longer than pre-training, in the three forms that
Llama / Qwen2 / Mistral checkpoints name in their `rope_scaling`:
- "linear" (position interpolation, Chen et al. 2023): every frequency divided by `factor`;
- "llama3" (Llama 3.1): wavelengths longer than original_max_position / low_freq_factor divided by
  `factor`, shorter than original_max_position / high_freq_factor kept, a linear blend between;
- "yarn" (Peng et al. 2023): per-dimension blend of interpolated and original frequencies over the
  correction range set by beta_fast / beta_slow rotations, and cos / sin scaled by the attention factor
  (0.1 ln(factor) + 1 unless given), which scales the rotated features' logits by its square.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from zoo.errors import ConfigError

ROPE_SCALINGS = ("linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    kind: str  # one of ROPE_SCALINGS
    factor: float
    original_max_position: int | None = None  # llama3, yarn: the pre-training context
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn; None: 0.1 ln(factor) + 1
    truncate: bool = True  # yarn: round the correction range to whole dimensions

    def validate(self, field: str) -> None:
        if self.kind not in ROPE_SCALINGS:
            raise ConfigError(f"{field}.kind", f"must be one of {ROPE_SCALINGS}, got {self.kind!r}")
        if not self.factor > 0:
            raise ConfigError(f"{field}.factor", f"must be positive, got {self.factor}")
        if self.kind in ("llama3", "yarn") and not (self.original_max_position or 0) > 0:
            raise ConfigError(f"{field}.original_max_position", f"{self.kind} scaling needs the pre-training context")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ConfigError(f"{field}.high_freq_factor",
                              f"must exceed low_freq_factor={self.low_freq_factor}, got {self.high_freq_factor}")

    @classmethod
    def coerce(cls, value) -> "RopeScaling | None":
        """A RopeScaling from itself, None, or its dict (as JSON configs hold it)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            try:
                return cls(**value)
            except TypeError as e:
                raise ConfigError("rope_scaling", str(e)) from None
        raise ConfigError("rope_scaling", f"expected an object or null, got {type(value).__name__}")


def rope_inverse_frequencies(rotary_dim: int, base: float, scaling: RopeScaling | None = None) -> jax.Array:
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
    exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
    inv_freq = 1.0 / (base**exponents)
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "llama3":
        wavelength = 2 * math.pi / inv_freq
        context = scaling.original_max_position
        long_wave = wavelength > context / scaling.low_freq_factor
        short_wave = wavelength < context / scaling.high_freq_factor
        smooth = (context / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        return jnp.where(long_wave, inv_freq / scaling.factor, jnp.where(short_wave, inv_freq, blended))
    low, high = _yarn_correction_range(scaling, rotary_dim, base)
    ramp = jnp.clip((jnp.arange(rotary_dim // 2, dtype=jnp.float32) - low) / max(high - low, 1e-3), 0.0, 1.0)
    keep_original = 1.0 - ramp  # high frequencies (few rotations' wavelength) extrapolate unchanged
    return inv_freq / scaling.factor * (1.0 - keep_original) + inv_freq * keep_original


def _yarn_correction_range(scaling: RopeScaling, rotary_dim: int, base: float) -> tuple[float, float]:
    def dimension_of(rotations):
        return rotary_dim * math.log(scaling.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dimension_of(scaling.beta_fast), dimension_of(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, rotary_dim - 1)


def rope_attention_factor(scaling: RopeScaling | None) -> float:
    """The factor cos and sin are scaled by (1 except for YaRN)."""
    if scaling is None or scaling.kind != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    return 1.0 if scaling.factor <= 1 else 0.1 * math.log(scaling.factor) + 1.0


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float, rotary_dim: int | None = None,
               scaling: RopeScaling | None = None, frequencies=None) -> jax.Array:
    """Rotate x [B, T, heads, D] by positions [B, T]; features past `rotary_dim` pass through.

    `frequencies` (rotary_dim / 2 inverse frequencies, one per rotated pair) replaces the geometric
    series of `base`: a model converted to MLA keeps the frequencies its source's RoPE pairs had."""
    head_dim = x.shape[-1]
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    if not 0 < rotary_dim <= head_dim:
        raise ValueError(f"rotary_dim must be in (0, {head_dim}], got {rotary_dim}")
    if frequencies is None:
        inv_freq = rope_inverse_frequencies(rotary_dim, base, scaling)
    else:
        inv_freq = jnp.asarray(frequencies, jnp.float32)
        if inv_freq.shape != (rotary_dim // 2,):
            raise ValueError(f"{inv_freq.shape[0]} frequencies given for {rotary_dim} rotated features")
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    magnitude = rope_attention_factor(scaling)
    cos = (jnp.cos(angles) * magnitude)[:, :, None, :]
    sin = (jnp.sin(angles) * magnitude)[:, :, None, :]
    rot = x[..., :rotary_dim].astype(jnp.float32)
    first, second = jnp.split(rot, 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), x[..., rotary_dim:]], axis=-1)
