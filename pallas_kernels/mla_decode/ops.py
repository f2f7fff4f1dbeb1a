"""mla_decode / latent_decode: one decode step of MLA's absorbed attention over a latent cache, with Pallas kernels.

    o_lat[b, h] = sum_s softmax_s(scale * (q_lat[b, h].c[b, s] + q_pe[b, h].k_pe[b, s])) c[b, s]

over the slots s < lengths[b]; the caller applies W_UV and W_O (zoo.layers.mla). latent_decode is the
layer's decode: TPLA's G latent shards, each attended with its own softmax (mla_decode on one shard) and
projected through its rows of W_UV, summed; under a mesh whose "tensor" axis splits the shards, each
device runs its shards and a psum over "tensor" is the all-reduce (G = 1 is MLA). Decode is never
differentiated, so there is no custom_vjp (DESIGN.md asks for one where training uses a kernel).
Both kernels read a paged cache (a page pool and a block table); a contiguous cache is handed to them as
a pool whose pages each row owns in order. GPUs: hopper.py (Mosaic GPU, wgmma; sm90, 64 heads a program)
where it applies, else gpu.py (Triton; both split-K flash-decoding); TPUs: tpu.py (a row's heads together,
page by page); splits are combined here by their log-sum-exp.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from zoo.pallas_kernels import dispatch, mosaic_gpu
from zoo.pallas_kernels.mla_decode import gpu, hopper, tpu
from zoo.pallas_kernels.mla_decode.reference import mla_decode_reference
from zoo.pallas_kernels.splits import combine_splits, default_splits
from zoo.pallas_kernels.tiles import pad_axis, triton_width
from zoo.train.mesh import LOGICAL_RULES, logical_to_spec


def paged_to_contiguous(pool, block_table):
    """A page pool [N, page, ...] read through block_table [B, M] -> each row's slots [B, M * page, ...]."""
    pages = pool[jnp.clip(block_table, 0, pool.shape[0] - 1)]
    return pages.reshape(block_table.shape[0], -1, *pool.shape[2:])


