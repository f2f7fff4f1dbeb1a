"""Pallas attention kernels against their references: MLA absorbed decode (interpret mode on CPU; the
compiled kernel where the tests run on a GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inputs import impl_for
from reference import TOLERANCE, relative_error
from zoo.pallas_kernels.mla_decode import mla_decode
from zoo.pallas_kernels.mla_decode.ops import default_splits
from zoo.pallas_kernels.mla_decode.reference import mla_decode_reference

BLOCK = 16


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mla_decode_matches_reference(rng, dtype, splits):
    """Ragged rows (one slot, all slots, random), a cache length that is not a multiple of the block or
    the splits (so rows end inside blocks and splits, and some splits of short rows are empty), head
    count and latent / RoPE widths that need padding."""
    batch, heads = 4, int(rng.choice([2, 5]))
    rank, rope, slots = int(rng.choice([24, 32])), int(rng.choice([8, 16])), int(rng.integers(70, 140))
    lengths = np.concatenate([[1, slots], rng.integers(1, slots + 1, batch - 2)]).astype(np.int32)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32).astype(dtype)

    q_lat, q_pe, c, k_pe = normal(batch, heads, rank), normal(batch, heads, rope), normal(batch, slots, rank), \
        normal(batch, slots, rope)
    scale = (rank + rope) ** -0.5
    run = jax.jit(lambda *a: mla_decode(*a, scale=scale, impl=impl_for("gpu"), platform="gpu", block=BLOCK,
                                        splits=splits))
    out = run(q_lat, q_pe, c, k_pe, jnp.asarray(lengths))
    with jax.default_matmul_precision("float32"):
        expected = mla_decode_reference(q_lat, q_pe, c, k_pe, jnp.asarray(lengths), scale=scale)
    assert out.shape == (batch, heads, rank) and out.dtype == jnp.float32
    # bf16: the kernel's probabilities enter the value matmul in bf16, as the XLA layer's do.
    assert relative_error(out, expected) < TOLERANCE[dtype]
    # A row of length 1 attends to its only slot: its output is that slot's latent.
    np.testing.assert_allclose(np.asarray(out[0]), np.broadcast_to(np.asarray(c[0, 0], np.float32), (heads, rank)),
                               rtol=1e-6, atol=1e-6)


def test_mla_decode_rejects_mismatched_shapes():
    q = jnp.zeros((2, 4, 32))
    with pytest.raises(ValueError, match="must agree"):
        mla_decode(q, jnp.zeros((2, 4, 16)), jnp.zeros((2, 64, 32)), jnp.zeros((2, 64, 16)), jnp.ones((3,), jnp.int32),
                   scale=1.0)


def test_default_splits_fill_the_gpu_without_tiny_splits():
    assert default_splits(batch=128, slots=8192, block=64) == 2
    assert default_splits(batch=1, slots=32768, block=64) == 64  # 32768 / (8 * 64) = 64 < 264
    assert default_splits(batch=4, slots=256, block=64) == 1


def test_mla_decode_rejects_a_block_triton_cannot_tile():
    args = (jnp.zeros((1, 2, 32)), jnp.zeros((1, 2, 16)), jnp.zeros((1, 64, 32)), jnp.zeros((1, 64, 16)),
            jnp.ones((1,), jnp.int32))
    with pytest.raises(ValueError, match="power of two"):
        mla_decode(*args, scale=1.0, impl="interpret", platform="gpu", block=24)
