"""Matmuls on kernel tiles, shared by every Pallas kernel (Triton and Mosaic lower them alike): inputs keep
their dtype (bf16 on the fast paths), products accumulate in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32
# The score of a slot no query may see: finite, so a block or split with no visible slot gives weights
# exp(MASKED - max) = 0 rather than NaN.
MASKED = -1e30


def _dot_general(a, b, contract):
    # float32 operands stay float32 (not TF32) so the float32 kernels match the references to 1e-5.
    precision = jax.lax.Precision.HIGHEST if a.dtype == F32 else None
    return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=F32)


def dot(a, b):
    return _dot_general(a, b, ((1,), (0,)))


def dot_nt(a, b):
    """a @ b^T."""
    return _dot_general(a, b, ((1,), (1,)))


def dot_tn(a, b):
    """a^T @ b."""
    return _dot_general(a, b, ((0,), (0,)))


def where_visible(mask, x, fill):
    """x where mask holds, else fill; mask None means every element is visible (a block walked unmasked)."""
    return x if mask is None else jnp.where(mask, x, fill)


def triton_width(n: int) -> int:
    """The tile width Triton needs for n features or rows: a power of two of at least 16 (its bf16 matmuls
    need K >= 16; with K = 8 the compiled MLA decode kernel returned wrong scores on the H100)."""
    return 1 << max(n - 1, 15).bit_length()


def pad_axis(x, axis: int, size: int, value=0):
    """x padded with `value` at the end of `axis` to `size` (the tiles' lengths and widths)."""
    return jnp.pad(x, [(0, size - n if i == axis else 0) for i, n in enumerate(x.shape)], constant_values=value)
