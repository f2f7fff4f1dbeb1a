"""mla_decode / latent_decode: one decode step of MLA's absorbed attention over a latent cache, with Pallas kernels.

    o_lat[b, h] = sum_s softmax_s(scale * (q_lat[b, h].c[b, s] + q_pe[b, h].k_pe[b, s])) c[b, s]

over the slots s < lengths[b]; the caller applies W_UV and W_O (zoo.layers.mla). latent_decode is the
layer's decode: TPLA's G latent shards, each attended with its own softmax (mla_decode on one shard) and
projected through its rows of W_UV, summed; under a mesh whose "tensor" axis splits the shards, each
device runs its shards and a psum over "tensor" is the all-reduce (G = 1 is MLA). Decode is never
differentiated, so there is no custom_vjp (DESIGN.md asks for one where training uses a kernel).
GPUs: gpu.py (split-K flash-decoding, splits combined here by their log-sum-exp). TPUs: no Mosaic kernel
yet; impl="auto" runs the XLA reference there and impl="pallas" says so.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from zoo.pallas_kernels import dispatch
from zoo.pallas_kernels.mla_decode import gpu
from zoo.pallas_kernels.mla_decode.reference import mla_decode_reference
from zoo.pallas_kernels.tiles import triton_width
from zoo.train.mesh import LOGICAL_RULES, logical_to_spec


def default_splits(batch: int, slots: int, block: int, target_programs: int = 264) -> int:
    """Enough splits that rows x splits reach ~2 per streaming multiprocessor of an H100 (132) when rows
    alone do not (each (row, split) is then H / head_block programs), without splits shorter than 8
    blocks."""
    return max(1, min(target_programs // max(batch, 1), slots // (8 * block)))


def mla_decode(q_lat, q_pe, c, k_pe, lengths, *, scale: float, impl: str = "auto", platform: str | None = None,
               block: int = 64, splits: int | None = None, head_block: int = 32):
    """q_lat [B, H, R], q_pe [B, H, P], c [B, S, R], k_pe [B, S, P], lengths [B] (slots 0 .. length-1 are
    attended; lengths are clipped to [0, S], and a row of length 0 gets a zero output). Returns the latent
    output [B, H, R], float32. The kernel reads the cache in place when S is a multiple of `block`
    (zoo.layers.mla allocates its caches so); otherwise it pads (a copy of the cache per call).

    block: cache slots per step of the walk (a power of two >= 16); splits: how many programs share a row's
    cache (default: default_splits); head_block: heads per program (all of them when fewer; defaults from
    the sweep in gpu.py)."""
    batch, heads, rank = q_lat.shape
    slots, rope = c.shape[1], k_pe.shape[-1]
    if q_pe.shape[:2] != (batch, heads) or c.shape != (batch, slots, rank) or k_pe.shape[:2] != (batch, slots) \
            or q_pe.shape[-1] != rope or lengths.shape != (batch,):
        raise ValueError("q_lat [B, H, R], q_pe [B, H, P], c [B, S, R], k_pe [B, S, P] and lengths [B] must agree: "
                         f"{q_lat.shape}, {q_pe.shape}, {c.shape}, {k_pe.shape}, {lengths.shape}")
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, slots)
    backend = dispatch.resolve(impl, platform)
    if backend.kind == "tpu" and impl != "auto":
        raise NotImplementedError("mla_decode has no Mosaic (TPU) kernel yet: use impl='xla' or 'auto' on TPUs")
    if backend.kind != "gpu":
        return mla_decode_reference(q_lat, q_pe, c, k_pe, lengths, scale=scale)
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two of at least 16 (Triton's matmul tiles), got {block}")
    blocks = -(-slots // block)
    split_len = -(-blocks // (splits or default_splits(batch, slots, block))) * block
    splits = -(-blocks * block // split_len)  # the last split may be short: the kernel stops at the length
    head_block = min(triton_width(heads), head_block)  # Triton's matmuls need >= 16 rows
    padded_heads = -(-heads // head_block) * head_block
    padded_slots = blocks * block
    pad = lambda x, axis, size: jnp.pad(x, [(0, size - n if i == axis else 0) for i, n in enumerate(x.shape)])  # noqa: E731
    dtype = c.dtype
    q_lat = pad(pad(q_lat.astype(dtype), 1, padded_heads), 2, triton_width(rank))
    q_pe = pad(pad(q_pe.astype(dtype), 1, padded_heads), 2, triton_width(rope))
    c = pad(pad(c, 1, padded_slots), 2, triton_width(rank))
    k_pe = pad(pad(k_pe.astype(dtype), 1, padded_slots), 2, triton_width(rope))
    partial, lse = gpu.mla_decode(q_lat, q_pe, c, k_pe, lengths, scale=scale, block=block, splits=splits,
                                  split_len=split_len, head_block=head_block, interpret=backend.interpret)
    weights = jax.nn.softmax(lse, axis=1)  # [B, splits, H]: each split's share of the softmax mass
    return jnp.einsum("bsh,bshr->bhr", weights, partial)[:, :heads, :rank]


def latent_decode(q_lat, q_pe, c, k_pe, lengths, v_up, *, scale: float, impl: str = "auto",
                  platform: str | None = None, **tiles):
    """q_lat [B, H, G, r], q_pe [B, H, P], c [B, S, G, r], k_pe [B, S, P], lengths [B], v_up [G, r, H, V]
    -> [B, H, V] float32: sum over shards g of mla_decode(shard g) @ v_up[g]. tiles: mla_decode's."""
    shards = q_lat.shape[2]

    def local(q_lat, c, v_up, q_pe, k_pe, lengths):
        out = 0.0
        for g in range(q_lat.shape[2]):
            o_lat = mla_decode(q_lat[:, :, g], q_pe, c[:, :, g], k_pe, lengths, scale=scale, impl=impl,
                               platform=platform, **tiles)
            out = out + jnp.einsum("bhr,rhv->bhv", o_lat, v_up[g].astype(jnp.float32))
        return out

    mesh = jax.sharding.get_abstract_mesh()
    tensor = 1 if mesh.empty else dict(zip(mesh.axis_names, mesh.axis_sizes)).get("tensor", 1)
    if tensor == 1 or shards % tensor:
        return local(q_lat, c, v_up, q_pe, k_pe, lengths)
    rows = logical_to_spec(("batch",), q_lat.shape[:1], mesh, nn.get_logical_axis_rules() or LOGICAL_RULES)[0]
    by_shard = P(rows, None, "tensor", None)
    return jax.shard_map(lambda *a: jax.lax.psum(local(*a), "tensor"), mesh=mesh, check_vma=False,
                         in_specs=(by_shard, by_shard, P("tensor"), P(rows), P(rows), P(rows)),
                         out_specs=P(rows))(q_lat, c, v_up, q_pe, k_pe, lengths)

