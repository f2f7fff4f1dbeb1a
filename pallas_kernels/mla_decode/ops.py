"""mla_decode: one decode step of MLA's absorbed attention over a latent cache, with Pallas kernels.

    o_lat[b, h] = sum_s softmax_s(scale * (q_lat[b, h].c[b, s] + q_pe[b, h].k_pe[b, s])) c[b, s]

over the slots s < lengths[b]; the caller applies W_UV and W_O (zoo.layers.mla). Decode is never
differentiated, so there is no custom_vjp (DESIGN.md asks for one where training uses a kernel).
GPUs: gpu.py (split-K flash-decoding, splits combined here by their log-sum-exp). TPUs: no Mosaic kernel
yet; impl="auto" runs the XLA reference there and impl="pallas" says so.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zoo.pallas_kernels import dispatch
from zoo.pallas_kernels.mla_decode import gpu
from zoo.pallas_kernels.mla_decode.reference import mla_decode_reference


def _tile_width(n: int) -> int:
    """A power of two of at least 16: Triton's bf16 matmuls need K >= 16 (with K = 8 the compiled kernel
    returned wrong scores on the H100)."""
    return 1 << max(n - 1, 15).bit_length()


def default_splits(batch: int, slots: int, block: int, target_programs: int = 264) -> int:
    """Enough splits that rows x splits reach ~2 per streaming multiprocessor of an H100 (132) when rows
    alone do not (each (row, split) is then H / head_block programs), without splits shorter than 8
    blocks."""
    return max(1, min(target_programs // max(batch, 1), slots // (8 * block)))


def mla_decode(q_lat, q_pe, c, k_pe, lengths, *, scale: float, impl: str = "auto", platform: str | None = None,
               block: int = 64, splits: int | None = None, head_block: int = 32):
    """q_lat [B, H, R], q_pe [B, H, P], c [B, S, R], k_pe [B, S, P], lengths [B] (1 <= length <= S; slots
    0 .. length-1 are attended). Returns the latent output [B, H, R], float32.

    block: cache slots per step of the walk (a power of two >= 16); splits: how many programs share a row's
    cache (default: default_splits); head_block: heads per program (all of them when fewer; defaults from
    the sweep in gpu.py)."""
    batch, heads, rank = q_lat.shape
    slots, rope = c.shape[1], k_pe.shape[-1]
    if q_pe.shape[:2] != (batch, heads) or c.shape != (batch, slots, rank) or k_pe.shape[:2] != (batch, slots) \
            or q_pe.shape[-1] != rope or lengths.shape != (batch,):
        raise ValueError("q_lat [B, H, R], q_pe [B, H, P], c [B, S, R], k_pe [B, S, P] and lengths [B] must agree: "
                         f"{q_lat.shape}, {q_pe.shape}, {c.shape}, {k_pe.shape}, {lengths.shape}")
    backend = dispatch.resolve(impl, platform)
    if backend.kind == "tpu" and impl != "auto":
        raise NotImplementedError("mla_decode has no Mosaic (TPU) kernel yet: use impl='xla' or 'auto' on TPUs")
    if backend.kind != "gpu":
        return mla_decode_reference(q_lat, q_pe, c, k_pe, lengths, scale=scale)
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two of at least 16 (Triton's matmul tiles), got {block}")
    splits = splits or default_splits(batch, slots, block)
    head_block = min(_tile_width(heads), head_block)  # Triton's matmuls need >= 16 rows
    padded_heads = -(-heads // head_block) * head_block
    padded_slots = -(-slots // (block * splits)) * block * splits
    pad = lambda x, axis, size: jnp.pad(x, [(0, size - n if i == axis else 0) for i, n in enumerate(x.shape)])  # noqa: E731
    dtype = c.dtype
    q_lat = pad(pad(q_lat.astype(dtype), 1, padded_heads), 2, _tile_width(rank))
    q_pe = pad(pad(q_pe.astype(dtype), 1, padded_heads), 2, _tile_width(rope))
    c = pad(pad(c, 1, padded_slots), 2, _tile_width(rank))
    k_pe = pad(pad(k_pe.astype(dtype), 1, padded_slots), 2, _tile_width(rope))
    partial, lse = gpu.mla_decode(q_lat, q_pe, c, k_pe, lengths.astype(jnp.int32), scale=scale, block=block,
                                  splits=splits, head_block=head_block, interpret=backend.interpret)
    weights = jax.nn.softmax(lse, axis=1)  # [B, splits, H]: each split's share of the softmax mass
    return jnp.einsum("bsh,bshr->bhr", weights, partial)[:, :heads, :rank]