def mla_decode(q_lat, q_pe, c, k_pe, lengths, *, scale: float, block_table=None, impl: str = "auto",
               platform: str | None = None, block: int = 64, splits: int | None = None, head_block: int = 32):
    """q_lat [B, H, R], q_pe [B, H, P] and lengths [B] (slots 0 .. length-1 are attended; lengths are clipped
    to the row's slots, and a row of length 0 gets a zero output), over either cache layout:
    - contiguous: c [B, S, R], k_pe [B, S, P]. The kernel reads it in place when S is a multiple of `block`
      (zoo.layers.mla allocates its caches so); otherwise it pads (a copy of the cache per call).
    - paged (block_table given): a pool of N pages c [N, page, R], k_pe [N, page, P] and block_table [B, M]
      int32, row b's slots [i * page, (i + 1) * page) living in page block_table[b, i]; the page size is the
      kernel's block. Table entries past a row's length are never read; entries outside [0, N) are clamped.
    Returns the latent output [B, H, R], float32.

    block: slots per step of the walk (a power of two >= 16 on GPUs, a multiple of 8 on TPUs); splits: how
    many programs share a row's slots (default: hopper.default_splits for the Mosaic GPU kernel,
    default_splits for Triton's, 1 on TPUs); head_block: heads per
    Triton program (all of them when fewer; defaults from the sweep in gpu.py). platform: None (the one JAX
    runs on; on an sm90 GPU the Mosaic GPU kernel where hopper.supports the shapes, else Triton), "gpu"
    (Triton), "mosaic_gpu" (an error where it does not apply) or "tpu"."""
    batch, heads, rank = q_lat.shape
    rope = k_pe.shape[-1]
    paged = block_table is not None
    if paged:
        pages, block = c.shape[:2]
        layout_ok = (c.ndim == 3 and k_pe.shape[:2] == (pages, block) and block_table.ndim == 2
                     and block_table.shape[0] == batch)
        slots = block_table.shape[1] * block if block_table.ndim == 2 else 0
    else:
        slots = c.shape[1]
        layout_ok = c.shape[0] == batch and k_pe.shape[:2] == (batch, slots)
    if not layout_ok or c.shape[-1] != rank or q_pe.shape != (batch, heads, rope) or lengths.shape != (batch,):
        raise ValueError("q_lat [B, H, R], q_pe [B, H, P], lengths [B] and a cache c [B, S, R], k_pe [B, S, P] "
                         "(or pools c [N, page, R], k_pe [N, page, P] with block_table [B, M]) must agree: "
                         f"{q_lat.shape}, {q_pe.shape}, {c.shape}, {k_pe.shape}, {lengths.shape}"
                         + (f", block_table {block_table.shape}" if paged else ""))
    lengths = lengths.astype(jnp.int32)
    backend = dispatch.resolve(impl, "gpu" if platform == "mosaic_gpu" else platform)
    if backend.kind == "xla":
        if paged:
            c, k_pe = paged_to_contiguous(c, block_table), paged_to_contiguous(k_pe, block_table)
        return mla_decode_reference(q_lat, q_pe, c, k_pe, jnp.clip(lengths, 0, slots), scale=scale)
    what = "page size" if paged else "block"
    if backend.kind == "gpu" and (block < 16 or block & (block - 1)):
        raise ValueError(f"the {what} must be a power of two of at least 16 (Triton's matmul tiles), got {block}")
    if backend.kind == "tpu" and block % 8:
        raise ValueError(f"the {what} must be a multiple of 8 (Mosaic's sublanes), got {block}")
    dtype = c.dtype
    on_hopper = (backend.kind == "gpu"
                 and gpu_kernel(heads, rank, rope, block, dtype, platform, backend.interpret) == "mosaic_gpu")
    blocks = block_table.shape[1] if paged else -(-slots // block)
    if not paged:  # a contiguous cache is a pool of B * S / block pages, row b owning its own in order
        c = pad_axis(c, 1, blocks * block).reshape(batch * blocks, block, rank)
        k_pe = pad_axis(k_pe, 1, blocks * block).reshape(batch * blocks, block, rope)
    q_lat, q_pe, k_pe = q_lat.astype(dtype), q_pe.astype(dtype), k_pe.astype(dtype)
    if on_hopper:  # clips lengths and table entries itself, and addresses a contiguous pool without a table
        splits, split_len = split_walk(batch, heads, rank, rope, blocks, block, splits, "mosaic_gpu")
        partial, lse = hopper.mla_decode(q_lat, q_pe, c, k_pe, lengths,
                                         block_table.astype(jnp.int32) if paged else None, scale=scale,
                                         splits=splits, split_len=split_len, interpret=backend.interpret)
        return combine_splits(partial, lse)
    lengths = jnp.clip(lengths, 0, slots)  # the Triton and TPU kernels take them clipped
    if paged:
        block_table = jnp.clip(block_table.astype(jnp.int32), 0, c.shape[0] - 1)
    else:
        block_table = (jnp.arange(batch, dtype=jnp.int32)[:, None] * blocks
                       + jnp.arange(blocks, dtype=jnp.int32)[None, :])
    if backend.kind == "tpu":  # one program per row reads each page once: splits only feed a second core
        partial, lse = tpu.mla_decode(q_lat, q_pe, c, k_pe, lengths, block_table, scale=scale, splits=splits or 1,
                                      interpret=backend.interpret)
        return combine_splits(partial, lse)
    splits, split_len = split_walk(batch, heads, rank, rope, blocks, block, splits, "gpu")
    head_block = min(triton_width(heads), head_block)  # Triton's matmuls need >= 16 rows
    padded_heads = -(-heads // head_block) * head_block
    partial, lse = gpu.mla_decode(
        pad_axis(pad_axis(q_lat, 1, padded_heads), 2, triton_width(rank)),
        pad_axis(pad_axis(q_pe, 1, padded_heads), 2, triton_width(rope)),
        pad_axis(c.reshape(-1, rank), 1, triton_width(rank)), pad_axis(k_pe.reshape(-1, rope), 1, triton_width(rope)),
        lengths, block_table, scale=scale, block=block, splits=splits, split_len=split_len, head_block=head_block,
        interpret=backend.interpret)
    return combine_splits(partial, lse)[:, :heads, :rank]


def split_walk(batch, heads, rank, rope, blocks, block, splits, kernel):
    """(splits, slots a split walks) that a GPU kernel ("mosaic_gpu" or "gpu", as gpu_kernel names them) runs
    for rows of `blocks` blocks, asked for `splits` (None: hopper.default_splits for the Mosaic GPU kernel,
    default_splits for Triton's). Whole blocks a split, so there may be fewer splits than asked; the last may
    be short (the kernels stop at the length)."""
    if splits is None:
        splits = (hopper.default_splits(batch, heads, blocks * block, rank, rope) if kernel == "mosaic_gpu"
                  else default_splits(batch, blocks * block, block))
    split_len = -(-blocks // splits) * block
    return -(-blocks * block // split_len), split_len


def gpu_kernel(heads, rank, rope, block, dtype, platform: str | None = None, interpret: bool = False) -> str:
    """Which GPU kernel mla_decode runs for these shapes: "mosaic_gpu" (hopper.py) on an sm90 GPU where it
    applies or when asked for (an error where it cannot run), else "gpu" (Triton)."""
    refusal = hopper.supports(heads, rank, rope, block, dtype)
    return mosaic_gpu.pick("MLA decode kernel", platform, refusal, interpret)


def latent_decode(q_lat, q_pe, c, k_pe, lengths, v_up, *, scale: float, block_table=None, impl: str = "auto",
                  platform: str | None = None, **tiles):
    """q_lat [B, H, G, r], q_pe [B, H, P], c [B, S, G, r], k_pe [B, S, P], lengths [B], v_up [G, r, H, V]
    -> [B, H, V] float32: sum over shards g of mla_decode(shard g) @ v_up[g]. With block_table [B, M] the
    cache is a page pool, c [N, page, G, r] and k_pe [N, page, P] (see mla_decode). tiles: mla_decode's."""
    shards = q_lat.shape[2]

    def local(q_lat, c, v_up, q_pe, k_pe, lengths, block_table):
        out = 0.0
        for g in range(q_lat.shape[2]):
            o_lat = mla_decode(q_lat[:, :, g], q_pe, c[:, :, g], k_pe, lengths, scale=scale,
                               block_table=block_table, impl=impl, platform=platform, **tiles)
            out = out + jnp.einsum("bhr,rhv->bhv", o_lat, v_up[g].astype(jnp.float32))
        return out

    args = (q_lat, c, v_up, q_pe, k_pe, lengths, block_table)
    mesh = jax.sharding.get_abstract_mesh()
    tensor = 1 if mesh.empty else dict(zip(mesh.axis_names, mesh.axis_sizes)).get("tensor", 1)
    if tensor == 1 or shards % tensor:
        return local(*args)
    rows = logical_to_spec(("batch",), q_lat.shape[:1], mesh, nn.get_logical_axis_rules() or LOGICAL_RULES)[0]
    cache_rows = None if block_table is not None else rows  # a page pool is shared by all rows
    specs = (P(rows, None, "tensor", None), P(cache_rows, None, "tensor", None), P("tensor"), P(rows),
             P(cache_rows), P(rows), None if block_table is None else P(rows))
    return jax.shard_map(lambda *a: jax.lax.psum(local(*a), "tensor"), mesh=mesh, check_vma=False,
                         in_specs=specs, out_specs=P(rows))(*args)
